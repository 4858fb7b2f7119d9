"""Model cards for saved adapters, rendered from the Jinja templates in `model_cards/`."""

from __future__ import annotations

import contextvars
import json
import math
import os
import re
from dataclasses import MISSING, fields
from importlib import resources
from pathlib import Path

import jinja2

from ._compat import trainer_card_comment
from .registry import find_method_spec


CARD_TEMPLATE = "adapter.md.jinja"
# Included by CARD_TEMPLATE: the "Use it" snippet, one branch per entry of TASKS.
USAGE_TEMPLATE = "usage.md.jinja"
# Written by hf_vpt next to the adapter; `write_model_card` merges it so training details survive a re-save.
CARD_DATA_FILE = "hf_vpt_card.json"
# The last line of every README.md hf_vpt writes: a README.md without it is the user's and is never replaced.
CARD_MARKER = "<!-- model card written by hf_vpt; a README.md without this line is kept as it is -->"
# Set by `PeftModel.save_pretrained` (hf_vpt.core.adapter_io) when the folder held a README.md hf_vpt did not write.
KEEP_USER_MODEL_CARD: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_vpt_keep_user_card", default=False)

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
    "stage_shapes",  # Swin's [depth, width] per stage: bookkeeping checked on load, not a setting
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


def _settings(config, hf_vpt_method: bool = True, always: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The settings table: an hf_vpt config's set fields; for PEFT's own configs the method's `card_settings`
    (`MethodSpec`) and the fields that differ from their defaults."""
    rows = []
    for item in fields(config):
        value = getattr(config, item.name)
        if value is None or value is False or value in ({}, []):
            continue
        if hf_vpt_method and item.name in _SKIPPED_FIELDS:
            continue
        if not hf_vpt_method and item.name not in always:
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


def _front_matter(
    *, base_model, base_model_on_hub, pipeline_tag, tags, dataset, metrics, task, title, trainer_metadata
) -> str:
    """The YAML metadata of the card, written by huggingface_hub (so the Hub reads what it wrote)."""
    from huggingface_hub import EvalResult, ModelCardData

    trainer_metadata = dict(trainer_metadata or {})
    trainer_results = (ModelCardData(**trainer_metadata).eval_results or []) if trainer_metadata else []
    dataset_id = dataset if _looks_like_hub_id(dataset) else None  # free text or a local folder: body text only
    datasets = [dataset_id] if dataset_id else []
    for name in trainer_metadata.get("datasets") or []:
        if _looks_like_hub_id(name) and name not in datasets:
            datasets.append(name)
    results = [
        EvalResult(
            task_type=pipeline_tag or task,
            dataset_type=dataset_id or "custom",  # the Hub wants a type: a dataset id, else "custom" (local data)
            dataset_name=str(dataset or "unspecified"),
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in (metrics or {}).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ]
    tag_list = list(dict.fromkeys([*tags, *(trainer_metadata.get("tags") or [])]))
    data = ModelCardData(
        library_name="peft",
        base_model=base_model if base_model_on_hub else None,
        pipeline_tag=pipeline_tag,
        tags=tag_list,
        datasets=datasets or None,
        license=trainer_metadata.get("license"),
        model_name=title if results or trainer_results else None,
        eval_results=(results + trainer_results) or None,
    )
    return data.to_yaml()


def render_model_card(config, **card_data) -> str:
    """The README.md of an adapter.

    `card_data` may hold dataset, metrics, command, trainable_parameters, repo_id (or adapter_id, the folder the
    snippet loads), num_labels, labels (class names, in label order), head (the trained head modules), title, tags,
    trainer_card (what `transformers.Trainer.create_model_card` wrote, kept by `write_model_card`), and what picks
    the usage snippet: `task` (one of `TASKS`) or else `base_model_class` (the class name of the model the adapter
    was trained on, see `card_task`), or else `config.auto_mapping` (PEFT records the base class there when it saves
    a model without a task type); `base_model_library` (the module of that class; default transformers) for the
    generic snippet's import. Everything method-specific comes from the method's `MethodSpec` (`hf_vpt.registry`).
    """
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    spec = find_method_spec(config) or find_method_spec(peft_type)
    method_title = spec.title if spec else peft_type
    paper_title, paper_url = (spec.paper_title, spec.paper_url) if spec else (peft_type, "")
    method_tag = peft_type.lower().replace("_", "-")
    auto_mapping = getattr(config, "auto_mapping", None) or {}
    base_model_class = card_data.get("base_model_class") or auto_mapping.get("base_model_class")
    library = card_data.get("base_model_library") or auto_mapping.get("parent_library") or "transformers"
    task = card_data.get("task") or card_task(peft_type, base_model_class)
    if task not in TASKS:
        raise ValueError(f"Unknown model-card task {task!r}; use one of {sorted(TASKS)}.")
    hf_vpt_method = spec is not None and not spec.peft_builtin
    base_model = config.base_model_name_or_path
    base_model_id, component = base_model, "text_encoder"
    if task == "text-to-image":
        base_model_id, component = _text_encoder_location(base_model)
    if task == "vision-language" and not base_model_class:
        base_model_class = "ViltForQuestionAnswering"
    labels = card_data.get("labels")
    id2label = dict(enumerate(str(label) for label in labels)) if labels and len(labels) <= 50 else None
    num_labels = card_data.get("num_labels") or (len(labels) if labels else None)
    title = card_data.get("title") or f"{method_title} adapter"
    pipeline_tag = _pipeline_tag(task, base_model_class)
    tags = ["peft", "hf_vpt", method_tag, "vision-prompt-tuning", *card_data.get("tags", [])]
    trainer_card = card_data.get("trainer_card") or {}
    return _template().render(
        front_matter=_front_matter(
            base_model=base_model,
            base_model_on_hub=_looks_like_hub_id(base_model),
            pipeline_tag=pipeline_tag,
            tags=tags,
            dataset=card_data.get("dataset"),
            metrics=card_data.get("metrics"),
            task=task,
            title=title,
            trainer_metadata=trainer_card.get("metadata"),
        ),
        title=title,
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
        adapter_id=card_data.get("repo_id") or card_data.get("adapter_id") or "<this repo or folder>",
        component=component,
        task=task,
        tags=tags,
        summary=spec.summary(config) if spec else "a few learnable parameters",
        card_usage=spec.card_usage if spec else None,
        settings=_settings(config, hf_vpt_method, spec.card_settings if spec else ()),
        head=card_data.get("head"),
        dataset=card_data.get("dataset"),
        metrics=card_data.get("metrics"),
        command=card_data.get("command"),
        trainable_parameters=card_data.get("trainable_parameters"),
        num_labels=num_labels,
        id2label=id2label,
        num_classes=getattr(config, "num_classes", None),
        trainer_text=trainer_card.get("text"),
    )


# Kept in CARD_DATA_FILE for whoever opens the folder without hf_vpt; never passed on as card data.
LOAD_NOTE_KEY = "how_to_load"
LOAD_NOTE = (
    "This is an hf_vpt adapter: PEFT knows its peft_type only after `import hf_vpt` (pip install hf-vpt). Load it "
    "with `import hf_vpt; from peft import PeftModel; PeftModel.from_pretrained(base_model, this_folder)`; the "
    "README.md next to this file has the full snippet. transformers' own loaders "
    "(`AutoModel*.from_pretrained(this_folder)`, `pipeline(model=this_folder)`) do not load hf_vpt adapters."
)
# Card data derived from the model at save time (head, labels, base class): fresh on every save, never stored.
MODEL_CARD_FACTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hf_vpt_card_facts", default=None)


def model_card_facts(peft_model, adapter_name: str | None = None) -> dict:
    """What the card needs to know from the model itself: the class it was trained on, the trained head(s)
    (`modules_to_save`) and, when a head is trained, the label count and names from the model's config."""
    base = peft_model.get_base_model()
    name = adapter_name or getattr(peft_model, "active_adapter", "default")
    peft_config = peft_model.peft_config.get(name) if isinstance(name, str) else None
    facts = {"base_model_class": type(base).__name__, "base_model_library": type(base).__module__}
    heads = list(getattr(peft_config, "modules_to_save", None) or [])
    config = getattr(base, "config", None)
    num_labels = getattr(config, "num_labels", None) if config is not None and not isinstance(config, dict) else None
    if heads:
        facts["head"] = heads
        if isinstance(num_labels, int) and num_labels > 0:
            facts["num_labels"] = num_labels
            id2label = getattr(config, "id2label", None) or {}
            names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(num_labels)]
            # transformers fills in LABEL_0, LABEL_1, ...: those are no names worth writing down
            if all(names) and names != [f"LABEL_{i}" for i in range(num_labels)]:
                facts["labels"] = names
    return facts


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
    data.pop(LOAD_NOTE_KEY, None)
    return data


def written_by_hf_vpt(readme_path: str) -> bool:
    with open(readme_path, encoding="utf-8", errors="replace") as handle:
        return CARD_MARKER in handle.read()


def written_by_trainer(readme_path: str) -> bool:
    """A README.md that `transformers.Trainer.create_model_card` has just written (its draft comment is still in)."""
    with open(readme_path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    return CARD_MARKER not in text and trainer_card_comment() in text


def _trainer_card(readme_path: str) -> dict:
    """The Trainer's card as card data: its YAML metadata and its text from the first section on."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(readme_path)
    text = card.text.replace(trainer_card_comment(), "")
    sections = text.split("\n## ", 1)  # the title and the "fine-tuned version of" line are hf_vpt's job
    body = ("## " + sections[1]) if len(sections) == 2 else text
    # Drop the draft's placeholder sections, and put the others one level deeper, under hf_vpt's "## Trainer".
    sections = re.split(r"\n(?=#+ )", body.strip())
    body = "\n".join(part for part in sections if part.split("\n", 1)[-1].strip() != "More information needed")
    body = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", body, flags=re.M)
    metadata = {
        k: v for k, v in card.data.to_dict().items() if k in ("model-index", "datasets", "tags", "license") and v
    }
    return {"metadata": metadata, "text": body}


# The keys of `model_card_facts`: facts of the saved model, not training details to keep in CARD_DATA_FILE.
MODEL_FACT_KEYS = frozenset({"base_model_class", "base_model_library", "head", "num_labels", "labels"})


def write_model_card(save_directory: str, config, *, model=None, **card_data) -> str:
    """Write README.md for the adapter in `save_directory`; training details given once are kept on re-save.

    `model` (the PeftModel the adapter was saved from) adds what the card learns from the model itself
    (`model_card_facts`: base class, trained heads, label count and names); `save_pretrained` passes it on its own.

    A README.md that hf_vpt did not write (no `CARD_MARKER`) is the user's: it is kept as it is (PEFT has already
    added its metadata, as it does for every adapter). One that `transformers.Trainer.create_model_card` wrote is
    merged: its metadata (metrics in `model-index`, datasets, tags, license) and its sections are kept in
    `hf_vpt_card.json` and rendered below hf_vpt's card, so a `Trainer` push keeps the import line and the snippet.
    """
    save_directory = str(save_directory)
    data_path = os.path.join(save_directory, CARD_DATA_FILE)
    path = os.path.join(save_directory, "README.md")
    stored = read_card_data(save_directory)
    if os.path.isfile(path) and written_by_trainer(path):
        stored["trainer_card"] = _trainer_card(path)
    elif KEEP_USER_MODEL_CARD.get() and os.path.isfile(path) and not written_by_hf_vpt(path):
        return path
    # What the model says about itself (head, labels, base class) is read fresh on every save and never stored, so a
    # re-save of another model into the folder cannot show the old one's labels; stored training details (dataset,
    # metrics, command) are kept, and what this call passes wins over both.
    stored = {key: value for key, value in stored.items() if key not in MODEL_FACT_KEYS}
    kept = {key: value for key, value in {**stored, **card_data}.items() if key not in MODEL_FACT_KEYS}
    with open(data_path, "w", encoding="utf-8") as handle:
        json.dump({LOAD_NOTE_KEY: LOAD_NOTE, **kept}, handle, indent=2, sort_keys=True)
    facts = model_card_facts(model) if model is not None else MODEL_CARD_FACTS.get()
    render_data = {**stored, **(facts or {}), **card_data}
    render_data.setdefault("adapter_id", save_directory)
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
