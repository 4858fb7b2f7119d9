"""What the two generative digits studies (ImageGPT in `run.py`, MaskGIT in `../maskgit_digits/run.py`) share.

* **Command line**: `study_parser` holds every option both studies have (run, data, pretraining, transfer, sampling
  and the instrument); a study adds its generator's options to the returned groups and sets its own defaults;
  `parse_study_args` applies `--quick` and `--config` and checks the shared options.
* **Tokens**: scikit-learn's 1797 digits (8x8, intensities 0..16) quantised into K levels `floor(v · K / 17)`;
  an image is 64 tokens in raster order (`[N, 64]`, or an 8x8 grid for MaskGIT).
* **Split**: a stratified split of the 5-9 digits, fixed by `--split_seed`.
* **Pretraining** (`pretrain_generator`): unconditional, on 90 % of digits 0-4, cached by
  `examples/digits_transfer/pretrain_cache.cached_pretraining` under a hash of the study's settings.
* **Adaptation** (`adapt`): the class-conditional prompt generator alone, or with every weight (full fine-tuning).
* **The measuring instrument**: an MLP classifier trained in the run on the real 5-9 training half; class fidelity
  of samples and the Fréchet distance between its penultimate features of samples and of the held-out half
  (`hf_vpt.metrics.inception.frechet_distance`, the repository's one Fréchet distance).
* **Training**: `fit` runs the recipes' shared loop `recipes/_common.train_loop` with a prepared model, optimiser and
  loader and transformers' warm-up + cosine schedule.
* **The run** (`run_study`): seeds x methods, the tables, PNG sample grids (rows = classes 5-9) and results.json; a
  `GenerativeStudy` subclass supplies the generator, its loss, its likelihood measures and its sampler.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import get_cosine_schedule_with_warmup

from hf_vpt.metrics import inception


_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(_HERE, os.pardir, os.pardir, "recipes")))
sys.path.append(os.path.normpath(os.path.join(_HERE, os.pardir, "digits_transfer")))
import _common  # noqa: E402
from pretrain_cache import cached_pretraining  # noqa: E402


PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TRANSFER_CLASSES = (5, 6, 7, 8, 9)
NUM_PIXELS = 64  # 8 x 8
SIDE = 8
METHODS = ("no_adaptation", "generative_prompt", "full_finetune")
METHOD_TITLES = {
    "no_adaptation": "no adaptation (frozen 0-4 generator, unconditional)",
    "generative_prompt": "generative prompt tuning",
    "full_finetune": "full fine-tuning (+ same prompt generator)",
    "real": "real digits (held-out half)",
}
GRID_TITLES = {
    "real": "real (held-out)",
    "no_adaptation": "no adaptation",
    "generative_prompt": "prompt tuning",
    "full_finetune": "full fine-tuning",
}


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def study_parser(description: str, generator_title: str, quick_defaults: dict):
    """The options both studies share, in groups; returns `(parser, groups)` (keys run, data, generator, transfer,
    sampling). The study adds its generator's own options to the groups, then `parser.set_defaults(...)` its own
    defaults: the values below that are study-specific (epochs, prompt length, learning rates, ...) are placeholders
    until then."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bool_flag = argparse.BooleanOptionalAction
    parser.add_argument("--config", default=None, help="YAML file whose keys override these defaults.")
    parser.add_argument("--quick", action="store_true", help=f"Small settings for a smoke test: {quick_defaults}.")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default=None)
    run.add_argument(
        "--methods", default=",".join(METHODS), help=f"Comma-separated, from {METHODS} (no_adaptation always runs)."
    )
    run.add_argument("--seed", type=int, default=0, help="First seed; the runs use seed, seed+1, ...")
    run.add_argument("--num_seeds", type=int, default=3)
    run.add_argument("--seeds", default=None, help="Comma-separated seeds; overrides --seed / --num_seeds.")
    run.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    run.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's own).")
    run.add_argument("--progress", action=bool_flag, default=True, help="tqdm bars (main process only).")

    data = parser.add_argument_group("data")
    data.add_argument("--num_levels", type=int, default=4, help="Intensity levels (the generator's codebook).")
    data.add_argument("--transfer_train_fraction", type=float, default=0.5, help="Share of 5-9 digits to train on.")
    data.add_argument("--split_seed", type=int, default=0, help="Fixes the 5-9 split and the classifier.")

    generator = parser.add_argument_group(f"pretrained generator ({generator_title} on digits 0-4, cached)")
    generator.add_argument("--cache_dir", default=os.path.join("~", ".cache", "hf_vpt"))
    generator.add_argument("--pretrain_epochs", type=int, default=30)
    generator.add_argument("--pretrain_batch_size", type=int, default=64)
    generator.add_argument("--pretrain_lr", type=float, default=3e-3)
    generator.add_argument("--pretrain_seed", type=int, default=0)

    transfer = parser.add_argument_group("transfer to 5-9")
    transfer.add_argument("--epochs", type=int, default=20)
    transfer.add_argument("--batch_size", type=int, default=32, help="Per device.")
    transfer.add_argument("--warmup_fraction", type=float, default=0.05)
    transfer.add_argument("--num_prompt_tokens", type=int, default=32, help="Prompt length (the paper: 32).")
    transfer.add_argument(
        "--prompt_dropout",
        type=float,
        default=0.0,
        help="Dropout on the prompts (the paper: 0.1; lower here, measured).",
    )
    transfer.add_argument("--prompt_lr", type=float, default=1e-2, help="AdamW lr of the prompt generator.")
    transfer.add_argument("--full_lr", type=float, default=1e-3, help="AdamW lr of the generator's weights (full).")
    transfer.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay of the weights (full).")

    sampling = parser.add_argument_group("sampling and evaluation")
    sampling.add_argument("--samples_per_class", type=int, default=40, help="Samples per class for the metrics.")
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument(
        "--guidance_scales", default="2", help="Comma-separated prompt-guidance scales for extra rows ('' for none)."
    )
    sampling.add_argument("--grid_columns", type=int, default=10, help="Samples per class in the PNG grids.")
    sampling.add_argument("--classifier_epochs", type=int, default=150)
    sampling.add_argument("--classifier_hidden", type=int, default=128)
    sampling.add_argument("--feature_dim", type=int, default=32, help="Width of the penultimate (feature) layer.")
    groups = {"run": run, "data": data, "generator": generator, "transfer": transfer, "sampling": sampling}
    return parser, groups


def number_list(parser, name: str, value, kind=int) -> list:
    """`"4,8,16"` -> `[4, 8, 16]` (`kind` int or float); a bad item is a parser error naming the option."""
    try:
        return [kind(v) for v in str(value or "").split(",") if v.strip()]
    except ValueError:
        what, example = ("integers", "4,8,16") if kind is int else ("numbers", "1.5,3")
        parser.error(f"--{name} takes comma-separated {what}, e.g. {example}; got {value!r}.")


def parse_study_args(parser, argv, script: str, quick_defaults: dict, prompt_sampling: tuple[str, ...] = ()):
    """Parse (`--quick` defaults, then the `--config` file, then explicit options) and check the shared options.

    `prompt_sampling` names the study's own options that, like `--guidance_scales`, sample the prompt-tuned
    generator (they need `generative_prompt` in `--methods` unless empty).
    """
    known, _ = parser.parse_known_args(argv)
    if known.quick:
        parser.set_defaults(**quick_defaults)
    args = _common.parse_args_with_config(parser, argv, script)
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"unknown methods {bad}; choose from {METHODS}.")
    args.methods = ["no_adaptation", *[m for m in METHODS[1:] if m in methods]]
    if args.seeds:
        args.seeds = number_list(parser, "seeds", args.seeds)
    else:
        if args.num_seeds < 1:
            parser.error(f"--num_seeds must be at least 1; got {args.num_seeds}.")
        args.seeds = [args.seed + i for i in range(args.num_seeds)]
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"the seeds must be distinct and at least one; got {args.seeds}.")
    args.guidance_scales = number_list(parser, "guidance_scales", args.guidance_scales, float)
    needing = [name for name in ("guidance_scales", *prompt_sampling) if getattr(args, name)]
    if needing and "generative_prompt" not in args.methods:
        options = " and ".join(f"--{name}" for name in needing)
        empty = " ".join(f"--{name} ''" for name in needing)
        parser.error(
            f"{options} sample the prompt-tuned generator: keep generative_prompt in --methods (or pass {empty})."
        )
    if not 2 <= args.num_levels <= 17:
        parser.error(f"--num_levels must be in [2, 17] (the digits have 17 intensities); got {args.num_levels}.")
    if not 0.0 < args.transfer_train_fraction < 1.0:
        parser.error(f"--transfer_train_fraction must be in (0, 1); got {args.transfer_train_fraction}.")
    if args.samples_per_class < 2 or args.grid_columns < 1:
        parser.error("--samples_per_class must be at least 2 (a covariance needs two) and --grid_columns positive.")
    args.grid_columns = min(args.grid_columns, args.samples_per_class)
    args.cache_dir = os.path.expanduser(args.cache_dir)
    return args


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
def load_digit_tokens(num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as `[N, 64]` intensity levels `floor(v · K / 17)` in `[0, K)`, raster order, and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    values = torch.tensor(digits.images, dtype=torch.long).reshape(-1, NUM_PIXELS)  # 0 .. 16
    return values * num_levels // 17, torch.tensor(digits.target, dtype=torch.long)


def tokens_to_pixels(tokens: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Levels `[N, 64]` (or `[N, 8, 8]`) -> `[N, 64]` intensities in [0, 1] (classifier input, grid grey values)."""
    return tokens.reshape(tokens.shape[0], NUM_PIXELS).float() / (num_levels - 1)


def stratified_split(labels: torch.Tensor, classes, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the digits of `classes`: `fraction` of each class first, the rest second (fixed by `seed`)."""
    from sklearn.model_selection import train_test_split

    indices = np.flatnonzero(np.isin(labels.numpy(), classes))
    first, second = train_test_split(indices, train_size=fraction, stratify=labels.numpy()[indices], random_state=seed)
    return np.sort(first), np.sort(second)


def class_order(class_ids: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of the first `per_class` examples of each class, class by class."""
    return torch.cat([torch.nonzero(class_ids == c).flatten()[:per_class] for c in range(len(TRANSFER_CLASSES))])


# ---------------------------------------------------------------------------------------------------------------
# training through the recipes' loop
# ---------------------------------------------------------------------------------------------------------------
def loop_args(max_train_steps: int, progress: bool, output_dir: str = ".") -> SimpleNamespace:
    """The options `_common.train_loop` reads: no checkpoints, no evaluation, no resume, no clipping."""
    return SimpleNamespace(
        output_dir=output_dir,
        max_train_steps=max_train_steps,
        stop_after_steps=None,
        gradient_accumulation_steps=1,
        max_grad_norm=None,
        logging_steps=max(1, max_train_steps // 20),
        checkpointing_steps=None,
        checkpoints_total_limit=None,
        eval_steps=None,
        resume_from_checkpoint=None,
        progress=progress,
    )


class _EpochLoader:
    """A plain `DataLoader` with the `set_epoch` that `train_loop` calls (its order comes from its own generator)."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def fit(accelerator, model, optimizer, loader, loss_fn, *, epochs: int, warmup_fraction: float, progress: bool):
    """`epochs` of `loss_fn(batch)` through `_common.train_loop`, with transformers' linear warm-up + cosine decay.

    Returns the prepared model, the wall-clock seconds and the mean loss of the last epoch. A non-finite loss stops
    the run with a message saying what to change.
    """
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps = epochs * max(1, math.ceil(len(loader) / accelerator.gradient_accumulation_steps))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(warmup_fraction * steps)), steps)
    losses: list[float] = []

    def checked_loss(batch):
        loss = loss_fn(model, batch)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"the training loss became {losses[-1]}; lower the learning rate.")
        return loss

    start = time.perf_counter()
    _common.train_loop(accelerator, loop_args(steps, progress), model, optimizer, scheduler, loader, checked_loss)
    seconds = time.perf_counter() - start
    return model, seconds, float(np.mean(losses[-len(loader) :]))


# ---------------------------------------------------------------------------------------------------------------
# the measuring instrument: a digits classifier and Fréchet distances in its feature space
# ---------------------------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """MLP `64 -> hidden -> feature_dim -> 5`. The features of the Fréchet distance are the `feature_dim`
    pre-activations of the penultimate layer (before its ReLU, so no feature is constant at 0)."""

    def __init__(self, hidden: int, feature_dim: int, num_classes: int = len(TRANSFER_CLASSES)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(NUM_PIXELS, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, feature_dim)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


def train_classifier(accelerator, args, pixels: torch.Tensor, class_ids: torch.Tensor):
    """AdamW on the real 5-9 training half, with small random shifts of the 8x8 images; returns (model, seconds).

    Every process trains the same classifier on all the data (the loader is not sharded), so the instrument does not
    depend on the number of processes.
    """
    start = time.perf_counter()
    torch.manual_seed(args.split_seed)
    model = DigitsClassifier(args.classifier_hidden, args.feature_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(args.split_seed)  # the order and the shifts
    loader = DataLoader(TensorDataset(pixels, class_ids), batch_size=64, shuffle=True, generator=generator)
    steps = args.classifier_epochs * len(loader)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, steps)

    def loss_fn(batch):
        images, labels = batch
        return F.cross_entropy(model(shift_one_pixel(images, generator)), labels)

    quiet = loop_args(steps, progress=False)
    _common.train_loop(accelerator, quiet, model, optimizer, scheduler, _EpochLoader(loader), loss_fn)
    return model.eval(), time.perf_counter() - start


def shift_one_pixel(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each 8x8 image moved by -1, 0 or +1 pixel along each axis (zeros come in): cheap augmentation."""
    images = pixels.view(-1, 1, SIDE, SIDE)
    padded = F.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (images.shape[0], 2), generator=generator)
    shifted = torch.stack([padded[i, :, dy : dy + 8, dx : dx + 8] for i, (dy, dx) in enumerate(offsets.tolist())])
    return shifted.view(pixels.shape)


@torch.no_grad()
def classify(classifier: DigitsClassifier, pixels: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(predicted class ids, float64 features `[N, feature_dim]`)."""
    features = classifier.features(pixels)
    return classifier.head(features).argmax(dim=-1), features.double().numpy()


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two `[N, F]` feature sets (`hf_vpt.metrics.inception`)."""
    stats_a = inception.feature_statistics(torch.as_tensor(np.asarray(features_a), dtype=torch.float64))
    stats_b = inception.feature_statistics(torch.as_tensor(np.asarray(features_b), dtype=torch.float64))
    return inception.frechet_distance(*stats_a, *stats_b)


def sample_metrics(classifier, tokens: torch.Tensor, num_levels: int, real_features: np.ndarray, per_class: int):
    """Class fidelity (mean over classes, and per class) and the Fréchet distance to the held-out real features."""
    predictions, features = classify(classifier, tokens_to_pixels(tokens, num_levels))
    targets = torch.arange(len(TRANSFER_CLASSES)).repeat_interleave(per_class)
    per_class_fidelity = [float((predictions[targets == c] == c).float().mean()) for c in range(len(TRANSFER_CLASSES))]
    return {
        "class_fidelity": float(np.mean(per_class_fidelity)),
        "class_fidelity_per_class": dict(zip([str(c) for c in TRANSFER_CLASSES], per_class_fidelity)),
        "frechet_distance": frechet_distance(features, real_features),
    }


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------
def grid_image(tokens: torch.Tensor, num_levels: int, per_class: int, columns: int, scale: int = 4):
    """A uint8 grey grid: one row per class 5-9, the first `columns` samples of each class, 1 px gaps."""
    cell = SIDE * scale + 1
    rows = len(TRANSFER_CLASSES)
    grid = np.full((rows * cell + 1, columns * cell + 1), 96, dtype=np.uint8)
    pixels = (tokens_to_pixels(tokens, num_levels).view(-1, SIDE, SIDE).numpy() * 255).round().astype(np.uint8)
    for row in range(rows):
        for column in range(columns):
            image = np.kron(pixels[row * per_class + column], np.ones((scale, scale), dtype=np.uint8))
            top, left = row * cell + 1, column * cell + 1
            grid[top : top + SIDE * scale, left : left + SIDE * scale] = image
    return grid


def save_grids(output_dir: str, grids: dict[str, np.ndarray], titles: dict[str, str]) -> list[str]:
    """`samples_<name>.png` per grid, and `samples.png` with every grid side by side under its title."""
    from PIL import Image, ImageDraw

    paths = []
    for name, grid in grids.items():
        path = os.path.join(output_dir, f"samples_{name}.png")
        Image.fromarray(grid).save(path)
        paths.append(path)
    header, gap, label_width = 16, 12, 14
    height = header + max(grid.shape[0] for grid in grids.values())
    width = label_width + sum(grid.shape[1] + gap for grid in grids.values())
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    cell = (next(iter(grids.values())).shape[0] - 1) // len(TRANSFER_CLASSES)
    for row, digit in enumerate(TRANSFER_CLASSES):
        draw.text((3, header + row * cell + cell // 2 - 5), str(digit), fill=0)
    left = label_width
    for name, grid in grids.items():
        canvas.paste(Image.fromarray(grid), (left, header))
        title = titles[name]
        limit = max(4, grid.shape[1] // 6)
        draw.text((left, 2), title if len(title) <= limit else title[: limit - 1] + ".", fill=0)
        left += grid.shape[1] + gap
    path = os.path.join(output_dir, "samples.png")
    canvas.save(path)
    return [path, *paths]


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summary_row(name: str, title: str, results: list[dict], keys: tuple[str, ...]) -> dict:
    """Mean ± std over seeds of `keys` (`train_time_s` is read from each result's `seconds`)."""
    row = {"method": name, "title": title, "trainable_parameters": results[0]["trainable"]}
    for key in keys:
        source = "seconds" if key == "train_time_s" else key
        values = [r[source] for r in results if source in r]
        row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values) if values else (None, None)
    row["class_fidelity_per_class_mean"] = {
        digit: float(np.mean([r["class_fidelity_per_class"][digit] for r in results]))
        for digit in results[0]["class_fidelity_per_class"]
    }
    row["per_seed"] = results
    return row


def format_table(rows: list[dict], num_seeds: int, loss_key: str, loss_title: str) -> str:
    """The markdown table: parameters, training time, class fidelity, Fréchet distance and a held-out loss."""
    pm = "±" if num_seeds > 1 else ""

    def cell(row, key, fmt, scale=1.0):
        if row.get(f"{key}_mean") is None:
            return "–"
        text = format(scale * row[f"{key}_mean"], fmt)
        return f"{text} {pm} {format(scale * row[f'{key}_std'], fmt)}" if pm else text

    lines = [
        f"| method | trainable params | train time (s) | class fidelity (%) | Fréchet distance | {loss_title} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        params = "–" if row["trainable_parameters"] is None else f"{row['trainable_parameters']:,}"
        lines.append(
            f"| {row['title']} | {params} | {cell(row, 'train_time_s', '.1f')} "
            f"| {cell(row, 'class_fidelity', '.1f', 100.0)} | {cell(row, 'frechet_distance', '.2f')} "
            f"| {cell(row, loss_key, '.4f')} |"
        )
    return "\n".join(lines)


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


# ---------------------------------------------------------------------------------------------------------------
# the study: what a generator plugs in, pretraining (cached), adaptation and the seeds x methods run
# ---------------------------------------------------------------------------------------------------------------
class GenerativeStudy:
    """The generator-specific parts of a study; `run_study` does the rest.

    A subclass sets the class attributes and implements the methods that raise `NotImplementedError`. `data` below is
    what `model_inputs` made of the `[N, 64]` tokens (ImageGPT: `[N, 65]` SOS-prefixed sequences; MaskGIT: `[N, 8,
    8]` grids), indexed like the digits.
    """

    script = ""  # the study's path in the repository (the command in results.json and the model card)
    cache_name = ""  # the cache entry's prefix: <cache_dir>/<cache_name>_<hash of the settings>
    experiment = ""
    card_title = ""
    loss_keys: tuple[str, ...] = ()  # per-run likelihood measures, averaged over seeds into the rows
    table_loss = ("", "")  # (row key, column title) of the table's likelihood column
    pretrain_loss = ""  # the key of the held-out 0-4 measure in the pretraining info
    pretrain_loss_title = ""

    def __init__(self, args):
        self.args = args

    def describe(self) -> str:
        """The generator in a few words, for the log and the table's caption."""
        raise NotImplementedError

    def pretrain_settings(self) -> dict:
        """Everything the pretraining depends on (its hash names the cache entry)."""
        raise NotImplementedError

    def build_generator(self):
        """A freshly initialised generator (called after the pretraining seed is set)."""
        raise NotImplementedError

    def load_generator(self, path: str):
        raise NotImplementedError

    def prompt_config(self, base_path: str):
        raise NotImplementedError

    def model_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_loss(self, model, batch) -> torch.Tensor:
        """The training loss of an `(inputs,)` (unconditional) or `(inputs, class ids)` batch."""
        raise NotImplementedError

    def losses(self, model, train: torch.Tensor, held: torch.Tensor, train_ids, held_ids) -> dict:
        """The likelihood measures (`loss_keys`) of a generator on the 5-9 halves; `*_ids` None when unconditional."""
        raise NotImplementedError

    def heldout_pretrain_loss(self, model, held: torch.Tensor) -> float:
        raise NotImplementedError

    def sample(self, model, conditional: bool, seed: int, guidance_scale: float | None = None) -> torch.Tensor:
        """`--samples_per_class` samples per class, class by class, from one seeded `torch.Generator`."""
        raise NotImplementedError

    def after_adaptation(self, model, method: str, seed: int, metrics_of) -> None:
        """Extra measurements of an adapted model (the MaskGIT decoding-steps sweep)."""

    def save_prompt_outputs(self, model, result: dict, metrics: dict, seed: int) -> str:
        """The first seed's prompt adapter in `<output_dir>/generative_prompt_adapter`; returns the folder."""
        folder = os.path.join(self.args.output_dir, "generative_prompt_adapter")
        card_metrics = {
            "class fidelity (MLP classifier)": f"{100 * metrics['class_fidelity']:.1f} %",
            "Fréchet distance (classifier features)": f"{metrics['frechet_distance']:.2f}",
            **self.card_losses(result),
        }
        save_prompt_adapter(self.args, model, folder, seed, card_metrics, result["trainable"], self.card_title)
        return folder

    def card_losses(self, result: dict) -> dict:
        return {}

    def extra_summary(self) -> tuple[dict, str]:
        """More results.json entries and the text printed after the main table."""
        return {}, ""


def save_prompt_adapter(args, model, folder: str, seed: int, metrics: dict, trainable: int, title: str) -> None:
    """`save_pretrained` (adapter weights, config and the plain card), then the card with this run's details."""
    from hf_vpt.hub import write_model_card

    model.save_pretrained(folder)
    write_model_card(
        folder,
        model.peft_config["default"],
        dataset=f"scikit-learn digits 5-9 (training half), {args.num_levels} intensity levels, seed {seed}",
        metrics=metrics,
        command=args.command,
        trainable_parameters=f"{trainable:,}",
        title=title,
    )


def pretrain_generator(study: GenerativeStudy, accelerator, data: torch.Tensor, labels: torch.Tensor) -> dict:
    """The generator pretrained unconditionally on 90 % of digits 0-4 (10 % held out), through
    `pretrain_cache.cached_pretraining`: reused from `<cache_dir>/<cache_name>_<hash>` when the settings match."""
    args = study.args

    def pretrain():
        train_idx, held_idx = stratified_split(labels, PRETRAIN_CLASSES, 0.9, args.pretrain_seed)
        set_seed(args.pretrain_seed)
        model = study.build_generator()
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
        loader = DataLoader(
            TensorDataset(data[train_idx]),  # no class labels: unconditional
            batch_size=args.pretrain_batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(args.pretrain_seed),
        )
        model, seconds, _ = fit(
            accelerator,
            model,
            optimizer,
            loader,
            study.batch_loss,
            epochs=args.pretrain_epochs,
            warmup_fraction=0.05,
            progress=args.progress,
        )
        model = accelerator.unwrap_model(model)
        info = {
            study.pretrain_loss: study.heldout_pretrain_loss(model, data[held_idx]),
            "num_pretrain_images": len(train_idx),
            "num_heldout_images": len(held_idx),
            "pretrain_time_s": seconds,
        }
        return model, info

    info = cached_pretraining(accelerator, args.cache_dir, study.cache_name, study.pretrain_settings(), pretrain)
    accelerator.free_memory()
    return info


def adapt(study: GenerativeStudy, accelerator, method: str, base_path: str, inputs, class_ids, seed: int) -> dict:
    """Train the class-conditional prompt generator (and, for full fine-tuning, every weight) on 5-9."""
    from peft import get_peft_model

    args = study.args
    set_seed(seed)
    model = get_peft_model(study.load_generator(base_path), study.prompt_config(base_path))
    generator_params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": generator_params, "lr": args.prompt_lr, "weight_decay": 0.0}]
    if method == "full_finetune":
        known = {id(p) for p in generator_params}
        base_params = [p for p in model.get_base_model().parameters() if id(p) not in known]
        for param in base_params:
            param.requires_grad_(True)
        groups += [
            {"params": [p for p in base_params if p.ndim > 1], "lr": args.full_lr, "weight_decay": args.weight_decay},
            {"params": [p for p in base_params if p.ndim <= 1], "lr": args.full_lr, "weight_decay": 0.0},
        ]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loader = DataLoader(
        TensorDataset(inputs, class_ids),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    model, seconds, last_loss = fit(
        accelerator,
        model,
        torch.optim.AdamW(groups),
        loader,
        study.batch_loss,
        epochs=args.epochs,
        warmup_fraction=args.warmup_fraction,
        progress=args.progress,
    )
    model = accelerator.unwrap_model(model).eval()
    return {"model": model, "trainable": trainable, "seconds": seconds, "last_epoch_loss": last_loss}


def guidance_title(name: str) -> str:
    return f"generative prompt tuning + guidance g={name.split('_', 1)[1]} (same adapter)"


def run_study(study_class: type[GenerativeStudy], args) -> dict:
    """Pretrain (or reuse) the generator, train the classifier, adapt every method for every seed, sample, measure,
    and write the tables, the grids and results.json; returns the summary written to results.json."""
    import transformers

    study = study_class(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    log = accelerator.print
    wall = time.perf_counter()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    tokens, labels = load_digit_tokens(args.num_levels)
    data = study.model_inputs(tokens)
    generator_info = pretrain_generator(study, accelerator, data, labels)
    base_path = generator_info["path"]
    log(
        f"generator: {study.describe()}, {args.num_levels} levels, pretrained on digits 0-4 "
        + ("(reused from cache" if generator_info["reused"] else f"({generator_info['pretrain_time_s']:.1f} s")
        + f", {base_path}); held-out 0-4 {study.pretrain_loss_title} {generator_info[study.pretrain_loss]:.4f}"
    )

    # the 5-9 digits: a fixed stratified split; the classifier is trained once on the training half
    train_idx, held_idx = stratified_split(labels, TRANSFER_CLASSES, args.transfer_train_fraction, args.split_seed)
    class_ids = labels - TRANSFER_CLASSES[0]
    train_ids, held_ids = class_ids[train_idx], class_ids[held_idx]
    train_data, held_data = data[train_idx], data[held_idx]
    train_pixels = tokens_to_pixels(tokens[train_idx], args.num_levels)
    held_pixels = tokens_to_pixels(tokens[held_idx], args.num_levels)
    classifier, classifier_seconds = train_classifier(accelerator, args, train_pixels, train_ids)
    held_predictions, real_features = classify(classifier, held_pixels)
    classifier_accuracy = float((held_predictions == held_ids).float().mean())
    real_frechet = frechet_distance(classify(classifier, train_pixels)[1], real_features)
    log(
        f"classifier (MLP, trained on {len(train_idx)} real 5-9 digits in {classifier_seconds:.1f} s): held-out "
        f"accuracy {100 * classifier_accuracy:.2f} % on {len(held_idx)} digits"
    )

    def metrics_of(sampled: torch.Tensor) -> dict:
        return sample_metrics(classifier, sampled, args.num_levels, real_features, args.samples_per_class)

    variants = [*args.methods, *[f"guidance_{g:g}" for g in args.guidance_scales]]
    per_seed: dict[str, list[dict]] = {name: [] for name in variants}
    grids, adapter_folder = {}, None
    base = study.load_generator(base_path).to(accelerator.device).eval()
    frozen_losses = study.losses(base, train_data, held_data, None, None)
    for seed in args.seeds:
        runs = {}
        for method in args.methods:
            if method == "no_adaptation":
                sampled = study.sample(base, conditional=False, seed=seed)
                runs[method] = {"trainable": 0, "seconds": 0.0, **frozen_losses, "tokens": sampled}
                continue
            result = adapt(study, accelerator, method, base_path, train_data, train_ids, seed)
            model = result.pop("model")
            result.update(study.losses(model, train_data, held_data, train_ids, held_ids))
            result["tokens"] = study.sample(model, conditional=True, seed=seed)
            runs[method] = result
            if method == "generative_prompt":
                for scale in args.guidance_scales:
                    guided = study.sample(model, conditional=True, seed=seed, guidance_scale=scale)
                    # the same adapter (its training time), sampled differently; no likelihood of its own
                    runs[f"guidance_{scale:g}"] = {
                        "trainable": result["trainable"],
                        "seconds": result["seconds"],
                        "tokens": guided,
                    }
                if seed == args.seeds[0] and accelerator.is_main_process:
                    adapter_folder = study.save_prompt_outputs(model, result, metrics_of(result["tokens"]), seed)
            study.after_adaptation(model, method, seed, metrics_of)
            del model
            accelerator.free_memory()
        for name, run in runs.items():
            metrics = metrics_of(run["tokens"])
            if seed == args.seeds[0]:
                grids[name] = grid_image(run["tokens"], args.num_levels, args.samples_per_class, args.grid_columns)
            per_seed[name].append({"seed": seed, **{k: v for k, v in run.items() if k != "tokens"}, **metrics})
            log(
                f"seed {seed} {name:<18} class fidelity {100 * metrics['class_fidelity']:5.1f} %  Fréchet "
                f"{metrics['frechet_distance']:7.2f}  train {run['seconds']:.1f} s"
            )

    keys = ("train_time_s", "class_fidelity", "frechet_distance", *study.loss_keys)
    rows = [
        summary_row(name, METHOD_TITLES.get(name) or guidance_title(name), results, keys)
        for name, results in per_seed.items()
    ]
    loss_key, loss_title = study.table_loss
    rows.append(
        {
            "method": "real",
            "title": METHOD_TITLES["real"],
            "trainable_parameters": None,
            "train_time_s_mean": None,
            "class_fidelity_mean": classifier_accuracy,
            "class_fidelity_std": 0.0,
            "frechet_distance_mean": real_frechet,
            "frechet_distance_std": 0.0,
            f"{loss_key}_mean": None,
            "note": "class fidelity = the classifier's held-out accuracy; Fréchet distance = training half vs held-out",
        }
    )
    table = format_table(rows, len(args.seeds), loss_key, loss_title)
    extra, extra_text = study.extra_summary()
    wall_time = time.perf_counter() - wall
    log(
        f"\nDigits 0-4 -> 5-9 {study.experiment}, {study.describe()}, {args.num_levels} levels, {len(train_idx)} "
        f"training / {len(held_idx)} held-out 5-9 digits, {args.samples_per_class} samples per class, seeds "
        f"{args.seeds} (mean ± std, ddof=1); class fidelity and Fréchet distance from an MLP classifier trained in "
        f"the run:\n"
    )
    log(table + extra_text)
    summary = {
        "experiment": f"digits 0-4 -> 5-9, {study.experiment}",
        "command": args.command,
        "generator": generator_info,
        "classifier": {
            "heldout_accuracy": classifier_accuracy,
            "train_time_s": classifier_seconds,
            "num_train": len(train_idx),
            "num_heldout": len(held_idx),
            "feature_dim": args.feature_dim,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("config", "command")},
        "seeds": args.seeds,
        "results": rows,
        "table": table,
        **extra,
        "adapter_path": adapter_folder,
        "wall_time_s": wall_time,
        "torch_threads": torch.get_num_threads(),
    }
    if accelerator.is_main_process:
        titles = {name: GRID_TITLES.get(name, f"prompt + guidance {name.split('_', 1)[1]}") for name in grids}
        shown = tokens[held_idx][class_order(held_ids, args.grid_columns)]
        real_grid = grid_image(shown, args.num_levels, args.grid_columns, args.grid_columns)
        summary["grids"] = save_grids(
            args.output_dir, {"real": real_grid, **grids}, {"real": GRID_TITLES["real"], **titles}
        )
        write_json(os.path.join(args.output_dir, "results.json"), summary)
        log(f"\nwrote {args.output_dir}/results.json and samples.png; wall time {wall_time:.1f} s")
    return summary
