"""Shared helpers of the hf_vpt recipes.

The training loop, optimiser, schedule, accelerator and checkpoints live in `training.py`; the loop and optimiser
are re-exported here (`_common.train_loop`, `_common.make_optimizer`) for `bench/` and `examples/`. This file adds
the end of a run: `results_table`, `save_adapter` (the PEFT adapter plus its model card through
`hf_vpt.hub.write_model_card`), `push_folder_to_hub` and `finish`; and, for the research studies that keep an
argparse command line, `parse_args_with_config` (a YAML `--config` file).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch


try:  # imported as `recipes._common` (bench/, examples/) or as `_common` with recipes/ on sys.path
    from . import training
except ImportError:
    import training

# The shared loop and optimiser, for `bench/` and `examples/` (the recipes import `training` itself).
make_optimizer = training.make_optimizer
train_loop = training.train_loop


# ---------------------------------------------------------------------------------------------------------------
# argparse command lines of the research studies (the recipes use `training.parse_recipe_args`)
# ---------------------------------------------------------------------------------------------------------------
def parse_args_with_config(
    parser: argparse.ArgumentParser, argv: list[str] | None, script: str, comma_lists: tuple[str, ...] = ()
) -> argparse.Namespace:
    """Parse `argv`; keys of the YAML `--config` file replace the defaults, explicit options win over both.

    `comma_lists` names options that take a comma-separated string; the YAML file may give them as a list.
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
    """Save the adapter (`model.save_pretrained` or `save_fn(folder, state_dict)`, from the gathered state dict) and
    write its complete model card.

    Every process must call it (it waits for the others); the main process writes. `card` holds more model-card
    data for `hf_vpt.hub.write_model_card` (`task`, `num_labels`, `labels`, ...); the base model's class is filled
    in from the model. A model without a PEFT adapter (full fine-tuning, linear probing) is saved whole, without
    an hf_vpt card.
    """
    from hf_vpt.hub import (
        KEEP_USER_MODEL_CARD,
        MODEL_CARD_FACTS,
        model_card_facts,
        write_model_card,
        written_by_hf_vpt,
    )

    accelerator.wait_for_everyone()
    # Under FSDP or ZeRO-3 each process holds shards: gather the full state dict (a collective, every process takes
    # part) and let the main process write the adapter once. Without sharding this is the plain state dict.
    state_dict = accelerator.get_state_dict(model)
    _use_float32_masters(accelerator, model, state_dict)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        os.makedirs(folder, exist_ok=True)
        readme = os.path.join(folder, "README.md")
        users_card = os.path.isfile(readme) and not written_by_hf_vpt(readme)  # before PEFT writes its own
        if save_fn is not None:
            save_fn(folder, state_dict)
        else:
            unwrapped.save_pretrained(folder, state_dict=state_dict)
        config = getattr(unwrapped, "peft_config", {}).get("default")
        if config is not None:
            if hasattr(unwrapped, "get_base_model"):
                base_class = type(unwrapped.get_base_model())
                card.setdefault("base_model_class", base_class.__name__)
                card.setdefault("base_model_library", base_class.__module__)
            # A README.md the user had in the folder before the save is theirs: keep it. The card's model facts
            # (trained heads, label names) come from the model, as in `save_pretrained`.
            keep = KEEP_USER_MODEL_CARD.set(users_card)
            facts = MODEL_CARD_FACTS.set(model_card_facts(unwrapped) if hasattr(unwrapped, "get_base_model") else None)
            try:
                write_model_card(
                    folder,
                    config,
                    dataset=dataset,
                    metrics={k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
                    command=command,
                    trainable_parameters=trainable,
                    **card,
                )
            finally:
                KEEP_USER_MODEL_CARD.reset(keep)
                MODEL_CARD_FACTS.reset(facts)
    accelerator.wait_for_everyone()
    return folder


def _use_float32_masters(accelerator, model, state_dict: dict | None) -> None:
    """DeepSpeed with bf16 or fp16 trains 16-bit copies of the parameters and keeps their float32 masters in its
    optimiser; accelerate's state dict holds the 16-bit copies. Put the masters of the trained tensors in instead, so
    that the adapter is saved in float32, as under DDP and FSDP. Every process must call it (under ZeRO-3 gathering
    a master is a collective); the masters land where `state_dict` has the key (the main process; the others may
    hold None)."""
    if accelerator.distributed_type.value != "DEEPSPEED":
        return
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in accelerator.unwrap_model(model).named_parameters():
        if not param.requires_grad or param.dtype == torch.float32:
            continue
        master = safe_get_full_fp32_param(param)
        if master is not None and state_dict is not None and name in state_dict:
            state_dict[name] = master.detach().cpu()


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
    if getattr(args, "trackers", None):
        accelerator.end_training()
