"""Model cards for saved adapters, rendered from the Jinja templates in `model_cards/`."""

from __future__ import annotations

import contextvars
import json
import os
import re
from dataclasses import MISSING, fields
from importlib import resources
from pathlib import Path

import jinja2


CARD_TEMPLATE = "adapter.md.jinja"
# Included by CARD_TEMPLATE: the "Use it" snippet, one branch per entry of TASKS.
USAGE_TEMPLATE = "usage.md.jinja"
# Written by hf_vpt next to the adapter; `write_model_card` merges it so training details survive a re-save.
CARD_DATA_FILE = "hf_vpt_card.json"
# The last line of every README.md hf_vpt writes: a README.md without it is the user's and is never replaced.
CARD_MARKER = "<!-- model card written by hf_vpt; a README.md without this line is kept as it is -->"
# Set by `PeftModel.save_pretrained` (hf_vpt.core.adapter_io) when the folder held a README.md hf_vpt did not write.
KEEP_USER_MODEL_CARD: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_vpt_keep_user_card", default=False)

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
    # PEFT's own method, trained by recipes/image_classification.py as a baseline next to the prompt methods.
    "LORA": (
        "LoRA",
        "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022)",
        "https://arxiv.org/abs/2106.09685",
    ),
}
# Tasks with their own usage snippet in USAGE_TEMPLATE, and the Hub `pipeline_tag` of their cards. "generic" loads
# the base class and the adapter, nothing more.
TASKS = {
    "image-classification": "image-classification",
    "vision-language": None,  # set per head class in `_pipeline_tag`
    "masked-token-generation": None,
    "autoregressive-generation": None,
    "text-to-image": "text-to-image",
    "generic": None,
}
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
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


def _read_template(name: str) -> str:
    # A source checkout reads the repository's model_cards/; an installed wheel carries them as hf_vpt.model_cards.
    checkout = Path(__file__).resolve().parent.parent / "model_cards" / name
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    return resources.files("hf_vpt.model_cards").joinpath(name).read_text(encoding="utf-8")


def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.FunctionLoader(_read_template), keep_trailing_newline=True, autoescape=False
    )
    environment.filters["py"] = _python_literal
    return environment.get_template(CARD_TEMPLATE)


def _python_literal(value) -> str:
    """A Python literal of a string (double-quoted, as the rest of the snippets) or a dict of them, so that any
    base-model name, path or class name keeps the usage snippet valid Python."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid Python string literal
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


# The settings of PEFT's own configs (LoRA) that a card always shows; their other fields only when not default.
_FOREIGN_KEY_FIELDS = ("r", "lora_alpha", "target_modules")


def _settings(config, hf_vpt_method: bool = True) -> list[tuple[str, str]]:
    rows = []
    for item in fields(config):
        value = getattr(config, item.name)
        if value is None or value is False or value in ({}, []):
            continue
        if hf_vpt_method and item.name in _SKIPPED_FIELDS:
            continue
        if not hf_vpt_method and item.name not in _FOREIGN_KEY_FIELDS:
            if item.name in _SKIPPED_FIELDS or value == _field_default(item):
                continue
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        rows.append((item.name, f"`{value}`"))
    return rows


def _field_default(item):
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    return MISSING


def card_task(peft_type: str, base_model_class: str | None) -> str:
    """The task whose usage snippet the card shows, from the class the adapter was trained on.

    `*ForImageClassification` -> "image-classification", `Vilt*` -> "vision-language", `UVit2DModel` ->
    "masked-token-generation", `ImageGPTForCausalImageModeling` -> "autoregressive-generation", a CLIP text
    encoder -> "text-to-image" (the text encoder of a diffusers pipeline), anything else -> "generic".
    """
    name = base_model_class or ""
    if name.endswith("ForImageClassification"):
        return "image-classification"
    if name.startswith("Vilt"):
        return "vision-language"
    if name.startswith("UVit2D"):
        return "masked-token-generation"
    if name.startswith("ImageGPT"):
        return "autoregressive-generation"
    if name in TEXT_ENCODER_CLASSES:
        return "text-to-image"
    return "generic"


def _pipeline_tag(task: str, base_model_class: str | None) -> str | None:
    if task == "vision-language":
        return "visual-question-answering" if base_model_class == "ViltForQuestionAnswering" else None
    return TASKS[task]


def _summary(peft_type: str, config) -> str:
    """What the adapter adds to the frozen model, for the card's first paragraph."""
    num_tokens = getattr(config, "num_prompt_tokens", None)
    if peft_type == "LORA":
        targets = config.target_modules
        targets = ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else targets
        return f"rank-{config.r} updates (alpha {config.lora_alpha}) of the weights of {targets}"
    if peft_type == "APPROX_PROMPT":
        return (
            f"an approximated-prompt term ({num_tokens} prompts and a rank-{config.rank} key map per layer) to each "
            "adapted attention output; no token enters the sequence"
        )
    if peft_type == "GENERATIVE_PROMPT":
        return f"{num_tokens} prompt tokens per sample, generated from its class label by a small generator"
    summary = f"{num_tokens} learnable prompt tokens" if num_tokens else "a few learnable parameters"
    depth = getattr(config, "depth", None)
    if depth:
        summary += " before every block" if depth == "deep" else " before the first block"
    if peft_type == "GATED_PROMPT":
        summary += ", a gate per block" + (
            " and an attention temperature per block" if config.learn_temperature else ""
        )
    return summary


def _looks_like_hub_id(name: str | None) -> bool:
    """`owner/name` or `name` on the Hub, as opposed to a local folder (which gets no Hub link or metadata)."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is not None


def _text_encoder_location(base_model: str | None) -> tuple[str | None, str]:
    """(pipeline, component) of a text encoder recorded as `<pipeline>/text_encoder[_2]` or as the pipeline."""
    if base_model:
        head, _, tail = base_model.rstrip("/").rpartition("/")
        if tail in ("text_encoder", "text_encoder_2") and head:
            return head, tail
    return base_model, "text_encoder"


def render_model_card(config, **card_data) -> str:
    """The README.md of an adapter.

    `card_data` may hold dataset, metrics, command, trainable_parameters, repo_id, num_labels, labels (class names,
    in label order), title, tags, and what picks the usage snippet: `task` (one of `TASKS`) or else
    `base_model_class` (the class name of the model the adapter was trained on, see `card_task`), or else
    `config.auto_mapping` (PEFT records the base class there when it saves a model without a task type);
    `base_model_library` (the module of that class; default transformers) for the generic snippet's import.
    """
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    method_title, paper_title, paper_url = METHODS.get(peft_type, (peft_type, peft_type, ""))
    method_tag = peft_type.lower().replace("_", "-")
    auto_mapping = getattr(config, "auto_mapping", None) or {}
    base_model_class = card_data.get("base_model_class") or auto_mapping.get("base_model_class")
    library = card_data.get("base_model_library") or auto_mapping.get("parent_library") or "transformers"
    task = card_data.get("task") or card_task(peft_type, base_model_class)
    if task not in TASKS:
        raise ValueError(f"Unknown model-card task {task!r}; use one of {sorted(TASKS)}.")
    hf_vpt_method = peft_type in METHODS and peft_type != "LORA"
    base_model = config.base_model_name_or_path
    base_model_id, component = base_model, "text_encoder"
    if task == "text-to-image":
        base_model_id, component = _text_encoder_location(base_model)
    if task == "vision-language" and not base_model_class:
        base_model_class = "ViltForQuestionAnswering"
    labels = card_data.get("labels")
    id2label = dict(enumerate(str(label) for label in labels)) if labels and len(labels) <= 50 else None
    return _template().render(
        title=card_data.get("title") or f"{method_title} adapter",
        method_title=method_title,
        paper_title=paper_title,
        paper_url=paper_url,
        peft_type=peft_type,
        hf_vpt_method=hf_vpt_method,
        import_comment=(
            "registers the hf_vpt methods with PEFT; needed before loading"
            if hf_vpt_method
            else f"{method_title} is PEFT's own method; hf_vpt trained it as a baseline"
        ),
        base_model=base_model,
        base_model_on_hub=_looks_like_hub_id(base_model),
        base_model_id=base_model_id or "<base model>",
        base_model_class=base_model_class,
        base_model_library=library.split(".")[0],
        adapter_id=card_data.get("repo_id") or "<this repo or folder>",
        component=component,
        task=task,
        pipeline_tag=_pipeline_tag(task, base_model_class),
        tags=["peft", "hf_vpt", method_tag, "vision-prompt-tuning", *card_data.get("tags", [])],
        summary=_summary(peft_type, config),
        settings=_settings(config, hf_vpt_method),
        dataset=card_data.get("dataset"),
        metrics=card_data.get("metrics"),
        command=card_data.get("command"),
        trainable_parameters=card_data.get("trainable_parameters"),
        num_labels=card_data.get("num_labels"),
        id2label=id2label,
        num_classes=getattr(config, "num_classes", None),
    )


def read_card_data(save_directory: str) -> dict:
    """The training details kept next to an adapter (`hf_vpt_card.json`); {} if there are none."""
    data_path = os.path.join(save_directory, CARD_DATA_FILE)
    if not os.path.isfile(data_path):
        return {}
    try:
        with open(data_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"'{data_path}' is not valid JSON ({exc}). hf_vpt keeps the model card's training details there; fix the "
            "file or delete it (the card is then written from the adapter config alone). Nothing was written."
        ) from exc
    if not isinstance(data, dict):
        raise ValueError(
            f"'{data_path}' holds a {type(data).__name__}, not the JSON object of model-card details hf_vpt writes; fix "
            "the file or delete it. Nothing was written."
        )
    return data


def written_by_hf_vpt(readme_path: str) -> bool:
    with open(readme_path, encoding="utf-8", errors="replace") as handle:
        return CARD_MARKER in handle.read()


def write_model_card(save_directory: str, config, **card_data) -> str:
    """Write README.md for the adapter in `save_directory`; training details given once are kept on re-save.

    A README.md that hf_vpt did not write (no `CARD_MARKER`) is the user's: it is kept as it is (PEFT has already
    added its metadata, as it does for every adapter).
    """
    data_path = os.path.join(save_directory, CARD_DATA_FILE)
    card_data = {**read_card_data(save_directory), **card_data}
    path = os.path.join(save_directory, "README.md")
    if KEEP_USER_MODEL_CARD.get() and os.path.isfile(path) and not written_by_hf_vpt(path):
        return path
    if card_data:
        with open(data_path, "w", encoding="utf-8") as handle:
            json.dump(card_data, handle, indent=2, sort_keys=True)
    render_data = dict(card_data)
    config_path = os.path.join(save_directory, "adapter_config.json")
    if "base_model_class" not in render_data and os.path.isfile(config_path):
        # PEFT wrote adapter_config.json just before; its `auto_mapping` names the class the adapter was trained on
        # (it is read again on every save, so it is not copied into CARD_DATA_FILE).
        with open(config_path, encoding="utf-8") as handle:
            auto_mapping = json.load(handle).get("auto_mapping") or {}
        if auto_mapping.get("base_model_class"):
            render_data["base_model_class"] = auto_mapping["base_model_class"]
            render_data["base_model_library"] = auto_mapping.get("parent_library") or "transformers"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_model_card(config, **render_data).rstrip("\n") + f"\n\n{CARD_MARKER}\n")
    return path
