"""What the two generative digits studies (ImageGPT in `run.py`, MaskGIT in `../maskgit_digits/run.py`) share.

* **Tokens**: scikit-learn's 1797 digits (8x8, intensities 0..16) quantised into K levels `floor(v · K / 17)`;
  an image is 64 tokens in raster order (`[N, 64]`, or an 8x8 grid for MaskGIT).
* **Split**: a stratified split of the 5-9 digits, fixed by `--split_seed`.
* **The measuring instrument**: an MLP classifier trained in the run on the real 5-9 training half; class fidelity
  of samples and the Fréchet distance between its penultimate features of samples and of the held-out half
  (`hf_vpt.metrics.inception.frechet_distance`, the repository's one Fréchet distance).
* **Training**: `fit` runs the recipes' shared loop `recipes/_common.train_loop` with a prepared model, optimiser and
  loader and transformers' warm-up + cosine schedule.
* **Outputs**: PNG sample grids (rows = classes 5-9), mean ± std rows and their markdown table, JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import get_cosine_schedule_with_warmup

from hf_vpt.metrics import inception


_RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "recipes")
sys.path.insert(0, os.path.normpath(_RECIPES))
import _common  # noqa: E402


PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TRANSFER_CLASSES = (5, 6, 7, 8, 9)
NUM_PIXELS = 64  # 8 x 8
SIDE = 8


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
