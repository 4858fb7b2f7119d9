"""Model cards for saved adapters, rendered from the Jinja templates in `model_cards/`."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from importlib import resources
from pathlib import Path

import jinja2


CARD_TEMPLATE = "adapter.md.jinja"
# Written by hf_vpt next to the adapter; `write_model_card` merges it so training details survive a re-save.
CARD_DATA_FILE = "hf_vpt_card.json"

METHODS = {
    "VISUAL_PROMPT": (
        "Visual Prompt Tuning",
        "Visual Prompt Tuning (Jia et al., ECCV 2022)",
        "https://arxiv.org/abs/2203.12119",
    ),
    "GATED_PROMPT": (
        "Gated Prompt Tuning",
        "Improving Visual Prompt Tuning for Self-supervised Vision Transformers (Yoo et al., ICML 2023)",
        "https://arxiv.org/abs/2306.05067",
    ),
    "APPROX_PROMPT": (
        "Approximated Prompt Tuning",
        "Approximated Prompt Tuning for Vision-Language Pre-trained Models (Wu et al., ICCV 2023)",
        "https://arxiv.org/abs/2306.15706",
    ),
    "GENERATIVE_PROMPT": (
        "Generative Visual Prompt Tuning",
        "Visual Prompt Tuning for Generative Transfer Learning (Sohn et al., CVPR 2023)",
        "https://arxiv.org/abs/2210.00990",
    ),
}
_SKIPPED_FIELDS = {
    "base_model_name_or_path",
    "revision",
    "peft_type",
    "task_type",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "target_modules",
    "exclude_modules",
    "target_parameters",
    "tower_shapes",
}


def _template() -> jinja2.Template:
    # A source checkout reads the repository's model_cards/; an installed wheel carries them as hf_vpt.model_cards.
    checkout = Path(__file__).resolve().parent.parent / "model_cards" / CARD_TEMPLATE
    if checkout.is_file():
        text = checkout.read_text(encoding="utf-8")
    else:
        text = resources.files("hf_vpt.model_cards").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")
    return jinja2.Environment(keep_trailing_newline=True, autoescape=False).from_string(text)


def _settings(config) -> list[tuple[str, str]]:
    rows = []
    for item in fields(config):
        value = getattr(config, item.name)
        if item.name in _SKIPPED_FIELDS or value is None or value is False:
            continue
        rows.append((item.name, f"`{value}`"))
    return rows


def render_model_card(config, **card_data) -> str:
    """The README.md of an adapter. `card_data` may hold dataset, metrics, command, trainable_parameters, repo_id."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    method_title, paper_title, paper_url = METHODS.get(peft_type, (peft_type, peft_type, ""))
    method_tag = peft_type.lower().replace("_", "-")
    num_tokens = getattr(config, "num_prompt_tokens", None)
    depth = getattr(config, "depth", None)
    summary = f"{num_tokens} learnable prompt tokens" if num_tokens else "a few learnable parameters"
    if depth:
        summary += " before every block" if depth == "deep" else " before the first block"
    return _template().render(
        title=card_data.get("title") or f"{method_title} adapter",
        method_title=method_title,
        paper_title=paper_title,
        paper_url=paper_url,
        peft_type=peft_type,
        base_model=config.base_model_name_or_path,
        tags=["peft", "hf_vpt", method_tag, "vision-prompt-tuning", *card_data.get("tags", [])],
        summary=summary,
        settings=_settings(config),
        dataset=card_data.get("dataset"),
        metrics=card_data.get("metrics"),
        command=card_data.get("command"),
        trainable_parameters=card_data.get("trainable_parameters"),
        num_labels=card_data.get("num_labels"),
        repo_id=card_data.get("repo_id"),
    )


def write_model_card(save_directory: str, config, **card_data) -> str:
    """Write README.md for the adapter in `save_directory`; training details given once are kept on re-save."""
    data_path = os.path.join(save_directory, CARD_DATA_FILE)
    if os.path.isfile(data_path):
        with open(data_path, encoding="utf-8") as handle:
            card_data = {**json.load(handle), **card_data}
    if card_data:
        with open(data_path, "w", encoding="utf-8") as handle:
            json.dump(card_data, handle, indent=2, sort_keys=True)
    path = os.path.join(save_directory, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_model_card(config, **card_data))
    return path
