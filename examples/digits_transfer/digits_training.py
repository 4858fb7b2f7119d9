"""Training for the digits study, on the recipes' code: `recipes/_common.train_loop` and `make_optimizer`, the
methods from `hf_vpt.registry`. Only what is particular to the study is here: its loop settings, the accuracy and
the configs' study-specific fields (readout, gate init, ...)."""

from __future__ import annotations

import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import get_scheduler


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)
from hf_vpt.registry import training_variant  # noqa: E402
from recipes import _common  # noqa: E402  (the recipes' shared training loop)


def loop_args(output_dir: str, max_train_steps: int, gradient_accumulation_steps: int = 1, progress: bool = False):
    """What `_common.train_loop` reads from a recipe's args, for the study's short runs: no checkpoints, no
    evaluation during training, no clipping (the study's tables were made without)."""
    return SimpleNamespace(
        output_dir=output_dir,
        max_train_steps=max_train_steps,
        gradient_accumulation_steps=gradient_accumulation_steps,
        stop_after_steps=None,
        progress=progress,
        logging_steps=max(1, max_train_steps),
        max_grad_norm=None,
        checkpointing_steps=None,
        checkpoints_total_limit=None,
        resume_from_checkpoint=None,
        eval_steps=None,
    )


def classification_loss(model, pixel_values, labels):
    return F.cross_entropy(model(pixel_values=pixel_values).logits.float(), labels)


def fit(
    accelerator,
    model,
    optimizer,
    loader,
    *,
    epochs: int,
    warmup_epochs: float,
    augment=None,
    desc="train",
    progress=False,
    output_dir=".",
    objective=classification_loss,
) -> tuple[torch.nn.Module, float, float]:
    """Train `epochs` epochs with linear warm-up then cosine decay, through the recipes' loop.

    `objective(model, pixel_values, labels) -> loss` (cross-entropy by default; the MAE pretraining passes its
    reconstruction loss). Returns the prepared model, the wall-clock seconds and this process's CPU seconds."""
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = max(1, math.ceil(len(loader) / accelerator.gradient_accumulation_steps))
    total = epochs * steps_per_epoch
    # accelerate steps a prepared scheduler once per process for each optimiser step, hence the scaling
    scale = accelerator.num_processes
    scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=int(round(warmup_epochs * steps_per_epoch)) * scale,
        num_training_steps=total * scale,
    )
    scheduler = accelerator.prepare(scheduler)

    def loss_fn(batch):
        pixel_values = batch["pixel_values"]
        if augment is not None:
            pixel_values = augment(pixel_values)
        loss = objective(model, pixel_values, batch["labels"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss became {loss.item()}; lower the learning rate.")
        return loss

    args = loop_args(output_dir, total, accelerator.gradient_accumulation_steps, progress)
    start, start_cpu = time.perf_counter(), time.process_time()
    _common.train_loop(accelerator, args, model, optimizer, scheduler, loader, loss_fn)
    return model, time.perf_counter() - start, time.process_time() - start_cpu


@torch.no_grad()
def evaluate(accelerator, model, loader) -> float:
    """Top-1 accuracy over every process."""
    loader = accelerator.prepare(loader)
    model.eval()
    correct = total = 0
    for batch in loader:
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct += int((predictions == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def config_overrides(method: str, args, readout: str) -> dict:
    """The study's own settings for the registry's config builders (prompt init, gate init, MAE readout, ...)."""
    if method in ("vpt_shallow", "vpt_deep"):
        return {"prompt_dropout": args.prompt_dropout, "prompt_init": args.prompt_init, "readout": readout}
    if method == "gated":
        return {
            "prompt_dropout": args.prompt_dropout,
            "prompt_init": args.prompt_init,
            "gate_init": args.gate_init,
            "learn_temperature": args.gated_learn_temperature,
            "readout": readout,
        }
    if readout != "default":
        raise ValueError(f"{method!r} has no readout option; use the mean-token hook (digits_mae.mean_token_readout).")
    if method == "apt":
        return {"rank": args.apt_rank}
    if method == "lora":
        return {"r": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout}
    return {}


def prepare_for_method(model, method: str, args, readout: str = "default", head: str = "classifier"):
    """Make trainable what the registry's variant `method` trains: an adapter (PEFT), the head, or everything."""
    from peft import get_peft_model

    variant = training_variant(method)
    if not hasattr(model, head):
        raise ValueError(f"The model has no module {head!r}; the digits study's ViT heads are called 'classifier'.")
    if variant.trains == "all":
        return model.requires_grad_(True)
    if variant.trains == "head":
        model.requires_grad_(False)
        getattr(model, head).requires_grad_(True)
        return model
    config = variant.build_config(
        model, num_prompt_tokens=args.num_prompt_tokens, head_modules=[head], **config_overrides(method, args, readout)
    )
    return get_peft_model(model, config)


def optimizer_name(method: str) -> str:
    """The study's optimisers, fixed whatever the recipes' defaults for real backbones become: SGD + momentum for
    linear probing and the VPT family (VPT's code), AdamW for the others."""
    return "sgd" if method in SGD_METHODS else "adamw"


def make_optimizer(model, method: str, lr: float, args):
    """The recipes' optimiser with the study's settings; no weight decay on biases and norms."""
    name = optimizer_name(method)
    weight_decay = args.weight_decay if name == "sgd" else getattr(args, f"{method}_weight_decay")
    settings = SimpleNamespace(optimizer=name, momentum=args.momentum, learning_rate=lr, weight_decay=weight_decay)
    return _common.make_optimizer(model, settings, method, lr=lr, weight_decay=weight_decay, adamw_eps=ADAMW_EPS)


def count_trainable(model) -> int:
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


SGD_METHODS = ("linear", "vpt_shallow", "vpt_deep", "gated")
ADAMW_EPS = 1e-6  # of every AdamW method of the study (full fine-tuning, APT, LoRA)
