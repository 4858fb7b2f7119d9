#!/usr/bin/env python
"""VPT on a frozen Swin, next to linear probing, LoRA and full fine-tuning, on the digits, in minutes on a CPU.

    python examples/swin_digits/run.py            # the README's table: 3 seeds
    python examples/swin_digits/run.py --quick    # tiny settings, 1 seed (the test's run)

No pretrained Swin is available offline, so, as the ViT digits study does (examples/digits_transfer), a small
`SwinForImageClassification` (32 px, patch 4, window 4, two stages of two blocks, widths 32 and 64) is pretrained in
the run on scikit-learn's digits 0-4 (cached in `--cache_dir`, keyed by its settings), frozen, and adapted to the
unseen digits 5-9 from `--shots` labelled images per class; every other 5-9 digit is the test set. The methods are
the registry's training variants (`hf_vpt.registry.training_variant(name).build_config`): linear probing, VPT-shallow
and VPT-deep (`hf_vpt.VisualPromptConfig` through `get_peft_model`, the head in `modules_to_save`), LoRA on the
query/value projections, full fine-tuning. Data, training loop (`recipes/_common.train_loop`), optimisers and the
backbone cache are the ViT study's (imported from examples/digits_transfer).

Gated prompts and APT are not in the table: hf_vpt refuses them on Swin with a clear error, because both are defined
for global attention (one prompt sequence per image that every token attends to), and Swin attends within shifted
windows; VPT-Swin attaches the prompts to every window (see `hf_vpt/tuners/visual_prompt/swin.py`).

The first seed's adapters are saved (with their model cards) to `--output_dir/<method>`, and the VPT-deep adapter is
loaded back with `PeftModel.from_pretrained` onto a fresh copy of the backbone to check that it predicts the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings


HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS_DIR = os.path.join(os.path.dirname(HERE), "digits_transfer")
if DIGITS_DIR not in sys.path:
    sys.path.insert(0, DIGITS_DIR)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from digits_backbones import pretrain_classifier  # noqa: E402
from digits_data import (  # noqa: E402
    PRETRAIN_CLASSES,
    TRANSFER_CLASSES,
    digits_loader,
    few_shot_split,
    load_digit_tensors,
)
from digits_study import save_adapter  # noqa: E402
from digits_training import count_trainable, evaluate, fit, make_optimizer, prepare_for_method  # noqa: E402
from pretrain_cache import cached_pretraining  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import hf_vpt  # noqa: E402, F401  (registers the methods with PEFT)
from hf_vpt.registry import training_variant  # noqa: E402


SCRIPT = "examples/swin_digits/run.py"
METHODS = ("linear", "vpt_shallow", "vpt_deep", "lora", "full")
# Gated prompts and APT are refused on Swin by hf_vpt (windowed attention): not offered here.
REFUSED_ON_SWIN = ("gated", "apt")
QUICK = {
    "shots": 10,
    "epochs": 2,
    "warmup_epochs": 1,
    "num_seeds": 1,
    "pretrain_epochs": 2,
    "num_prompt_tokens": 3,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"Tiny settings for a smoke test: {QUICK}.")
    parser.add_argument("--output_dir", default="outputs/swin_digits")
    parser.add_argument("--cache_dir", default=os.path.join("~", ".cache", "hf_vpt"), help="Pretrained backbones.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Registry names, comma-separated.")
    parser.add_argument("--seed", type=int, default=0, help="First seed; the runs use seed, seed+1, ...")
    parser.add_argument("--num_seeds", type=int, default=3)
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads (the tensors are tiny).")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False, help="tqdm bars.")

    transfer = parser.add_argument_group("transfer to digits 5-9")
    transfer.add_argument("--shots", type=int, default=100, help="Labelled training images per class of 5-9.")
    transfer.add_argument("--epochs", type=int, default=20)
    transfer.add_argument("--warmup_epochs", type=float, default=2)
    transfer.add_argument("--batch_size", type=int, default=10)
    transfer.add_argument("--eval_batch_size", type=int, default=256)
    # the ViT digits study's settings (SGD + momentum for linear and VPT, AdamW for LoRA and full), not re-tuned
    transfer.add_argument("--lr_linear", type=float, default=0.25)
    transfer.add_argument("--lr_vpt_shallow", type=float, default=0.25)
    transfer.add_argument("--lr_vpt_deep", type=float, default=0.25)
    transfer.add_argument("--lr_lora", type=float, default=1e-3)
    transfer.add_argument("--lr_full", type=float, default=1e-3)
    transfer.add_argument("--weight_decay", type=float, default=1e-4, help="SGD weight decay (not on biases).")
    transfer.add_argument("--full_weight_decay", type=float, default=0.01)
    transfer.add_argument("--lora_weight_decay", type=float, default=0.01)
    transfer.add_argument("--momentum", type=float, default=0.9)
    transfer.add_argument("--num_prompt_tokens", type=int, default=5)
    transfer.add_argument("--prompt_dropout", type=float, default=0.0)
    transfer.add_argument("--prompt_init", default="vpt_uniform", choices=["vpt_uniform", "normal", "zeros"])
    transfer.add_argument("--lora_rank", type=int, default=8)
    transfer.add_argument("--lora_alpha", type=int, default=16)
    transfer.add_argument("--lora_dropout", type=float, default=0.0)

    backbone = parser.add_argument_group("the Swin backbone (pretrained on digits 0-4)")
    backbone.add_argument("--image_size", type=int, default=32, help="The 8x8 digits are upscaled to this size.")
    backbone.add_argument("--patch_size", type=int, default=4)
    backbone.add_argument("--window_size", type=int, default=4)
    backbone.add_argument("--embed_dim", type=int, default=32, help="Width of the first stage (doubles per stage).")
    backbone.add_argument("--depths", default="2,2", help="Blocks per stage.")
    backbone.add_argument("--num_heads", default="2,4", help="Attention heads per stage.")
    backbone.add_argument("--mlp_ratio", type=float, default=2.0)
    backbone.add_argument("--pretrain_epochs", type=int, default=60)
    backbone.add_argument("--pretrain_batch_size", type=int, default=64)
    backbone.add_argument("--pretrain_lr", type=float, default=2e-3)
    backbone.add_argument("--pretrain_weight_decay", type=float, default=0.05)
    backbone.add_argument("--pretrain_seed", type=int, default=0)
    return parser


def _int_list(parser, text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        parser.error(f"--{option} takes comma-separated integers (e.g. 2,2); got {text!r}.")
    if not values or any(v < 1 for v in values):
        parser.error(f"--{option} needs at least one positive integer per stage; got {text!r}.")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # tiny settings, unless given explicitly
        given = {arg.split("=")[0].lstrip("-") for arg in (sys.argv[1:] if argv is None else argv)}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        parser.error("--methods is empty; give at least one of " + ", ".join(METHODS) + ".")
    for method in args.methods:
        if method in REFUSED_ON_SWIN:
            parser.error(
                f"--methods: {method!r} is not defined on Swin (hf_vpt refuses it: it is made for global attention, "
                f"and Swin attends within windows). Use some of {', '.join(METHODS)}."
            )
        if method not in METHODS:
            try:
                training_variant(method)
            except ValueError as error:
                parser.error(f"--methods: {error}")
            parser.error(f"--methods: {method!r} is not part of this study; use some of {', '.join(METHODS)}.")
    args.depths = _int_list(parser, args.depths, "depths")
    args.num_heads = _int_list(parser, args.num_heads, "num_heads")
    if len(args.depths) != len(args.num_heads):
        parser.error(f"--depths {args.depths} and --num_heads {args.num_heads} must have one entry per stage.")
    for name in ("shots", "num_seeds", "epochs", "num_prompt_tokens", "lora_rank", "pretrain_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer; got {getattr(args, name)}.")
    if args.image_size % args.patch_size:
        parser.error(f"--image_size {args.image_size} must be a multiple of --patch_size {args.patch_size}.")
    args.cache_dir = os.path.expanduser(args.cache_dir)
    args.command = " ".join(shlex.quote(p) for p in ["python", SCRIPT, *(sys.argv[1:] if argv is None else argv)])
    return args


def swin_config(args, num_labels: int, classes):
    from transformers import SwinConfig

    return SwinConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=1,
        embed_dim=args.embed_dim,
        depths=list(args.depths),
        num_heads=list(args.num_heads),
        window_size=args.window_size,
        mlp_ratio=args.mlp_ratio,
        num_labels=num_labels,
        id2label={i: str(c) for i, c in enumerate(classes)},
        label2id={str(c): i for i, c in enumerate(classes)},
    )


def backbone_settings(args) -> dict:
    """Everything the pretrained Swin depends on: its cache key."""
    return {
        "architecture": "SwinForImageClassification",
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "window_size": args.window_size,
        "embed_dim": args.embed_dim,
        "depths": list(args.depths),
        "num_heads": list(args.num_heads),
        "mlp_ratio": args.mlp_ratio,
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain_batch_size": args.pretrain_batch_size,
        "pretrain_lr": args.pretrain_lr,
        "pretrain_weight_decay": args.pretrain_weight_decay,
        "pretrain_seed": args.pretrain_seed,
        "classes": list(PRETRAIN_CLASSES),
        "augment": "random_affine",
        "loop": "recipes/_common.train_loop",
    }


def swin_backbone(args, accelerator, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pretrain the small Swin on digits 0-4 (held-out accuracy recorded), or reuse the cached copy."""
    from transformers import SwinForImageClassification

    def pretrain():
        set_seed(args.pretrain_seed)
        model = SwinForImageClassification(swin_config(args, len(PRETRAIN_CLASSES), PRETRAIN_CLASSES))
        return pretrain_classifier(args, accelerator, model, pixels, labels, "pretrain Swin on digits 0-4")

    backbone = cached_pretraining(accelerator, args.cache_dir, "digits_swin", backbone_settings(args), pretrain)
    accelerator.free_memory()
    return backbone


def load_transfer_model(backbone_path: str):
    """The cached Swin with a fresh 5-way head for digits 5-9 (the 0-4 head is dropped)."""
    import transformers
    from transformers import SwinForImageClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the head-size mismatch is intended
    try:
        return SwinForImageClassification.from_pretrained(
            backbone_path,
            num_labels=len(TRANSFER_CLASSES),
            id2label={i: str(c) for i, c in enumerate(TRANSFER_CLASSES)},
            label2id={str(c): i for i, c in enumerate(TRANSFER_CLASSES)},
            ignore_mismatched_sizes=True,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)


def prompt_parameters(model) -> int:
    """Trainable parameters of the VPT prompt bank (0 for the other methods)."""
    return sum(
        param.numel() for name, param in model.named_parameters() if param.requires_grad and "visual_prompt" in name
    )


def train_one(args, accelerator, method: str, backbone_path: str, train_set, test_set, seed: int) -> dict:
    """One transfer run: fresh head (and adapter) from `seed`, train, evaluate on the test digits."""
    set_seed(seed)
    model = prepare_for_method(load_transfer_model(backbone_path), method, args)
    trainable, prompts = count_trainable(model), prompt_parameters(model)
    lr = getattr(args, f"lr_{method}")
    model, seconds, cpu_seconds = fit(
        accelerator,
        model,
        make_optimizer(model, method, lr, args),
        digits_loader(train_set, args.batch_size, True, seed),
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        desc=f"Swin {method} seed {seed}",
        progress=args.progress,
        output_dir=args.output_dir,
    )
    accuracy = evaluate(accelerator, model, digits_loader(test_set, args.eval_batch_size, False))
    return {
        "model": model,
        "accuracy": accuracy,
        "trainable": trainable,
        "prompt_parameters": prompts,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable parameters | test accuracy (mean ± std) | train time (s) |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['title']} | {row['trainable_parameters']:,} | {100 * row['accuracy_mean']:.2f} ± "
            f"{100 * row['accuracy_std']:.2f} % | {row['train_time_s_mean']:.1f} |"
        )
    return "\n".join(lines)


def reload_and_compare(args, accelerator, backbone_path: str, saved: dict, pixels) -> dict:
    """Load a saved adapter onto a fresh copy of the backbone; its largest logit difference to the trained model."""
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_transfer_model(backbone_path), saved["path"]).eval()
    sample = pixels[:: max(1, len(pixels) // 32)][:32]
    with torch.no_grad():
        expected = saved["model"].eval()(pixel_values=sample).logits
        got = reloaded(pixel_values=sample).logits
    difference = (got - expected).abs().max().item()
    accelerator.print(
        f"\nReloaded {saved['path']} with PeftModel.from_pretrained: largest logit difference to the trained model "
        f"{difference:.1e} on {len(sample)} digits"
    )
    return {"path": saved["path"], "max_logit_difference": difference}


def main(argv: list[str] | None = None) -> dict:
    """Run the study; returns the summary written to results.json plus the first seed's trained adapters."""
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    log = accelerator.print
    wall = time.perf_counter()
    pixels, labels = load_digit_tensors(args.image_size)
    backbone = swin_backbone(args, accelerator, pixels, labels)
    when = "reused from the cache" if backbone["reused"] else f"pretrained in {backbone['pretrain_time_s']:.1f} s"
    widths = [args.embed_dim * 2**i for i in range(len(args.depths))]
    log(
        f"Swin backbone: {args.image_size} px, patch {args.patch_size}, window {args.window_size}, stages of "
        f"{args.depths} blocks, widths {widths}, {when} ({backbone['path']}); held-out accuracy on digits 0-4: "
        f"{100 * backbone['heldout_accuracy']:.2f} %"
    )

    seeds = [args.seed + i for i in range(args.num_seeds)]
    transfer_labels = labels - TRANSFER_CLASSES[0]
    runs = {method: [] for method in args.methods}
    adapters = {}
    for seed in seeds:
        train_idx, test_idx = few_shot_split(labels, args.shots, seed)
        train_set = TensorDataset(pixels[train_idx], transfer_labels[train_idx])
        test_set = TensorDataset(pixels[test_idx], transfer_labels[test_idx])
        for method in args.methods:
            result = train_one(args, accelerator, method, backbone["path"], train_set, test_set, seed)
            runs[method].append(result)
            log(f"seed {seed} {method:<12} test accuracy {100 * result['accuracy']:.2f} % ({result['seconds']:.1f} s)")
            if training_variant(method).trains == "adapter" and seed == seeds[0]:
                folder = os.path.join(args.output_dir, method)
                save_adapter(args, accelerator, result["model"], folder, seed=seed, accuracy=result["accuracy"])
                adapters[method] = {"path": folder, "model": accelerator.unwrap_model(result["model"]), "seed": seed}
            result["model"] = None
            accelerator.free_memory()

    rows = []
    for method, results in runs.items():
        accuracies = [r["accuracy"] for r in results]
        rows.append(
            {
                "method": method,
                "title": training_variant(method).title,
                "learning_rate": getattr(args, f"lr_{method}"),
                "accuracy_mean": float(np.mean(accuracies)),
                "accuracy_std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
                "accuracies": accuracies,
                "trainable_parameters": results[0]["trainable"],
                "prompt_parameters": results[0]["prompt_parameters"],
                "train_time_s_mean": float(np.mean([r["seconds"] for r in results])),
                "train_cpu_time_s_mean": float(np.mean([r["cpu_seconds"] for r in results])),
                "adapter_path": adapters.get(method, {}).get("path"),
            }
        )
    table = format_table(rows)
    num_test = len(few_shot_split(labels, args.shots, seeds[0])[1])
    log(
        f"\nSwin, digits 0-4 -> 5-9, {args.shots} shots per class, {num_test} test images, seeds {seeds}, "
        f"{args.epochs} epochs, {args.num_prompt_tokens} prompt tokens (std over seeds, ddof=1):\n"
    )
    log(table)
    reload = None
    if accelerator.is_main_process and adapters:
        saved = adapters.get("vpt_deep") or next(iter(adapters.values()))
        reload = reload_and_compare(args, accelerator, backbone["path"], saved, pixels)
    summary = {
        "experiment": "Swin, digits 0-4 -> 5-9",
        "backbone": dict(backbone),
        "stage_widths": widths,
        "seeds": seeds,
        "num_test_images": num_test,
        "results": rows,
        "table": table,
        "reload": reload,
        "command": args.command,
        "settings": {k: v for k, v in vars(args).items() if k != "command"},
        "wall_time_s": time.perf_counter() - wall,
    }
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "results.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        log(f"\nwrote {path}; wall time {summary['wall_time_s']:.1f} s")
    summary["adapters"] = adapters
    return summary


if __name__ == "__main__":
    main()
