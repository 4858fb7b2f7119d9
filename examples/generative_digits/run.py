#!/usr/bin/env python
"""Generative transfer on 8x8 digits: a small ImageGPT pretrained on classes 0-4, adapted to classes 5-9.

The setting of Sohn et al. (CVPR 2023, https://arxiv.org/abs/2210.00990) at a size a CPU runs in minutes, offline:

1. **Tokens.** scikit-learn's 1797 digits (8x8, intensities 0..16) are quantised into `--num_levels` intensity
   levels (level `floor(v · K / 17)`): each image is 64 tokens in raster order. The generator is an
   `ImageGPTForCausalImageModeling` with `K + 1` tokens (the last is SOS) and 65 positions, so `[SOS, x_1 .. x_64]`
   scores all 64 pixels.
2. **Pretraining.** The generator is trained unconditionally (next-token loss) on digits 0-4 and cached under
   `--cache_dir`, keyed by a hash of its hyper-parameters (a second run reuses it).
3. **Transfer to 5-9**, class-conditionally, from the training half of the 5-9 digits (a stratified split; the
   other half is held out):
   * **no adaptation**: the frozen pretrained generator. It has no way to take a class: it is sampled
     unconditionally for every class row, so its class fidelity is chance by construction (about 20 %). It is the
     floor, not a competitor.
   * **generative prompt tuning** (the paper's method): a `hf_vpt.GenerativePromptConfig` prompt generator over the
     5 classes, `prompt[c, j] = LN(E[c] + Pos[j])`, in front of the frozen ImageGPT; only the generator trains
     (`hf_vpt.tuners.generative_prompt.objectives.autoregressive_loss`).
   * **full fine-tuning**: the same prompt generator as the class-conditioning mechanism, and every weight of the
     ImageGPT trained as well (AdamW, a lower learning rate for the pretrained weights).
   * **prompt tuning + guidance g** (`--guidance_scales`): the prompt-tuned generator sampled with
     `l_u + g · (l_p - l_u)` between prompted and frozen logits. This guidance is an hf_vpt addition, not part of
     the paper; no extra training.
4. **Evaluation.** A small MLP classifier is trained in the run on the real 5-9 training half (at the same
   quantisation as the generator's tokens) and tested on the held-out half. For `--samples_per_class` samples per
   class (`hf_vpt.sampling.autoregressive_sample`, fixed seeds):
   * **class fidelity**: the fraction of the samples of class c that the classifier labels c (mean over classes);
   * **Fréchet distance** between the classifier's penultimate-layer features of all samples and of the held-out
     real digits (an FID computed in this classifier's feature space instead of Inception's);
   * the held-out **negative log-likelihood** (nats per pixel token) of each generator on the real 5-9 digits.
   The reference row "real digits" gives the classifier's held-out accuracy and the Fréchet distance between the
   real training half and the held-out half (what a generator that memorised its training images would score).

Seeds (`--num_seeds` / `--seeds`) change the adaptation (initialisation and data order) and the sampling; the 5-9
split and the classifier are fixed by `--split_seed`, so every method of every seed is measured with the same
instrument. Defaults that differ from the paper's released ones, chosen by held-out likelihood and fidelity on this
data: no prompt dropout (0.1 lowered both), AdamW lr 1e-2, 20 epochs; 32 prompt tokens as in the paper.

Every training run (pretraining, adaptation, the classifier) goes through the recipes' shared loop
`recipes/_common.train_loop` (via `generative_digits_common.fit`) with transformers' warm-up + cosine schedule. The optimisers stay
the study's own AdamW parameter groups (two learning rates for full fine-tuning, weight decay on every pretraining
weight): `_common.make_optimizer` has one learning rate and no decay on biases, which would change the published
numbers. The MaskGIT counterpart is `examples/maskgit_digits/run.py`; both share `generative_digits_common.py`.

Outputs in `--output_dir`: `results.json` (every number, per seed and mean ± std), a PNG grid of samples per method
(`samples_<method>.png`, rows = classes 5-9) and all of them side by side (`samples.png`), the prompt adapter of the
first seed (`generative_prompt_adapter/`, `save_pretrained` + model card) and `generative_prompt_samples.pt` (its
grid samples with their seed and logits, to check a reloaded adapter against).

    python examples/generative_digits/run.py                      # 3 seeds
    python examples/generative_digits/run.py --quick              # seconds: tiny generator, few epochs
    accelerate launch examples/generative_digits/run.py --num_seeds 5
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        examples/generative_digits/run.py                         # two CPU processes (DDP, gloo)
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

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader, TensorDataset


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generative_digits_common import (  # noqa: E402  (also puts recipes/ on the path for _common)
    NUM_PIXELS,
    PRETRAIN_CLASSES,
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
from hf_vpt.sampling import autoregressive_sample  # noqa: E402
from hf_vpt.tuners.generative_prompt.objectives import autoregressive_loss, next_token_loss  # noqa: E402


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
# `--quick`: a generator and schedules small enough for a test (seconds); explicit options still win.
QUICK_DEFAULTS = {
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "pretrain_epochs": 12,
    "epochs": 10,
    "num_prompt_tokens": 8,
    "prompt_lr": 3e-2,
    "samples_per_class": 12,
    "grid_columns": 6,
    "classifier_epochs": 40,
    "num_seeds": 1,
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
    run.add_argument("--output_dir", default="outputs/generative_digits")
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

    generator = parser.add_argument_group("pretrained generator (ImageGPT on digits 0-4, cached)")
    generator.add_argument("--cache_dir", default=os.path.join("~", ".cache", "hf_vpt"))
    generator.add_argument("--n_embd", type=int, default=64)
    generator.add_argument("--n_layer", type=int, default=4)
    generator.add_argument("--n_head", type=int, default=4)
    generator.add_argument("--n_inner", type=int, default=None, help="MLP width (default: 2 x n_embd).")
    generator.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="ImageGPT's residual/embedding/attention dropout (0: it took about a quarter of the CPU time).",
    )
    generator.add_argument("--pretrain_epochs", type=int, default=30)
    generator.add_argument("--pretrain_batch_size", type=int, default=64)
    generator.add_argument("--pretrain_lr", type=float, default=3e-3)
    generator.add_argument("--pretrain_seed", type=int, default=0)

    transfer = parser.add_argument_group("transfer to 5-9")
    transfer.add_argument("--epochs", type=int, default=20)
    transfer.add_argument("--batch_size", type=int, default=32, help="Per device.")
    transfer.add_argument("--warmup_fraction", type=float, default=0.05)
    transfer.add_argument("--num_prompt_tokens", type=int, default=32, help="The paper's default.")
    transfer.add_argument(
        "--prompt_dropout", type=float, default=0.0, help="The paper uses 0.1; here it lowered fidelity (measured)."
    )
    transfer.add_argument("--prompt_lr", type=float, default=1e-2, help="AdamW lr of the prompt generator.")
    transfer.add_argument("--full_lr", type=float, default=1e-3, help="AdamW lr of the ImageGPT weights (full).")
    transfer.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay of the weights (full).")

    sampling = parser.add_argument_group("sampling and evaluation")
    sampling.add_argument("--samples_per_class", type=int, default=90, help="Samples per class for the metrics.")
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--top_k", type=int, default=None)
    sampling.add_argument(
        "--guidance_scales", default="2", help="Comma-separated prompt-guidance scales for extra rows ('' for none)."
    )
    sampling.add_argument("--grid_columns", type=int, default=10, help="Samples per class in the PNG grids.")
    sampling.add_argument("--classifier_epochs", type=int, default=150)
    sampling.add_argument("--classifier_hidden", type=int, default=128)
    sampling.add_argument("--feature_dim", type=int, default=32, help="Width of the penultimate (feature) layer.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
    args = _common.parse_args_with_config(parser, argv, "examples/generative_digits/run.py")
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"unknown methods {bad}; choose from {METHODS}.")
    args.methods = ["no_adaptation", *[m for m in METHODS[1:] if m in methods]]
    if args.seeds:
        try:
            args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
        except ValueError:
            parser.error(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {args.seeds!r}.")
    else:
        if args.num_seeds < 1:
            parser.error(f"--num_seeds must be at least 1; got {args.num_seeds}.")
        args.seeds = [args.seed + i for i in range(args.num_seeds)]
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"the seeds must be distinct and at least one; got {args.seeds}.")
    try:
        args.guidance_scales = [float(g) for g in str(args.guidance_scales or "").split(",") if g.strip()]
    except ValueError:
        parser.error(f"--guidance_scales takes comma-separated numbers, e.g. 1.5,3; got {args.guidance_scales!r}.")
    if args.guidance_scales and "generative_prompt" not in args.methods:
        parser.error("--guidance_scales samples the prompt-tuned generator: keep generative_prompt in --methods.")
    if not 2 <= args.num_levels <= 17:
        parser.error(f"--num_levels must be in [2, 17] (the digits have 17 intensities); got {args.num_levels}.")
    if not 0.0 < args.transfer_train_fraction < 1.0:
        parser.error(f"--transfer_train_fraction must be in (0, 1); got {args.transfer_train_fraction}.")
    if args.n_embd % args.n_head:
        parser.error(f"--n_embd ({args.n_embd}) must be a multiple of --n_head ({args.n_head}).")
    if args.samples_per_class < 2 or args.grid_columns < 1:
        parser.error("--samples_per_class must be at least 2 (a covariance needs two) and --grid_columns positive.")
    args.grid_columns = min(args.grid_columns, args.samples_per_class)
    args.n_inner = args.n_inner or 2 * args.n_embd
    args.cache_dir = os.path.expanduser(args.cache_dir)
    return args


# ---------------------------------------------------------------------------------------------------------------
# tokens, training and likelihood
# ---------------------------------------------------------------------------------------------------------------
def with_sos(tokens: torch.Tensor, sos: int) -> torch.Tensor:
    """`[N, 64]` -> `[N, 65]` generator inputs `[SOS, x_1 .. x_64]` (every pixel is scored)."""
    return torch.cat([torch.full((tokens.shape[0], 1), sos, dtype=torch.long), tokens], dim=1)


def next_token_batch_loss(model, batch) -> torch.Tensor:
    """`autoregressive_loss` on an `(ids,)` or `(ids, class ids)` batch."""
    extra = {"class_labels": batch[1]} if len(batch) > 1 else {}
    return autoregressive_loss(model, batch[0], **extra)


@torch.no_grad()
def mean_nll(model, sequences: torch.Tensor, class_labels: torch.Tensor | None, batch_size: int = 256) -> float:
    """Mean next-token negative log-likelihood (nats per pixel token) in eval mode, over all `sequences`."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        ids = sequences[start : start + batch_size].to(device)
        extra = {} if class_labels is None else {"class_labels": class_labels[start : start + batch_size].to(device)}
        logits = model(input_ids=ids, use_cache=False, **extra).logits
        total += next_token_loss(logits, ids).item() * ids.shape[0]
        count += ids.shape[0]
    return total / count


def pretrain_settings(args) -> dict:
    return {
        "architecture": "ImageGPTForCausalImageModeling",
        "data": "scikit-learn digits 8x8, raster order, levels floor(v * K / 17)",
        "classes": list(PRETRAIN_CLASSES),
        "num_levels": args.num_levels,
        "n_embd": args.n_embd,
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "n_inner": args.n_inner,
        "dropout": args.dropout,
        "epochs": args.pretrain_epochs,
        "batch_size": args.pretrain_batch_size,
        "lr": args.pretrain_lr,
        "seed": args.pretrain_seed,
    }


def get_generator(args, accelerator, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    """Pretrain the ImageGPT on digits 0-4 (90 % of them; 10 % held out), or reuse the copy cached under the same
    hyper-parameters in `--cache_dir/digits_imagegpt_<hash>`."""
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    settings = pretrain_settings(args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(args.cache_dir, f"digits_imagegpt_{key}")
    info_path = os.path.join(folder, "pretraining.json")
    cached = os.path.isfile(info_path)
    accelerator.wait_for_everyone()  # every process decides before the main one may write the cache
    if cached:
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
        return {"path": folder, "reused": True, **info, "pretrain_time_s": 0.0}

    sos = args.num_levels
    train_idx, held_idx = stratified_split(labels, PRETRAIN_CLASSES, 0.9, args.pretrain_seed)
    set_seed(args.pretrain_seed)
    config = ImageGPTConfig(
        vocab_size=args.num_levels + 1,
        n_positions=NUM_PIXELS + 1,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_inner=args.n_inner,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
    )
    model = ImageGPTForCausalImageModeling(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
    loader = DataLoader(
        TensorDataset(with_sos(tokens[train_idx], sos)),  # no class labels: unconditional
        batch_size=args.pretrain_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.pretrain_seed),
    )
    model, seconds, _ = fit(
        accelerator,
        model,
        optimizer,
        loader,
        next_token_batch_loss,
        epochs=args.pretrain_epochs,
        warmup_fraction=0.05,
        progress=args.progress,
    )
    model = accelerator.unwrap_model(model)
    info = {
        "heldout_nll": mean_nll(model, with_sos(tokens[held_idx], sos), None),
        "num_pretrain_images": len(train_idx),
        "num_heldout_images": len(held_idx),
        "pretrain_time_s": seconds,
        "settings": settings,
    }
    if accelerator.is_main_process:
        os.makedirs(args.cache_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".digits_imagegpt_", dir=args.cache_dir)
        model.save_pretrained(staging)
        with open(os.path.join(staging, "pretraining.json"), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return {"path": folder, "reused": False, **info}


def load_generator(path: str):
    from transformers import ImageGPTForCausalImageModeling

    return ImageGPTForCausalImageModeling.from_pretrained(path)


def prompt_config(args, base_path: str) -> hf_vpt.GenerativePromptConfig:
    config = hf_vpt.GenerativePromptConfig(
        num_prompt_tokens=args.num_prompt_tokens,
        num_classes=len(TRANSFER_CLASSES),
        prompt_dropout=args.prompt_dropout,
    )
    config.base_model_name_or_path = base_path
    return config


def adapt(args, accelerator, method: str, base_path: str, sequences, class_ids, seed: int) -> dict:
    """Train the class-conditional prompt generator (and, for full fine-tuning, every weight) on 5-9."""
    set_seed(seed)
    model = get_peft_model(load_generator(base_path), prompt_config(args, base_path))
    generator_params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": generator_params, "lr": args.prompt_lr, "weight_decay": 0.0}]
    if method == "full_finetune":
        base_params = list(model.get_base_model().parameters())
        known = {id(p) for p in generator_params}
        base_params = [p for p in base_params if id(p) not in known]
        for param in base_params:
            param.requires_grad_(True)
        decay = [p for p in base_params if p.ndim > 1]
        no_decay = [p for p in base_params if p.ndim <= 1]
        groups += [
            {"params": decay, "lr": args.full_lr, "weight_decay": args.weight_decay},
            {"params": no_decay, "lr": args.full_lr, "weight_decay": 0.0},
        ]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(groups)
    loader = DataLoader(
        TensorDataset(sequences, class_ids),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    model, seconds, last_loss = fit(
        accelerator,
        model,
        optimizer,
        loader,
        next_token_batch_loss,
        epochs=args.epochs,
        warmup_fraction=args.warmup_fraction,
        progress=args.progress,
    )
    model = accelerator.unwrap_model(model).eval()
    return {"model": model, "trainable": trainable, "seconds": seconds, "last_epoch_loss": last_loss}


@torch.no_grad()
def sample_per_class(args, model, conditional: bool, seed: int, guidance_scale: float | None = None) -> torch.Tensor:
    """`[5 · n, 64]` samples, class by class (n = --samples_per_class), from one seeded `torch.Generator`."""
    model.eval()
    class_ids = torch.arange(len(TRANSFER_CLASSES)).repeat_interleave(args.samples_per_class)
    options = {"class_labels": class_ids} if conditional else {"batch_size": len(class_ids)}
    device = next(model.parameters()).device
    return autoregressive_sample(
        model,
        num_tokens=NUM_PIXELS,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=torch.Generator(device=device).manual_seed(seed),
        guidance_scale=guidance_scale,
        **options,
    ).cpu()


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------
def save_prompt_adapter(args, model, folder: str, seed: int, metrics: dict, trainable: int) -> None:
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
        title="Generative prompt adapter: ImageGPT digits 0-4 -> 5-9",
    )


@torch.no_grad()
def save_prompt_outputs(args, model, result: dict, metrics: dict, seed: int) -> str:
    """The prompt adapter (`generative_prompt_adapter/`) and `generative_prompt_samples.pt`: the samples, their class
    ids and seed, and the adapter's logits on them, so that a reloaded adapter can be checked against both."""
    folder = os.path.join(args.output_dir, "generative_prompt_adapter")
    card_metrics = {
        "class fidelity (MLP classifier)": f"{100 * metrics['class_fidelity']:.1f} %",
        "Fréchet distance (classifier features)": f"{metrics['frechet_distance']:.2f}",
        "held-out NLL (nats/pixel)": f"{result['heldout_nll']:.4f}",
    }
    save_prompt_adapter(args, model, folder, seed, card_metrics, result["trainable"])
    model.eval()
    device = next(model.parameters()).device
    tokens = result["tokens"]
    class_ids = torch.arange(len(TRANSFER_CLASSES)).repeat_interleave(args.samples_per_class)
    inputs = with_sos(tokens, args.num_levels)[:, :-1].to(device)  # [SOS, x_1 .. x_63] predicts x_1 .. x_64
    logits = model(input_ids=inputs, class_labels=class_ids.to(device), use_cache=False).logits.cpu()
    check = {"tokens": tokens, "class_labels": class_ids, "logits": logits, "seed": torch.tensor(seed)}
    torch.save(check, os.path.join(args.output_dir, "generative_prompt_samples.pt"))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the summary written to results.json."""
    import transformers

    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    log = accelerator.print
    wall = time.perf_counter()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    sos = args.num_levels

    tokens, labels = load_digit_tokens(args.num_levels)
    generator_info = get_generator(args, accelerator, tokens, labels)
    base_path = generator_info["path"]
    log(
        f"generator: ImageGPT {args.n_layer} layers x {args.n_embd} wide, {args.num_levels} levels, pretrained on "
        f"digits 0-4 "
        + ("(reused from cache" if generator_info["reused"] else f"({generator_info['pretrain_time_s']:.1f} s")
        + f", {base_path}); held-out 0-4 NLL {generator_info['heldout_nll']:.4f} nats/pixel"
    )

    # the 5-9 digits: a fixed stratified split; the classifier is trained once on the training half
    train_idx, held_idx = stratified_split(labels, TRANSFER_CLASSES, args.transfer_train_fraction, args.split_seed)
    class_ids = labels - TRANSFER_CLASSES[0]
    train_seq, held_seq = with_sos(tokens[train_idx], sos), with_sos(tokens[held_idx], sos)
    train_pixels = tokens_to_pixels(tokens[train_idx], args.num_levels)
    held_pixels = tokens_to_pixels(tokens[held_idx], args.num_levels)
    classifier, classifier_seconds = train_classifier(accelerator, args, train_pixels, class_ids[train_idx])
    held_predictions, real_features = classify(classifier, held_pixels)
    classifier_accuracy = float((held_predictions == class_ids[held_idx]).float().mean())
    _, train_features = classify(classifier, train_pixels)
    real_frechet = frechet_distance(train_features, real_features)
    log(
        f"classifier (MLP, trained on {len(train_idx)} real 5-9 digits in {classifier_seconds:.1f} s): held-out "
        f"accuracy {100 * classifier_accuracy:.2f} % on {len(held_idx)} digits"
    )

    variants = [*args.methods]
    variants += [f"guidance_{g:g}" for g in args.guidance_scales]
    per_seed: dict[str, list[dict]] = {name: [] for name in variants}
    grids, adapter_folder = {}, None
    base = load_generator(base_path).to(accelerator.device).eval()
    no_adaptation_nll = {"train_nll": mean_nll(base, train_seq, None), "heldout_nll": mean_nll(base, held_seq, None)}
    for seed in args.seeds:
        runs = {}
        for method in args.methods:
            if method == "no_adaptation":
                sampled = sample_per_class(args, base, conditional=False, seed=seed)
                runs[method] = {"trainable": 0, "seconds": 0.0, **no_adaptation_nll, "tokens": sampled}
                continue
            result = adapt(args, accelerator, method, base_path, train_seq, class_ids[train_idx], seed)
            model = result.pop("model")
            result["train_nll"] = mean_nll(model, train_seq, class_ids[train_idx])
            result["heldout_nll"] = mean_nll(model, held_seq, class_ids[held_idx])
            result["tokens"] = sample_per_class(args, model, conditional=True, seed=seed)
            runs[method] = result
            if method == "generative_prompt":
                for scale in args.guidance_scales:
                    guided = sample_per_class(args, model, conditional=True, seed=seed, guidance_scale=scale)
                    # the same adapter (its training time), sampled differently; no likelihood of its own
                    runs[f"guidance_{scale:g}"] = {
                        "trainable": result["trainable"],
                        "seconds": result["seconds"],
                        "tokens": guided,
                    }
                if seed == args.seeds[0] and accelerator.is_main_process:
                    metrics = sample_metrics(
                        classifier, result["tokens"], args.num_levels, real_features, args.samples_per_class
                    )
                    adapter_folder = save_prompt_outputs(args, model, result, metrics, seed)
            del model
            accelerator.free_memory()
        for name, run in runs.items():
            metrics = sample_metrics(classifier, run["tokens"], args.num_levels, real_features, args.samples_per_class)
            if seed == args.seeds[0]:
                grids[name] = grid_image(run["tokens"], args.num_levels, args.samples_per_class, args.grid_columns)
            per_seed[name].append({"seed": seed, **{k: v for k, v in run.items() if k != "tokens"}, **metrics})
            log(
                f"seed {seed} {name:<18} class fidelity {100 * metrics['class_fidelity']:5.1f} %  Fréchet "
                f"{metrics['frechet_distance']:7.2f}  train {run['seconds']:.1f} s"
            )

    rows = []
    for name, results in per_seed.items():
        title = (
            METHOD_TITLES.get(name) or f"generative prompt tuning + guidance g={name.split('_', 1)[1]} (same adapter)"
        )
        keys = ("train_time_s", "class_fidelity", "frechet_distance", "train_nll", "heldout_nll")
        row = summary_row(name, title, results, keys)
        rows.append(row)
    real_row = {
        "method": "real",
        "title": METHOD_TITLES["real"],
        "trainable_parameters": None,
        "train_time_s_mean": None,
        "class_fidelity_mean": classifier_accuracy,
        "class_fidelity_std": 0.0,
        "frechet_distance_mean": real_frechet,
        "frechet_distance_std": 0.0,
        "heldout_nll_mean": None,
        "note": "class fidelity = the classifier's held-out accuracy; Fréchet distance = training half vs held-out",
    }
    rows.append(real_row)
    table = format_table(rows, len(args.seeds), "heldout_nll", "held-out NLL")
    wall_time = time.perf_counter() - wall
    log(
        f"\nDigits 0-4 -> 5-9 generative transfer, ImageGPT {args.n_layer}x{args.n_embd}, {args.num_levels} levels, "
        f"{len(train_idx)} training / {len(held_idx)} held-out 5-9 digits, {args.samples_per_class} samples per class, "
        f"seeds {args.seeds} (mean ± std, ddof=1); class fidelity and Fréchet distance from an MLP classifier "
        f"trained in the run; NLL in nats per pixel:\n"
    )
    log(table)
    summary = {
        "experiment": "digits 0-4 -> 5-9, generative transfer",
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
        "adapter_path": adapter_folder,
        "samples_path": os.path.join(args.output_dir, "generative_prompt_samples.pt") if adapter_folder else None,
        "wall_time_s": wall_time,
        "torch_threads": torch.get_num_threads(),
    }
    if accelerator.is_main_process:
        titles = {name: GRID_TITLES.get(name, f"prompt + guidance {name.split('_', 1)[1]}") for name in grids}
        shown = tokens[held_idx][class_order(class_ids[held_idx], args.grid_columns)]
        real_grid = grid_image(shown, args.num_levels, args.grid_columns, args.grid_columns)
        summary["grids"] = save_grids(
            args.output_dir, {"real": real_grid, **grids}, {"real": GRID_TITLES["real"], **titles}
        )
        write_json(os.path.join(args.output_dir, "results.json"), summary)
        log(f"\nwrote {args.output_dir}/results.json and samples.png; wall time {wall_time:.1f} s")
    return summary


if __name__ == "__main__":
    main()
