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
`recipes/_common.train_loop` (via `generative_digits_common.fit`) with transformers' warm-up + cosine schedule. The
optimisers stay the study's own AdamW parameter groups (two learning rates for full fine-tuning, weight decay on every
pretraining weight): `_common.make_optimizer` has one learning rate and no decay on biases, which would change the
published numbers. The MaskGIT counterpart is `examples/maskgit_digits/run.py`; both share
`generative_digits_common.py`: the command line, the cached pretraining
(`examples/digits_transfer/pretrain_cache.py`), the adaptation, the instrument and the seeds x methods run
(`run_study`). This file holds only what is ImageGPT's: the model, its next-token loss and NLL, and its sampler.

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

import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generative_digits_common import (  # noqa: E402, F401  (the tests read the shared helpers through this module)
    NUM_PIXELS,
    PRETRAIN_CLASSES,
    TRANSFER_CLASSES,
    GenerativeStudy,
    frechet_distance,
    load_digit_tokens,
    parse_study_args,
    run_study,
    stratified_split,
    study_parser,
)

import hf_vpt  # noqa: E402
from hf_vpt.sampling import autoregressive_sample  # noqa: E402
from hf_vpt.tuners.generative_prompt.objectives import autoregressive_loss, next_token_loss  # noqa: E402


SCRIPT = "examples/generative_digits/run.py"
# this study's values of the shared options (generative_digits_common.study_parser)
DEFAULTS = {
    "output_dir": "outputs/generative_digits",
    "pretrain_epochs": 30,
    "epochs": 20,
    "num_prompt_tokens": 32,
    "prompt_lr": 1e-2,
    "samples_per_class": 90,
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
def build_parser():
    parser, groups = study_parser(__doc__.split("\n\n")[0], "ImageGPT", QUICK_DEFAULTS)
    generator = groups["generator"]
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
    groups["sampling"].add_argument("--top_k", type=int, default=None)
    parser.set_defaults(**DEFAULTS)
    return parser


def parse_args(argv: list[str] | None = None):
    parser = build_parser()
    args = parse_study_args(parser, argv, SCRIPT, QUICK_DEFAULTS)
    if args.n_embd % args.n_head:
        parser.error(f"--n_embd ({args.n_embd}) must be a multiple of --n_head ({args.n_head}).")
    args.n_inner = args.n_inner or 2 * args.n_embd
    return args


# ---------------------------------------------------------------------------------------------------------------
# tokens, loss and likelihood
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


def load_generator(path: str):
    from transformers import ImageGPTForCausalImageModeling

    return ImageGPTForCausalImageModeling.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------------------------
class ImageGPTStudy(GenerativeStudy):
    script = SCRIPT
    cache_name = "digits_imagegpt"
    experiment = "generative transfer"
    card_title = "Generative prompt adapter: ImageGPT digits 0-4 -> 5-9"
    loss_keys = ("train_nll", "heldout_nll")
    table_loss = ("heldout_nll", "held-out NLL")
    pretrain_loss = "heldout_nll"
    pretrain_loss_title = "NLL (nats/pixel)"

    def describe(self) -> str:
        return f"ImageGPT {self.args.n_layer}x{self.args.n_embd}"

    def pretrain_settings(self) -> dict:
        return pretrain_settings(self.args)

    def build_generator(self):
        from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

        args = self.args
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
        return ImageGPTForCausalImageModeling(config)

    def load_generator(self, path: str):
        return load_generator(path)

    def prompt_config(self, base_path: str) -> hf_vpt.GenerativePromptConfig:
        config = hf_vpt.GenerativePromptConfig(
            num_prompt_tokens=self.args.num_prompt_tokens,
            num_classes=len(TRANSFER_CLASSES),
            prompt_dropout=self.args.prompt_dropout,
        )
        config.base_model_name_or_path = base_path
        return config

    def model_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        return with_sos(tokens, self.args.num_levels)  # SOS is the last id

    def batch_loss(self, model, batch) -> torch.Tensor:
        return next_token_batch_loss(model, batch)

    def losses(self, model, train, held, train_ids, held_ids) -> dict:
        return {"train_nll": mean_nll(model, train, train_ids), "heldout_nll": mean_nll(model, held, held_ids)}

    def heldout_pretrain_loss(self, model, held: torch.Tensor) -> float:
        return mean_nll(model, held, None)

    @torch.no_grad()
    def sample(self, model, conditional: bool, seed: int, guidance_scale: float | None = None) -> torch.Tensor:
        """`[5 · n, 64]` samples, class by class (n = --samples_per_class), from one seeded `torch.Generator`."""
        args = self.args
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

    def card_losses(self, result: dict) -> dict:
        return {"held-out NLL (nats/pixel)": f"{result['heldout_nll']:.4f}"}

    @torch.no_grad()
    def save_prompt_outputs(self, model, result: dict, metrics: dict, seed: int) -> str:
        """The prompt adapter and `generative_prompt_samples.pt`: the samples, their class ids and seed, and the
        adapter's logits on them, so that a reloaded adapter can be checked against both."""
        folder = super().save_prompt_outputs(model, result, metrics, seed)
        model.eval()
        device = next(model.parameters()).device
        tokens = result["tokens"]
        class_ids = torch.arange(len(TRANSFER_CLASSES)).repeat_interleave(self.args.samples_per_class)
        inputs = with_sos(tokens, self.args.num_levels)[:, :-1].to(device)  # [SOS, x_1 .. x_63] predicts x_1 .. x_64
        logits = model(input_ids=inputs, class_labels=class_ids.to(device), use_cache=False).logits.cpu()
        check = {"tokens": tokens, "class_labels": class_ids, "logits": logits, "seed": torch.tensor(seed)}
        self.samples_path = os.path.join(self.args.output_dir, "generative_prompt_samples.pt")
        torch.save(check, self.samples_path)
        return folder

    def extra_summary(self) -> tuple[dict, str]:
        return {"samples_path": getattr(self, "samples_path", None)}, ""


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the summary written to results.json."""
    return run_study(ImageGPTStudy, parse_args(argv))


if __name__ == "__main__":
    main()
