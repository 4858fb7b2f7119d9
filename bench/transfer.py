#!/usr/bin/env python
"""VTAB-1k-style transfer table on real pretrained ViT-Tiny backbones: scikit-learn digits, 1000 training images.

Protocol
--------
* Data: `sklearn.datasets.load_digits` (1797 grey 8x8 images, 10 classes). A fixed stratified split (seed 0, not the
  training seed) gives exactly 100 images per class for training (1000, "train800val200") and the other 797 for
  test. The 1000 are split again, 80 / 20 per class, into train800 / val200 for the learning-rate choice. Pixels
  are scaled to [0, 1], upsampled with torch bilinear interpolation to `--image_size`, repeated to 3 channels and
  normalised with the mean/std of the backbone's own `AutoImageProcessor` (0.5/0.5 for ViT-Ti AugReg, the
  ImageNet statistics for DeiT-Tiny). No augmentation (as VTAB-1k in VPT).
* Backbones: `vit-tiny-patch16-224-augreg` and `deit-tiny-patch16-224` from `--weights_dir` (default
  `../shared/weights` beside the project). The images are smaller than the pretraining 224 px, so every forward
  passes `interpolate_pos_encoding=True` (the 14x14 position-embedding grid is resized bicubically to the patch
  grid).
* Methods, on the same frozen backbone with a fresh 10-class head (`modules_to_save=["classifier"]`):
  `linear` (only the head; trained on precomputed features, the classifier's exact input, which is mathematically
  the same as training the head inside the frozen model), `vpt_shallow` and `vpt_deep` (`hf_vpt.VisualPromptConfig`,
  p=10), `gated` (`hf_vpt.GatedPromptConfig`, p=10, gate_init 5), `apt` (`hf_vpt.ApproxPromptConfig`, p=10,
  rank 4), `lora` (PEFT's LoRA, r=8 on the attention's query and value projections, found by structure), and
  `full` fine-tuning (every parameter). The configs come from `hf_vpt.registry` (`training_variant(name)`) with
  the sizes above; all PEFT methods go through `peft.get_peft_model`.
* Training: the recipes' shared loop (`recipes/_common.train_loop`), AdamW (weight decay 0.01), batch 32,
  `transformers`' linear warm-up over the first epoch then cosine decay to 0 (stepped per batch), cross-entropy,
  last-epoch accuracy. The learning rate of every method (and backbone) is chosen on
  val200 after training on train800 with the first seed (ties go to the smaller lr); then each seed retrains on all
  1000 images with that lr and is evaluated once on the 797 test images. Nothing is chosen on the test set.
* Measured per run: test accuracy; trainable parameters; adapter file size (`save_pretrained`, size of
  `adapter_model.safetensors`; for linear probing the head saved with safetensors; for full fine-tuning the
  whole model's `model.safetensors`); train wall time and process CPU time (linear probing: feature extraction of
  the training images plus head training); peak memory = peak resident set size during training minus the RSS at
  its start (Linux `VmHWM` after resetting it through `/proc/self/clear_refs`; psutil sampling every 10 ms
  where that is not possible).

Default settings and why (2-core CPU budget of about 60-75 minutes)
--------------------------------------------------------------------
One epoch over 1000 images at 112 px costs about 27 s (prompt methods) to 36 s (full fine-tuning) of single-thread
CPU time; at 64 px it is about 9-10 s and 15-17 s. The default run trains 6 methods x 2 backbones x (3 lrs on
800 images + 3 seeds on 1000 images) x `--epochs`, i.e. about 65 k-image-epochs per epoch of schedule, so at
112 px even 5 epochs would take over 2 hours. The defaults are therefore **64 px** (a 4x4 patch grid; each 16-px
patch sees 2x2 of the original 8x8 pixels, so no digit detail is lost by the resolution) and **10 epochs**
(320 AdamW steps), with three lrs per method and seeds 0, 1, 2. `--image_size 112 --epochs 20
--no-lr_grid_search` reproduces the orientation setting of a single run.

The script sets `OMP_WAIT_POLICY=PASSIVE` before torch is imported: on a shared 2-core machine the default
spin-waiting OpenMP threads made training 10x slower whenever other processes were running.

Usage:
    python bench/transfer.py                               # full default run, writes bench/results/transfer.{json,png}
    python bench/transfer.py --backbones vit-tiny-patch16-224-augreg --methods linear,vpt_deep --seeds 0 \\
        --epochs 3 --train_images 300 --test_images 300 --no-lr_grid_search
    python bench/transfer.py --methods gated,apt --merge   # add methods to an existing transfer.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import fcntl
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import types
from pathlib import Path


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from transformers import AutoImageProcessor, ViTForImageClassification  # noqa: E402

import hf_vpt  # noqa: E402
from hf_vpt.registry import training_variant  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO_ROOT))
from recipes import _common  # noqa: E402  (the recipes' shared training loop)


DEFAULT_WEIGHTS_DIR = REPO_ROOT.parent / "shared" / "weights"
DEFAULT_BACKBONES = ("vit-tiny-patch16-224-augreg", "deit-tiny-patch16-224")
# AdamW learning-rate grids, searched on train800 -> val200, by registry variant (`hf_vpt.registry`), in table order.
LR_GRIDS = {
    "linear": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "vpt_shallow": (1e-3, 3e-3, 1e-2),
    "vpt_deep": (1e-3, 3e-3, 1e-2),
    "gated": (1e-3, 3e-3, 1e-2),
    "apt": (1e-3, 3e-3, 1e-2),
    "lora": (1e-3, 3e-3, 1e-2),
    "full": (1e-4, 3e-4, 1e-3),
}
METHODS = tuple(LR_GRIDS)
# With --no-lr_grid_search the learning rate is the registry's default for the variant (`--lrs` overrides it).
NUM_PROMPTS = 10
GATE_INIT = 5.0
APT_RANK = 4
LORA_RANK = 8
# This benchmark's settings for the registry's config builders (its protocol, not the methods' defaults).
CONFIG_OVERRIDES = {"gated": {"gate_init": GATE_INIT}, "apt": {"rank": APT_RANK}, "lora": {"r": LORA_RANK}}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def digits_split(train_images: int, test_images: int | None, val_fraction: float = 0.2, split_seed: int = 0):
    """Indices of a fixed split: `train_images // 10` per class for training (of which `val_fraction` per class is
    held out for the lr choice) and the rest (or the first `test_images` of it, in a fixed random order) for test."""
    digits = load_digits()
    labels = digits.target
    rng = np.random.default_rng(split_seed)
    per_class = train_images // 10
    per_class_val = round(per_class * val_fraction)
    train, val_part, test = [], [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if per_class > len(idx) - 1:
            raise ValueError(f"--train_images {train_images} leaves no test image of class {c}.")
        train.append(idx[:per_class])
        val_part.append(idx[:per_class_val])
        test.append(idx[per_class:])
    train, val_part, test = (np.concatenate(x) for x in (train, val_part, test))
    test = rng.permutation(test)
    if test_images is not None:
        test = test[:test_images]
    fit = np.setdiff1d(train, val_part)
    return {"train": np.sort(train), "fit": np.sort(fit), "val": np.sort(val_part), "test": np.sort(test)}


def digits_pixels(image_size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as normalised (N, 3, S, S) float32 pixels and their labels."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(), torch.tensor(digits.target, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`), so that a run's RSS growth is not hidden by
    pages an earlier run left resident."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident set size above the RSS at entry, in MiB.

    Linux: resets the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`) and reads `VmHWM` at exit.
    Elsewhere: samples psutil's RSS every 10 ms in a thread."""

    def __enter__(self):
        self.method = None
        release_free_memory()
        self.start_kb = _status_kb("VmRSS")
        if self.start_kb is not None:
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self.method = "VmHWM after clear_refs"
            except OSError:
                pass
        if self.method is None:
            import psutil

            process = psutil.Process()
            self.start_kb = process.memory_info().rss // 1024
            self.peak_kb = self.start_kb
            self._stop = threading.Event()

            def sample():
                while not self._stop.wait(0.01):
                    self.peak_kb = max(self.peak_kb, process.memory_info().rss // 1024)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
            self.method = "psutil RSS sampled every 10 ms"
        return self

    def __exit__(self, *exc):
        if self.method.startswith("VmHWM"):
            self.peak_kb = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
        self.delta_mib = max(self.peak_kb - self.start_kb, 0) / 1024
        return False


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def adapter_config(method: str, model):
    """The PEFT config of an adapter method, from the registry, with this benchmark's settings; None for linear
    probing and full fine-tuning."""
    variant = training_variant(method)
    if variant.build_config is None:
        return None
    return variant.build_config(
        model, num_prompt_tokens=NUM_PROMPTS, head_modules=["classifier"], **CONFIG_OVERRIDES.get(method, {})
    )


def method_title(method: str) -> str:
    """The registry's title plus this run's sizes, read from the config: "VPT-deep (p=10)", "LoRA (r=8, q_proj/v_proj)"."""
    variant = training_variant(method)
    if variant.build_config is None:
        return variant.title
    config = adapter_config(method, _title_probe())
    details = []
    if hasattr(config, "num_prompt_tokens"):
        details.append(f"p={config.num_prompt_tokens}")
    rank = getattr(config, "rank", None) or getattr(config, "r", None)
    if rank:
        details.append(f"r={rank}")
    targets = getattr(config, "target_modules", None)
    if targets:
        details.append("/".join(sorted(targets)))
    return f"{variant.title} ({', '.join(details)})" if details else variant.title


@functools.cache
def _title_probe():
    """A tiny ViT of the benchmark's family, for reading a config's sizes (LoRA's targets are found on a model)."""
    from hf_vpt.testing_utils import tiny_vit

    return tiny_vit()


def fresh_head(base: ViTForImageClassification, seed: int) -> torch.nn.Linear:
    """A new 10-class head, initialised like transformers' ViT (trunc-normal std 0.02, zero bias) from `seed`."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    head = torch.nn.Linear(base.config.hidden_size, 10)
    with torch.no_grad():
        weight = torch.randn(head.weight.shape, generator=generator) * base.config.initializer_range
        head.weight.copy_(weight.clamp(-2 * base.config.initializer_range, 2 * base.config.initializer_range))
        head.bias.zero_()
    return head


def build_model(method: str, base: ViTForImageClassification, seed: int):
    """A copy of the frozen backbone with a fresh head, wrapped for `method`; returns (model, trainable params)."""
    model = copy.deepcopy(base)
    model.classifier = fresh_head(base, seed)
    model.config.num_labels = 10
    torch.manual_seed(seed)  # prompt / LoRA initialisation
    trains = training_variant(method).trains
    if trains == "all":
        model.requires_grad_(True)
    elif trains == "head":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
    else:
        model = get_peft_model(model, adapter_config(method, model))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def adapter_bytes(method: str, model) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        if training_variant(method).trains == "head":
            path = os.path.join(tmp, "head.safetensors")
            save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()}, path)
            return os.path.getsize(path), "head.safetensors (classifier only)"
        model.save_pretrained(tmp)
        name = "model.safetensors" if training_variant(method).trains == "all" else "adapter_model.safetensors"
        return os.path.getsize(os.path.join(tmp, name)), name


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
class Diverged(Exception):
    """The training loss stopped being finite: the run ends there and is scored as it is (lr search)."""


def fit(module, forward, params, x, y, lr, epochs, batch_size, seed, weight_decay):
    """AdamW, linear warm-up over the first epoch, cosine to 0, through the recipes' loop (`_common.train_loop`);
    the batches are drawn by a generator seeded with `seed`. `module` owns `params` (the model, or the head alone
    for linear probing); `forward(x)` gives logits. Returns the mean training loss of the last epoch (NaN if the
    loss diverged, which stops the run)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    accelerator = Accelerator(cpu=True)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    scheduler = transformers.get_scheduler(
        "cosine", optimizer, num_warmup_steps=min(steps_per_epoch, total), num_training_steps=total
    )
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)
    losses = []  # (loss, batch size) of every step

    def loss_fn(batch):
        inputs, labels = batch
        loss = F.cross_entropy(forward(inputs), labels)
        losses.append((loss.item(), len(labels)))
        return loss

    def stop_if_diverged(step):
        if not math.isfinite(losses[-1][0]):
            raise Diverged

    args = types.SimpleNamespace(
        max_train_steps=total, gradient_accumulation_steps=1, output_dir=tempfile.gettempdir(),
        logging_steps=total, disable_tqdm=True,
    )  # fmt: skip
    try:
        _common.train_loop(accelerator, args, module, optimizer, scheduler, loader, loss_fn, on_step=stop_if_diverged)
    except Diverged:
        return float("nan")
    finally:
        accelerator.free_memory()
    last = losses[-steps_per_epoch:]
    return sum(loss * n for loss, n in last) / sum(n for _, n in last)


@torch.no_grad()
def predict(forward, x, batch_size=200) -> torch.Tensor:
    return torch.cat([forward(x[i : i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def head_features(base: ViTForImageClassification, x: torch.Tensor, batch_size=200) -> torch.Tensor:
    """The exact input of the classifier (CLS after the final LayerNorm) for every image, via a pre-forward hook."""
    captured = []
    hook = base.classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        base.eval()
        for i in range(0, len(x), batch_size):
            base(pixel_values=x[i : i + batch_size], interpolate_pos_encoding=True)
    finally:
        hook.remove()
    return torch.cat(captured)


class Runner:
    """Trains and evaluates one (backbone, method, lr, seed) setting."""

    def __init__(self, base, pixels, labels, args):
        self.base, self.pixels, self.labels, self.args = base, pixels, labels, args
        self._features = None
        self.feature_time = (0.0, 0.0)
        self.feature_peak_mib = 0.0

    def features(self):
        if self._features is None:
            wall, cpu = time.perf_counter(), time.process_time()
            with PeakRSS() as memory:
                self._features = head_features(self.base, self.pixels, self.args.batch_size)
            n = len(self.pixels)
            self.feature_time = ((time.perf_counter() - wall) / n, (time.process_time() - cpu) / n)
            self.feature_peak_mib = memory.delta_mib
        return self._features

    def run(self, method, lr, seed, train_idx, eval_idx, measure=False):
        args = self.args
        model, params = build_model(method, self.base, seed)
        head_only = training_variant(method).trains == "head"
        trained = model.classifier if head_only else model
        if head_only:  # the head alone, on the precomputed features (its exact input)
            inputs = self.features()

            def forward(batch):
                return trained(batch)

        else:
            inputs = self.pixels

            def forward(batch):
                return model(pixel_values=batch, interpolate_pos_encoding=True).logits

        x_train, y_train = inputs[train_idx], self.labels[train_idx]
        wall, cpu = time.perf_counter(), time.process_time()
        with PeakRSS() as memory:
            final_loss = fit(
                trained, forward, params, x_train, y_train, lr, args.epochs,
                args.batch_size, seed, args.weight_decay,
            )  # fmt: skip
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = memory.delta_mib
        if head_only:  # the head needs the features of its training images; count their extraction
            wall += self.feature_time[0] * len(train_idx)
            cpu += self.feature_time[1] * len(train_idx)
            peak = max(peak, self.feature_peak_mib)
        model.eval()
        accuracy = float((predict(forward, inputs[eval_idx]) == self.labels[eval_idx]).float().mean())
        result = {
            "lr": lr,
            "seed": seed,
            "accuracy": accuracy,
            "final_train_loss": final_loss,
            "train_time_s": wall,
            "train_cpu_time_s": cpu,
            "peak_rss_delta_mib": peak,
            "memory_method": memory.method,
        }
        if measure:
            result["trainable_params"] = sum(p.numel() for p in params)
            result["adapter_bytes"], result["adapter_file"] = adapter_bytes(method, model)
            if isinstance(getattr(model, "peft_config", {}).get("default"), hf_vpt.GatedPromptConfig):
                gates = hf_vpt.gate_values(model)
                result["gates"] = [row["gate"] for row in gates if row["gate"] is not None]
                result["temperatures"] = [row["temperature"] for row in gates]
        return result


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------
def human_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def markdown_table(results: dict) -> str:
    lines = [
        "| backbone | method | test acc % (mean ± std, n) | lr (val acc %) | trainable params | adapter file | "
        "train time s | train CPU s | peak RSS Δ MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for backbone, entry in results["backbones"].items():
        for method in METHODS:
            if method not in entry["methods"]:
                continue
            m = entry["methods"][method]
            if m.get("status") != "ok":
                lines.append(f"| {backbone} | {method_title(method)} | {m.get('status')} | | | | | | |")
                continue
            runs = m["runs"]
            val = m["lr_search"].get(f"{m['lr']:g}") if m.get("lr_search") else None
            lr_text = f"{m['lr']:g}" + (f" ({100 * val:.1f})" if val is not None else " (fixed)")
            lines.append(
                f"| {backbone} | {method_title(method)} | {100 * m['test_acc_mean']:.1f} ± {100 * m['test_acc_std']:.1f} "
                f"({len(runs)}) | {lr_text} | {runs[0]['trainable_params']:,} | {human_bytes(runs[0]['adapter_bytes'])} | "
                f"{statistics.mean(r['train_time_s'] for r in runs):.0f} | "
                f"{statistics.mean(r['train_cpu_time_s'] for r in runs):.0f} | "
                f"{statistics.mean(r['peak_rss_delta_mib'] for r in runs):.0f} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = ["o", "s", "^", "D"]
    for i, (backbone, entry) in enumerate(results["backbones"].items()):
        xs, ys, es, names = [], [], [], []
        for method in METHODS:
            m = entry["methods"].get(method)
            if not m or m.get("status") != "ok":
                continue
            xs.append(m["runs"][0]["trainable_params"])
            ys.append(100 * m["test_acc_mean"])
            es.append(100 * m["test_acc_std"])
            names.append(method)
        ax.errorbar(xs, ys, yerr=es, fmt=markers[i % len(markers)], capsize=3, label=backbone, alpha=0.85)
        for x, y, name in zip(xs, ys, names):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -10 if i else 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    settings = results["settings"]
    ax.set_ylabel(f"test accuracy on {settings['test_images']} held-out digits (%)")
    ax.set_title(
        f"digits, {settings['train_images']} training images, {settings['image_size']} px, {settings['epochs']} epochs, "
        f"seeds {settings['seeds']}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES), help="Comma-separated folder names.")
    parser.add_argument("--weights_dir", default=str(DEFAULT_WEIGHTS_DIR), help="Folder holding the backbones.")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, from {METHODS}.")
    parser.add_argument(
        "--seeds", default="0,1,2", help="Comma-separated training seeds (the first one is used for the lr search)."
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--train_images", type=int, default=1000, help="Per class: train_images // 10.")
    parser.add_argument("--test_images", type=int, default=None, help="Default: all the remaining images (797).")
    parser.add_argument(
        "--lr_grid_search",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Choose each lr on train800/val200 (default); --no-lr_grid_search uses the fixed --lrs.",
    )
    parser.add_argument(
        "--lrs",
        default="",
        help="Overrides, e.g. 'vpt_deep=0.003,full=1e-4': with the grid "
        "search on, a single-value grid; off, the fixed lr.",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--output", default=str(REPO_ROOT / "bench" / "results" / "transfer.json"))
    parser.add_argument("--plot", default=None, help="PNG path (default: the --output path with .png).")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="Add to an existing --output JSON (replacing the (backbone, method) entries run now) instead of starting "
        "it afresh; use it for a second invocation with other methods or backbones, or side-by-side invocations.",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Like --merge, and reuse every lr-search point and seed run that the JSON already holds for the same "
        "settings (the JSON is rewritten after every training run, so an interrupted run loses at most one).",
    )
    return parser


def parse_lrs(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, value = item.split("=")
        if name not in METHODS:
            raise SystemExit(f"--lrs: unknown method {name!r}; choose from {METHODS}.")
        out[name] = float(value)
    return out


def run_benchmark(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"Unknown methods {bad}; choose from {METHODS}.")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = parse_lrs(args.lrs)
    split = digits_split(args.train_images, args.test_images)
    settings = {
        key: getattr(args, key)
        for key in ("epochs", "image_size", "batch_size", "weight_decay", "train_images", "lr_grid_search")
    }
    settings.update(
        seeds=seeds,
        test_images=len(split["test"]),
        fit_images=len(split["fit"]),
        val_images=len(split["val"]),
        optimizer="AdamW, warm-up 1 epoch then cosine, per-batch steps",
        num_prompt_tokens=NUM_PROMPTS,
        gated_gate_init=GATE_INIT,
        apt_rank=APT_RANK,
        lora_rank=LORA_RANK,
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "hf_vpt": hf_vpt.__version__,
        },
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
    )
    store = Store(Path(args.output))
    previous = store.read() if args.resume else None
    if not (args.merge or args.resume):
        store.write({"settings": settings, "backbones": {}, "invocations": []})
    started = time.perf_counter()
    print(f"settings: {json.dumps(settings)}", flush=True)
    for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        path = Path(args.weights_dir) / backbone
        if not (path / "config.json").is_file():
            raise SystemExit(f"Backbone {backbone!r} not found at {path} (set --weights_dir).")
        processor = AutoImageProcessor.from_pretrained(path)
        base = ViTForImageClassification.from_pretrained(path)
        base.requires_grad_(False)
        pixels, labels = digits_pixels(args.image_size, processor.image_mean, processor.image_std)
        runner = Runner(base, pixels, labels, args)
        meta = {
            "path": os.path.relpath(path, REPO_ROOT),
            "image_mean": list(processor.image_mean),
            "image_std": list(processor.image_std),
        }
        for method in methods:
            old = reusable(previous, backbone, method, settings)
            record = {"status": "running", "settings": dict(settings), "lr_search": None, "runs": []}
            if args.lr_grid_search:
                grid = (overrides[method],) if method in overrides else LR_GRIDS[method]
                record["lr_search"], record["lr_search_seed"] = {}, seeds[0]
                old_search = (old or {}).get("lr_search") or {}
                if (old or {}).get("lr_search_seed") != seeds[0]:
                    old_search = {}
                for lr in grid:
                    key = f"{lr:g}"
                    if key in old_search:
                        record["lr_search"][key] = old_search[key]
                        if key in old.get("lr_search_cost", {}):
                            record.setdefault("lr_search_cost", {})[key] = old["lr_search_cost"][key]
                        print(f"[{backbone}] {method} lr={key}: val {100 * old_search[key]:.1f}% (reused)", flush=True)
                        continue
                    r = runner.run(method, lr, seeds[0], split["fit"], split["val"])
                    record["lr_search"][key] = r["accuracy"]
                    record.setdefault("lr_search_cost", {})[key] = {
                        k: r[k] for k in ("train_time_s", "train_cpu_time_s", "final_train_loss")
                    }
                    store.put(settings, backbone, meta, method, record)
                    print(
                        f"[{backbone}] {method} lr={key}: val {100 * r['accuracy']:.1f}% "
                        f"(loss {r['final_train_loss']:.3f}, {r['train_time_s']:.0f}s)",
                        flush=True,
                    )
                best = max(record["lr_search"].values())
                lr = min(float(k) for k, v in record["lr_search"].items() if v == best)
            else:
                lr = overrides.get(method, training_variant(method).learning_rate)
            record["lr"] = lr
            old_runs = {r["seed"]: r for r in (old or {}).get("runs", []) if f"{r['lr']:g}" == f"{lr:g}"}
            for seed in seeds:
                if seed in old_runs:
                    r = old_runs[seed]
                    print(
                        f"[{backbone}] {method} lr={lr:g} seed={seed}: test {100 * r['test_acc']:.2f}% (reused)",
                        flush=True,
                    )
                else:
                    r = runner.run(method, lr, seed, split["train"], split["test"], measure=True)
                    r["test_acc"] = r.pop("accuracy")
                    print(
                        f"[{backbone}] {method} lr={lr:g} seed={seed}: test {100 * r['test_acc']:.2f}% "
                        f"({r['train_time_s']:.0f}s wall, {r['train_cpu_time_s']:.0f}s cpu, "
                        f"{r['peak_rss_delta_mib']:.0f} MiB, {r['trainable_params']:,} params)",
                        flush=True,
                    )
                record["runs"].append(r)
                store.put(settings, backbone, meta, method, record)
            accs = [r["test_acc"] for r in record["runs"]]
            record["status"] = "ok"
            record["test_acc_mean"] = statistics.mean(accs)
            record["test_acc_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
            store.put(settings, backbone, meta, method, record)
            print(
                f"[{backbone}] {method}: {100 * record['test_acc_mean']:.2f} ± {100 * record['test_acc_std']:.2f}%"
                f"  (elapsed {time.perf_counter() - started:.0f}s)",
                flush=True,
            )
    invocation = {
        "argv": sys.argv[1:],
        "settings": settings,
        "runtime_s": time.perf_counter() - started,
        "process_cpu_s": time.process_time(),
        "load_average_at_end": os.getloadavg(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return store.finish(settings, invocation, args.plot)


# Settings that must agree before --resume reuses a finished training run.
REUSE_KEYS = (
    "epochs",
    "image_size",
    "batch_size",
    "weight_decay",
    "train_images",
    "test_images",
    "optimizer",
    "num_prompt_tokens",
    "gated_gate_init",
    "apt_rank",
    "lora_rank",
)


def reusable(previous: dict | None, backbone: str, method: str, settings: dict) -> dict | None:
    """The record of (backbone, method) in an earlier output, if it was made with the same settings."""
    record = ((previous or {}).get("backbones", {}).get(backbone, {}).get("methods", {})).get(method)
    if not record or "settings" not in record:
        return None
    if any(record["settings"].get(k) != settings.get(k) for k in REUSE_KEYS):
        return None
    return record


class Store:
    """The output JSON, rewritten (atomically, under a lock on its folder) after every finished training run.

    An interrupted invocation thus loses at most the run in progress (`--resume` continues from the file), and
    invocations running side by side (e.g. one per backbone, with `--merge`) share the file."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self):
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def read(self) -> dict | None:
        return json.loads(self.path.read_text()) if self.path.is_file() else None

    def write(self, doc: dict) -> None:
        with self.locked():
            self._write(doc)

    def _write(self, doc: dict) -> None:
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.path)

    def put(self, settings: dict, backbone: str, meta: dict, method: str, record: dict) -> None:
        with self.locked():
            doc = self.read() or {"settings": settings, "backbones": {}, "invocations": []}
            entry = doc["backbones"].setdefault(backbone, {**meta, "methods": {}})
            entry["methods"][method] = copy.deepcopy(record)
            self._write(doc)

    def finish(self, settings: dict, invocation: dict, plot_path: str | None) -> dict:
        with self.locked():
            doc = self.read() or {"settings": settings, "backbones": {}, "invocations": []}
            doc.setdefault("invocations", []).append(invocation)
            doc["table_markdown"] = markdown_table(doc)
            self._write(doc)
            plot(doc, Path(plot_path) if plot_path else self.path.with_suffix(".png"))
        return doc


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    results = run_benchmark(args)
    print(results["table_markdown"])
    print(
        f"runtime of this invocation {results['invocations'][-1]['runtime_s']:.0f}s; wrote {args.output}", flush=True
    )
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
