"""Shared helpers of the hf_vpt training recipes (`accelerate` loops).

* command line: `add_common_args` (the options every recipe has) and `parse_args_with_config` (a YAML `--config`
  file whose keys override the argparse defaults; the command line overrides the file);
* optimisation: `make_optimizer` (SGD with momentum 0.9 for VPT-style prompts and linear probing, AdamW elsewhere)
  and `warmup_cosine_schedule` (linear warm-up, then cosine decay, stepped once per optimiser step);
* the loop: `make_accelerator` (trackers, seedable shuffling), `save_checkpoint` / `resume` (`accelerator.save_state`
  every N steps; `--resume_from_checkpoint` restores model, optimiser, scheduler, RNG states, the step and the
  position in the data with `skip_first_batches`), `progress_bar` (tqdm on the main process only);
* the end: `results_table`, `save_adapter` (the PEFT adapter plus a complete model card through
  `hf_vpt.hub.write_model_card`) and `push_folder_to_hub` (`huggingface_hub.create_repo` + `upload_folder`);
  `add_tracker_args` / `add_hub_args` declare the options of the last two for recipes with their own loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


PROMPT_STYLE_SGD = ("visual_prompt", "vpt", "vpt_shallow", "vpt_deep", "gated_prompt", "gated")
# Methods trained with SGD + momentum by default: the VPT family and, as in VPT's code, linear probing.
SGD_METHODS = (*PROMPT_STYLE_SGD, "linear")
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser, *, output_dir: str, learning_rate: float, max_train_steps: int):
    """The options shared by the recipes; each recipe adds its own."""
    bool_flag = argparse.BooleanOptionalAction
    parser.add_argument("--config", default=None, help="YAML file whose keys override these defaults.")
    group = parser.add_argument_group("training loop (shared by the recipes)")
    group.add_argument("--output_dir", default=output_dir)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--max_train_steps", type=int, default=max_train_steps, help="Optimiser steps.")
    group.add_argument("--train_batch_size", type=int, default=4, help="Per device.")
    group.add_argument("--eval_batch_size", type=int, default=8)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--weight_decay", type=float, default=0.0)
    group.add_argument(
        "--optimizer",
        default="auto",
        choices=["auto", "sgd", "adamw"],
        help="auto: SGD (momentum 0.9) for VPT-style prompts, AdamW for the other methods.",
    )
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--warmup_steps", type=int, default=0, help="Linear warm-up, then cosine decay to 0.")
    group.add_argument("--max_grad_norm", type=float, default=None)
    group.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    group.add_argument("--eval_steps", type=int, default=None, help="Evaluate every N steps (and at the end).")
    group.add_argument("--logging_steps", type=int, default=1)
    group.add_argument("--checkpointing_steps", type=int, default=None, help="accelerator.save_state every N steps.")
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint folder, or 'latest' for the newest checkpoint-N in --output_dir.",
    )
    group.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        help="Stop (as if interrupted) after this many steps; the schedule still follows --max_train_steps.",
    )
    add_tracker_args(group)
    group.add_argument("--progress", action=bool_flag, default=True, help="tqdm bar (main process only).")
    add_hub_args(group)
    return parser


def add_tracker_args(group, default: str = "tensorboard") -> None:
    """`--report_to`: the trackers of `available_trackers` / `make_accelerator`."""
    group.add_argument(
        "--report_to",
        default=default,
        help="Trackers for accelerate's `log_with` ('tensorboard', 'wandb', 'all', 'none'); skipped if not installed.",
    )


def add_hub_args(group) -> None:
    """`--push_to_hub` and its options, read by `finish` / `push_folder_to_hub`."""
    group.add_argument("--push_to_hub", action="store_true", help="Upload the adapter folder with huggingface_hub.")
    group.add_argument("--hub_model_id", default=None, help="Repo id for --push_to_hub (default: the folder name).")
    group.add_argument("--hub_token", default=None)
    group.add_argument("--hub_private_repo", action="store_true")


def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: list[str] | None, script: str, comma_lists: tuple[str, ...] = ()
) -> argparse.Namespace:
    """Parse `argv`; keys of the YAML `--config` file replace the defaults, explicit options win over both.

    `comma_lists` names options that take a comma-separated string (`--methods a,b`); the YAML file may give them as
    a list (`methods: [a, b]`).
    """
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "config", None):
        import yaml

        with open(known.config, encoding="utf-8") as handle:
            overrides = yaml.safe_load(handle) or {}
        if not isinstance(overrides, dict):
            parser.error(f"{known.config} must hold a mapping of option names to values.")
        overrides = {str(key).replace("-", "_"): value for key, value in overrides.items()}
        valid = {action.dest for action in parser._actions}
        unknown = sorted(set(overrides) - valid - {"help"})
        if unknown:
            parser.error(f"unknown keys in {known.config}: {unknown}")
        for key in comma_lists:
            if isinstance(overrides.get(key), (list, tuple)):
                overrides[key] = ",".join(str(item) for item in overrides[key])
        parser.set_defaults(**overrides)
    args = parser.parse_args(argv)
    args.command = command_line(script, argv)
    return args


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran (`script` is the recipe's path in the repository), for the model card."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(part) for part in ["python", script, *arguments])


# ---------------------------------------------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------------------------------------------
def default_optimizer_name(method: str) -> str:
    """SGD for VPT-style prompts and linear probing (as the VPT papers), AdamW for everything else (APT, LoRA, full
    fine-tuning, generative prompts)."""
    return "sgd" if method.lower() in SGD_METHODS else "adamw"


def make_optimizer(
    model: torch.nn.Module,
    args,
    method: str,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    adamw_eps: float | None = None,
) -> torch.optim.Optimizer:
    """SGD (momentum `args.momentum`) or AdamW over the trainable parameters; no weight decay on biases/norms.

    `args.optimizer` ('auto', 'sgd', 'adamw'; 'auto' if absent) picks the optimiser, 'auto' by `method`. `lr` and
    `weight_decay` default to `args.learning_rate` and `args.weight_decay` (recipes with one value per method pass
    theirs); `adamw_eps` defaults to torch's 1e-8.
    """
    optimizer = getattr(args, "optimizer", "auto")
    name = optimizer if optimizer != "auto" else default_optimizer_name(method)
    lr = args.learning_rate if lr is None else lr
    weight_decay = args.weight_decay if weight_decay is None else weight_decay
    decay, no_decay = [], []
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or param_name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum)
    if adamw_eps is None:
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, eps=adamw_eps)


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Per step: `lr · s / w` during the `w` warm-up steps, then `lr · ½(1 + cos(π · progress))` down to 0."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------------------
# accelerate
# ---------------------------------------------------------------------------------------------------------------
def available_trackers(report_to: str) -> list[str]:
    """The requested trackers that are installed (TensorBoard when 'all' and nothing else is)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if report_to in (None, "", "none"):
        return []
    installed = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    wanted = list(installed) if report_to == "all" else [name.strip() for name in report_to.split(",")]
    return [name for name in wanted if installed.get(name, False)]


def make_accelerator(args):
    """An `Accelerator` with seedable shuffling (the order depends on seed and epoch only) and the trackers."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    trackers = available_trackers(args.report_to)
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs"))
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=project,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    args.trackers = trackers
    return accelerator


def init_trackers(accelerator, args, project_name: str) -> None:
    if not args.trackers:
        return
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and v is not None}
    accelerator.init_trackers(project_name, config=config)


def progress_bar(accelerator, args, total: int, initial: int = 0, desc: str = "train"):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, disable=not (args.progress and accelerator.is_local_main_process)
    )


def seeded_generator(seed: int) -> torch.Generator:
    """A generator for `DataLoader(generator=...)`: iterator creation then never draws from the global RNG, so
    that a resumed run sees the same random stream as an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


@dataclass
class ResumeState:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batches_to_skip: int = 0  # batches of `epoch` already consumed


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def latest_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    steps = [
        int(match.group(1))
        for name in os.listdir(output_dir)
        if (match := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name))
        and os.path.isfile(os.path.join(output_dir, name, TRAINING_STATE_FILE))
    ]
    return checkpoint_dir(output_dir, max(steps)) if steps else None


def resolve_checkpoint(output_dir: str, value: str) -> str:
    """The folder that `--resume_from_checkpoint value` names: 'latest' is the newest `checkpoint-<step>` in
    `output_dir`, anything else a checkpoint folder. Raises `FileNotFoundError`, saying what was looked for, when
    there is no such checkpoint (`resume` instead starts from scratch when 'latest' finds none)."""
    if value == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: there is no checkpoint in {output_dir} (no "
                f"{CHECKPOINT_PREFIX}<step> folder with a {TRAINING_STATE_FILE}); pass the --output_dir of the run "
                "to resume, or drop --resume_from_checkpoint to start from scratch."
            )
        return path
    if not os.path.isdir(value):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {value}: no such folder; pass a {CHECKPOINT_PREFIX}<step> folder that "
            "--checkpointing_steps wrote, or 'latest'."
        )
    if not os.path.isfile(os.path.join(value, TRAINING_STATE_FILE)):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {value}: not a checkpoint (it has no {TRAINING_STATE_FILE}); pass a "
            f"{CHECKPOINT_PREFIX}<step> folder that --checkpointing_steps wrote, or 'latest'."
        )
    return value


def save_checkpoint(accelerator, output_dir: str, step: int, batches_per_epoch: int, extra: dict | None = None) -> str:
    """`accelerator.save_state` (model, optimiser, scheduler, RNG states) plus the step, in `checkpoint-<step>`.

    `extra` (JSON-serialisable) is written to the checkpoint's training_state.json next to the step."""
    folder = checkpoint_dir(output_dir, step)
    accelerator.save_state(folder)
    if accelerator.is_main_process:
        with open(os.path.join(folder, TRAINING_STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump({"step": step, "batches_per_epoch": batches_per_epoch, **(extra or {})}, handle)
    accelerator.wait_for_everyone()
    return folder


def resume(accelerator, args, batches_per_epoch: int, steps_per_epoch: int) -> ResumeState:
    """Load `--resume_from_checkpoint` (if any) and say where the loop continues."""
    path = args.resume_from_checkpoint
    if not path:
        return ResumeState()
    if path == "latest":
        path = latest_checkpoint(args.output_dir)
        if path is None:
            accelerator.print(f"No checkpoint in {args.output_dir}; starting from scratch.")
            return ResumeState()
    with open(os.path.join(path, TRAINING_STATE_FILE), encoding="utf-8") as handle:
        saved = json.load(handle)
    if saved["batches_per_epoch"] != batches_per_epoch:
        raise ValueError(
            f"{path} was written with {saved['batches_per_epoch']} batches per epoch, this run has "
            f"{batches_per_epoch}: resuming needs the same data, batch size and number of processes."
        )
    accelerator.load_state(path)
    step = int(saved["step"])
    batches_done = step * args.gradient_accumulation_steps
    accelerator.print(f"Resumed from {path} at step {step}.")
    return ResumeState(
        step=step, epoch=batches_done // batches_per_epoch, batches_to_skip=batches_done % batches_per_epoch
    )


def epoch_batches(accelerator, dataloader, epoch: int, skip: int):
    """The batches of `epoch` (seedable order), skipping the first `skip` of them when resuming."""
    dataloader.set_epoch(epoch)
    return accelerator.skip_first_batches(dataloader, skip) if skip else dataloader


def train_loop(accelerator, args, model, optimizer, scheduler, dataloader, loss_fn, evaluate_fn=None, on_step=None):
    """The shared loop: gradient accumulation, clipping, logging, evaluation, checkpoints, resume, early stop.

    `loss_fn(batch) -> loss tensor`; `evaluate_fn(step) -> dict of metrics` (run every `--eval_steps` and at the
    end on every process; the main process logs them); returns `(last_metrics, steps_done, finished)`.
    """
    batches_per_epoch = len(dataloader)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    state = resume(accelerator, args, batches_per_epoch, steps_per_epoch)
    step, metrics = state.step, {}
    stop_at = min(args.max_train_steps, args.stop_after_steps or args.max_train_steps)
    bar = progress_bar(accelerator, args, total=args.max_train_steps, initial=step)
    epoch, skip = state.epoch, state.batches_to_skip
    model.train()
    while step < stop_at:
        for batch in epoch_batches(accelerator, dataloader, epoch, skip):
            with accelerator.accumulate(model):
                loss = loss_fn(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if step % args.logging_steps == 0:
                logged = {"train/loss": accelerator.gather(loss.detach()[None]).mean().item()}
                logged["train/lr"] = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}")
                accelerator.log(logged, step=step)
            if on_step is not None:
                on_step(step)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, step, batches_per_epoch)
            if evaluate_fn is not None and args.eval_steps and step % args.eval_steps == 0 and step < stop_at:
                metrics = evaluate_fn(step)
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
                model.train()
            if step >= stop_at:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    finished = step >= args.max_train_steps
    if evaluate_fn is not None and finished:
        metrics = evaluate_fn(step)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    return metrics, step, finished


def scheduler_for(accelerator, optimizer, args) -> LambdaLR:
    """accelerate steps a prepared scheduler once per process per optimiser step, hence the scaling."""
    scale = accelerator.num_processes
    return warmup_cosine_schedule(optimizer, args.warmup_steps * scale, args.max_train_steps * scale)


# ---------------------------------------------------------------------------------------------------------------
# the end of a run
# ---------------------------------------------------------------------------------------------------------------
def trainable_parameters(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"


def results_table(rows: dict[str, object]) -> str:
    """A two-column Markdown table of the final results."""
    lines = ["| result | value |", "| --- | --- |"]
    for key, value in rows.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines)


def save_adapter(
    accelerator,
    model,
    folder: str,
    *,
    dataset: str,
    metrics: dict,
    command: str,
    trainable: str,
    save_fn=None,
    **card,
) -> str:
    """Save the adapter (`model.save_pretrained` or `save_fn(folder)`) and write its complete model card.

    Every process must call it (it waits for the others); the main process writes. `card` holds more model-card
    data for `hf_vpt.hub.write_model_card` (`task`, `num_labels`, `labels`, ...); the base model's class is filled
    in from the model. A model without a PEFT adapter (full fine-tuning, linear probing) is saved whole, without
    an hf_vpt card.
    """
    from hf_vpt.hub import write_model_card

    accelerator.wait_for_everyone()
    # Under FSDP or ZeRO-3 each process holds shards: gather the full state dict (a collective, every process takes
    # part) and let the main process write the adapter once. Without sharding this is the plain state dict.
    state_dict = accelerator.get_state_dict(model) if save_fn is None else None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        os.makedirs(folder, exist_ok=True)
        if save_fn is not None:
            save_fn(folder)
        else:
            unwrapped.save_pretrained(folder, state_dict=state_dict)
        config = getattr(unwrapped, "peft_config", {}).get("default")
        if config is not None:
            if hasattr(unwrapped, "get_base_model"):
                base_class = type(unwrapped.get_base_model())
                card.setdefault("base_model_class", base_class.__name__)
                card.setdefault("base_model_library", base_class.__module__)
            write_model_card(
                folder,
                config,
                dataset=dataset,
                metrics={k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
                command=command,
                trainable_parameters=trainable,
                **card,
            )
    accelerator.wait_for_everyone()
    return folder


def push_folder_to_hub(folder: str, repo_id: str | None, token: str | None = None, private: bool = False) -> str:
    """Create (if needed) the Hub model repo and upload the adapter folder; returns the repo id."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = repo_id or os.path.basename(os.path.abspath(folder))
    repo = create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        token=token,
        commit_message="Upload hf_vpt adapter",
        ignore_patterns=["checkpoint-*", "logs/*", "*.pt"],
    )
    return repo.repo_id


def finish(accelerator, args, folder: str, results: dict) -> None:
    """Print the results table, write results.json, push to the Hub if asked, end the trackers."""
    if accelerator.is_main_process:
        table = results_table(results)
        print(table)
        with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        if args.push_to_hub:
            repo_id = push_folder_to_hub(folder, args.hub_model_id, args.hub_token, args.hub_private_repo)
            print(f"Pushed {folder} to https://huggingface.co/{repo_id}")
    if args.trackers:
        accelerator.end_training()
