#!/usr/bin/env python
"""Prompt tuning on a frozen pretrained ViT, next to linear probing and full fine-tuning, in a few minutes on a CPU.

    python examples/digits_transfer/run.py              # the demo: 3.5 minutes on a busy 2-core machine
    python examples/digits_transfer/run.py --study      # the README's digits study (both backbones, 3 seeds)
    python examples/digits_transfer/run.py --study --num_seeds 5      # its published tables

A small ViT is pretrained in the run on scikit-learn's 8x8 digits 0-4 (cached in `--cache_dir`, keyed by its
settings), frozen, and adapted to the unseen digits 5-9 from 100 labelled images per class; the other 5-9 digits
are the test set. The demo trains linear probing, VPT-deep and full fine-tuning on one seed, prints the table,
saves the VPT-deep adapter with its model card, and loads it back with `PeftModel.from_pretrained` to predict.

`--study` runs the whole study: a second backbone pretrained with the MAE objective (no labels) for gated prompt
tuning (see digits_mae.py), VPT-shallow too, several seeds, the gate plot; `--tune` picks the learning rates by
k-fold cross-validation inside the training shots (the test digits are never looked at). Training runs through the
recipes' shared loop (`recipes/_common.train_loop`) with the methods of `hf_vpt.registry`; `accelerate launch`
works as for the recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from digits_backbones import load_transfer_model, supervised_backbone  # noqa: E402
from digits_data import TRANSFER_CLASSES, few_shot_split, load_digit_tensors  # noqa: E402
from digits_mae import mae_backbone  # noqa: E402
from digits_study import transfer_experiment, tune  # noqa: E402

import hf_vpt  # noqa: E402, F401  (registers the methods with PEFT)
from hf_vpt.registry import training_variant  # noqa: E402


BACKBONES = ("supervised", "mae")
# The demo and the study differ only in these defaults; every option below works in both.
MODE_DEFAULTS = {
    "demo": {"backbones": "supervised", "methods": "linear,vpt_deep,full", "num_seeds": 1},
    "study": {"backbones": "supervised,mae", "methods": "linear,vpt_shallow,vpt_deep,full", "num_seeds": 3},
}
MAE_METHODS = "linear,vpt_shallow,vpt_deep,gated"
# 3-fold CV on the MAE backbone (vpt_shallow untuned: vpt_deep's value)
MAE_DEFAULT_LRS = "linear=0.25,vpt_shallow=0.1,vpt_deep=0.1,gated=0.05"
SCRIPT = "examples/digits_transfer/run.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    bool_flag = argparse.BooleanOptionalAction
    parser.add_argument("--study", action="store_true", help="The whole study (both backbones, several seeds).")
    parser.add_argument("--output_dir", default="outputs/digits_transfer")
    parser.add_argument("--cache_dir", default=os.path.join("~", ".cache", "hf_vpt"), help="Pretrained backbones.")
    parser.add_argument("--backbones", default=None, help="'supervised' and/or 'mae'. Default: supervised (demo).")
    parser.add_argument("--methods", default=None, help="Methods on the supervised backbone (registry names).")
    parser.add_argument("--mae_methods", default=MAE_METHODS, help="Methods on the MAE backbone.")
    parser.add_argument("--seed", type=int, default=0, help="First seed; the runs use seed, seed+1, ...")
    parser.add_argument("--num_seeds", type=int, default=None, help="Default: 1 (demo) or 3 (--study).")
    parser.add_argument("--progress", action=bool_flag, default=False, help="tqdm bars.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads (the tensors are tiny).")

    transfer = parser.add_argument_group("transfer")
    transfer.add_argument("--shots", type=int, default=100, help="Labelled training images per class of 5-9.")
    transfer.add_argument("--epochs", type=int, default=20)
    transfer.add_argument("--warmup_epochs", type=float, default=2)
    transfer.add_argument("--batch_size", type=int, default=10)
    transfer.add_argument("--eval_batch_size", type=int, default=256)
    # chosen by 3-fold CV inside the shots on the supervised backbone (README); gated, APT, LoRA untuned
    transfer.add_argument("--lr_linear", type=float, default=0.25)
    transfer.add_argument("--lr_vpt_shallow", type=float, default=0.25)
    transfer.add_argument("--lr_vpt_deep", type=float, default=0.25)
    transfer.add_argument("--lr_gated", type=float, default=1.0)
    transfer.add_argument("--lr_apt", type=float, default=1e-3)
    transfer.add_argument("--lr_lora", type=float, default=1e-3)
    transfer.add_argument("--lr_full", type=float, default=1e-3)
    transfer.add_argument("--mae_lrs", default=MAE_DEFAULT_LRS, help="'method=lr,...' on the MAE backbone.")
    transfer.add_argument("--weight_decay", type=float, default=1e-4, help="SGD weight decay (not on biases).")
    transfer.add_argument("--full_weight_decay", type=float, default=0.01)
    transfer.add_argument("--apt_weight_decay", type=float, default=0.01)
    transfer.add_argument("--lora_weight_decay", type=float, default=0.01)
    transfer.add_argument("--momentum", type=float, default=0.9)
    transfer.add_argument("--num_prompt_tokens", type=int, default=5)
    transfer.add_argument("--prompt_dropout", type=float, default=0.0)
    transfer.add_argument("--prompt_init", default="vpt_uniform", choices=["vpt_uniform", "normal", "zeros"])
    transfer.add_argument("--gate_init", type=float, default=10.0, help="Gates start at sigmoid(-gate_init).")
    transfer.add_argument("--gated_learn_temperature", action=bool_flag, default=True)
    transfer.add_argument("--apt_rank", type=int, default=4)
    transfer.add_argument("--lora_rank", type=int, default=8)
    transfer.add_argument("--lora_alpha", type=int, default=16)
    transfer.add_argument("--lora_dropout", type=float, default=0.0)
    transfer.add_argument("--augment", action=bool_flag, default=False, help="Random affine warps in training.")

    tuning = parser.add_argument_group("learning-rate search")
    tuning.add_argument("--tune", action="store_true", help="k-fold CV inside the shots instead of the tables.")
    tuning.add_argument("--tune_folds", type=int, default=5)
    tuning.add_argument("--tune_lrs", default=None, help="Comma-separated learning rates instead of the grids.")

    backbone = parser.add_argument_group("the backbones (pretrained on digits 0-4)")
    backbone.add_argument("--image_size", type=int, default=16, help="The 8x8 digits are upscaled to this size.")
    backbone.add_argument("--patch_size", type=int, default=4)
    backbone.add_argument("--hidden_size", type=int, default=64)
    backbone.add_argument("--num_hidden_layers", type=int, default=4)
    backbone.add_argument("--num_attention_heads", type=int, default=4)
    backbone.add_argument("--intermediate_size", type=int, default=128)
    backbone.add_argument("--pretrain_epochs", type=int, default=60)
    backbone.add_argument("--pretrain_batch_size", type=int, default=64)
    backbone.add_argument("--pretrain_lr", type=float, default=2e-3)
    backbone.add_argument("--pretrain_weight_decay", type=float, default=0.05)
    backbone.add_argument("--pretrain_seed", type=int, default=0)
    backbone.add_argument("--mae_patch_size", type=int, default=4)
    backbone.add_argument("--mae_mask_ratio", type=float, default=0.75)
    backbone.add_argument("--mae_pretrain_epochs", type=int, default=200)
    backbone.add_argument("--mae_pretrain_lr", type=float, default=1.5e-3)
    return parser


def _method_list(parser, text: str, option: str) -> list[str]:
    names = [m.strip() for m in str(text).split(",") if m.strip()]
    if not names:
        parser.error(f"--{option} is empty; give at least one method.")
    for name in names:
        try:
            variant = training_variant(name)
        except ValueError as error:
            parser.error(f"--{option}: {error}")
        if variant.name == "generative":
            parser.error(f"--{option}: 'generative' is for token-based image generators, not a classifier.")
    return names


def parse_method_values(parser, text: str, option: str) -> dict[str, float]:
    """'gated=0.05,vpt_deep=0.1' -> {'gated': 0.05, 'vpt_deep': 0.1}, with errors that name the option."""
    values = {}
    for item in (part.strip() for part in str(text or "").split(",")):
        if not item:
            continue
        method, sep, value = item.partition("=")
        method = method.strip()
        if not sep:
            parser.error(f"--{option} takes method=value pairs; got {item!r}.")
        _method_list(parser, method, option)
        try:
            values[method] = float(value)
        except ValueError:
            parser.error(f"--{option}: {value!r} (for {method}) is not a number.")
        if not values[method] > 0:
            parser.error(f"--{option}: the learning rate of {method} must be positive; got {value}.")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.mode = "study" if args.study else "demo"
    for key, value in MODE_DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = _method_list(parser, args.methods, "methods")
    args.mae_methods = _method_list(parser, args.mae_methods, "mae_methods")
    args.backbones = [b.strip() for b in str(args.backbones).split(",") if b.strip()]
    if not args.backbones or any(b not in BACKBONES for b in args.backbones):
        parser.error(f"--backbones must list some of {', '.join(BACKBONES)}; got {args.backbones}.")
    args.mae_lrs = parse_method_values(parser, args.mae_lrs, "mae_lrs")
    if args.tune_lrs:
        try:
            args.tune_lrs = [float(v) for v in args.tune_lrs.split(",")]
        except ValueError:
            parser.error(f"--tune_lrs takes comma-separated numbers; got {args.tune_lrs!r}.")
    if not 0.0 < args.mae_mask_ratio < 1.0:
        parser.error(f"--mae_mask_ratio must be in (0, 1); got {args.mae_mask_ratio}.")
    for name in ("shots", "num_seeds", "epochs", "num_prompt_tokens", "apt_rank", "lora_rank", "tune_folds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer; got {getattr(args, name)}.")
    args.cache_dir = os.path.expanduser(args.cache_dir)
    args.command = " ".join(shlex.quote(p) for p in ["python", SCRIPT, *(sys.argv[1:] if argv is None else argv)])
    return args


def load_backbone(args, accelerator, kind: str, pixels, labels) -> dict:
    """The pretrained backbone `kind`, pretrained now or reused from the cache, with its quality printed."""
    if kind == "supervised":
        backbone = supervised_backbone(args, accelerator, pixels, labels)
        quality = f"held-out accuracy on digits 0-4: {100 * backbone['heldout_accuracy']:.2f} %"
    else:
        backbone = mae_backbone(args, accelerator, pixels, labels)
        quality = (
            f"held-out MAE loss on digits 0-4: {backbone['heldout_reconstruction_loss']:.4f} "
            f"(untrained: {backbone['heldout_reconstruction_loss_at_init']:.4f})"
        )
    when = "reused from the cache" if backbone["reused"] else f"pretrained in {backbone['pretrain_time_s']:.1f} s"
    accelerator.print(
        f"{kind} backbone: ViT {args.num_hidden_layers} blocks x {args.hidden_size} wide, {args.image_size} px, "
        f"{when} ({backbone['path']}); {quality}"
    )
    return {"kind": kind, **backbone}


def reload_and_predict(args, accelerator, summary: dict, pixels, labels) -> dict | None:
    """Load the first saved adapter back onto a fresh copy of the frozen backbone and predict test digits."""
    from peft import PeftModel

    adapters = summary.get("adapters") or {}
    method = "vpt_deep" if "vpt_deep" in adapters else next(iter(adapters), None)
    if method is None or not accelerator.is_main_process:
        return None
    saved = adapters[method]
    card = open(os.path.join(saved["path"], "README.md"), encoding="utf-8").read()
    title = next((line for line in card.splitlines() if line.startswith("# ")), "")
    accelerator.print(f"\nSaved {training_variant(method).title} adapter: {saved['path']} (model card: {title[2:]})")
    for name in sorted(os.listdir(saved["path"])):
        accelerator.print(f"  {name:<28} {os.path.getsize(os.path.join(saved['path'], name)):>8,} bytes")
    base = load_transfer_model(summary["backbone"]["path"])
    model = PeftModel.from_pretrained(base, saved["path"]).eval()
    _, test_idx = few_shot_split(labels, args.shots, saved["seed"])
    sample = torch.as_tensor(test_idx[:: max(1, len(test_idx) // 12)][:12])
    with torch.no_grad():
        logits = model(pixel_values=pixels[sample]).logits
        trained = saved["model"].eval()(pixel_values=pixels[sample]).logits
    predicted = [TRANSFER_CLASSES[i] for i in logits.argmax(-1).tolist()]
    accelerator.print(
        "Reloaded with PeftModel.from_pretrained; predictions on 12 test digits:\n"
        f"  predicted {predicted}\n  true      {labels[sample].tolist()}\n"
        f"  largest logit difference to the model in memory: {(logits - trained).abs().max().item():.1e}"
    )
    return {"method": method, "predicted": predicted, "true": labels[sample].tolist()}


def main(argv: list[str] | None = None) -> dict:
    """Run the demo or the study; returns the summary written to results.json plus the trained adapters."""
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    transformers.logging.disable_progress_bar()  # no "Loading weights" bar for each of the many small loads
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    wall = time.perf_counter()
    pixels, labels = load_digit_tensors(args.image_size)
    seeds = [args.seed + i for i in range(args.num_seeds)]
    experiments = {}
    for kind in args.backbones:
        backbone = load_backbone(args, accelerator, kind, pixels, labels)
        methods = args.methods if kind == "supervised" else args.mae_methods
        run = tune if args.tune else transfer_experiment
        experiments[kind] = run(args, accelerator, backbone, methods, pixels, labels, seeds)
    adapters = {kind: experiment.pop("adapters", {}) for kind, experiment in experiments.items()}
    summary = {
        **experiments[args.backbones[0]],
        "command": args.command,
        "settings": {k: v for k, v in vars(args).items() if k != "command"},
        "num_processes": accelerator.num_processes,
        "by_backbone": experiments,
    }
    if not args.tune:
        shown = {**summary, "adapters": adapters[args.backbones[0]]}
        summary["reload"] = reload_and_predict(args, accelerator, shown, pixels, labels)
    summary["wall_time_s"] = time.perf_counter() - wall
    if accelerator.is_main_process:
        name = "tuning.json" if args.tune else "results.json"
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, name), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        accelerator.print(f"\nwrote {os.path.join(args.output_dir, name)}; wall time {summary['wall_time_s']:.1f} s")
        if args.mode == "demo" and not args.tune:
            accelerator.print("The whole study (MAE backbone, gated prompts, 3 seeds): add --study.")
    summary["adapters"] = adapters[args.backbones[0]]
    summary["adapters_by_backbone"] = adapters
    return summary


if __name__ == "__main__":
    main()
