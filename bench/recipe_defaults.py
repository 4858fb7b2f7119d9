#!/usr/bin/env python
"""Per-method default optimiser and learning rate for the image-classification recipe, measured on real backbones.

Why: the recipe's defaults were tuned on a toy backbone; on a real ImageNet ViT-Ti, VPT-deep with SGD at lr 0.25
diverged (hf_vpt issue 15). This sweep measures what trains a real pretrained backbone.

Protocol
--------
* Data: `sklearn.datasets.load_digits`, a fixed stratified split (split seed 0): `--train_images` (400) for training,
  `--val_images` (300) of the rest for validation, 10 classes. Each 8x8 image (0..16) becomes an 8-bit grey PIL
  image, converted to RGB and passed through the backbone's own `AutoImageProcessor` (resize, rescale, normalise)
  -- what a user's imagefolder gets in the recipe. No augmentation. The sweep runs at `--image_size` 64 (a 4x4
  patch grid, position embeddings interpolated; each 16-px patch still sees 2x2 of the 8x8 pixels) because 224 px
  costs ~10x the CPU time on the shared 2-core machine; the chosen defaults of `--check_methods` (linear, VPT-deep)
  are then trained once more at `--check_image_size` 224, the recipe's and the issue's setting.
* Models: `ViTForImageClassification.from_pretrained(<backbone>, num_labels=10, ignore_mismatched_sizes=True)` (a
  fresh 10-class head from the run seed), then per method: `linear` (everything frozen but the classifier), `full`
  (every parameter), or the adapter of the `hf_vpt.registry` variant (`training_variant(method).build_config`, as
  the recipe builds it): `vpt_shallow` / `vpt_deep`, `gated` (gate_init 3, the variant's), `apt` (rank 4), all with
  `--num_prompt_tokens`; `lora` (r=8, lora_alpha=16 on the attention query/value projections). The adapters save
  the classifier (`modules_to_save=["classifier"]`); each run records its config's non-default fields.
* Training: the recipes' own `make_optimizer` (SGD momentum 0.9 or AdamW; no decay on biases and norms) and
  `train_loop` (recipes/training.py), batch `--batch_size` (32), `--epochs` (10), linear warm-up over
  `--warmup_epochs` (1) then cosine decay to 0 (`transformers.get_scheduler("cosine")`), cross-entropy, fp32.
  Weight decay: 1e-4 with SGD (VPT's base config), 0.01 with AdamW (VPT's end-to-end baselines, APT, the transfer
  bench). Final validation accuracy after the last step; final train loss = mean loss of the last epoch.
* Diverged: a non-finite loss, a step loss above 10 ln 10 (ten times a uniform guess; the run stops there), or a
  last-epoch mean loss above ln 10 (worse than a uniform guess).
* Grid (GRID below): two or three learning rates per method and optimiser (a third where the best of two sat at the
  edge). AdamW around the transfer bench's choices on these backbones (`bench/transfer.py`: 1e-3..1e-2 for
  adapters, 3e-4 for full fine-tuning, 0.1 for the head) and APT's reference (5e-4 x5); SGD (VPT: lr = grid x
  batch/256, grid 0.05..50, i.e. 0.006..6 at batch 32) at today's toy-backbone defaults (0.25, gated 1.0) and, for
  linear and VPT-deep, 0.01. A first pass (112 px, 3 epochs) found linear probing diverging with SGD at 0.1 and 1.0
  and VPT-deep at 0.05 and 0.25: the ViT-Ti AugReg CLS feature that the head reads has an L2 norm of ~55
  (DeiT-Tiny ~20), so an SGD step on the head is ~3000x lr times the error; AdamW's step does not scale with it.
* Choice: per method the run with the best validation accuracy that did not diverge (ties within 0.5 points go to
  the smaller lr, as in VPT's tuning scripts). The choices are then trained once more on `--confirm_backbone`
  (DeiT-Tiny).

The script sets `OMP_WAIT_POLICY=PASSIVE` (spinning OpenMP threads slow a shared 2-core machine badly). Results are
written after every run; a rerun with the same settings reuses the finished runs (`--fresh` to redo them).

Usage:
    nice python bench/recipe_defaults.py     # sweep + checks, writes bench/results/recipe_defaults.json
    python bench/recipe_defaults.py --short  # smoke test: 32 px, 40 images, 2 epochs, one lr per method
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoImageProcessor, ViTForImageClassification, get_scheduler  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hf_vpt  # noqa: E402
from hf_vpt.registry import training_variant  # noqa: E402
from recipes import training as _loop  # noqa: E402  (the recipes' one shared loop)


# method -> optimiser -> learning rates (why: see the module docstring, "Grid").
GRID = {
    "linear": {"sgd": (0.01, 0.25), "adamw": (1e-2, 1e-1)},
    "vpt_deep": {"sgd": (0.01, 0.25), "adamw": (1e-3, 3e-3, 1e-2)},
    "lora": {"adamw": (3e-3, 1e-2, 3e-2)},
    "full": {"adamw": (1e-4, 3e-4, 1e-3)},
    "apt": {"adamw": (1e-3, 3e-3, 1e-2)},
    "vpt_shallow": {"sgd": (0.25,), "adamw": (3e-3, 1e-2, 3e-2)},
    "gated": {"sgd": (1.0,), "adamw": (3e-3, 1e-2, 3e-2)},
}
METHODS = tuple(GRID)  # registry training variants, the most wanted first
SHORT_GRID = {method: {opt: lrs[:1] for opt, lrs in grid.items()} for method, grid in GRID.items()}
WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.01}
ABORT_LOSS = 10 * math.log(10)
TIE_POINTS = 0.5
LORA_RANK, LORA_ALPHA = 8, 16


class Diverged(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
def digits_split(train_images: int, val_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/validation split of sklearn's digits (split seed 0): (images, labels, train idx, val idx)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, val = train_test_split(
        index, train_size=train_images, test_size=val_images, stratify=digits.target, random_state=0
    )
    return digits.images, digits.target, train, val


def processed_pixels(backbone: Path, images: np.ndarray, image_size: int) -> torch.Tensor:
    """The 8x8 digits as RGB PIL images through the backbone's image processor at `image_size`."""
    from PIL import Image

    processor = AutoImageProcessor.from_pretrained(backbone)
    pil = [Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").convert("RGB") for image in images]
    size = {"height": image_size, "width": image_size}
    return processor(images=pil, size=size, return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
# This benchmark's protocol for the registry's config builders (the variants' own defaults otherwise).
CONFIG_OVERRIDES = {"lora": {"r": LORA_RANK, "lora_alpha": LORA_ALPHA}}


def build_model(backbone: Path, method: str, seed: int, num_prompt_tokens: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the fresh head and the adapter's initialisation
    labels = {i: str(i) for i in range(10)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1000-class head is replaced on purpose
        model = ViTForImageClassification.from_pretrained(
            backbone, num_labels=10, id2label=labels, label2id={v: k for k, v in labels.items()},
            ignore_mismatched_sizes=True,
        )  # fmt: skip
    variant = training_variant(method)
    if variant.trains == "all":
        return model.requires_grad_(True)
    if variant.trains == "head":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model
    config = variant.build_config(
        model, num_prompt_tokens=num_prompt_tokens, head_modules=["classifier"], **CONFIG_OVERRIDES.get(method, {})
    )
    return get_peft_model(model, config)


def config_fields(model: torch.nn.Module) -> dict:
    """The adapter config's scalar fields that differ from the config class's defaults (recorded with each run, so
    that a row says e.g. which `gate_init` it trained with)."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return {}
    default = type(config)()
    return {
        name: value
        for name, value in vars(config).items()
        if isinstance(value, (bool, int, float, str))
        and value != getattr(default, name, None)
        and name != "base_model_name_or_path"  # a path on the measuring machine; each row names its `backbone`
    }


# ---------------------------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------------------------
def train_one(backbone: Path, method: str, optimizer_name: str, lr: float, data: dict, args, image_size: int) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    train_x, train_y, val_x, val_y = data["train_x"], data["train_y"], data["val_x"], data["val_y"]
    model = build_model(backbone, method, args.seed, args.num_prompt_tokens)
    interpolate = image_size != model.config.image_size  # smaller images: resize the position embeddings
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)
    weight_decay = WEIGHT_DECAY[optimizer_name]
    with tempfile.TemporaryDirectory() as tmp:
        loop_args = SimpleNamespace(
            optimizer=optimizer_name, learning_rate=lr, weight_decay=weight_decay, momentum=0.9,
            gradient_accumulation_steps=1, max_train_steps=total, stop_after_steps=None, max_grad_norm=None,
            logging_steps=total + 1, checkpointing_steps=None, eval_steps=None, progress=False, disable_tqdm=True,
            resume_from_checkpoint=None, output_dir=tmp,
        )  # fmt: skip
        accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
        optimizer = _loop.make_optimizer(model, loop_args, method)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(train_x, train_y),
            batch_size=args.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(args.seed),
        )
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        losses: list[float] = []

        def loss_fn(batch):
            pixels, labels = batch
            loss = F.cross_entropy(model(pixel_values=pixels, interpolate_pos_encoding=interpolate).logits, labels)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]) or losses[-1] > ABORT_LOSS:
                raise Diverged(f"loss {losses[-1]:.4g} at step {len(losses)}")
            return loss

        @torch.no_grad()
        def evaluate_fn(step):
            model.eval()
            hits = 0
            for start in range(0, len(val_x), args.eval_batch_size):
                logits = model(
                    pixel_values=val_x[start : start + args.eval_batch_size], interpolate_pos_encoding=interpolate
                )
                hits += (logits.logits.argmax(-1) == val_y[start : start + args.eval_batch_size]).sum().item()
            return {"accuracy": hits / len(val_x)}

        start = time.perf_counter()
        aborted = None
        try:
            metrics, _, _ = _loop.train_loop(
                accelerator, loop_args, model, optimizer, scheduler, loader, loss_fn, evaluate_fn
            )
        except Diverged as error:
            aborted, metrics = str(error), {}
        wall = time.perf_counter() - start
    last_epoch = losses[-steps_per_epoch:]
    final_loss = sum(last_epoch) / len(last_epoch) if last_epoch else float("nan")
    diverged = aborted is not None or not math.isfinite(final_loss) or final_loss > math.log(10)
    result = {
        "backbone": backbone.name,
        "image_size": image_size,
        "method": method,
        "optimizer": optimizer_name,
        "learning_rate": lr,
        "weight_decay": weight_decay,
        "warmup_steps": warmup,
        "total_steps": total,
        "val_accuracy": metrics.get("accuracy"),
        "final_train_loss": None if aborted else round(final_loss, 4),
        "diverged": diverged,
        "aborted": aborted,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "config_fields": config_fields(accelerator.unwrap_model(model)),
        "loss_curve": [round(value, 4) for value in losses],
        "wall_s": round(wall, 1),
    }
    return result


# ---------------------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------------------
def choose(runs: list[dict], method: str) -> dict | None:
    """Best validation accuracy among the runs that did not diverge; within TIE_POINTS the smaller lr (VPT's rule:
    a default should sit away from the unstable side)."""
    ok = [run for run in runs if run["method"] == method and not run["diverged"] and run["val_accuracy"] is not None]
    if not ok:
        return None
    best = max(run["val_accuracy"] for run in ok)
    close = [run for run in ok if 100 * (best - run["val_accuracy"]) <= TIE_POINTS]
    return min(close, key=lambda run: run["learning_rate"])


def markdown_table(runs: list[dict], chosen: dict[str, dict]) -> str:
    lines = [
        "| backbone | px | method | optimizer | lr | weight decay | val acc % | final train loss | diverged | chosen "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        accuracy = "—" if run["val_accuracy"] is None else f"{100 * run['val_accuracy']:.1f}"
        loss = "—" if run["final_train_loss"] is None else f"{run['final_train_loss']:.3f}"
        diverged = ("yes (" + run["aborted"] + ")") if run["aborted"] else ("yes" if run["diverged"] else "no")
        pick = chosen.get(run["method"])
        mark = "**yes**" if pick and all(pick[k] == run[k] for k in ("optimizer", "learning_rate")) else ""
        lines.append(
            f"| {run['backbone']} | {run['image_size']} | {run['method']} | {run['optimizer']} | "
            f"{run['learning_rate']:g} | {run['weight_decay']:g} | {accuracy} | {loss} | {diverged} | {mark} | "
            f"{run['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights_dir", type=Path, default=ROOT.parent / "shared" / "weights")
    parser.add_argument("--sweep_backbone", default="vit-tiny-patch16-224-augreg")
    parser.add_argument("--confirm_backbone", default="deit-tiny-patch16-224", help="'' skips the confirmation.")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--image_size", type=int, default=64, help="Sweep resolution (224: ~10x the CPU time).")
    parser.add_argument("--check_image_size", type=int, default=224, help="Resolution of the final check.")
    parser.add_argument(
        "--check_methods",
        default="linear,vpt_deep",
        help="Methods whose chosen defaults are trained once more on the sweep backbone at --check_image_size.",
    )
    parser.add_argument("--train_images", type=int, default=400)
    parser.add_argument("--val_images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10, help="The image-classification recipe's default.")
    parser.add_argument("--warmup_epochs", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_batch_size", type=int, default=50)
    parser.add_argument("--num_prompt_tokens", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="Default: bench/results/recipe_defaults.json.")
    parser.add_argument("--fresh", action="store_true", help="Redo runs that the output file already holds.")
    parser.add_argument(
        "--reuse",
        type=Path,
        nargs="*",
        default=[],
        help="More result files (same settings) whose runs are taken instead of retrained, e.g. from a second "
        "process that ran other --methods.",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="Smoke test: 32 px (check 48 px), 40/30 images, 2 epochs, one lr per method, no file.",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    grid = GRID
    if args.short:
        args.image_size, args.train_images, args.val_images, args.epochs, args.batch_size = 32, 40, 30, 2, 10
        args.check_image_size = 48
        grid = SHORT_GRID
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}.")
    backbones = [args.sweep_backbone] + ([args.confirm_backbone] if args.confirm_backbone else [])
    for name in backbones:
        if not (args.weights_dir / name / "model.safetensors").is_file():
            raise SystemExit(
                f"{args.weights_dir / name} holds no model.safetensors: this benchmark needs the real pretrained "
                "backbones (see ../shared/weights/README.md); pass --weights_dir."
            )
    output = args.output or (None if args.short else ROOT / "bench" / "results" / "recipe_defaults.json")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per model

    settings = {
        key: getattr(args, key)
        for key in ("image_size", "train_images", "val_images", "epochs", "warmup_epochs", "batch_size",
                    "num_prompt_tokens", "seed")
    }  # fmt: skip
    settings.update(
        weight_decay=WEIGHT_DECAY,
        momentum=0.9,
        scheduler="linear warm-up over warmup_epochs, then cosine to 0 (transformers get_scheduler 'cosine')",
        lora={"r": LORA_RANK, "lora_alpha": LORA_ALPHA},
        diverged=f"non-finite loss, a step loss > 10 ln 10 ({ABORT_LOSS:.2f}; run stopped), or last-epoch mean "
        "loss > ln 10 (worse than a uniform guess)",
        versions={"torch": torch.__version__, "hf_vpt": getattr(hf_vpt, "__version__", "?")},
        threads=args.threads,
    )
    previous = []
    sources = ([output] if output is not None and not args.fresh else []) + args.reuse
    for source in (path for path in sources if path.is_file()):
        stored = json.loads(source.read_text())
        if stored.get("settings") == json.loads(json.dumps(settings)):
            previous += stored.get("runs", []) + stored.get("confirm", []) + stored.get("check", [])
    results = {
        "settings": settings,
        "grid": {m: grid[m] for m in methods},
        "runs": [],
        "confirm": [],
        "check": [],
        "chosen": {},
    }
    results["command"] = " ".join(["python", "bench/recipe_defaults.py", *(sys.argv[1:] if argv is None else argv)])

    def run(backbone_name: str, method: str, optimizer_name: str, lr: float, data: dict, size: int) -> dict:
        for old in previous:
            if (old["backbone"], old["image_size"], old["method"], old["optimizer"], old["learning_rate"]) == (
                backbone_name, size, method, optimizer_name, lr,
            ):  # fmt: skip
                return old
        result = train_one(args.weights_dir / backbone_name, method, optimizer_name, lr, data, args, size)
        gc.collect()  # the finished run's model and optimiser
        accuracy = "—" if result["val_accuracy"] is None else f"{100 * result['val_accuracy']:.1f}%"
        print(
            f"{backbone_name} {method:11s} {optimizer_name:5s} lr {lr:<7g} val {accuracy:>6s} "
            f"loss {result['final_train_loss']} diverged {result['diverged']} ({result['wall_s']:.0f} s)",
            flush=True,
        )
        return result

    def save() -> None:
        results["table_markdown"] = markdown_table(
            results["runs"] + results["confirm"] + results["check"], results["chosen"]
        )
        results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=1) + "\n")

    images, labels, train_idx, val_idx = digits_split(args.train_images, args.val_images)

    def load(name: str, size: int) -> dict:
        pixels = processed_pixels(args.weights_dir / name, images[np.concatenate([train_idx, val_idx])], size)
        return {
            "train_x": pixels[: len(train_idx)],
            "train_y": torch.as_tensor(labels[train_idx]),
            "val_x": pixels[len(train_idx) :],
            "val_y": torch.as_tensor(labels[val_idx]),
        }

    data = {name: load(name, args.image_size) for name in backbones}
    check_methods = [m.strip() for m in args.check_methods.split(",") if m.strip()]
    check_data: dict[int, dict] = {}
    for method in methods:  # each method's sweep, its choice and the choice's check, so a cut run is complete so far
        for optimizer_name, lrs in grid[method].items():
            for lr in lrs:
                results["runs"].append(
                    run(args.sweep_backbone, method, optimizer_name, lr, data[args.sweep_backbone], args.image_size)
                )
                save()
        pick = choose(results["runs"], method)
        if pick is None:
            continue
        results["chosen"][method] = {
            k: pick[k] for k in ("optimizer", "learning_rate", "weight_decay", "warmup_steps", "val_accuracy")
        }
        if args.confirm_backbone:
            check = run(
                args.confirm_backbone, method, pick["optimizer"], pick["learning_rate"],
                data[args.confirm_backbone], args.image_size,
            )  # fmt: skip
            results["confirm"].append(check)
            results["chosen"][method]["confirm_val_accuracy"] = check["val_accuracy"]
        save()
        if method in check_methods and args.check_image_size != args.image_size:  # right away: the key evidence
            if args.check_image_size not in check_data:
                check_data[args.check_image_size] = load(args.sweep_backbone, args.check_image_size)
            data_at = check_data[args.check_image_size]
            check = run(
                args.sweep_backbone, method, pick["optimizer"], pick["learning_rate"], data_at, args.check_image_size
            )
            results["check"].append(check)
            results["chosen"][method][f"val_accuracy_at_{args.check_image_size}px"] = check["val_accuracy"]
            save()
    save()
    print(results["table_markdown"])
    print("chosen:", json.dumps(results["chosen"], indent=1))
    return results


if __name__ == "__main__":
    main()
