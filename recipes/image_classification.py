#!/usr/bin/env python
"""Image classification with prompt tuning on a frozen ViT, next to the usual baselines.

Methods: linear probing, VPT-shallow, VPT-deep, gated prompt tuning (`gated`), approximated prompt tuning (`apt`),
and as baselines PEFT's LoRA (`lora`, rank 8 on the attention's query and value projections) and full fine-tuning.
The VPT family and linear probing train with SGD + momentum as in VPT's code; APT, LoRA and full fine-tuning with
AdamW. Each method has its learning-rate option (`--lr_vpt_deep`, `--lr_lora`, ...).

Two modes, one script:

* **Default (no arguments, no network):** an embedded transfer experiment for a CPU (about 20-25 minutes on 2
  shared cores the first time, pretraining included). Two small ViTs are pretrained on scikit-learn's 8x8 digits
  of classes 0-4 (cached, keyed by their hyper-parameters): one supervised, one with the MAE objective
  (`--backbones`, see digits_mae.py). Each is frozen and transferred to classes 5-9 from `--shots` labelled images
  per class: linear, vpt_shallow, vpt_deep and full on the supervised one (`--methods`), linear, vpt_shallow,
  vpt_deep and gated on the MAE one (`--mae_methods`). The remaining 5-9 digits are the test set.
  Several seeds; a table (accuracy mean ± std, trainable parameters, train time) is printed and written to
  `<output_dir>/results.json`; the adapters are saved with `save_pretrained`.

      python recipes/image_classification.py
      python recipes/image_classification.py --methods linear,vpt_deep,gated,apt,lora,full
      accelerate launch recipes/image_classification.py --mixed_precision bf16

  `--tune` instead picks the learning rates by k-fold cross-validation *inside* the few-shot training sets (the
  test digits are never looked at); the defaults of linear, VPT and full below were chosen that way, those of
  gated, APT and LoRA are untuned starting points (`--tune --methods gated,apt,lora` searches them).

* **Your model and data:** fine-tune a Hub (or local) checkpoint on a Hub dataset or a local `imagefolder`.

      accelerate launch recipes/image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \
          --dataset_name uoft-cs/cifar10 --image_column img --label_column label --method vpt_deep

Several processes (`accelerate launch --num_processes N`) give the same training as one process with an N times
larger `--batch_size`: every process starts from the same seed, the shuffled order is drawn by one seeded
generator, and process i takes batches i, i + N, ... of it, so one optimiser step sees the same images either way
(when the number of training images is a multiple of N x `--batch_size`; otherwise accelerate pads the last step
with images from the start). tests/test_multiprocess.py checks this with `--save_rank_tensors`.

Every option can also come from a YAML file, `--config my.yaml`, whose keys (the option names below, without the
dashes) override the defaults; options given on the command line override the file.

On your data, `--checkpointing_steps N` (or `epoch`) saves `accelerator.save_state` checkpoints to
`<output_dir>/checkpoint-<step>`, and `--resume_from_checkpoint latest` (or a checkpoint folder) continues an
interrupted run where it stopped (model and adapter, optimiser, LR schedule, RNG states, position in the epoch), to
the same trained tensors as an uninterrupted run. The digits experiment (many short runs) does not checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import digits_mae  # noqa: E402

import hf_vpt  # noqa: E402


METHODS = ("linear", "vpt_shallow", "vpt_deep", "gated", "apt", "lora", "full")
# The digits experiment's default --methods; the others are opt-in.
DIGITS_METHODS = ("linear", "vpt_shallow", "vpt_deep", "full")
BACKBONES = ("supervised", "mae")
MAE_METHODS = ("linear", "vpt_shallow", "vpt_deep", "gated")
READOUT_METHODS = ("vpt_shallow", "vpt_deep", "gated")  # configs with a `readout` field
MAE_DEFAULT_LRS = "linear=0.25,vpt_shallow=0.1,vpt_deep=0.1,gated=0.05"  # 3-fold CV on the MAE backbone (vpt_shallow: untuned, vpt_deep's value)
PROMPT_METHODS = ("vpt_shallow", "vpt_deep", "gated", "apt")
# Methods whose result is a PEFT adapter (saved with its model card); linear and full save the whole model.
ADAPTER_METHODS = (*PROMPT_METHODS, "lora")
METHOD_TITLES = {
    "linear": "linear probing",
    "vpt_shallow": "VPT-shallow",
    "vpt_deep": "VPT-deep",
    "gated": "gated prompt tuning",
    "apt": "APT",
    "lora": "LoRA",
    "full": "full fine-tuning",
}
ADAMW_EPS = 1e-6  # of every AdamW method (full fine-tuning, APT, LoRA)
# Learning-rate grids searched by `--tune` (SGD for the head and the VPT family, AdamW for the others).
SGD_LR_GRID = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ADAMW_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
ADAPTER_ADAMW_LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)  # APT and LoRA train few parameters: larger steps than full
TUNE_GRIDS = {"full": ADAMW_LR_GRID, "apt": ADAPTER_ADAMW_LR_GRID, "lora": ADAPTER_ADAMW_LR_GRID}
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TRANSFER_CLASSES = (5, 6, 7, 8, 9)
# Options that take a different default in the embedded experiment and on user data.
MODE_DEFAULTS = {
    "digits": {"epochs": 20, "warmup_epochs": 2, "batch_size": 10},
    "hub": {"epochs": 10, "warmup_epochs": 1, "batch_size": 32},
}
SCRIPT = "recipes/image_classification.py"


# ---------------------------------------------------------------------------------------------------------------
# Command line and YAML config
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    bool_flag = argparse.BooleanOptionalAction
    parser.add_argument("--config", default=None, help="YAML file whose keys override these defaults.")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="outputs/image_classification")
    run.add_argument(
        "--methods",
        default=",".join(DIGITS_METHODS),
        help=f"Comma-separated methods for the digits experiment, from {', '.join(METHODS)}.",
    )
    run.add_argument("--seed", type=int, default=0, help="First seed; the runs use seed, seed+1, ...")
    run.add_argument("--num_seeds", type=int, default=3)
    run.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    run.add_argument("--gradient_accumulation_steps", type=int, default=1)
    run.add_argument("--eval_batch_size", type=int, default=256)
    run.add_argument("--progress", action=bool_flag, default=True, help="tqdm bars (main process only).")
    run.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads per process. Default: 1 for the digits experiment (its tensors are too small to "
        "gain from more), torch's own default on your data.",
    )
    _common.add_tracker_args(run, default="none")
    run.add_argument(
        "--save_rank_tensors",
        action="store_true",
        help="Every process also writes the tensors it trains (adapter and head; all weights for full fine-tuning) "
        "to <output_dir>/rank<N>/<method>-seed<S>.safetensors after training and to ...-init.safetensors before "
        "(your data: <method>[-init].safetensors), to check that the processes of a distributed run stay "
        "identical (tests/test_multiprocess.py).",
    )

    transfer = parser.add_argument_group("transfer (both modes)")
    transfer.add_argument("--epochs", type=int, default=None, help="Default: 20 (digits) or 10 (your data).")
    transfer.add_argument("--warmup_epochs", type=float, default=None, help="Default: 2 (digits) or 1 (your data).")
    transfer.add_argument("--batch_size", type=int, default=None, help="Per device. Default: 10 (digits) or 32.")
    transfer.add_argument("--lr_linear", type=float, default=0.25, help="SGD learning rate of linear probing.")
    transfer.add_argument("--lr_vpt_shallow", type=float, default=0.25, help="SGD learning rate of VPT-shallow.")
    transfer.add_argument("--lr_vpt_deep", type=float, default=0.25, help="SGD learning rate of VPT-deep.")
    transfer.add_argument("--lr_gated", type=float, default=1.0, help="SGD learning rate of gated prompt tuning.")
    transfer.add_argument("--lr_apt", type=float, default=1e-3, help="AdamW learning rate of APT.")
    transfer.add_argument("--lr_lora", type=float, default=1e-3, help="AdamW learning rate of LoRA.")
    transfer.add_argument("--lr_full", type=float, default=1e-3, help="AdamW learning rate of full fine-tuning.")
    transfer.add_argument("--weight_decay", type=float, default=1e-4, help="SGD weight decay (not on biases).")
    transfer.add_argument("--full_weight_decay", type=float, default=0.01, help="AdamW weight decay (full).")
    transfer.add_argument("--apt_weight_decay", type=float, default=0.01, help="AdamW weight decay (APT).")
    transfer.add_argument("--lora_weight_decay", type=float, default=0.01, help="AdamW weight decay (LoRA).")
    transfer.add_argument("--momentum", type=float, default=0.9)
    transfer.add_argument(
        "--num_prompt_tokens", type=int, default=5, help="Prompt tokens of VPT and gated; prompts per layer of APT."
    )
    transfer.add_argument("--prompt_dropout", type=float, default=0.0, help="VPT and gated prompts.")
    transfer.add_argument(
        "--prompt_init", default="vpt_uniform", choices=["vpt_uniform", "normal", "zeros"], help="VPT and gated."
    )
    transfer.add_argument(
        "--gate_init",
        type=float,
        default=10.0,
        help="Gated: initial gate prior k, gates start at sigmoid(-k) (the official default 10: almost closed).",
    )
    transfer.add_argument(
        "--gated_learn_temperature",
        action=bool_flag,
        default=True,
        help="Gated: learn one attention temperature per block (the official setting).",
    )
    transfer.add_argument("--apt_rank", type=int, default=4, help="APT: rank of the key map (released code: 4).")
    transfer.add_argument("--lora_rank", type=int, default=8, help="LoRA: rank r.")
    transfer.add_argument("--lora_alpha", type=int, default=16, help="LoRA: scale alpha (updates scaled by alpha/r).")
    transfer.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA: dropout on the LoRA branch input.")
    transfer.add_argument(
        "--augment",
        action=bool_flag,
        default=False,
        help="Train-time augmentation: small random affine warps (digits), horizontal flips (your data).",
    )
    transfer.add_argument("--head_module", default="classifier", help="Name of the classification head module.")

    digits = parser.add_argument_group("embedded digits experiment")
    digits.add_argument(
        "--shots",
        type=int,
        default=100,
        help="Labelled training images per class of 5-9 (100: VTAB-1k's scale of a few hundred images).",
    )
    digits.add_argument("--cache_dir", default=os.path.join("~", ".cache", "hf_vpt"))
    digits.add_argument("--image_size", type=int, default=16, help="The 8x8 digits are upscaled to this size.")
    digits.add_argument("--patch_size", type=int, default=4)
    digits.add_argument("--hidden_size", type=int, default=64)
    digits.add_argument("--num_hidden_layers", type=int, default=4)
    digits.add_argument("--num_attention_heads", type=int, default=4)
    digits.add_argument("--intermediate_size", type=int, default=128)
    digits.add_argument("--pretrain_epochs", type=int, default=60)
    digits.add_argument("--pretrain_batch_size", type=int, default=64)
    digits.add_argument("--pretrain_lr", type=float, default=2e-3)
    digits.add_argument("--pretrain_weight_decay", type=float, default=0.05)
    digits.add_argument("--pretrain_seed", type=int, default=0)
    digits.add_argument(
        "--backbones",
        default=",".join(BACKBONES),
        help="Comma-separated pretrained backbones to transfer from: 'supervised' (classification of digits 0-4) "
        "and/or 'mae' (the MAE objective on digits 0-4, no labels; see recipes/digits_mae.py).",
    )
    digits.add_argument(
        "--mae_methods",
        default=",".join(MAE_METHODS),
        help="Comma-separated methods for the MAE backbone (the gated-prompt paper's comparison).",
    )
    digits.add_argument(
        "--mae_lrs",
        default=MAE_DEFAULT_LRS,
        help="Learning rates on the MAE backbone, 'method=lr,...' (others use --lr_<method>); chosen by `--tune "
        "--backbones mae` (3-fold cross-validation inside the training shots).",
    )
    digits.add_argument("--mae_patch_size", type=int, default=4)
    digits.add_argument("--mae_mask_ratio", type=float, default=0.75)
    digits.add_argument("--mae_pretrain_epochs", type=int, default=200)
    digits.add_argument("--mae_pretrain_lr", type=float, default=1.5e-3)
    digits.add_argument("--tune", action="store_true", help="Pick learning rates by k-fold CV on the shots.")
    digits.add_argument("--tune_folds", type=int, default=5)
    digits.add_argument(
        "--tune_lrs",
        default=None,
        help="Comma-separated learning rates to search instead of each method's built-in grid (e.g. to extend it).",
    )

    hub = parser.add_argument_group("your model and data (needs the Hub unless everything is local)")
    hub.add_argument("--model_name_or_path", default=None, help="Checkpoint to adapt; switches to this mode.")
    hub.add_argument("--dataset_name", default=None, help="`datasets` name of the data.")
    hub.add_argument("--dataset_config_name", default=None)
    hub.add_argument("--train_dir", default=None, help="Local imagefolder (one sub-folder per class).")
    hub.add_argument("--validation_dir", default=None, help="Local imagefolder for evaluation.")
    hub.add_argument("--image_column", default="image")
    hub.add_argument("--label_column", default="label")
    hub.add_argument("--method", default="vpt_deep", choices=list(METHODS))
    hub.add_argument("--train_split", default="train")
    hub.add_argument("--eval_split", default=None, help="Default: 'validation', else 'test', else a train split.")
    hub.add_argument("--val_split_fraction", type=float, default=0.15)
    hub.add_argument("--max_train_samples", type=int, default=None)
    hub.add_argument("--max_eval_samples", type=int, default=None)
    hub.add_argument(
        "--checkpointing_steps",
        default=None,
        help="accelerator.save_state every N optimiser steps (an integer), or 'epoch' (after each epoch), into "
        "<output_dir>/checkpoint-<step>.",
    )
    hub.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint-<step> folder, or 'latest' for the newest one in --output_dir: restores the model, "
        "optimiser, LR schedule, RNG states and the position in the epoch, and trains on to the end.",
    )
    hub.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="Stop (as if interrupted) after this many optimiser steps, without evaluating or saving the result; "
        "the schedule still follows --epochs.",
    )
    _common.add_hub_args(hub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = _common.parse_args_with_config(parser, argv, SCRIPT, comma_lists=("methods", "mae_methods", "backbones"))
    args.mode = "hub" if args.model_name_or_path else "digits"
    for key, value in MODE_DEFAULTS[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for option in ("methods", "mae_methods"):
        chosen = [m.strip() for m in str(getattr(args, option)).split(",") if m.strip()]
        bad = [m for m in chosen if m not in METHODS]
        if bad:
            parser.error(f"unknown methods {bad} in --{option}; choose from {', '.join(METHODS)}")
        if not chosen:
            parser.error(f"--{option} is empty; give at least one of {', '.join(METHODS)}")
        setattr(args, option, chosen)
    args.backbones = [b.strip() for b in str(args.backbones).split(",") if b.strip()]
    if not args.backbones or any(b not in BACKBONES for b in args.backbones):
        parser.error(f"--backbones must list some of {', '.join(BACKBONES)}; got {args.backbones}.")
    try:
        args.mae_lrs = parse_method_values(args.mae_lrs, "mae_lrs")
    except ValueError as error:
        parser.error(str(error))
    if not 0.0 < args.mae_mask_ratio < 1.0:
        parser.error(f"--mae_mask_ratio must be in (0, 1); got {args.mae_mask_ratio}.")
    if args.mode == "hub" and not (args.dataset_name or args.train_dir):
        parser.error("--model_name_or_path needs --dataset_name or --train_dir.")
    if args.mode == "digits" and (args.dataset_name or args.train_dir):
        parser.error("--dataset_name / --train_dir need --model_name_or_path (the checkpoint to adapt).")
    if args.mode == "digits" and args.push_to_hub:
        parser.error(
            "--push_to_hub uploads the adapter trained on your data; use it with --model_name_or_path (the digits "
            "experiment's adapters are demos of a locally pretrained toy ViT)."
        )
    checkpoint_options = ("checkpointing_steps", "resume_from_checkpoint", "stop_after_steps")
    if args.mode == "digits":
        given = [f"--{name}" for name in checkpoint_options if getattr(args, name) is not None]
        if given:
            parser.error(
                f"{' / '.join(given)} applies to --model_name_or_path runs (your model and data); the embedded "
                "digits experiment (many short runs of a few seconds) does not checkpoint."
            )
    else:
        try:
            args.checkpointing_steps = parse_checkpointing_steps(args.checkpointing_steps)
        except ValueError as error:
            parser.error(str(error))
        if args.stop_after_steps is not None and args.stop_after_steps < 1:
            parser.error(f"--stop_after_steps must be a positive integer; got {args.stop_after_steps}.")
        if args.resume_from_checkpoint:
            try:
                args.resume_from_checkpoint = _common.resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
            except FileNotFoundError as error:
                parser.error(str(error))
    if args.shots < 1 or args.num_seeds < 1:
        parser.error("--shots and --num_seeds must be positive.")
    for name in ("num_prompt_tokens", "apt_rank", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer; got {getattr(args, name)}.")
    args.cache_dir = os.path.expanduser(args.cache_dir)
    args.trackers = _common.available_trackers(args.report_to)
    return args


def parse_checkpointing_steps(value) -> int | str | None:
    """`--checkpointing_steps`: None, a positive number of optimiser steps, or 'epoch'."""
    if value is None or value == "epoch":
        return value
    try:
        steps = int(value)
    except (TypeError, ValueError):
        steps = 0
    if steps < 1 or str(value).strip() not in (str(steps), f"+{steps}"):
        raise ValueError(f"--checkpointing_steps takes a positive number of steps or 'epoch'; got {value!r}.")
    return steps


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation, shared by both modes
# ---------------------------------------------------------------------------------------------------------------
def learning_rate(args, method: str, backbone_kind: str = "supervised") -> float:
    """`--lr_<method>`, or on the MAE backbone the `--mae_lrs` entry of the method where there is one."""
    if backbone_kind == "mae" and method in args.mae_lrs:
        return args.mae_lrs[method]
    return getattr(args, f"lr_{method}")


def parse_method_values(text: str, option: str) -> dict[str, float]:
    """'gated=0.05,vpt_deep=0.1' -> {'gated': 0.05, 'vpt_deep': 0.1}, with errors that name the option."""
    if isinstance(text, dict):  # a YAML mapping {method: lr}
        text = ",".join(f"{method}={value}" for method, value in text.items())
    values = {}
    for item in (part.strip() for part in str(text or "").split(",")):
        if not item:
            continue
        method, sep, value = item.partition("=")
        if not sep or method.strip() not in METHODS:
            raise ValueError(f"--{option} takes method=value pairs with methods from {METHODS}; got {item!r}.")
        try:
            values[method.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--{option}: {value!r} (for {method.strip()}) is not a number.") from None
        if not values[method.strip()] > 0:
            raise ValueError(f"--{option}: the learning rate of {method.strip()} must be positive; got {value}.")
    return values


def weight_decay(args, method: str) -> float:
    """`--weight_decay` for the SGD methods, `--<method>_weight_decay` for the AdamW ones."""
    if _common.default_optimizer_name(method) == "sgd":
        return args.weight_decay
    return getattr(args, f"{method}_weight_decay")


def optimizer_title(args, method: str) -> str:
    return f"SGD (momentum {args.momentum})" if _common.default_optimizer_name(method) == "sgd" else "AdamW"


def make_optimizer(model: torch.nn.Module, method: str, lr: float, args) -> torch.optim.Optimizer:
    """The paper optimisers: SGD with momentum for linear probing and the VPT family (as VPT's code), AdamW for
    APT, LoRA and full fine-tuning (`_common.default_optimizer_name`). Biases and other 1-d parameters (LayerNorm)
    get no weight decay."""
    return _common.make_optimizer(
        model, args, method, lr=lr, weight_decay=weight_decay(args, method), adamw_eps=ADAMW_EPS
    )


def count_trainable(model: torch.nn.Module) -> int:
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


class Checkpointing:
    """Checkpoints and resume for one `fit` call (the `--model_name_or_path` mode; the digits runs pass none).

    Checkpoints go to `<output_dir>/checkpoint-<step>` (`_common.save_checkpoint`) every `every` optimiser steps
    (an int) or after each epoch ('epoch'). `resume_from` is a checkpoint folder (`_common.resolve_checkpoint`);
    `stop_after_steps` stops early as if interrupted. `fit` fills in `step` (optimiser steps done, those before the
    resume included) and `finished` (whether the schedule ran to its end). A plain class, not a dataclass: the tests
    load this file as a module that is not in `sys.modules`.
    """

    def __init__(
        self,
        output_dir: str,
        every: int | str | None = None,
        resume_from: str | None = None,
        stop_after_steps: int | None = None,
    ):
        self.output_dir = output_dir
        self.every = every
        self.resume_from = resume_from
        self.stop_after_steps = stop_after_steps
        self.step = 0
        self.finished = False


class DataOrder:
    """The state of the shuffling generator at the start of the current epoch, saved with each checkpoint
    (`accelerator.register_for_checkpointing`): restoring it before the resumed epoch draws that epoch's order again,
    and `skip_first_batches` then skips the batches already trained on."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.epoch_start = generator.get_state()

    def mark_epoch_start(self) -> None:
        self.epoch_start = self.generator.get_state()

    def state_dict(self) -> dict:
        return {"epoch_start": self.epoch_start}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_start = state["epoch_start"]


def start_checkpointing(accelerator, checkpointing, scheduler, generator, batches_per_epoch, total_steps):
    """Register the schedule and the data order for `save_state`; load `resume_from` if given.

    Returns the `DataOrder` and where training goes on: `(epoch, batches of it already done, optimiser step)`.
    """
    if generator is None:
        raise ValueError("Checkpoints need a training DataLoader with a seeded `generator` (to redraw its order).")
    order = DataOrder(generator)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(order)
    path = checkpointing.resume_from
    if not path:
        return order, 0, 0, 0
    with open(os.path.join(path, _common.TRAINING_STATE_FILE), encoding="utf-8") as handle:
        saved = json.load(handle)
    if "epoch" not in saved:
        raise ValueError(f"{path} was not written by recipes/image_classification.py (no epoch position in it).")
    for key, value, what in (
        ("batches_per_epoch", batches_per_epoch, "batches per epoch (data, --batch_size, number of processes)"),
        ("total_steps", total_steps, "optimiser steps in all (--epochs, --batch_size, --gradient_accumulation_steps)"),
    ):
        if saved[key] != value:
            raise ValueError(
                f"{path} was written by a run with {saved[key]} {what}, this run has {value}: resume with the "
                "settings of the interrupted run."
            )
    accelerator.load_state(path)
    generator.set_state(order.epoch_start)
    accelerator.print(f"Resumed from {path} at step {saved['step']} (epoch {saved['epoch']}).")
    return order, int(saved["epoch"]), int(saved["batches_done_in_epoch"]), int(saved["step"])


def save_fit_checkpoint(accelerator, checkpointing, order, step, epoch, batches_done, batches_per_epoch, total_steps):
    """`_common.save_checkpoint` plus the position in the data; a checkpoint at the end of an epoch points at the
    start of the next one (whose order the generator's current state draws)."""
    if batches_done >= batches_per_epoch:
        order.mark_epoch_start()
        epoch, batches_done = epoch + 1, 0
    extra = {"epoch": epoch, "batches_done_in_epoch": batches_done, "total_steps": total_steps}
    return _common.save_checkpoint(accelerator, checkpointing.output_dir, step, batches_per_epoch, extra=extra)


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    epochs: int,
    warmup_epochs: float,
    augment=None,
    desc: str = "train",
    progress: bool = True,
    log_prefix: str | None = None,
    checkpointing: Checkpointing | None = None,
    on_epoch_end=None,
) -> tuple[torch.nn.Module, float, float]:
    """Train with linear warm-up then cosine decay, stepped per optimizer step.

    With `log_prefix`, the loss (mean over processes) and learning rate of every optimizer step go to the trackers
    as `<log_prefix>/train_loss` and `<log_prefix>/lr`. With `checkpointing` (see `Checkpointing`; `loader` must
    then shuffle with a seeded `generator`), the run saves checkpoints, resumes from one and may stop early; the
    numerics are those of the uninterrupted run. `on_epoch_end(model, epoch, step)` runs after every finished epoch
    (evaluation), under a forked torch RNG so that it never changes the training's random draws. Returns the
    prepared model, the wall-clock seconds and the CPU seconds of this process (of this call only, when resumed).
    """
    generator = getattr(loader, "generator", None)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batches_per_epoch = len(loader)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accelerator.gradient_accumulation_steps))
    total_steps = epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(warmup_epochs * steps_per_epoch)), total_steps)
    order, start_epoch, skip, step = None, 0, 0, 0
    if checkpointing is not None:
        order, start_epoch, skip, step = start_checkpointing(
            accelerator, checkpointing, scheduler, generator, batches_per_epoch, total_steps
        )
    every = checkpointing.every if checkpointing is not None else None
    stop_at = checkpointing.stop_after_steps if checkpointing is not None else None
    model.train()
    start, start_cpu = time.perf_counter(), time.process_time()
    bar = tqdm(
        range(start_epoch, epochs),
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=not (progress and accelerator.is_main_process),
    )
    stopped, saved_at = False, None
    for epoch in bar:
        if order is not None:
            order.mark_epoch_start()
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for index, batch in enumerate(batches, start=skip):
            with accelerator.accumulate(model):
                pixel_values = batch["pixel_values"]
                if augment is not None:
                    pixel_values = augment(pixel_values)
                logits = model(pixel_values=pixel_values).logits
                loss = F.cross_entropy(logits.float(), batch["labels"])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: the loss became {loss.item()}; lower the learning rate.")
                accelerator.backward(loss)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            if log_prefix is not None:
                mean_loss = accelerator.gather(loss.detach()[None]).mean().item()
                accelerator.log(
                    {f"{log_prefix}/train_loss": mean_loss, f"{log_prefix}/lr": scheduler.get_last_lr()[0]}, step=step
                )
            if isinstance(every, int) and step % every == 0:
                save_fit_checkpoint(
                    accelerator, checkpointing, order, step, epoch, index + 1, batches_per_epoch, total_steps
                )
                saved_at = step
            if stop_at is not None and step >= stop_at and step < total_steps:
                stopped = True
                break
        skip = 0
        if stopped:
            break
        if every == "epoch" and saved_at != step:
            save_fit_checkpoint(
                accelerator, checkpointing, order, step, epoch, batches_per_epoch, batches_per_epoch, total_steps
            )
            saved_at = step
        if on_epoch_end is not None:
            with torch.random.fork_rng(devices=[]):
                on_epoch_end(model, epoch, step)
            model.train()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    if checkpointing is not None:
        checkpointing.step, checkpointing.finished = step, not stopped
    return model, time.perf_counter() - start, time.process_time() - start_cpu


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy over processes, with the `evaluate`-format accuracy module of `hf_vpt.metrics` (offline)."""
    loader = accelerator.prepare(loader)
    model.eval()
    metric = accuracy_metric()
    for batch in loader:
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        metric.add_batch(predictions=predictions.tolist(), references=labels.tolist())
    return float(metric.compute()["accuracy"])


@functools.cache
def _accuracy_module_path() -> str:
    from hf_vpt.metrics import ACCURACY_METRIC_PATH

    return str(ACCURACY_METRIC_PATH)


def log_epoch_accuracy(accelerator: Accelerator, loader: DataLoader, model, epoch: int, step: int) -> None:
    """Evaluation after every epoch of a run on your data: printed and sent to the trackers."""
    accuracy = evaluate(accelerator, model, loader)
    accelerator.print(f"epoch {epoch + 1}: eval accuracy {100 * accuracy:.2f} %")
    accelerator.log({"eval/accuracy": accuracy}, step=step)


def accuracy_metric():
    """A fresh `evaluate` accuracy module (loaded from the local file: `evaluate.load("accuracy")` needs the Hub)."""
    import evaluate

    return evaluate.load(_accuracy_module_path())


def attention_projections(model: torch.nn.Module) -> list[str]:
    """LoRA's targets: the query and value projection of every block of the model's vision tower(s).

    The blocks are found by structure (`hf_vpt.find_towers`), the projections inside a block by the names
    transformers gives them (`q_proj`/`v_proj` in 5.x ViTs, `query`/`value` in older or other models). Returns
    the bare names (`["q_proj", "v_proj"]`) when they pick exactly these modules, which keeps the saved
    adapter_config.json free of module paths, else the full module paths.
    """
    towers = hf_vpt.find_towers(model)
    towers = [tower for tower in towers if tower.kind == "vision"] or towers
    if not towers:
        supported = ", ".join(spec.name for spec in hf_vpt.SUPPORTED_ARCHITECTURES)
        raise ValueError(
            f"{type(model).__name__} contains no transformer that hf_vpt knows ({supported}), so the LoRA baseline "
            "cannot find the query/value projections of its attention blocks. Use a model built on one of them, or "
            "give LoRA its target_modules yourself with peft.LoraConfig."
        )
    targets = []
    for tower in towers:
        for block_name, block in zip(tower.block_names, tower.blocks):
            for role, names in (("query", tower.spec.query_names), ("value", tower.spec.value_names)):
                found = [
                    name
                    for name, module in block.named_modules()
                    if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names
                ]
                if len(found) != 1:
                    raise ValueError(
                        f"Expected one attention {role} projection (an nn.Linear named one of {names}) in "
                        f"{block_name} ({type(block).__name__}), found {found or 'none'}."
                    )
                targets.append(f"{block_name}.{found[0]}")
    leaves = sorted({target.rsplit(".", 1)[-1] for target in targets})
    same_leaf = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in leaves}
    return leaves if same_leaf == set(targets) else targets


def adapter_config(model: torch.nn.Module, method: str, args, readout: str = "default"):
    """The PEFT config of an adapter method; the head (`--head_module`) is trained and saved with it.

    `readout` goes to the prompt configs that have one (VPT, gated): "default" or an MAE readout."""
    head = [args.head_module]
    if readout != "default" and method not in READOUT_METHODS:
        raise ValueError(f"{method!r} has no readout option; only {READOUT_METHODS} take readout={readout!r}.")
    if method in ("vpt_shallow", "vpt_deep"):
        return hf_vpt.VisualPromptConfig(
            num_prompt_tokens=args.num_prompt_tokens,
            depth="shallow" if method == "vpt_shallow" else "deep",
            prompt_dropout=args.prompt_dropout,
            prompt_init=args.prompt_init,
            readout=readout,
            modules_to_save=head,
        )
    if method == "gated":
        return hf_vpt.GatedPromptConfig(
            num_prompt_tokens=args.num_prompt_tokens,
            prompt_dropout=args.prompt_dropout,
            prompt_init=args.prompt_init,
            gate_init=args.gate_init,
            learn_temperature=args.gated_learn_temperature,
            readout=readout,
            modules_to_save=head,
        )
    if method == "apt":
        return hf_vpt.ApproxPromptConfig(
            num_prompt_tokens=args.num_prompt_tokens, rank=args.apt_rank, modules_to_save=head
        )
    if method == "lora":
        return LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=attention_projections(model),
            modules_to_save=head,
        )
    raise ValueError(f"{method!r} is not an adapter method; these are {ADAPTER_METHODS}.")


def prepare_for_method(model: torch.nn.Module, method: str, args, readout: str = "default") -> torch.nn.Module:
    """Make only what `method` trains trainable. Adapter methods go through the public PEFT API."""
    head = args.head_module
    if not hasattr(model, head):
        raise ValueError(f"The model has no module '{head}'; pass the name of its head with --head_module.")
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "linear":
        model.requires_grad_(False)
        getattr(model, head).requires_grad_(True)
        return model
    return get_peft_model(model, adapter_config(model, method, args, readout=readout))


def save_rank_tensors(args, accelerator: Accelerator, model: torch.nn.Module, name: str) -> None:
    """`--save_rank_tensors`: this process's trainable tensors to `<output_dir>/rank<N>/<name>.safetensors`."""
    from safetensors.torch import save_file

    unwrapped = accelerator.unwrap_model(model)
    tensors = {key: p.detach().cpu().contiguous() for key, p in unwrapped.named_parameters() if p.requires_grad}
    folder = os.path.join(args.output_dir, f"rank{accelerator.process_index}")
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, f"{name}.safetensors"))


def save_result(args, accelerator: Accelerator, model, folder: str, **card) -> None:
    """Save an adapter with its model card (`_common.save_adapter`), or the whole model for linear and full.

    Every process calls it; the main process writes.
    """
    _common.save_adapter(
        accelerator,
        model,
        folder,
        dataset=card.pop("dataset"),
        metrics=card.pop("metrics"),
        command=args.command,
        trainable=_common.trainable_parameters(accelerator.unwrap_model(model)),
        task="image-classification",
        **card,
    )


def format_table(rows: list[dict]) -> str:
    lines = [
        "| method | test accuracy (mean ± std) | trainable parameters | train time (s) |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['title']} | {100 * row['accuracy_mean']:.2f} ± {100 * row['accuracy_std']:.2f} % "
            f"| {row['trainable_parameters']:,} | {row['train_time_s_mean']:.1f} |"
        )
    return "\n".join(lines)


def settings(args) -> dict:
    """The options of this run for results.json (never the Hub token)."""
    return {k: v for k, v in vars(args).items() if k not in ("config", "hub_token")}


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


# ---------------------------------------------------------------------------------------------------------------
# Embedded experiment: digits 0-4 -> 5-9
# ---------------------------------------------------------------------------------------------------------------
def load_digit_tensors(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as `[N, 1, S, S]` pixels in [-1, 1] (background -1) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return pixels * 2.0 - 1.0, torch.tensor(digits.target, dtype=torch.long)


def random_affine(pixel_values: torch.Tensor, rotate_deg: float = 12.0, scale: float = 0.1, shift: float = 0.12):
    """Small random rotation, zoom and shift per image; the uncovered border gets the background value -1."""
    n = pixel_values.shape[0]
    device = pixel_values.device
    angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(rotate_deg)
    zoom = 1 + (torch.rand(n, device=device) * 2 - 1) * scale
    offset = (torch.rand(n, 2, device=device) * 2 - 1) * shift
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(pixel_values.dtype), list(pixel_values.shape), align_corners=False)
    return F.grid_sample(pixel_values + 1, grid, align_corners=False, padding_mode="zeros") - 1


def tensor_collate(batch):
    pixel_values, labels = zip(*batch)
    return {"pixel_values": torch.stack(pixel_values), "labels": torch.stack(labels)}


def digits_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=tensor_collate)


def backbone_settings(args) -> dict:
    return {
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "intermediate_size": args.intermediate_size,
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain_batch_size": args.pretrain_batch_size,
        "pretrain_lr": args.pretrain_lr,
        "pretrain_weight_decay": args.pretrain_weight_decay,
        "pretrain_seed": args.pretrain_seed,
        "classes": list(PRETRAIN_CLASSES),
        "augment": "random_affine",
    }


def pretrain_split(labels: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the 0-4 digits: 80% to pretrain on, 20% held out (stratified, fixed by `seed`)."""
    from sklearn.model_selection import train_test_split

    indices = np.flatnonzero(np.isin(labels.numpy(), PRETRAIN_CLASSES))
    train, held_out = train_test_split(indices, test_size=0.2, stratify=labels.numpy()[indices], random_state=seed)
    return np.sort(train), np.sort(held_out)


def get_backbone(args, accelerator: Accelerator, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pretrain the small ViT on digits 0-4, or reuse the copy cached under the same hyper-parameters."""
    from transformers import ViTConfig, ViTForImageClassification

    settings = backbone_settings(args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(args.cache_dir, f"digits_vit_{key}")
    info_path = os.path.join(folder, "pretraining.json")
    cached = os.path.isfile(info_path)
    accelerator.wait_for_everyone()  # every process decides before the main one may write the cache
    train_idx, held_idx = pretrain_split(labels, args.pretrain_seed)
    held_out = digits_loader(TensorDataset(pixels[held_idx], labels[held_idx]), args.eval_batch_size, False)
    if cached:
        model = accelerator.prepare(ViTForImageClassification.from_pretrained(folder))
        accuracy = evaluate(accelerator, model, held_out)
        accelerator.free_memory()
        return {"path": folder, "reused": True, "heldout_accuracy": accuracy, "pretrain_time_s": 0.0}

    set_seed(args.pretrain_seed)
    config = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=1,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size,
        num_labels=len(PRETRAIN_CLASSES),
        id2label={i: str(c) for i, c in enumerate(PRETRAIN_CLASSES)},
        label2id={str(c): i for i, c in enumerate(PRETRAIN_CLASSES)},
    )
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": args.pretrain_weight_decay},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=args.pretrain_lr,
    )
    train = digits_loader(
        TensorDataset(pixels[train_idx], labels[train_idx]), args.pretrain_batch_size, True, args.pretrain_seed
    )
    model, seconds, _ = fit(
        accelerator,
        model,
        optimizer,
        train,
        epochs=args.pretrain_epochs,
        warmup_epochs=max(1, args.pretrain_epochs // 10),
        augment=random_affine,
        desc="pretrain ViT on digits 0-4",
        progress=args.progress,
    )
    accuracy = evaluate(accelerator, model, held_out)
    info = {"heldout_accuracy": accuracy, "pretrain_time_s": seconds, "settings": settings}
    if accelerator.is_main_process:
        os.makedirs(args.cache_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".digits_vit_", dir=args.cache_dir)
        accelerator.unwrap_model(model).save_pretrained(staging)
        write_json(os.path.join(staging, "pretraining.json"), info)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return {"path": folder, "reused": False, "heldout_accuracy": accuracy, "pretrain_time_s": seconds}


def few_shot_split(labels: torch.Tensor, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`shots` random training images per class of 5-9; every other 5-9 digit is the test set."""
    rng = np.random.default_rng(seed)
    labels = labels.numpy()
    train = []
    for cls in TRANSFER_CLASSES:
        members = np.flatnonzero(labels == cls)
        if shots >= len(members):
            raise ValueError(f"--shots {shots} leaves no test images of class {cls} ({len(members)} images).")
        train.extend(rng.choice(members, size=shots, replace=False).tolist())
    train = np.sort(np.array(train))
    test = np.setdiff1d(np.flatnonzero(np.isin(labels, TRANSFER_CLASSES)), train)
    return train, test


def load_transfer_model(backbone_path: str):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(
        backbone_path,
        num_labels=len(TRANSFER_CLASSES),
        id2label={i: str(c) for i, c in enumerate(TRANSFER_CLASSES)},
        label2id={str(c): i for i, c in enumerate(TRANSFER_CLASSES)},
        ignore_mismatched_sizes=True,  # the 0-4 head is dropped and a new 5-way head is initialised
    )


def train_one(
    args,
    accelerator,
    method,
    lr,
    backbone_path,
    train_set,
    eval_set,
    seed,
    desc,
    log_prefix=None,
    rank_tensors=None,
    readout="cls",
):
    """One transfer run: fresh head (and adapter) from `seed`, train, evaluate. Returns a dict.

    `readout="mean"` is MAE's readout (see recipes/digits_mae.py): the prompt configs get
    `readout="mean_model_norm"`, every other method a mean-token hook on the final norm. With `rank_tensors` (a file
    name), every process writes its trainable tensors before and after training (`save_rank_tensors`).
    """
    set_seed(seed)
    model = load_transfer_model(backbone_path)
    if readout == "mean" and method not in READOUT_METHODS:
        digits_mae.mean_token_readout(model)
    model = prepare_for_method(model, method, args, readout="mean_model_norm" if readout == "mean" else "default")
    if rank_tensors:
        save_rank_tensors(args, accelerator, model, f"{rank_tensors}-init")
    trainable = count_trainable(model)
    optimizer = make_optimizer(model, method, lr, args)
    loader = digits_loader(train_set, args.batch_size, True, seed)
    model, seconds, cpu_seconds = fit(
        accelerator,
        model,
        optimizer,
        loader,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        augment=random_affine if args.augment else None,
        desc=desc,
        progress=args.progress,
        log_prefix=log_prefix,
    )
    if rank_tensors:
        save_rank_tensors(args, accelerator, model, rank_tensors)
    accuracy = evaluate(accelerator, model, digits_loader(eval_set, args.eval_batch_size, False))
    return {
        "model": model,
        "accuracy": accuracy,
        "trainable": trainable,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }


def load_backbone(args, accelerator: Accelerator, kind: str, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    """The pretrained backbone `kind` ('supervised' or 'mae'), pretrained now or reused from the cache."""
    if kind == "supervised":
        backbone = get_backbone(args, accelerator, pixels, labels)
        quality = f"held-out accuracy on digits 0-4: {100 * backbone['heldout_accuracy']:.2f} %"
        patch_size = args.patch_size
    else:
        backbone = digits_mae.get_mae_backbone(
            args,
            accelerator,
            pixels,
            labels,
            pretrain_split=pretrain_split,
            loader=digits_loader,
            augment=random_affine,
            classes=PRETRAIN_CLASSES,
        )
        quality = (
            f"held-out MAE loss on digits 0-4: {backbone['heldout_reconstruction_loss']:.4f} "
            f"(untrained: {backbone['heldout_reconstruction_loss_at_init']:.4f})"
        )
        patch_size = args.mae_patch_size
    accelerator.print(
        f"{kind} backbone: ViT {args.num_hidden_layers} layers x {args.hidden_size} wide, {args.image_size}px / patch "
        f"{patch_size}, pretrained on digits 0-4 "
        + ("(reused from cache" if backbone["reused"] else f"({backbone['pretrain_time_s']:.1f} s")
        + f", {backbone['path']}); {quality}"
    )
    return {"kind": kind, **backbone}


def run_digits(args, accelerator: Accelerator) -> dict:
    """The embedded experiment on every backbone of `--backbones`.

    results.json holds the first backbone's table at the top level and every backbone's under `by_backbone`."""
    import transformers

    transformers.logging.set_verbosity_error()  # the head-size mismatch on every load is intended
    transformers.logging.disable_progress_bar()  # no "Loading weights" bar for each of the many small loads
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    wall = time.perf_counter()
    pixels, labels = load_digit_tensors(args.image_size)
    seeds = [args.seed + i for i in range(args.num_seeds)]
    if args.trackers:
        _common.init_trackers(accelerator, args, "image_classification")
    experiments = {}
    for kind in args.backbones:
        backbone = load_backbone(args, accelerator, kind, pixels, labels)
        methods = args.methods if kind == "supervised" else args.mae_methods
        if args.tune:
            experiments[kind] = tune_digits(args, accelerator, backbone, methods, pixels, labels, seeds)
        else:
            experiments[kind] = transfer_experiment(args, accelerator, backbone, methods, pixels, labels, seeds)
    if args.trackers:
        accelerator.end_training()
    adapters = {kind: experiment.pop("adapters", {}) for kind, experiment in experiments.items()}
    summary = {
        **experiments[args.backbones[0]],
        "command": args.command,
        "settings": settings(args),
        "num_processes": accelerator.num_processes,
        "by_backbone": experiments,
        "wall_time_s": time.perf_counter() - wall,
    }
    if accelerator.is_main_process:
        name = "tuning.json" if args.tune else "results.json"
        write_json(os.path.join(args.output_dir, name), summary)
        accelerator.print(f"\nwrote {os.path.join(args.output_dir, name)}; wall time {summary['wall_time_s']:.1f} s")
    summary["adapters"] = adapters[args.backbones[0]]
    summary["adapters_by_backbone"] = adapters
    return summary


def experiment_dir(args, backbone: dict) -> str:
    """Adapters and plots of the supervised backbone go to `--output_dir`, the others to a sub-folder."""
    kind = backbone["kind"]
    return args.output_dir if kind == "supervised" else os.path.join(args.output_dir, kind)


def transfer_experiment(args, accelerator, backbone: dict, methods, pixels, labels, seeds) -> dict:
    """Few-shot transfer to digits 5-9 from one frozen backbone: every method on every seed, then the table."""
    log = accelerator.print
    kind = backbone["kind"]
    readout = "mean" if kind == "mae" else "cls"
    transfer_labels = labels - TRANSFER_CLASSES[0]
    runs = {method: [] for method in methods}
    adapters, gates = {}, []
    out_dir = experiment_dir(args, backbone)
    for seed in seeds:
        train_idx, test_idx = few_shot_split(labels, args.shots, seed)
        train_set = TensorDataset(pixels[train_idx], transfer_labels[train_idx])
        test_set = TensorDataset(pixels[test_idx], transfer_labels[test_idx])
        for method in methods:
            lr = learning_rate(args, method, kind)
            tag = f"{kind}/{method}/seed{seed}"
            result = train_one(
                args,
                accelerator,
                method,
                lr,
                backbone["path"],
                train_set,
                test_set,
                seed,
                f"{kind} {method} seed {seed}",
                log_prefix=tag if args.trackers else None,
                rank_tensors=tag.replace("/", "-").removeprefix("supervised-") if args.save_rank_tensors else None,
                readout=readout,
            )
            runs[method].append(result)
            log(
                f"{kind} seed {seed} {method:<12} test accuracy {100 * result['accuracy']:.2f} % ({result['seconds']:.1f} s)"
            )
            accelerator.log({f"{tag}/test_accuracy": result["accuracy"]})
            if method == "gated":
                gates.append(hf_vpt.gate_values(accelerator.unwrap_model(result["model"])))
            if method in ADAPTER_METHODS and seed == seeds[0]:
                folder = os.path.join(out_dir, method)
                save_result(
                    args,
                    accelerator,
                    result["model"],
                    folder,
                    dataset=f"scikit-learn digits 5-9, {args.shots} shots per class, seed {seed}",
                    metrics={"test accuracy": f"{100 * result['accuracy']:.2f} %"},
                    num_labels=len(TRANSFER_CLASSES),
                    labels=[str(c) for c in TRANSFER_CLASSES],
                )
                adapters[method] = {"path": folder, "model": accelerator.unwrap_model(result["model"]), "seed": seed}
            result["model"] = None
            accelerator.free_memory()

    rows = []
    for method, results in runs.items():
        accuracies = [r["accuracy"] for r in results]
        rows.append(
            {
                "method": method,
                "title": METHOD_TITLES[method],
                "optimizer": optimizer_title(args, method),
                "learning_rate": learning_rate(args, method, kind),
                "accuracy_mean": float(np.mean(accuracies)),
                "accuracy_std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
                "accuracies": accuracies,
                "trainable_parameters": results[0]["trainable"],
                "train_time_s_mean": float(np.mean([r["seconds"] for r in results])),
                "train_cpu_time_s_mean": float(np.mean([r["cpu_seconds"] for r in results])),
                "adapter_path": adapters.get(method, {}).get("path"),
            }
        )
    table = format_table(rows)
    num_test = len(few_shot_split(labels, args.shots, seeds[0])[1])
    readout_note = "CLS readout" if readout == "cls" else "MAE readout: mean over tokens, then the pretrained norm"
    log(
        f"\nDigits 0-4 -> 5-9 transfer from the {kind} backbone ({readout_note}), {args.shots} shots per class, "
        f"{num_test} test images, seeds {seeds}, {args.epochs} epochs, {args.num_prompt_tokens} prompt tokens "
        "(std over seeds, ddof=1):\n"
    )
    log(table)
    summary = {
        "experiment": f"digits 0-4 -> 5-9, {kind} backbone",
        "backbone": dict(backbone),
        "readout": readout,
        "seeds": seeds,
        "num_test_images": num_test,
        "results": rows,
        "table": table,
        "adapters": adapters,
    }
    if gates:
        summary["gates"] = gates
        if accelerator.is_main_process:
            plot = os.path.join(out_dir, "gates.png")
            digits_mae.plot_gates(
                gates, plot, f"gated prompts, {kind} backbone: learned gates over {len(gates)} seeds"
            )
            summary["gate_plot"] = plot
            log(f"wrote the gate plot {plot}")
    return summary


def tune_digits(args, accelerator, backbone, methods, pixels, labels, seeds) -> dict:
    """k-fold cross-validation inside each seed's few-shot training set; the test digits are never used."""
    from sklearn.model_selection import StratifiedKFold

    transfer_labels = labels - TRANSFER_CLASSES[0]
    readout = "mean" if backbone["kind"] == "mae" else "cls"
    scores = {}
    for method in methods:
        grid = [float(v) for v in args.tune_lrs.split(",")] if args.tune_lrs else TUNE_GRIDS.get(method, SGD_LR_GRID)
        for lr in grid:
            accuracies = []
            for seed in seeds:
                train_idx, _ = few_shot_split(labels, args.shots, seed)
                folds = StratifiedKFold(n_splits=args.tune_folds, shuffle=True, random_state=seed)
                for fold, (fit_part, val_part) in enumerate(folds.split(train_idx, labels[train_idx].numpy())):
                    fit_set = TensorDataset(pixels[train_idx[fit_part]], transfer_labels[train_idx[fit_part]])
                    val_set = TensorDataset(pixels[train_idx[val_part]], transfer_labels[train_idx[val_part]])
                    result = train_one(
                        args,
                        accelerator,
                        method,
                        lr,
                        backbone["path"],
                        fit_set,
                        val_set,
                        seed,
                        f"tune {method}",
                        readout=readout,
                    )
                    accuracies.append(result["accuracy"])
                    accelerator.free_memory()
            scores[(method, lr)] = float(np.mean(accuracies))
            accelerator.print(
                f"tune {method:<12} lr {lr:<8g} cross-validated accuracy {100 * scores[(method, lr)]:.2f} %"
            )
    best = {}
    for method in methods:
        candidates = [(acc, -lr) for (m, lr), acc in scores.items() if m == method]
        acc, neg_lr = max(candidates)  # ties go to the smaller learning rate, as VPT's tuning scripts do
        best[method] = {"lr": -neg_lr, "cv_accuracy": acc}
        accelerator.print(f"best {method:<12} --lr_{method} {-neg_lr:g} ({100 * acc:.2f} %)")
    return {
        "experiment": f"digits 0-4 -> 5-9, {backbone['kind']} backbone, learning-rate tuning",
        "backbone": dict(backbone),
        "folds": args.tune_folds,
        "seeds": seeds,
        "scores": [{"method": m, "lr": lr, "cv_accuracy": acc} for (m, lr), acc in scores.items()],
        "best": best,
    }


# ---------------------------------------------------------------------------------------------------------------
# Your model and data
# ---------------------------------------------------------------------------------------------------------------
def load_user_dataset(args):
    from datasets import ClassLabel, load_dataset

    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    else:
        data_files = {"train": os.path.join(args.train_dir, "**")}
        if args.validation_dir:
            data_files["validation"] = os.path.join(args.validation_dir, "**")
        raw = load_dataset("imagefolder", data_files=data_files)
    if args.train_split not in raw:
        raise ValueError(f"No split '{args.train_split}' in the dataset; it has {list(raw)}.")
    train = raw[args.train_split]
    for column in (args.image_column, args.label_column):
        if column not in train.column_names:
            raise ValueError(f"No column '{column}' in the dataset; it has {train.column_names}.")
    eval_split = args.eval_split or next((s for s in ("validation", "test") if s in raw), None)
    if eval_split is not None:
        evaluation = raw[eval_split]
    else:
        stratify = args.label_column if isinstance(train.features[args.label_column], ClassLabel) else None
        parts = train.train_test_split(test_size=args.val_split_fraction, seed=args.seed, stratify_by_column=stratify)
        train, evaluation, eval_split = parts["train"], parts["test"], f"{args.val_split_fraction:g} of train"
    feature = train.features[args.label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        to_id = {i: i for i in range(len(names))}
    else:
        values = sorted(set(train[args.label_column]) | set(evaluation[args.label_column]))
        names = [str(v) for v in values]
        to_id = {v: i for i, v in enumerate(values)}
    if args.max_train_samples:
        train = train.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation, eval_split, names, to_id


def image_collate(examples, processor, image_column, label_column, to_id, flip: bool):
    from PIL import Image

    images = []
    for example in examples:
        image = example[image_column].convert("RGB")
        if flip and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        images.append(image)
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    labels = torch.tensor([to_id[example[label_column]] for example in examples], dtype=torch.long)
    return {"pixel_values": pixel_values, "labels": labels}


def random_hflip(pixel_values: torch.Tensor) -> torch.Tensor:
    """`--augment` on your data: mirror each image left-right with probability 1/2."""
    flip = torch.rand(pixel_values.shape[0], device=pixel_values.device) < 0.5
    return torch.where(flip[:, None, None, None], pixel_values.flip(-1), pixel_values)


def run_hub(args, accelerator: Accelerator) -> dict:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    wall = time.perf_counter()
    set_seed(args.seed)
    train, evaluation, eval_split, names, to_id = load_user_dataset(args)
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    model = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    model = prepare_for_method(model, args.method, args)
    if args.save_rank_tensors:
        save_rank_tensors(args, accelerator, model, f"{args.method}-init")
    trainable = count_trainable(model)
    accelerator.print(
        f"{args.method}: {trainable:,} trainable parameters; {len(train)} train / {len(evaluation)} eval"
    )
    collate = partial(
        image_collate,
        processor=processor,
        image_column=args.image_column,
        label_column=args.label_column,
        to_id=to_id,
    )
    generator = torch.Generator().manual_seed(args.seed)
    # The flips are drawn in the training step (`random_hflip`, torch's RNG), not in the collate function: the
    # loader fetches a batch ahead, so RNG draws made there would straddle a checkpoint.
    train_loader = DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=partial(collate, flip=False),
    )
    eval_loader = DataLoader(evaluation, batch_size=args.eval_batch_size, collate_fn=partial(collate, flip=False))
    lr = learning_rate(args, args.method)
    optimizer = make_optimizer(model, args.method, lr, args)
    _common.init_trackers(accelerator, args, "image_classification")
    checkpointing = Checkpointing(
        output_dir=args.output_dir,
        every=args.checkpointing_steps,
        resume_from=args.resume_from_checkpoint,
        stop_after_steps=args.stop_after_steps,
    )
    model, seconds, _ = fit(
        accelerator,
        model,
        optimizer,
        train_loader,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        augment=random_hflip if args.augment else None,
        desc=args.method,
        progress=args.progress,
        log_prefix="train" if args.trackers else None,
        checkpointing=checkpointing,
        on_epoch_end=partial(log_epoch_accuracy, accelerator, eval_loader),
    )
    if not checkpointing.finished:
        accelerator.print(
            f"Stopped after {checkpointing.step} steps (--stop_after_steps); resume with --resume_from_checkpoint."
        )
        if args.trackers:
            accelerator.end_training()
        return {"experiment": "user data", "steps": checkpointing.step, "finished": False}
    accuracy = evaluate(accelerator, model, eval_loader)
    accelerator.log({"eval/accuracy": accuracy})
    if args.save_rank_tensors:
        save_rank_tensors(args, accelerator, model, args.method)
    folder = os.path.join(args.output_dir, args.method)
    dataset = args.dataset_name or args.train_dir
    save_result(
        args,
        accelerator,
        model,
        folder,
        dataset=dataset,
        metrics={f"accuracy ({eval_split})": f"{100 * accuracy:.2f} %"},
        num_labels=len(names),
        labels=names,
    )
    if accelerator.is_main_process and args.method not in ADAPTER_METHODS:
        processor.save_pretrained(folder)  # the whole model was saved: make the folder loadable on its own
    row = {
        "method": args.method,
        "title": METHOD_TITLES[args.method],
        "optimizer": optimizer_title(args, args.method),
        "learning_rate": lr,
        "accuracy_mean": accuracy,
        "accuracy_std": 0.0,
        "accuracies": [accuracy],
        "trainable_parameters": trainable,
        "train_time_s_mean": seconds,
        "adapter_path": folder,
    }
    table = format_table([row])
    accelerator.print(f"\n{args.model_name_or_path} on {dataset} (evaluated on {eval_split}):\n\n{table}")
    summary = {
        "experiment": "user data",
        "command": args.command,
        "settings": settings(args),
        "num_processes": accelerator.num_processes,
        "eval_split": eval_split,
        "labels": names,
        "results": [row],
        "table": table,
        "steps": checkpointing.step,
        "finished": True,
        "wall_time_s": time.perf_counter() - wall,
    }
    if accelerator.is_main_process:
        write_json(os.path.join(args.output_dir, "results.json"), summary)
        if args.push_to_hub:
            repo_id = _common.push_folder_to_hub(folder, args.hub_model_id, args.hub_token, args.hub_private_repo)
            accelerator.print(f"Pushed {folder} to https://huggingface.co/{repo_id}")
            summary["hub_repo_id"] = repo_id
    if args.trackers:
        accelerator.end_training()
    summary["adapters"] = {args.method: {"path": folder, "model": accelerator.unwrap_model(model)}}
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; returns the summary written to results.json plus the in-memory trained models."""
    args = parse_args(argv)
    num_threads = args.num_threads or (1 if args.mode == "digits" else None)
    if num_threads:
        torch.set_num_threads(num_threads)
    tracking = {}
    if args.trackers:
        from accelerate.utils import ProjectConfiguration

        tracking = {
            "log_with": args.trackers,
            "project_config": ProjectConfiguration(
                project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
            ),
        }
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps, **tracking
    )
    if args.mode == "hub":
        return run_hub(args, accelerator)
    return run_digits(args, accelerator)


if __name__ == "__main__":
    main()
