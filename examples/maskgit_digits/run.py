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
   64 tokens, cross-entropy on the masked ones; `--label_smoothing`, 0 by default, the paper's 0.1), 60 epochs of
   a 4-layer, width-64 UVit2D, cached under `--cache_dir` by a hash of its hyper-parameters
   (`examples/digits_transfer/pretrain_cache.cached_pretraining`, through `generative_digits_common`).
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

Everything but the generator is shared with the ImageGPT study in `../generative_digits/generative_digits_common.py`
(the command line, the cached pretraining, the adaptation, the instrument, the seeds x methods run `run_study`);
this file holds the UVit2D, its neutral conditioning, its masked-token loss and its sampler. Every training run goes
through the recipes' shared loop `recipes/_common.train_loop` (through `generative_digits_common.fit`).
Outputs in `--output_dir`: `results.json`, `samples_<method>.png` grids (rows = classes 5-9), `samples.png` (all
side by side) and the first seed's prompt adapter (`generative_prompt_adapter/`, `save_pretrained` + model card).

    python examples/maskgit_digits/run.py --num_threads 1  # 3 seeds, pretraining included: about 10 CPU-minutes
    python examples/maskgit_digits/run.py --quick          # seconds: tiny model, few epochs
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "generative_digits"))
from generative_digits_common import (  # noqa: E402  (also puts recipes/ and digits_transfer/ on the path)
    METHOD_TITLES,
    METHODS,
    PRETRAIN_CLASSES,
    SIDE,
    TRANSFER_CLASSES,
    GenerativeStudy,
    number_list,
    parse_study_args,
    run_study,
    study_parser,
)

import hf_vpt  # noqa: E402
from hf_vpt.sampling import maskgit_sample  # noqa: E402
from hf_vpt.tuners.generative_prompt.objectives import masked_token_loss, maskgit_loss, random_token_mask  # noqa: E402


SCRIPT = "examples/maskgit_digits/run.py"
EVAL_MASK_SEED = 1234  # the held-out loss's masks: the same for every model and seed
# this study's values of the shared options (generative_digits_common.study_parser)
DEFAULTS = {
    "output_dir": "outputs/maskgit_digits",
    "pretrain_epochs": 60,
    "epochs": 20,
    "num_prompt_tokens": 32,
    "prompt_lr": 3e-2,
    "samples_per_class": 40,
}
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
def build_parser():
    parser, groups = study_parser(__doc__.split("\n\n")[0], "UVit2DModel", QUICK_DEFAULTS)
    generator = groups["generator"]
    generator.add_argument("--hidden_size", type=int, default=64, help="Width of the transformer layers.")
    generator.add_argument("--num_hidden_layers", type=int, default=4)
    generator.add_argument("--num_attention_heads", type=int, default=4)
    generator.add_argument("--block_channels", type=int, default=32, help="Width of the convolutional blocks.")
    transfer = groups["transfer"]
    transfer.add_argument(
        "--label_smoothing",
        type=float,
        default=0.0,
        help="Of the training losses (the paper: 0.1; not measured here).",
    )
    sampling = groups["sampling"]
    sampling.add_argument("--num_steps", type=int, default=8, help="MaskGIT decoding iterations of the main table.")
    sampling.add_argument("--steps_sweep", default="4,8,16", help="Decoding iterations to compare ('' for none).")
    sampling.add_argument("--choice_temperature", type=float, default=4.5, help="MaskGIT's (annealed) t_c.")
    sampling.add_argument("--eval_mask_draws", type=int, default=4, help="Random masks per held-out image.")
    parser.set_defaults(**DEFAULTS)
    return parser


def parse_args(argv: list[str] | None = None):
    parser = build_parser()
    args = parse_study_args(parser, argv, SCRIPT, QUICK_DEFAULTS, prompt_sampling=("steps_sweep",))
    args.steps_sweep = number_list(parser, "steps_sweep", args.steps_sweep)
    if args.num_steps < 1 or any(s < 1 for s in args.steps_sweep):
        parser.error(f"--num_steps and --steps_sweep need at least 1 step; got {args.num_steps}, {args.steps_sweep}.")
    if args.hidden_size % args.num_attention_heads:
        parser.error(f"--hidden_size ({args.hidden_size}) must be a multiple of --num_attention_heads.")
    if args.eval_mask_draws < 1:
        parser.error(f"--eval_mask_draws must be positive; got {args.eval_mask_draws}.")
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


def load_generator(path: str):
    from diffusers import UVit2DModel

    return UVit2DModel.from_pretrained(path).eval()


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


# ---------------------------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------------------------
class MaskGITStudy(GenerativeStudy):
    script = SCRIPT
    cache_name = "digits_uvit2d"
    experiment = "MaskGIT generative transfer"
    card_title = "Generative prompt adapter: UVit2D (MaskGIT) digits 0-4 -> 5-9"
    loss_keys = ("train_masked_loss", "heldout_masked_loss", "heldout_masked_loss_wrong_class")
    table_loss = ("heldout_masked_loss", "held-out masked-token loss")
    pretrain_loss = "heldout_masked_loss"
    pretrain_loss_title = "masked-token loss"

    def __init__(self, args):
        super().__init__(args)
        self.sweep: dict[tuple[str, int], list[dict]] = {}

    def describe(self) -> str:
        return f"UVit2D {self.args.num_hidden_layers}x{self.args.hidden_size}"

    def pretrain_settings(self) -> dict:
        return pretrain_settings(self.args)

    def build_generator(self):
        return build_uvit(self.args)

    def load_generator(self, path: str):
        return load_generator(path)

    def prompt_config(self, base_path: str) -> hf_vpt.GenerativePromptConfig:
        # no `base_model_name_or_path`: PEFT's save would read the base's config class as a transformers one; the
        # cached generator's folder is in results.json (`generator.path`)
        return hf_vpt.GenerativePromptConfig(
            num_prompt_tokens=self.args.num_prompt_tokens,
            num_classes=len(TRANSFER_CLASSES),
            prompt_dropout=self.args.prompt_dropout,
        )

    def model_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.view(-1, SIDE, SIDE)

    def batch_loss(self, model, batch) -> torch.Tensor:
        return masked_batch_loss(self.args, model, batch)

    def losses(self, model, train, held, train_ids, held_ids) -> dict:
        args = self.args
        losses = {
            "train_masked_loss": heldout_masked_loss(args, model, train, train_ids),
            "heldout_masked_loss": heldout_masked_loss(args, model, held, held_ids),
        }
        if held_ids is not None:  # the same images under the next class's prompts: how much the class matters
            wrong = (held_ids + 1) % len(TRANSFER_CLASSES)
            losses["heldout_masked_loss_wrong_class"] = heldout_masked_loss(args, model, held, wrong)
        return losses

    def heldout_pretrain_loss(self, model, held: torch.Tensor) -> float:
        return heldout_masked_loss(self.args, model, held, None)

    def sample(self, model, conditional: bool, seed: int, guidance_scale: float | None = None) -> torch.Tensor:
        return sample_per_class(self.args, model, conditional, seed, guidance_scale=guidance_scale)[0]

    def after_adaptation(self, model, method: str, seed: int, metrics_of) -> None:
        """The decoding-steps comparison: fidelity, Fréchet distance and sampling time per `--steps_sweep` value."""
        for steps in self.args.steps_sweep:
            sampled, seconds = sample_per_class(self.args, model, conditional=True, seed=seed, num_steps=steps)
            self.sweep.setdefault((method, steps), []).append({"seed": seed, "sampling_time_s": seconds})
            self.sweep[(method, steps)][-1].update(metrics_of(sampled))

    def card_losses(self, result: dict) -> dict:
        return {"held-out masked-token loss (nats/token)": f"{result['heldout_masked_loss']:.4f}"}

    def extra_summary(self) -> tuple[dict, str]:
        rows = []
        for (method, steps), results in self.sweep.items():
            row = {"method": method, "title": METHOD_TITLES[method], "num_steps": steps, "per_seed": results}
            for key in ("class_fidelity", "frechet_distance", "sampling_time_s"):
                values = [r[key] for r in results]
                row[f"{key}_mean"] = float(np.mean(values))
                row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            rows.append(row)
        rows.sort(key=lambda row: (METHODS.index(row["method"]), row["num_steps"]))
        table = steps_table(rows, len(self.args.seeds)) if rows else ""
        extra = {
            "conditioning": "neutral: encoder_hidden_states zeros [B, 1, 16], pooled_text_emb zeros [B, 16], "
            "micro_conds zeros [B, 5], in every call",
            "decoding_steps": rows,
            "decoding_steps_table": table,
        }
        samples = len(TRANSFER_CLASSES) * self.args.samples_per_class
        text = f"\n\nDecoding steps ({samples} samples per run):\n\n{table}" if table else ""
        return extra, text


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the summary written to results.json."""
    return run_study(MaskGITStudy, parse_args(argv))


if __name__ == "__main__":
    main()
