"""A tiny prompt-tuning run with `accelerate` checkpoints, driven by `tests/test_reliability_crash_resume.py`.

Not a test module: the test runs it as `python tests/reliability_train_script.py --workdir DIR [...]` so that it
can be killed with SIGKILL and resumed in a fresh process. The run trains VPT-deep prompts (with prompt dropout,
so the torch RNG matters) and the classifier head of a tiny random ViT on a fixed random data set, shuffled every
epoch, on the CPU in float32.

- Every `--save-every` steps it writes `accelerator.save_state` into `DIR/checkpoints/step_<n>`: first into a
  temporary folder, then renamed, so a process killed while saving never leaves a half-written checkpoint behind.
  The state holds the model, the optimizer, the scheduler, the RNG states and the step counter (a registered
  object), which gives the position in the data loader.
- `--crash-at-step k` makes step k stop after its backward pass (before the optimizer step), write
  `DIR/crashed_at_step_<k>` and sleep until the process is killed.
- `--resume` loads the newest complete checkpoint, skips the batches of the interrupted epoch that were already
  trained on, and trains to the end.
- At the end it writes `DIR/final.safetensors` (every trainable tensor) and `DIR/log.json` (per step: the sample
  indices of the batch and the loss, as a hex float).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration, set_seed  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import hf_vpt  # noqa: E402


SEED = 1234
DATA_SEED = 99
NUM_SAMPLES = 10
BATCH_SIZE = 2  # 5 batches per epoch
NUM_LABELS = 4


class Progress:
    """The number of optimizer steps done; saved with every checkpoint (`register_for_checkpointing`)."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def build_model() -> torch.nn.Module:
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=NUM_LABELS,
    )
    base = transformers.ViTForImageClassification(config)
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


def latest_checkpoint(folder: str) -> str | None:
    """The newest complete checkpoint (`step_<n>`; a `step_<n>.partial` left by a crash while saving is ignored)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    steps = [int(match.group(1)) for name in names if (match := re.fullmatch(r"step_(\d+)", name))]
    return os.path.join(folder, f"step_{max(steps)}") if steps else None


def save_checkpoint(accelerator: Accelerator, folder: str, step: int) -> None:
    final = os.path.join(folder, f"step_{step}")
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    accelerator.save_state(partial)
    os.replace(partial, final)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--crash-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the same kernels and reduction order in every process
    torch.use_deterministic_algorithms(True)
    set_seed(SEED)
    checkpoints = os.path.join(args.workdir, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)

    model = build_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.1 * step))
    # The loader has its own generator, so creating an iterator does not draw from the global torch RNG (the
    # dropout masks depend on it); the seedable sampler shuffles every epoch from `data_seed + epoch`.
    loader = DataLoader(
        build_data(), batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(DATA_SEED)
    )
    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=DATA_SEED)
    )
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    if args.resume:
        checkpoint = latest_checkpoint(checkpoints)
        if checkpoint is None:
            raise SystemExit(f"--resume: no complete checkpoint in {checkpoints}")
        accelerator.load_state(checkpoint)
    else:
        save_file(trainable_state(model), os.path.join(args.workdir, "initial.safetensors"))

    log: dict[str, dict] = {}
    model.train()
    batches_per_epoch = len(loader)
    while progress.step < args.steps:
        epoch, done_in_epoch = divmod(progress.step, batches_per_epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader
        for indices, images, labels in batches:
            step = progress.step + 1
            logits = model(pixel_values=images).logits
            loss = torch.nn.functional.cross_entropy(logits, labels)
            accelerator.backward(loss)
            if step == args.crash_at_step:
                marker = os.path.join(args.workdir, f"crashed_at_step_{step}")
                with open(marker, "w") as handle:
                    handle.write(str(os.getpid()))
                while True:  # killed here, in the middle of the step
                    time.sleep(1)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.step = step
            log[str(step)] = {"indices": indices.tolist(), "loss": loss.item().hex()}
            if step % args.save_every == 0:
                save_checkpoint(accelerator, checkpoints, step)
            if progress.step >= args.steps:
                break

    save_file(trainable_state(model), os.path.join(args.workdir, "final.safetensors"))
    with open(os.path.join(args.workdir, "log.json"), "w") as handle:
        json.dump(log, handle, indent=1)


if __name__ == "__main__":
    main()
