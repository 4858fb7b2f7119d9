#!/usr/bin/env python
"""Prompt tuning of a Stable Diffusion pipeline's text encoder (APT or deep VPT) on captioned images.

The adapter is attached with `hf_vpt.attach_text_encoder_adapter`; the UNet, VAE and the encoder's own weights stay
frozen. Loss: the usual noise-prediction MSE (`epsilon` or `v_prediction`, from the scheduler's config) of the frozen
UNet conditioned on the adapted text embeddings. Every evaluation writes sample images for `--validation_prompt`;
the adapter is saved with `hf_vpt.save_text_encoder_adapter` (plus a model card).

Data: `--train_data_dir` is an `imagefolder` with a `metadata.jsonl` (`{"file_name": "a.png", "text": "..."}`), or
`--dataset_name` a Hub dataset with `--image_column` / `--caption_column`.
`--tiny` (the default when no data is given) builds a tiny pipeline from configs (CLIP BPE tokenizer over a
byte vocabulary written to a temporary folder) and a few synthetic captioned images, offline, in seconds.

    python recipes/text_to_image.py
    accelerate launch recipes/text_to_image.py --model_name_or_path <sd-1.5 folder> \
        --train_data_dir my_images --resolution 512 --method apt
"""

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from PIL import Image
from torch.utils.data import DataLoader


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import training  # noqa: E402

import hf_vpt  # noqa: E402


TINY_SIZE = 32
TINY_CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square"]
TINY_COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]
# The variants that adapt a CLIP text encoder (hf_vpt.attach_text_encoder_adapter), declared with their methods.
METHODS = tuple(variant.name for variant in hf_vpt.registry.training_variants("text-to-image"))


@dataclass
class TextToImageArguments:
    method: str = field(default="apt", metadata={"help": "What trains.", "choices": list(METHODS)})
    num_prompt_tokens: int | None = field(default=None, metadata={"help": "Default: 4 (tiny) or 50."})
    rank: int = field(default=4, metadata={"help": "APT: rank of the key map."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "A Stable Diffusion pipeline folder."})
    train_data_dir: str | None = field(default=None, metadata={"help": "imagefolder with metadata.jsonl."})
    dataset_name: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int | None = field(default=None, metadata={"help": "Default: 32 (tiny) or 512."})
    max_train_samples: int | None = None
    tiny: bool = field(default=False, metadata={"help": "Tiny pipeline, synthetic data (also when no data is given)."})
    validation_prompt: str = "a red square"
    num_validation_images: int = 2
    num_inference_steps: int | None = field(default=None, metadata={"help": "Default: 2 (tiny) or 30."})


@dataclass
class TextToImageTrainingArguments(training.TrainingArguments):
    output_dir: str = training.recipe_default("output_dir", "outputs/text_to_image")
    per_device_train_batch_size: int = training.recipe_default("per_device_train_batch_size", 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parsed = training.parse_recipe_args(
        (TextToImageArguments, TextToImageTrainingArguments), argv, "recipes/text_to_image.py"
    )
    args = training.merged(*parsed)
    has_data = bool(args.train_data_dir or args.dataset_name)
    args.tiny = args.tiny or not has_data
    if not args.tiny and not args.model_name_or_path:
        raise SystemExit("Real data needs --model_name_or_path (a Stable Diffusion pipeline folder or Hub id).")
    args.num_prompt_tokens = args.num_prompt_tokens or (4 if args.tiny else 50)
    args.resolution = args.resolution or (TINY_SIZE if args.tiny else 512)
    args.num_inference_steps = args.num_inference_steps or (2 if args.tiny else 30)
    return args


# ---------------------------------------------------------------------------------------------------------------
# tiny pipeline and data
# ---------------------------------------------------------------------------------------------------------------
def tiny_pipeline(workdir: str):
    """A tiny `StableDiffusionPipeline` from configs (`hf_vpt.testing_utils.tiny_stable_diffusion`): byte-level CLIP
    tokenizer written to `workdir` (32 tokens), 3-layer CLIP text encoder, 2-level VAE and UNet (32 px images, 16 px
    latents), a DDPM scheduler for training."""
    from diffusers import DDPMScheduler

    from hf_vpt.testing_utils import tiny_stable_diffusion, write_clip_tokenizer

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    pipe = tiny_stable_diffusion(write_clip_tokenizer(workdir), scheduler, max_length=32)
    pipe.text_encoder.config._name_or_path = "tiny-random-stable-diffusion/text_encoder"
    return pipe


def tiny_records(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        image = rng.integers(0, 40, size=(TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
        image[8:24, 8:24] = TINY_COLOURS[index % len(TINY_COLOURS)]
        records.append({"image": Image.fromarray(image), "text": TINY_CAPTIONS[index % len(TINY_CAPTIONS)]})
    return records


def load_records(args) -> list[dict]:
    if args.tiny:
        return tiny_records(16, 1000 + args.seed)
    import datasets

    if args.train_data_dir:
        data = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, split="train")
    else:
        data = datasets.load_dataset(args.dataset_name, split="train")
    if args.max_train_samples:
        data = data.select(range(min(args.max_train_samples, len(data))))
    return [{"image": row[args.image_column], "text": row[args.caption_column]} for row in data]


class Collator:
    def __init__(self, tokenizer, resolution: int):
        self.tokenizer, self.resolution = tokenizer, resolution

    def __call__(self, records: list[dict]) -> dict:
        pixels = []
        for record in records:
            image = record["image"].convert("RGB").resize((self.resolution, self.resolution), Image.BICUBIC)
            pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        ids = self.tokenizer(
            [r["text"] for r in records],
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        return {"pixel_values": torch.stack(pixels), "input_ids": ids}


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    from diffusers import StableDiffusionPipeline

    args = parse_args(argv)
    accelerator = training.make_accelerator(args)
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    set_seed(args.seed)
    with tempfile.TemporaryDirectory() as workdir, training.loading_whole_model(accelerator):
        if args.tiny:
            pipe = tiny_pipeline(workdir)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                args.model_name_or_path, safety_checker=None, requires_safety_checker=False
            )
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae):
        module.requires_grad_(False).eval()
    variant = hf_vpt.registry.training_variant(args.method)
    overrides = {"rank": args.rank} if variant.accepts("rank") else {}
    config = variant.build_config(
        pipe.text_encoder, num_prompt_tokens=args.num_prompt_tokens, head_modules=[], **overrides
    )
    text_encoder = hf_vpt.attach_text_encoder_adapter(pipe, config)
    base_name = args.model_name_or_path or "tiny-random-stable-diffusion"
    config.base_model_name_or_path = base_name
    trainable = _common.trainable_parameters(text_encoder)
    accelerator.print(f"{args.method} on the text encoder of {base_name}: trainable {trainable}")

    loader = DataLoader(
        load_records(args),
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=Collator(pipe.tokenizer, args.resolution),
        generator=training.seeded_generator(args.seed),
    )
    loader = accelerator.prepare(loader)
    training.resolve_max_train_steps(args, len(loader))
    optimizer = training.make_optimizer(text_encoder, args, args.method)
    scheduler = training.make_scheduler(accelerator, optimizer, args)
    text_encoder, optimizer, scheduler = training.prepare_for_training(
        accelerator, args, text_encoder, optimizer, scheduler
    )
    # DeepSpeed with bf16 / fp16 casts the text encoder itself rather than autocasting; the frozen UNet and VAE then
    # run in that dtype too, as diffusers' training examples cast their frozen parts (and the pipeline's sampling
    # feeds the UNet in the text encoder's dtype).
    frozen_dtype = accelerator.unwrap_model(text_encoder).dtype
    pipe.unet.to(accelerator.device, dtype=frozen_dtype)
    pipe.vae.to(accelerator.device, dtype=frozen_dtype)
    training.init_trackers(accelerator, args, "text_to_image")
    noise_scheduler = pipe.scheduler
    scaling = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))
    # latents, noise and timesteps: re-seeded every step by the loop, so that a resumed run draws as the
    # uninterrupted one did
    draws = training.StepSeededGenerator(args.seed, accelerator.device, accelerator.process_index)
    noise_generator = draws.generator

    def loss_fn(batch):
        with torch.no_grad():
            pixels = batch["pixel_values"].to(pipe.vae.dtype)
            latents = pipe.vae.encode(pixels).latent_dist.sample(noise_generator) * scaling
        noise = torch.randn(latents.shape, generator=noise_generator, device=latents.device, dtype=latents.dtype)
        steps = torch.randint(
            0,
            noise_scheduler.config.num_train_timesteps,
            (len(latents),),
            generator=noise_generator,
            device=latents.device,
        )
        noisy = noise_scheduler.add_noise(latents, noise, steps)
        states = text_encoder(batch["input_ids"])[0]
        prediction = pipe.unet(noisy, steps, encoder_hidden_states=states).sample
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())

    def evaluate_fn(step):
        unwrapped = accelerator.unwrap_model(text_encoder)
        unwrapped.eval()
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
        with torch.no_grad():
            images = pipe(
                [args.validation_prompt] * args.num_validation_images,
                num_inference_steps=args.num_inference_steps,
                height=args.resolution,
                width=args.resolution,
                generator=generator,
            ).images
        if accelerator.is_main_process:
            for index, image in enumerate(images):
                image.save(os.path.join(args.output_dir, "samples", f"step-{step}-{index}.png"))
        unwrapped.train()
        return {}

    metrics, step, finished = training.train_loop(
        accelerator, args, text_encoder, optimizer, scheduler, loader, loss_fn, evaluate_fn, step_generators=[draws]
    )
    results = {"method": args.method, "steps": step, "trainable parameters": trainable}
    if not finished:
        return results
    folder = os.path.join(args.output_dir, "adapter")
    dataset = "synthetic captioned squares (--tiny)" if args.tiny else (args.dataset_name or args.train_data_dir)
    _common.save_adapter(
        accelerator,
        text_encoder,
        folder,
        dataset=dataset,
        metrics={},  # no evaluation metric: the step count is in the command and all_results.json, not model-index
        command=args.command,
        trainable=trainable,
        save_fn=lambda path, state_dict: hf_vpt.save_text_encoder_adapter(pipe, path, state_dict=state_dict),
    )
    _common.finish(accelerator, args, folder, results)
    return results


if __name__ == "__main__":
    main()
