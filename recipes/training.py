"""The one training loop and checkpoint system of the hf_vpt recipes (also imported by `bench/` and `examples/`).

* `TrainingArguments`: the loop's options under transformers' names (`--per_device_train_batch_size`,
  `--learning_rate`, `--num_train_epochs` / `--max_train_steps`, `--lr_scheduler_type`, `--checkpointing_steps`, ...);
  a recipe subclasses it to change a default and parses it with `parse_recipe_args` (`HfArgumentParser`, a single
  `.json` / `.yaml` path accepted as transformers' examples do).
* Startup checks, before any data or model is loaded: `check_trackers` (`--report_to` names installed trackers)
  and `check_hub` (`--push_to_hub` has a network, a token and a valid repo id).
* `make_accelerator`: mixed precision from `accelerate launch` unless `--mixed_precision` is given, seedable
  shuffling, trackers; under DeepSpeed, options its config would override must agree with it.
* Sharded engines (`accelerate launch --config_file` with FSDP or DeepSpeed): `loading_whole_model` around the
  base model's `from_pretrained` (ZeRO-3 partitions it in `prepare`, not while it loads), `prepare_for_training`
  for the model, optimiser and scheduler (after the loaders).
* `make_optimizer` (the variant's registry defaults unless the user gives `--optimizer` / `--learning_rate` /
  `--weight_decay`) and `make_scheduler` (`transformers.get_scheduler`).
* `train_loop`: gradient accumulation, clipping, logging, evaluation, a progress bar counting optimiser steps, and
  checkpoints `checkpoint-<step>` that hold only the trainable tensors (the adapter and head, not the frozen
  backbone) plus optimiser, scheduler, RNG states and the position in the data; `--resume_from_checkpoint` continues
  bit for bit; `--checkpoints_total_limit` keeps the newest N.
"""

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field

import torch


CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"
MIXED_PRECISION = ("no", "fp16", "bf16")
OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")


@dataclass
class TrainingArguments:
    """The options of the shared loop. Recipes subclass it to change defaults (`output_dir`, `max_train_steps`)."""

    output_dir: str = field(default="outputs", metadata={"help": "Where the adapter, checkpoints and logs go."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, data order and dropout."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Evaluation batch size per device."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate. Default: the method's (hf_vpt.registry)."}
    )
    optimizer: str | None = field(
        default=None,
        metadata={"help": "Optimiser. Default: the method's (hf_vpt.registry).", "choices": ["sgd", "adamw"]},
    )
    weight_decay: float | None = field(
        default=None, metadata={"help": "Weight decay (not on biases and norms). Default: the method's."}
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    num_train_epochs: int = field(default=3, metadata={"help": "Epochs, unless --max_train_steps is given."})
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Optimiser steps; overrides --num_train_epochs."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimiser step."})
    lr_scheduler_type: str = field(
        default="cosine",
        metadata={
            "help": "transformers.get_scheduler name.",
            "choices": ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        },
    )
    num_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up optimiser steps."})
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Warm-up as a fraction of --max_train_steps (used if > --num_warmup_steps)."}
    )
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm."})
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "Default: what `accelerate launch` (or `accelerate config`) sets; 'no' without a launcher.",
            "choices": list(MIXED_PRECISION),
        },
    )
    logging_steps: int = field(default=1, metadata={"help": "Log the loss every N optimiser steps."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (and at the end)."})
    checkpointing_steps: str | None = field(
        default=None,
        metadata={"help": "Save a checkpoint every N optimiser steps (an integer), or 'epoch' after each epoch."},
    )
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint-<step> folder, or 'latest' (the newest in --output_dir)."}
    )
    stop_after_steps: int | None = field(
        default=None,
        metadata={
            "help": "Stop (as if interrupted) after this many steps, writing a checkpoint there; the schedule still "
            "runs to its end."
        },
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "Trackers: 'none', 'all' (every installed one) or a comma-separated list (tensorboard, ...)."
        },
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the saved adapter folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id (default: the folder's name)."})
    hub_token: str | None = field(default=None, metadata={"help": "Default: the logged-in token (HF_TOKEN)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repo as private."})


def recipe_default(name: str, default):
    """A `TrainingArguments` field with a recipe's own default and the shared help text (so `--help` still says
    what the option does, and shows the recipe's default)."""
    return field(default=default, metadata=dict(TrainingArguments.__dataclass_fields__[name].metadata))


# ---------------------------------------------------------------------------------------------------------------
# command line and startup checks
# ---------------------------------------------------------------------------------------------------------------
def parse_recipe_args(dataclass_types, argv: list | None = None, script: str = ""):
    """`HfArgumentParser` over `dataclass_types`; one `.json` / `.yaml` argument is read as a file of options.

    The `TrainingArguments` among the results is checked (`check_training_args`) and gets `.command` (the command
    line, for the model card) and `.trackers`; a bad value exits with the parser's usage and a message that names
    the fix, before anything is loaded.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else [str(item) for item in argv]
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            parsed = parser.parse_yaml_file(yaml_file=os.path.abspath(argv[0]))
        else:
            *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
            if unknown:
                raise ValueError(f"unrecognized arguments: {' '.join(unknown)} (see --help for the options)")
    except ValueError as error:  # unknown options or file keys: a usage error, not a traceback
        parser.error(str(error))
    for args in parsed:
        if isinstance(args, TrainingArguments):
            try:
                check_training_args(args)
            except (ValueError, FileNotFoundError) as error:
                parser.error(str(error))
            args.command = " ".join(shlex.quote(part) for part in ["python", script, *argv])
    return parsed


def check_training_args(args) -> None:
    """Reject impossible values, resolve `--resume_from_checkpoint` and `--checkpointing_steps`, and check the
    trackers and the Hub push now rather than after training."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "num_train_epochs", "logging_steps"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer; got {getattr(args, name)}.")
    for name in ("max_train_steps", "eval_steps", "checkpoints_total_limit", "stop_after_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer (or left out); got {value}.")
    if args.num_warmup_steps < 0:
        raise ValueError(f"--num_warmup_steps must be 0 or more; got {args.num_warmup_steps}.")
    if not 0.0 <= args.warmup_ratio <= 1.0:
        raise ValueError(f"--warmup_ratio must be in [0, 1]; got {args.warmup_ratio}.")
    for name in ("learning_rate", "weight_decay"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (name == "learning_rate" and value == 0)):
            raise ValueError(f"--{name} must be positive (or left out for the method's default); got {value}.")
    args.checkpointing_steps = parse_checkpointing_steps(args.checkpointing_steps)
    if args.resume_from_checkpoint:
        args.resume_from_checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    args.trackers = check_trackers(args.report_to)
    if args.push_to_hub:
        args.hub_model_id = check_hub(args.hub_model_id, args.output_dir, args.hub_token)


def parse_checkpointing_steps(value):
    """`--checkpointing_steps`: None, a positive number of optimiser steps, or 'epoch'."""
    if value is None or value == "epoch" or (isinstance(value, int) and value > 0):
        return value
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--checkpointing_steps takes a positive number of steps or 'epoch'; got {value!r}.")
    return int(text)


def _installed_trackers() -> dict:
    """accelerate's trackers and whether each is installed (looked up when asked, so a test can patch them)."""
    import accelerate.utils as utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return {name: bool(getattr(utils, f"is_{name}_available", lambda: False)()) for name in LOGGER_TYPE_TO_CLASS}


def check_trackers(report_to) -> list:
    """The trackers for `Accelerator(log_with=...)`: none for 'none', every installed one for 'all'; a tracker that
    is unknown or not installed is an error (training without the logs one asked for is worse than not starting)."""
    if report_to in (None, "", "none"):
        return []
    installed = _installed_trackers()
    if report_to == "all":
        return [name for name, ok in installed.items() if ok]
    wanted = [name.strip() for name in str(report_to).split(",") if name.strip()]
    unknown = [name for name in wanted if name not in installed]
    if unknown:
        raise ValueError(f"--report_to {report_to}: unknown tracker(s) {unknown}; choose from {sorted(installed)}.")
    missing = [name for name in wanted if not installed[name]]
    if missing:
        raise ValueError(
            f"--report_to {report_to}: {', '.join(missing)} is not installed; `pip install {' '.join(missing)}`, or "
            "pass --report_to none."
        )
    return wanted


def check_hub(repo_id: str | None, output_dir: str, token: str | None) -> str:
    """Check a `--push_to_hub` before training: a valid repo id, not offline, a token the Hub accepts.

    Returns the repo id (default: the output folder's name)."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"--push_to_hub: {repo_id!r} is not a valid repo id ({error}); pass --hub_model_id."
        ) from None
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in OFFLINE_VALUES or constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub.")
    token = token or get_token()
    if not token:
        raise ValueError(
            "--push_to_hub needs a Hub token: run `hf auth login`, set HF_TOKEN, or pass --hub_token "
            "(or drop --push_to_hub)."
        )
    try:
        HfApi(token=token).whoami()
    except Exception as error:  # any failure here (network, bad token) would otherwise surface after training
        raise ValueError(
            f"--push_to_hub: could not check the token with the Hub ({type(error).__name__}: {error}); check the "
            "network and the token (`hf auth whoami`), or drop --push_to_hub."
        ) from None
    return repo_id


# ---------------------------------------------------------------------------------------------------------------
# accelerate, optimiser, schedule
# ---------------------------------------------------------------------------------------------------------------
def make_accelerator(args):
    """An `Accelerator` for `args`: `--mixed_precision` or else the launcher's (accelerate reads it from the
    environment when given None), seedable shuffling (the order depends on the seed and epoch only), trackers."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    trackers = check_trackers(getattr(args, "report_to", "none"))
    mixed_precision = getattr(args, "mixed_precision", None)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    args.trackers = trackers
    warn_if_engine_not_applied(accelerator)
    check_deepspeed_settings(accelerator, args)
    return accelerator


def check_deepspeed_settings(accelerator, args) -> None:
    """Under DeepSpeed the engine accumulates and clips, with the numbers of its config: accelerate then ignores
    `--gradient_accumulation_steps` (with a log line) and `accelerator.clip_grad_norm_` does nothing. A recipe option
    that contradicts the config is an error here, before any data or model loads. An "auto" value in the config
    takes the recipe's: its option, or for clipping no clipping when `--max_grad_norm` is not given, as under DDP and
    FSDP (accelerate would fill in 1.0)."""
    plugin = _deepspeed_plugin(accelerator)
    if plugin is None:
        return
    if _zero3_plugin(accelerator) is not None and plugin.is_zero3_init_enabled():
        # accelerate's default for ZeRO-3 when the launcher does not say (--use_deepspeed --zero_stage 3)
        accelerator.print(
            "Note: zero3_init_flag is on, but the recipe loads the frozen base model whole on every process (the "
            "prompts attach to the whole model) and DeepSpeed partitions it in prepare. Launch with "
            "--zero3_init_flag false to silence this."
        )
    config = plugin.deepspeed_config
    max_grad_norm = getattr(args, "max_grad_norm", None)
    settings = (
        ("gradient_accumulation_steps", "--gradient_accumulation_steps", args.gradient_accumulation_steps, None),
        ("gradient_clipping", "--max_grad_norm", max_grad_norm, 0.0),
    )
    for key, option, asked, recipe_default in settings:
        configured = config.get(key, "auto")
        if configured == "auto":
            config[key] = recipe_default if asked is None else asked
        elif asked is not None and float(configured) != float(asked):
            raise ValueError(
                f"{option} {asked} contradicts the DeepSpeed config ({key}: {configured}), which DeepSpeed would "
                f"use instead. Set {key}: {asked} in the accelerate config file, or pass {option} {configured}."
            )


# The launcher's engine settings (`accelerate launch --config_file` with FSDP or DeepSpeed) as environment flags.
ENGINE_FLAGS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def warn_if_engine_not_applied(accelerator) -> None:
    """Say so when the launcher asked for FSDP or DeepSpeed but accelerate runs plain data parallelism: accelerate
    applies neither on CPU processes (`ACCELERATE_USE_CPU` or no accelerator) and falls back to DDP without a word,
    so the model is then replicated, not sharded."""
    asked = [name for flag, name in ENGINE_FLAGS.items() if os.environ.get(flag, "false").lower() == "true"]
    running = accelerator.distributed_type.value
    if asked and running not in ("FSDP", "DEEPSPEED"):
        accelerator.print(
            f"Warning: the launcher asked for {asked[0]}, but accelerate runs {running} on "
            f"{accelerator.device.type} processes (it applies FSDP and DeepSpeed on accelerators only): every process "
            "holds the whole model. Launch on GPUs to shard it."
        )


def _deepspeed_plugin(accelerator):
    """accelerate's active DeepSpeed plugin when it runs DeepSpeed, else None."""
    return accelerator.state.deepspeed_plugin if accelerator.distributed_type.value == "DEEPSPEED" else None


def _zero3_plugin(accelerator):
    """accelerate's DeepSpeed plugin when it runs ZeRO stage 3, else None."""
    plugin = _deepspeed_plugin(accelerator)
    if plugin is None or plugin.deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    return plugin


@contextlib.contextmanager
def loading_whole_model(accelerator):
    """Load the frozen base model whole on every process, as under DDP and FSDP; DeepSpeed partitions it in
    `accelerator.prepare`.

    Under ZeRO-3, accelerate registers its DeepSpeed config with transformers whatever `zero3_init_flag` says, so
    `from_pretrained` would build the model already partitioned (`deepspeed.zero.Init`) and then refuse
    `ignore_mismatched_sizes`, the new head of a recipe. This context lifts the registration while the model
    loads, whatever `zero3_init_flag` says (`check_deepspeed_settings` says so when it is on).
    """
    plugin = _zero3_plugin(accelerator)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # accelerate's own registration, back for prepare and saving


def prepare_for_training(accelerator, args, model, optimizer, scheduler):
    """`accelerator.prepare(model, optimizer, scheduler)`, after the data loaders (prepared first: the schedule's
    length depends on the per-process loader). DeepSpeed reads its micro-batch size from a loader in the same call
    or from its config; accelerate's shipped DeepSpeed configs leave it to "auto", so it comes from
    `--per_device_train_batch_size` here."""
    plugin = _deepspeed_plugin(accelerator)
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    return accelerator.prepare(model, optimizer, scheduler)


def init_trackers(accelerator, args, project_name: str) -> None:
    if not getattr(args, "trackers", None):
        return
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
    accelerator.init_trackers(project_name, config=config)


def training_variant(method: str):
    from hf_vpt.registry import training_variant as lookup

    return lookup(method)


def resolved_hyperparameters(args, method: str) -> dict:
    """`--optimizer`, `--learning_rate`, `--weight_decay`, each the variant's registry default where not given."""
    variant = training_variant(method)
    optimizer = getattr(args, "optimizer", None)
    learning_rate = getattr(args, "learning_rate", None)
    weight_decay = getattr(args, "weight_decay", None)
    return {
        "optimizer": variant.optimizer if optimizer in (None, "auto") else optimizer,
        "learning_rate": variant.learning_rate if learning_rate is None else learning_rate,
        "weight_decay": variant.weight_decay if weight_decay is None else weight_decay,
    }


def make_optimizer(model, args, method: str, *, lr=None, weight_decay=None, adamw_eps=None):
    """SGD (momentum `args.momentum`) or AdamW over the trainable parameters; no weight decay on biases and norms.

    The optimiser, learning rate and weight decay are `args.optimizer` / `args.learning_rate` / `args.weight_decay`,
    each falling back to the registry's defaults for `method` (`hf_vpt.registry.training_variant`); `lr` and
    `weight_decay` given here win over both. `adamw_eps` defaults to torch's 1e-8.
    """
    chosen = resolved_hyperparameters(args, method)
    lr = chosen["learning_rate"] if lr is None else lr
    weight_decay = chosen["weight_decay"] if weight_decay is None else weight_decay
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError(f"{method}: the model has no trainable parameter; nothing to optimise.")
    if chosen["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=getattr(args, "momentum", 0.9))
    return torch.optim.AdamW(groups, lr=lr, **({} if adamw_eps is None else {"eps": adamw_eps}))


def steps_per_epoch(num_batches: int, args) -> int:
    return max(1, math.ceil(num_batches / args.gradient_accumulation_steps))


def resolve_max_train_steps(args, num_batches: int) -> int:
    """`--max_train_steps`, or `--num_train_epochs` x optimiser steps per epoch (of the prepared loader)."""
    if num_batches == 0:  # the loop would go round empty epochs for ever
        raise ValueError(
            "The training data loader is empty: no training examples, or fewer than the number of processes. "
            "Check the training data (--train_dir / --dataset_name / --train_file, --max_train_samples)."
        )
    if getattr(args, "max_train_steps", None) is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch(num_batches, args)
    return args.max_train_steps


def make_scheduler(accelerator, optimizer, args):
    """`transformers.get_scheduler(--lr_scheduler_type)`, warm-up `--num_warmup_steps` or `--warmup_ratio`. A
    prepared scheduler is stepped once per process per optimiser step, hence the scaling (as in transformers'
    examples)."""
    from transformers import get_scheduler

    scale = accelerator.num_processes
    warmup = max(
        getattr(args, "num_warmup_steps", 0), math.ceil(getattr(args, "warmup_ratio", 0.0) * args.max_train_steps)
    )
    return get_scheduler(
        getattr(args, "lr_scheduler_type", "cosine"),
        optimizer=optimizer,
        num_warmup_steps=warmup * scale,
        num_training_steps=args.max_train_steps * scale,
    )


def seeded_generator(seed: int) -> torch.Generator:
    """A generator for `DataLoader(generator=...)`: creating an iterator then never draws from the global RNG, so
    that a resumed run sees the same random stream as an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


class StepSeededGenerator:
    """A `torch.Generator` for a recipe's own draws in the loss (masks, noise, timesteps) that `train_loop` re-seeds
    from (seed, process index, optimiser step) before every optimiser step.

    A resumed run then draws exactly what the uninterrupted one drew from that step on, with no generator state in
    the checkpoint (accelerate saves custom state from the main process only, which would hand every process rank 0's
    stream), and each process draws its own numbers. Pass it to `train_loop(step_generators=[...])` and draw from
    `.generator`.
    """

    def __init__(self, seed: int, device, process_index: int = 0):
        self.seed, self.process_index = int(seed), int(process_index)
        self.generator = torch.Generator(device=device)
        self.start_step(0)

    def start_step(self, step: int) -> None:
        """Re-seed for optimiser step `step` (0 for the first): one reproducible seed per (seed, process, step)."""
        mixed = ((self.seed * 1_000_003 + self.process_index) * 1_000_003 + int(step)) % (2**63 - 1)
        self.generator.manual_seed(mixed)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def list_checkpoints(output_dir: str) -> list:
    """The complete checkpoints in `output_dir` (those with a training_state.json, written last), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(
        int(match.group(1))
        for name in os.listdir(output_dir)
        if (match := re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name))
        and os.path.isfile(os.path.join(output_dir, name, TRAINING_STATE_FILE))
    )
    return [checkpoint_dir(output_dir, step) for step in steps]


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_checkpoint(output_dir: str, value: str) -> str:
    """The folder `--resume_from_checkpoint value` names ('latest': the newest in `output_dir`), or a
    `FileNotFoundError` that says what was looked for."""
    if value == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: there is no checkpoint in {output_dir} (no {CHECKPOINT_PREFIX}<step> "
                f"folder with a {TRAINING_STATE_FILE}); pass the --output_dir of the run to resume, or drop "
                "--resume_from_checkpoint to start from scratch."
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


def _trainable_names(model) -> set:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _keep_trainable_tensors(models, weights, output_dir) -> None:
    """save_state hook: each model's state dict keeps only its trainable tensors (the adapter and head, or every
    weight under full fine-tuning). Sharded models (FSDP, DeepSpeed) give no `weights`; they are saved whole."""
    for model, state in zip(models, weights):
        keep = _trainable_names(model)
        for key in [key for key in state if key not in keep]:
            del state[key]


def _load_trainable_tensors(models, input_dir) -> None:
    """load_state hook: load the trainable tensors saved by `_keep_trainable_tensors` into the (frozen-elsewhere)
    models, checking that the checkpoint holds exactly the tensors this run trains; accelerate loads the rest."""
    from safetensors.torch import load_file

    for index, model in enumerate(list(models)):
        path = os.path.join(input_dir, f"model{'' if index == 0 else f'_{index}'}.safetensors")
        if not os.path.isfile(path):
            continue  # not ours (e.g. a pickle checkpoint): accelerate's own loading reports what is missing
        state = load_file(path, device=str(next(model.parameters()).device))
        expected = _trainable_names(model)
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(
                f"{input_dir} does not hold the tensors this run trains (missing e.g. {missing}, unexpected e.g. "
                f"{extra}): resume with the --method and options of the run that wrote it."
            )
        model.load_state_dict(state, strict=False)
        models.remove(model)


def use_adapter_only_checkpoints(accelerator) -> None:
    """Make `accelerator.save_state` / `load_state` write and read only the trainable tensors (once per
    accelerator)."""
    if getattr(accelerator, "_hf_vpt_adapter_only", False):
        return
    accelerator.register_save_state_pre_hook(_keep_trainable_tensors)
    accelerator.register_load_state_pre_hook(_load_trainable_tensors)
    accelerator._hf_vpt_adapter_only = True


def save_checkpoint(accelerator, output_dir, step, batches_per_epoch, extra=None, total_limit=None) -> str:
    """`accelerator.save_state` (trainable tensors, optimiser, scheduler, RNG states) into `checkpoint-<step>`, then
    training_state.json (the step and position; written last, so a crash mid-save leaves no complete-looking
    checkpoint), then drop all but the newest `total_limit` checkpoints."""
    use_adapter_only_checkpoints(accelerator)
    folder = checkpoint_dir(output_dir, step)
    accelerator.save_state(folder)
    if accelerator.is_main_process:
        with open(os.path.join(folder, TRAINING_STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump({"step": step, "batches_per_epoch": batches_per_epoch, **(extra or {})}, handle)
        later = [path for path in list_checkpoints(output_dir) if resume_step(path) > step]
        if later:  # left by another run in this folder: `--resume_from_checkpoint latest` would pick them, not ours
            stale = os.path.basename(later[-1])
            accelerator.print(
                f"Warning: {output_dir} holds checkpoints of a later step from another run ({stale}); "
                f"`--resume_from_checkpoint latest` would resume from it. Pass {folder} explicitly, or use a fresh "
                "--output_dir."
            )
        if total_limit:
            # The newest `total_limit`, counting the one just written, which is never among those removed.
            others = [path for path in list_checkpoints(output_dir) if path != folder]
            for old in others[: max(0, len(others) - (total_limit - 1))]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def resume_step(path: str) -> int:
    """The optimiser step a checkpoint folder was written at."""
    with open(os.path.join(path, TRAINING_STATE_FILE), encoding="utf-8") as handle:
        return int(json.load(handle)["step"])


@dataclass
class ResumeState:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batches_to_skip: int = 0  # batches of `epoch` already consumed


def resume(accelerator, args, batches_per_epoch: int, optimizer_steps_per_epoch: int = 0) -> ResumeState:
    """Load `args.resume_from_checkpoint` (a folder, or 'latest') if set and say where the loop goes on."""
    path = getattr(args, "resume_from_checkpoint", None)
    if not path:
        return ResumeState()
    path = resolve_checkpoint(args.output_dir, path)
    with open(os.path.join(path, TRAINING_STATE_FILE), encoding="utf-8") as handle:
        saved = json.load(handle)
    for key, value, what in (
        ("batches_per_epoch", batches_per_epoch, "batches per epoch (data, batch size, number of processes)"),
        ("max_train_steps", args.max_train_steps, "optimiser steps in all (--max_train_steps / --num_train_epochs)"),
    ):
        if key in saved and saved[key] != value:
            raise ValueError(
                f"{path} was written by a run with {saved[key]} {what}; this run has {value}: resume with the "
                "settings of the interrupted run."
            )
    use_adapter_only_checkpoints(accelerator)
    accelerator.load_state(path)
    step = int(saved["step"])
    per_epoch = optimizer_steps_per_epoch or steps_per_epoch(batches_per_epoch, args)
    epoch, in_epoch = divmod(step, per_epoch)
    accelerator.print(f"Resumed from {path} at step {step}.")
    return ResumeState(step, epoch, min(in_epoch * args.gradient_accumulation_steps, batches_per_epoch))


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------
def progress_bar(accelerator, args, total: int, initial: int = 0, desc: str = "train"):
    """A bar of optimiser steps (main process only) that starts at `initial` after a resume."""
    from tqdm.auto import tqdm

    hidden = getattr(args, "disable_tqdm", False) or not getattr(args, "progress", True)
    return tqdm(total=total, initial=initial, desc=desc, disable=hidden or not accelerator.is_local_main_process)


def epoch_batches(accelerator, dataloader, epoch: int, skip: int):
    """The batches of `epoch` (seedable order), skipping the first `skip` of them when resuming."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    return accelerator.skip_first_batches(dataloader, skip) if skip else dataloader


def _log_metrics(accelerator, metrics: dict, step: int) -> None:
    numbers = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    if numbers:
        accelerator.log(numbers, step=step)


def train_loop(
    accelerator,
    args,
    model,
    optimizer,
    scheduler,
    dataloader,
    loss_fn,
    evaluate_fn=None,
    on_step=None,
    *,
    step_generators=(),
    desc="train",
):
    """The shared loop: gradient accumulation, clipping, logging, evaluation, checkpoints, resume, early stop.

    `loss_fn(batch) -> loss tensor` (it runs under accelerate's autocast); `evaluate_fn(step) -> dict of metrics`
    (every `--eval_steps` and at the end, on every process); `on_step(step)` after each optimiser step;
    `step_generators` (`StepSeededGenerator`s the loss draws from) are re-seeded before every step. Stopping early
    (`--stop_after_steps`) writes a checkpoint at the stop, so that `--resume_from_checkpoint latest` goes on from
    there. Reads from
    `args`: `max_train_steps` (required: see `resolve_max_train_steps`), `gradient_accumulation_steps`,
    `output_dir`, and if present `checkpointing_steps` (int or 'epoch'), `checkpoints_total_limit`,
    `resume_from_checkpoint`, `stop_after_steps`, `logging_steps`, `eval_steps`, `max_grad_norm`, `disable_tqdm`.
    Returns `(last_metrics, steps_done, finished)`.
    """
    every = parse_checkpointing_steps(getattr(args, "checkpointing_steps", None))
    limit = getattr(args, "checkpoints_total_limit", None)
    logging_steps = getattr(args, "logging_steps", 1) or 1
    eval_steps = getattr(args, "eval_steps", None)
    max_grad_norm = getattr(args, "max_grad_norm", None)
    batches_per_epoch = len(dataloader)
    per_epoch = steps_per_epoch(batches_per_epoch, args)
    use_adapter_only_checkpoints(accelerator)
    state = resume(accelerator, args, batches_per_epoch, per_epoch)
    step, metrics = state.step, {}
    stop_at = min(args.max_train_steps, getattr(args, "stop_after_steps", None) or args.max_train_steps)
    bar = progress_bar(accelerator, args, total=args.max_train_steps, initial=step, desc=desc)
    epoch, skip = state.epoch, state.batches_to_skip
    extra = {"max_train_steps": args.max_train_steps}
    saved_at = None
    for generator in step_generators:
        generator.start_step(step)
    model.train()
    while step < stop_at:
        for batch in epoch_batches(accelerator, dataloader, epoch, skip):
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = loss_fn(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            for generator in step_generators:
                generator.start_step(step)
            bar.update(1)
            if step % logging_steps == 0:
                logged = {"train/loss": accelerator.gather(loss.detach().float()[None]).mean().item()}
                logged["train/lr"] = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}")
                accelerator.log(logged, step=step)
            if on_step is not None:
                on_step(step)
            epoch_done = step % per_epoch == 0
            if (isinstance(every, int) and step % every == 0) or (every == "epoch" and epoch_done):
                saved_at = save_checkpoint(accelerator, args.output_dir, step, batches_per_epoch, extra, limit)
            if evaluate_fn is not None and eval_steps and step % eval_steps == 0 and step < stop_at:
                metrics = evaluate_fn(step)
                _log_metrics(accelerator, metrics, step)
                model.train()
            if step >= stop_at:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    finished = step >= args.max_train_steps
    if not finished:  # stopped early: the checkpoint of this step is where a resumed run goes on
        if saved_at != checkpoint_dir(args.output_dir, step):
            saved_at = save_checkpoint(accelerator, args.output_dir, step, batches_per_epoch, extra, limit)
        accelerator.print(
            f"Stopped after {step} of {args.max_train_steps} steps (--stop_after_steps); continue with "
            f"--resume_from_checkpoint latest (or {saved_at})."
        )
    if evaluate_fn is not None and finished:
        metrics = evaluate_fn(step)
        _log_metrics(accelerator, metrics, step)
    return metrics, step, finished


def merged(*parsed):
    """One namespace with the fields of several parsed dataclasses (the recipes read `args.<option>`)."""
    import argparse

    values = {}
    for item in parsed:
        values.update(vars(item))
    return argparse.Namespace(**values)
