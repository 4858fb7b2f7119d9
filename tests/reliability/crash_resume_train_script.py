"""A tiny prompt-tuning run through the recipes' shared loop (`recipes/training.py`), driven by
`tests/reliability/test_crash_resume.py`.

Not a test module: the test runs it as `python tests/reliability/crash_resume_train_script.py --workdir DIR [...]`
so that it can be killed with SIGKILL and resumed in a fresh process. The run trains VPT-deep prompts (with prompt dropout,
so the torch RNG matters) and the classifier head of a tiny random ViT on a fixed random data set, shuffled every
epoch, on the CPU in float32, with `training.train_loop`.

- Every `--save-every` steps the loop writes `DIR/checkpoint-<n>` (`training.save_checkpoint`: the trainable
  tensors, optimizer, scheduler and RNG states, then training_state.json last, so a process killed while saving
  never leaves a checkpoint that looks complete).
- `--crash-at-step k` makes step k stop in its forward pass (before the backward pass and the optimizer step),
  write `DIR/crashed_at_step_<k>` and sleep until the process is killed.
- `--resume` continues from the newest complete checkpoint (`--resume_from_checkpoint latest`).
- At the end it writes `DIR/final.safetensors` (every trainable tensor) and `DIR/log.json` (per step: the sample
  indices of the batch and the loss, as a hex float).
"""

import argparse
import json
import os
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes")
)

import torch  # noqa: E402
import training  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import hf_vpt  # noqa: E402
from hf_vpt.testing_utils import MICRO_VIT, tiny_vit  # noqa: E402


SEED = 1234
DATA_SEED = 99
NUM_SAMPLES = 10
BATCH_SIZE = 2  # 5 batches per epoch
NUM_LABELS = 4


def build_model() -> torch.nn.Module:
    base = tiny_vit(num_labels=NUM_LABELS, **MICRO_VIT)
    base.set_attn_implementation("eager")
    peft_config = hf_vpt.VisualPromptConfig(
        num_prompt_tokens=3, depth="deep", prompt_dropout=0.2, modules_to_save=["classifier"]
    )
    return get_peft_model(base, peft_config)


def build_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(DATA_SEED)
    images = torch.randn(NUM_SAMPLES, 3, 16, 16, generator=generator)
    labels = torch.randint(0, NUM_LABELS, (NUM_SAMPLES,), generator=generator)
    return TensorDataset(torch.arange(NUM_SAMPLES), images, labels)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--crash-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()

    torch.set_num_threads(1)  # the same kernels and reduction order in every process
    torch.use_deterministic_algorithms(True)
    args = training.TrainingArguments(
        output_dir=options.workdir,
        seed=SEED,
        max_train_steps=options.steps,
        checkpointing_steps=options.save_every,
        resume_from_checkpoint="latest" if options.resume else None,
        optimizer="adamw",
        learning_rate=0.05,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        mixed_precision="no",
        disable_tqdm=True,
    )
    accelerator = training.make_accelerator(args)
    set_seed(SEED)
    model = build_model()
    optimizer = training.make_optimizer(model, args, "vpt_deep")
    scheduler = training.make_scheduler(accelerator, optimizer, args)
    loader = DataLoader(
        build_data(), batch_size=BATCH_SIZE, shuffle=True, generator=training.seeded_generator(DATA_SEED)
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if not options.resume:
        save_file(trainable_state(model), os.path.join(options.workdir, "initial.safetensors"))

    latest = training.latest_checkpoint(options.workdir) if options.resume else None
    progress = {"step": training.resume_step(latest) if latest else 0, "pending": None}
    log: dict[str, dict] = {}

    def loss_fn(batch):
        indices, images, labels = batch
        step = progress["step"] + 1
        if step == options.crash_at_step:
            with open(os.path.join(options.workdir, f"crashed_at_step_{step}"), "w") as handle:
                handle.write(str(os.getpid()))
            while True:  # killed here, in the middle of the step
                time.sleep(1)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=images).logits, labels)
        progress["pending"] = {"indices": indices.tolist(), "loss": loss.item().hex()}
        return loss

    def on_step(step):
        progress["step"] = step
        log[str(step)] = progress["pending"]

    training.train_loop(accelerator, args, model, optimizer, scheduler, loader, loss_fn, on_step=on_step)
    save_file(trainable_state(model), os.path.join(options.workdir, "final.safetensors"))
    with open(os.path.join(options.workdir, "log.json"), "w") as handle:
        json.dump(log, handle, indent=1)


if __name__ == "__main__":
    main()
