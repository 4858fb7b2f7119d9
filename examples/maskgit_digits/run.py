#!/usr/bin/env python
"""MaskGIT generative transfer on 8x8 digits: a small `UVit2DModel` pretrained on classes 0-4, adapted to 5-9.

The MaskGIT counterpart of `examples/generative_digits/run.py` (ImageGPT), the headline setting of Sohn et al.
(CVPR 2023, https://arxiv.org/abs/2210.00990) at a size two CPU cores run in minutes, offline:

1. **Tokens** (the same as the ImageGPT study): scikit-learn's 8x8 digits, intensities 0..16 quantised into
   `--num_levels` K levels, level `floor(v · K / 17)`; an image is an 8x8 grid of tokens in `[0, K)`. The generator is
   a diffusers `UVit2DModel` (aMUSEd's MaskGIT transformer, no VQ-GAN: the levels are the codebook) with
   `codebook_size = K` and `vocab_size = K + 1`; the mask token is `K`.
2. **Neutral conditioning.** `UVit2DModel.forward` requires text conditioning (`encoder_hidden_states`,
   `pooled_text_emb`) and aMUSEd's micro-conditioning (`micro_conds`). Here they are constants fed to every call, in
   pretraining, adaptation, evaluation and sampling alike: one all-zero text token `[B, 1, encoder_hidden_size]`, an
   all-zero pooled embedding `[B, cond_embed_dim]` and all-zero micro-conditions `[B, 5]` (`neutral_conditioning`).
   They are the same for every class, so the class can only come from the prompts (the tests check it).
3. **Pretraining**: unconditionally on 90 % of digits 0-4 with the MaskGIT objective
   (`hf_vpt.tuners.generative_prompt.objectives.maskgit_loss`: per image `r ~ U(0, 1)`, mask `cos(π r / 2)` of the
   64 tokens, cross-entropy with label smoothing 0.1 on the masked ones), cached under `--cache_dir` by a hash of
   its hyper-parameters.
4. **Transfer to 5-9**, class-conditionally, from the training half of the 5-9 digits (`--transfer_train_fraction`
   of a stratified split; 448 images; the other half is held out):
   * **no adaptation**: the frozen 0-4 generator, sampled unconditionally for every class row (chance fidelity);
   * **generative prompt tuning**: `hf_vpt.GenerativePromptConfig` (`prompt[c, j] = LN(E[c] + Pos[j])`, inserted
     before the first transformer layer of the UVit2D and removed after the last), only the prompt generator trains;
   * **full fine-tuning**: the same prompt generator and every UVit2D weight;
   * **prompt tuning + guidance g** (`--guidance_scales`): the prompt-tuned model sampled with
     `l_u + g · (l_p - l_u)` between prompted and frozen logits (an hf_vpt addition, not the paper's).
5. **Evaluation** with the ImageGPT study's instrument (`../generative_digits/generative_digits_common.py`): an MLP
   classifier trained in the run on the real 5-9 training half; **class fidelity** and the **Fréchet distance** of its
   penultimate features of `--samples_per_class` samples per class (`hf_vpt.sampling.maskgit_sample`, `--num_steps`
   iterations) against the held-out half; the **held-out masked-token loss** (nats per masked token, no label
   smoothing, the same `--eval_mask_draws` fixed random masks for every model). Decoding steps `--steps_sweep`
   are compared on the adapted models for fidelity, Fréchet distance and sampling time.

Every training run goes through the recipes' shared loop `recipes/_common.train_loop` (through
`generative_digits_common.fit`).
Outputs in `--output_dir`: `results.json`, `samples_<method>.png` grids (rows = classes 5-9), `samples.png` (all
side by side) and the first seed's prompt adapter (`generative_prompt_adapter/`, `save_pretrained` + model card).

    python examples/maskgit_digits/run.py --num_threads 1  # 3 seeds: 190 s on an idle 2-core machine (measured)
    python examples/maskgit_digits/run.py --quick          # seconds: tiny model, few epochs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader, TensorDataset


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "generative_digits"))
from generative_digits_common import (  # noqa: E402  (also puts recipes/ on the path for _common)
    PRETRAIN_CLASSES,
    SIDE,
    TRANSFER_CLASSES,
    _common,
    class_order,
    classify,
    fit,
    format_table,
    frechet_distance,
    grid_image,
    load_digit_tokens,
    sample_metrics,
    save_grids,
    stratified_split,
    summary_row,
    tokens_to_pixels,
    train_classifier,
    write_json,
)

import hf_vpt  # noqa: E402
from hf_vpt.sampling import maskgit_sample  # noqa: E402
from hf_vpt.tuners.generative_prompt.objectives import masked_token_loss, maskgit_loss, random_token_mask  # noqa: E402


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
EVAL_MASK_SEED = 1234  # the held-out loss's masks: the same for every model and seed
# `--quick`: small enough for a test (seconds); explicit options still win.
QUICK_DEFAULTS = {
    "hidden_size": 32,
    "num_hidden_layers": 2,  # the block finder needs two identical blocks
    "pretrain_epochs": 15,
    "epochs": 8,
    "num_prompt_tokens": 4,
    "samples_per_class": 12,
    "grid_columns": 6,
    "classifier_epochs": 40,
    "num_seeds": 1,
    "steps_sweep": "2,4",
    "num_steps": 4,
}


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    bool_flag = argparse.BooleanOptionalAction
    parser.add_argument("--config", default=None, help="YAML file whose keys override these defaults.")
    parser.add_argument("--quick", action="store_true", help=f"Small settings for a smoke test: {QUICK_DEFAULTS}.")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="outputs/maskgit_digits")
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

    generator = parser.add_argument_group("pretrained generator (UVit2DModel on digits 0-4, cached)")
    generator.add_argument("--cache_dir", default=os.path.join("~", ".cache", "hf_vpt"))
    generator.add_argument("--hidden_size", type=int, default=48, help="Width of the transformer layers.")
    generator.add_argument("--num_hidden_layers", type=int, default=2)
    generator.add_argument("--num_attention_heads", type=int, default=4)
    generator.add_argument("--block_channels", type=int, default=32, help="Width of the convolutional blocks.")
    generator.add_argument("--pretrain_epochs", type=int, default=25)
    generator.add_argument("--pretrain_batch_size", type=int, default=64)
    generator.add_argument("--pretrain_lr", type=float, default=3e-3)
    generator.add_argument("--pretrain_seed", type=int, default=0)

    transfer = parser.add_argument_group("transfer to 5-9")
    transfer.add_argument("--epochs", type=int, default=12)
    transfer.add_argument("--batch_size", type=int, default=32, help="Per device.")
    transfer.add_argument("--warmup_fraction", type=float, default=0.05)
    transfer.add_argument("--num_prompt_tokens", type=int, default=16)
    transfer.add_argument("--prompt_dropout", type=float, default=0.0)
    transfer.add_argument("--prompt_lr", type=float, default=3e-2, help="AdamW lr of the prompt generator.")
    transfer.add_argument("--full_lr", type=float, default=1e-3, help="AdamW lr of the UVit2D weights (full).")
    transfer.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay of the weights (full).")
    transfer.add_argument("--label_smoothing", type=float, default=0.1, help="Of the training loss (paper: 0.1).")

    sampling = parser.add_argument_group("sampling and evaluation")
    sampling.add_argument("--samples_per_class", type=int, default=40, help="Samples per class for the metrics.")
    sampling.add_argument("--num_steps", type=int, default=8, help="MaskGIT decoding iterations of the main table.")
    sampling.add_argument("--steps_sweep", default="4,8,16", help="Decoding iterations to compare ('' for none).")
    sampling.add_argument("--choice_temperature", type=float, default=4.5, help="MaskGIT's (annealed) t_c.")
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument(
        "--guidance_scales", default="2", help="Comma-separated prompt-guidance scales for extra rows ('' for none)."
    )
    sampling.add_argument("--eval_mask_draws", type=int, default=4, help="Random masks per held-out image.")
    sampling.add_argument("--grid_columns", type=int, default=10, help="Samples per class in the PNG grids.")
    sampling.add_argument("--classifier_epochs", type=int, default=150)
    sampling.add_argument("--classifier_hidden", type=int, default=128)
    sampling.add_argument("--feature_dim", type=int, default=32, help="Width of the penultimate (feature) layer.")
    return parser


def _int_list(parser, name: str, value) -> list[int]:
    try:
        return [int(v) for v in str(value or "").split(",") if v.strip()]
    except ValueError:
        parser.error(f"--{name} takes comma-separated integers, e.g. 4,8,16; got {value!r}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
    args = _common.parse_args_with_config(parser, argv, "examples/maskgit_digits/run.py")
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"unknown methods {bad}; choose from {METHODS}.")
    args.methods = ["no_adaptation", *[m for m in METHODS[1:] if m in methods]]
    if args.seeds:
        args.seeds = _int_list(parser, "seeds", args.seeds)
    else:
        if args.num_seeds < 1:
            parser.error(f"--num_seeds must be at least 1; got {args.num_seeds}.")
        args.seeds = [args.seed + i for i in range(args.num_seeds)]
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"the seeds must be distinct and at least one; got {args.seeds}.")
    args.steps_sweep = _int_list(parser, "steps_sweep", args.steps_sweep)
    if args.num_steps < 1 or any(s < 1 for s in args.steps_sweep):
        parser.error(f"--num_steps and --steps_sweep need at least 1 step; got {args.num_steps}, {args.steps_sweep}.")
    try:
        args.guidance_scales = [float(g) for g in str(args.guidance_scales or "").split(",") if g.strip()]
    except ValueError:
        parser.error(f"--guidance_scales takes comma-separated numbers, e.g. 1.5,3; got {args.guidance_scales!r}.")
    if (args.guidance_scales or args.steps_sweep) and "generative_prompt" not in args.methods:
        parser.error(
            "--guidance_scales and --steps_sweep sample the prompt-tuned generator: keep generative_prompt in "
            "--methods (or pass --guidance_scales '' --steps_sweep '')."
        )
    if not 2 <= args.num_levels <= 17:
        parser.error(f"--num_levels must be in [2, 17] (the digits have 17 intensities); got {args.num_levels}.")
    if not 0.0 < args.transfer_train_fraction < 1.0:
        parser.error(f"--transfer_train_fraction must be in (0, 1); got {args.transfer_train_fraction}.")
    if args.hidden_size % args.num_attention_heads:
        parser.error(f"--hidden_size ({args.hidden_size}) must be a multiple of --num_attention_heads.")
    if args.samples_per_class < 2 or args.grid_columns < 1 or args.eval_mask_draws < 1:
        parser.error("--samples_per_class must be at least 2, --grid_columns and --eval_mask_draws positive.")
    args.grid_columns = min(args.grid_columns, args.samples_per_class)
    args.cache_dir = os.path.expanduser(args.cache_dir)
    return args


# ---------------------------------------------------------------------------------------------------------------
# the generator and its neutral conditioning
# ---------------------------------------------------------------------------------------------------------------
TEXT_WIDTH, POOLED_WIDTH, MICRO_ENCODE = 16, 16, 2  # the unused conditioning paths, kept tiny


def build_uvit(args):
    from diffusers import UVit2DModel

    return UVit2DModel(
        hidden_size=args.hidden_size,
        use_bias=False,
        hidden_dropout=0.0,
        cond_embed_dim=POOLED_WIDTH,
        micro_cond_encode_dim=MICRO_ENCODE,
        micro_cond_embed_dim=5 * MICRO_ENCODE,
        encoder_hidden_size=TEXT_WIDTH,
        vocab_size=args.num_levels + 1,  # the levels, then the mask token
        codebook_size=args.num_levels,
        in_channels=args.block_channels,
        block_out_channels=args.block_channels,
        num_res_blocks=1,
        downsample=False,
        upsample=False,
        block_num_heads=2,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        attention_dropout=0.0,
        intermediate_size=2 * args.hidden_size,
        layer_norm_eps=1e-6,
        ln_elementwise_affine=True,
        sample_size=SIDE,
    )


def neutral_conditioning(model, batch: int) -> dict:
    """The same constants for every image and class: one all-zero text token, zero pooled text, zero micro-conds."""
    config = model.config if hasattr(model.config, "encoder_hidden_size") else model.get_base_model().config
    device = next(model.parameters()).device
    return {
        "encoder_hidden_states": torch.zeros(batch, 1, config.encoder_hidden_size, device=device),
        "pooled_text_emb": torch.zeros(batch, config.cond_embed_dim, device=device),
        "micro_conds": torch.zeros(batch, 5, device=device),
    }


def masked_batch_loss(args, model, batch) -> torch.Tensor:
    """The MaskGIT training loss on an `(ids,)` or `(ids, class ids)` batch, with neutral conditioning."""
    ids = batch[0]
    extra = {"class_labels": batch[1]} if len(batch) > 1 else {}
    return maskgit_loss(
        model,
        ids,
        mask_token_id=args.num_levels,
        label_smoothing=args.label_smoothing,
        **extra,
        **neutral_conditioning(model, ids.shape[0]),
    ).loss


@torch.no_grad()
def heldout_masked_loss(args, model, grids: torch.Tensor, class_labels, batch_size: int = 512) -> float:
    """Cross-entropy (nats per masked token, no smoothing) under `--eval_mask_draws` fixed random masks per image."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(EVAL_MASK_SEED)
    total, count = 0.0, 0
    for _ in range(args.eval_mask_draws):
        for start in range(0, len(grids), batch_size):
            ids = grids[start : start + batch_size].to(device)
            mask = random_token_mask(ids.shape[0], ids[0].numel(), generator=generator).view_as(ids).to(device)
            extra = {} if class_labels is None else {"class_labels": class_labels[start : start + batch_size]}
            masked = torch.where(mask, torch.full_like(ids, args.num_levels), ids)
            logits = model(input_ids=masked, **extra, **neutral_conditioning(model, ids.shape[0]))
            scored = int(mask.sum())
            total += masked_token_loss(logits, ids, mask, label_smoothing=0.0).item() * scored
            count += scored
    return total / count


def pretrain_settings(args) -> dict:
    return {
        "architecture": "UVit2DModel",
        "data": "scikit-learn digits 8x8 grids, levels floor(v * K / 17), mask id K",
        "classes": list(PRETRAIN_CLASSES),
        "num_levels": args.num_levels,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "block_channels": args.block_channels,
        "epochs": args.pretrain_epochs,
        "batch_size": args.pretrain_batch_size,
        "lr": args.pretrain_lr,
        "label_smoothing": args.label_smoothing,
        "seed": args.pretrain_seed,
    }


def get_generator(args, accelerator, grids: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pretrain the UVit2D on digits 0-4 (90 %; 10 % held out), or reuse `--cache_dir/digits_uvit2d_<hash>`."""
    settings = pretrain_settings(args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(args.cache_dir, f"digits_uvit2d_{key}")
    info_path = os.path.join(folder, "pretraining.json")
    cached = os.path.isfile(info_path)
    accelerator.wait_for_everyone()  # every process decides before the main one may write the cache
    if cached:
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
        return {"path": folder, "reused": True, **info, "pretrain_time_s": 0.0}

    train_idx, held_idx = stratified_split(labels, PRETRAIN_CLASSES, 0.9, args.pretrain_seed)
    set_seed(args.pretrain_seed)
    model = build_uvit(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
    loader = DataLoader(
        TensorDataset(grids[train_idx]),  # no class labels: unconditional
        batch_size=args.pretrain_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.pretrain_seed),
    )
    model, seconds, _ = fit(
        accelerator,
        model,
        optimizer,
        loader,
        lambda m, batch: masked_batch_loss(args, m, batch),
        epochs=args.pretrain_epochs,
        warmup_fraction=0.05,
        progress=args.progress,
    )
    model = accelerator.unwrap_model(model)
    info = {
        "heldout_masked_loss": heldout_masked_loss(args, model, grids[held_idx], None),
        "num_pretrain_images": len(train_idx),
        "num_heldout_images": len(held_idx),
        "pretrain_time_s": seconds,
        "settings": settings,
    }
    if accelerator.is_main_process:
        os.makedirs(args.cache_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".digits_uvit2d_", dir=args.cache_dir)
        model.save_pretrained(staging)
        with open(os.path.join(staging, "pretraining.json"), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return {"path": folder, "reused": False, **info}


def load_generator(path: str):
    from diffusers import UVit2DModel

    return UVit2DModel.from_pretrained(path).eval()


# ---------------------------------------------------------------------------------------------------------------
# adaptation and sampling
# ---------------------------------------------------------------------------------------------------------------
def prompt_config(args) -> hf_vpt.GenerativePromptConfig:
    # no `base_model_name_or_path`: PEFT's save would read the base's config class as a transformers one; the cached
    # generator's folder is in results.json (`generator.path`)
    return hf_vpt.GenerativePromptConfig(
        num_prompt_tokens=args.num_prompt_tokens,
        num_classes=len(TRANSFER_CLASSES),
        prompt_dropout=args.prompt_dropout,
    )


def adapt(args, accelerator, method: str, base_path: str, grids, class_ids, seed: int) -> dict:
    """Train the class-conditional prompt generator (and, for full fine-tuning, every weight) on 5-9."""
    set_seed(seed)
    model = get_peft_model(load_generator(base_path), prompt_config(args))
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
        TensorDataset(grids, class_ids),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    model, seconds, last_loss = fit(
        accelerator,
        model,
        torch.optim.AdamW(groups),
        loader,
        lambda m, batch: masked_batch_loss(args, m, batch),
        epochs=args.epochs,
        warmup_fraction=args.warmup_fraction,
        progress=args.progress,
    )
    model = accelerator.unwrap_model(model).eval()
    return {"model": model, "trainable": trainable, "seconds": seconds, "last_epoch_loss": last_loss}


@torch.no_grad()
def sample_per_class(
    args, model, conditional: bool, seed: int, num_steps: int | None = None, guidance_scale: float | None = None
) -> tuple[torch.Tensor, float]:
    """`[5 · n, 8, 8]` MaskGIT samples class by class (n = --samples_per_class) and the seconds they took."""
    model.eval()
    class_ids = torch.arange(len(TRANSFER_CLASSES)).repeat_interleave(args.samples_per_class)
    options = {"class_labels": class_ids} if conditional else {"batch_size": len(class_ids)}
    device = next(model.parameters()).device
    start = time.perf_counter()
    tokens = maskgit_sample(
        model,
        mask_token_id=args.num_levels,
        grid_size=(SIDE, SIDE),
        num_steps=num_steps or args.num_steps,
        choice_temperature=args.choice_temperature,
        temperature=args.temperature,
        generator=torch.Generator(device=device).manual_seed(seed),
        model_kwargs=neutral_conditioning(model, len(class_ids)),
        guidance_scale=guidance_scale,
        **options,
    ).tokens.cpu()
    return tokens, time.perf_counter() - start


def save_prompt_adapter(args, model, result: dict, metrics: dict, seed: int) -> str:
    """`generative_prompt_adapter/`: `save_pretrained` (weights + config), then the card with this run's numbers."""
    from hf_vpt.hub import write_model_card

    folder = os.path.join(args.output_dir, "generative_prompt_adapter")
    model.save_pretrained(folder)
    write_model_card(
        folder,
        model.peft_config["default"],
        dataset=f"scikit-learn digits 5-9 (training half), {args.num_levels} intensity levels, seed {seed}",
        metrics={
            "class fidelity (MLP classifier)": f"{100 * metrics['class_fidelity']:.1f} %",
            "Fréchet distance (classifier features)": f"{metrics['frechet_distance']:.2f}",
            "held-out masked-token loss (nats/token)": f"{result['heldout_masked_loss']:.4f}",
        },
        command=args.command,
        trainable_parameters=f"{result['trainable']:,}",
        title="Generative prompt adapter: UVit2D (MaskGIT) digits 0-4 -> 5-9",
    )
    return folder


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def steps_table(rows: list[dict], num_seeds: int) -> str:
    pm = " ±" if num_seeds > 1 else ""

    def cell(row, key, fmt, scale=1.0):
        text = format(scale * row[f"{key}_mean"], fmt)
        return f"{text}{pm} {format(scale * row[f'{key}_std'], fmt)}" if pm else text

    lines = [
        "| method | decoding steps | class fidelity (%) | Fréchet distance | sampling time (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['title']} | {row['num_steps']} | {cell(row, 'class_fidelity', '.1f', 100.0)} "
            f"| {cell(row, 'frechet_distance', '.2f')} | {cell(row, 'sampling_time_s', '.2f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the summary written to results.json."""
    import transformers

    args = parse_args(argv)
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
    grids = tokens.view(-1, SIDE, SIDE)
    generator_info = get_generator(args, accelerator, grids, labels)
    base_path = generator_info["path"]
    log(
        f"generator: UVit2D {args.num_hidden_layers} layers x {args.hidden_size} wide, {args.num_levels} levels, "
        "pretrained on digits 0-4 "
        + ("(reused from cache" if generator_info["reused"] else f"({generator_info['pretrain_time_s']:.1f} s")
        + f", {base_path}); held-out 0-4 masked-token loss {generator_info['heldout_masked_loss']:.4f}"
    )

    train_idx, held_idx = stratified_split(labels, TRANSFER_CLASSES, args.transfer_train_fraction, args.split_seed)
    class_ids = labels - TRANSFER_CLASSES[0]
    train_pixels = tokens_to_pixels(tokens[train_idx], args.num_levels)
    held_pixels = tokens_to_pixels(tokens[held_idx], args.num_levels)
    classifier, classifier_seconds = train_classifier(accelerator, args, train_pixels, class_ids[train_idx])
    held_predictions, real_features = classify(classifier, held_pixels)
    classifier_accuracy = float((held_predictions == class_ids[held_idx]).float().mean())
    real_frechet = frechet_distance(classify(classifier, train_pixels)[1], real_features)
    log(f"classifier: held-out accuracy {100 * classifier_accuracy:.2f} % on {len(held_idx)} real 5-9 digits")

    def metrics_of(sampled):
        return sample_metrics(classifier, sampled, args.num_levels, real_features, args.samples_per_class)

    variants = [*args.methods, *[f"guidance_{g:g}" for g in args.guidance_scales]]
    per_seed: dict[str, list[dict]] = {name: [] for name in variants}
    sweep: dict[tuple[str, int], list[dict]] = {}
    grid_tokens: dict[str, torch.Tensor] = {}
    adapter_folder = None
    base = load_generator(base_path).to(accelerator.device)
    frozen_losses = {
        "train_masked_loss": heldout_masked_loss(args, base, grids[train_idx], None),
        "heldout_masked_loss": heldout_masked_loss(args, base, grids[held_idx], None),
    }
    for seed in args.seeds:
        runs = {}
        for method in args.methods:
            if method == "no_adaptation":
                sampled, _ = sample_per_class(args, base, conditional=False, seed=seed)
                runs[method] = {"trainable": 0, "seconds": 0.0, **frozen_losses, "tokens": sampled}
                continue
            result = adapt(args, accelerator, method, base_path, grids[train_idx], class_ids[train_idx], seed)
            model = result.pop("model")
            result["train_masked_loss"] = heldout_masked_loss(args, model, grids[train_idx], class_ids[train_idx])
            result["heldout_masked_loss"] = heldout_masked_loss(args, model, grids[held_idx], class_ids[held_idx])
            # the same images under the next class's prompts: how much the class in the prompts matters
            wrong = (class_ids[held_idx] + 1) % len(TRANSFER_CLASSES)
            result["heldout_masked_loss_wrong_class"] = heldout_masked_loss(args, model, grids[held_idx], wrong)
            result["tokens"], _ = sample_per_class(args, model, conditional=True, seed=seed)
            runs[method] = result
            if method == "generative_prompt":
                for scale in args.guidance_scales:
                    guided, _ = sample_per_class(args, model, conditional=True, seed=seed, guidance_scale=scale)
                    runs[f"guidance_{scale:g}"] = {"trainable": result["trainable"], "seconds": result["seconds"]}
                    runs[f"guidance_{scale:g}"]["tokens"] = guided
            if method == "generative_prompt" and seed == args.seeds[0] and accelerator.is_main_process:
                adapter_folder = save_prompt_adapter(args, model, result, metrics_of(result["tokens"]), seed)
            for steps in args.steps_sweep:
                sampled, seconds = sample_per_class(args, model, conditional=True, seed=seed, num_steps=steps)
                sweep.setdefault((method, steps), []).append({"seed": seed, "sampling_time_s": seconds})
                sweep[(method, steps)][-1].update(metrics_of(sampled))
            del model
        for name, run in runs.items():
            metrics = metrics_of(run["tokens"])
            if seed == args.seeds[0]:
                grid_tokens[name] = run["tokens"]
            per_seed[name].append({"seed": seed, **{k: v for k, v in run.items() if k != "tokens"}, **metrics})
            log(
                f"seed {seed} {name:<18} class fidelity {100 * metrics['class_fidelity']:5.1f} %  Fréchet "
                f"{metrics['frechet_distance']:7.2f}  train {run['seconds']:.1f} s"
            )

    keys = (
        "train_time_s",
        "class_fidelity",
        "frechet_distance",
        "train_masked_loss",
        "heldout_masked_loss",
        "heldout_masked_loss_wrong_class",
    )
    rows = []
    for name, results in per_seed.items():
        title = METHOD_TITLES.get(name) or f"generative prompt tuning + guidance g={name.split('_', 1)[1]}"
        rows.append(summary_row(name, title, results, keys))
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
            "heldout_masked_loss_mean": None,
            "note": "class fidelity = the classifier's held-out accuracy; Fréchet distance = training half vs held-out",
        }
    )
    table = format_table(rows, len(args.seeds), "heldout_masked_loss", "held-out masked-token loss")
    steps_rows = []
    for (method, steps), results in sweep.items():
        row = {"method": method, "title": METHOD_TITLES[method], "num_steps": steps, "per_seed": results}
        for key in ("class_fidelity", "frechet_distance", "sampling_time_s"):
            values = [r[key] for r in results]
            row[f"{key}_mean"] = float(np.mean(values))
            row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        steps_rows.append(row)
    steps_rows.sort(key=lambda row: (METHODS.index(row["method"]), row["num_steps"]))
    decoding = steps_table(steps_rows, len(args.seeds)) if steps_rows else ""
    wall_time = time.perf_counter() - wall
    log(
        f"\nDigits 0-4 -> 5-9 MaskGIT transfer, UVit2D {args.num_hidden_layers}x{args.hidden_size}, "
        f"{args.num_levels} levels, {len(train_idx)} training / {len(held_idx)} held-out 5-9 digits, "
        f"{args.samples_per_class} samples per class, {args.num_steps} decoding steps, seeds {args.seeds}:\n"
    )
    log(table)
    if decoding:
        log(f"\nDecoding steps ({len(TRANSFER_CLASSES) * args.samples_per_class} samples per run):\n\n{decoding}")
    summary = {
        "experiment": "digits 0-4 -> 5-9, MaskGIT generative transfer",
        "command": args.command,
        "conditioning": "neutral: encoder_hidden_states zeros [B, 1, 16], pooled_text_emb zeros [B, 16], "
        "micro_conds zeros [B, 5], in every call",
        "generator": generator_info,
        "classifier": {
            "heldout_accuracy": classifier_accuracy,
            "train_time_s": classifier_seconds,
            "num_train": len(train_idx),
            "num_heldout": len(held_idx),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("config", "command")},
        "seeds": args.seeds,
        "results": rows,
        "table": table,
        "decoding_steps": steps_rows,
        "decoding_steps_table": decoding,
        "adapter_path": adapter_folder,
        "wall_time_s": wall_time,
        "torch_threads": torch.get_num_threads(),
    }
    if accelerator.is_main_process:
        shown = tokens[held_idx][class_order(class_ids[held_idx], args.grid_columns)]
        pictures = {"real": grid_image(shown, args.num_levels, args.grid_columns, args.grid_columns)}
        titles = {"real": GRID_TITLES["real"]}
        for name, sampled in grid_tokens.items():
            pictures[name] = grid_image(sampled, args.num_levels, args.samples_per_class, args.grid_columns)
            titles[name] = GRID_TITLES.get(name, f"prompt + guidance {name.split('_', 1)[1]}")
        summary["grids"] = save_grids(args.output_dir, pictures, titles)
        write_json(os.path.join(args.output_dir, "results.json"), summary)
        log(f"\nwrote {args.output_dir}/results.json and samples.png; wall time {wall_time:.1f} s")
    return summary


if __name__ == "__main__":
    main()
