"""Model cards for saved adapters, rendered from the Jinja templates in `model_cards/`."""

from __future__ import annotations

import contextlib
import contextvars
import json
import keyword
import math
import os
import re
import reprlib
import secrets
from dataclasses import MISSING, fields
from importlib import resources
from pathlib import Path

import jinja2

from ._compat import trainer_card_comment
from .registry import find_method_spec


CARD_TEMPLATE = "adapter.md.jinja"
# Included by CARD_TEMPLATE: the "Use it" snippet, one branch per entry of TASKS.
USAGE_TEMPLATE = "usage.md.jinja"
# Written by hf_vpt next to the adapter; `write_model_card` merges it so training details survive a re-save. It also
# holds the label names of the last save, which the card's snippet reads back when there are many (`adapter_labels`).
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
# Label names the "Use it" snippet writes out as `id2label`; with more it reads them from CARD_DATA_FILE instead.
INLINE_LABELS_MAX = 50
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
    environment.filters["md_code"] = _markdown_code
    environment.filters["md_text"] = _markdown_text
    environment.filters["fence"] = _code_fence
    return environment.get_template(CARD_TEMPLATE)


def _python_literal(value) -> str:
    """A Python literal of a string (double-quoted, as the rest of the snippets) or a dict of them, so that any
    base-model name, path or class name keeps the usage snippet valid Python."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid Python string literal
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


# Line breaks and other control characters, shown escaped: a string from an adapter config or a card-data file must
# stay on its line, or it could start a new Markdown section or code block in the card.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
# What Markdown reads as markup inside a line: emphasis, code, links, HTML, table cells, headings.
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]<>|~#!])")


def _one_line(value) -> str:
    return _CONTROL_CHARACTERS.sub(lambda match: ascii(match.group())[1:-1], str(value))


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _markdown_code(value, in_table: bool = False) -> str:
    """`value` as inline code that Markdown shows verbatim: on one line, between more backticks than it holds."""
    text = _one_line(value)
    if in_table:
        text = text.replace("|", "\\|")  # a table splits its cells at a bare `|`, even inside code
    fence = "`" * (_longest_backtick_run(text) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def _markdown_text(value) -> str:
    """`value` as plain text on one line, its Markdown punctuation escaped (numbers and names read as before)."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", _one_line(value))


def _code_fence(text: str) -> str:
    """The fence of a code block around `text`: longer than any backtick run in it, so no line of it ends the block."""
    return "`" * max(3, _longest_backtick_run(str(text)) + 1)


def _settings(config, hf_vpt_method: bool = True, always: tuple[str, ...] = ()) -> list[tuple[str, object]]:
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
        rows.append((item.name, value))  # the template shows it as inline code
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
    trainer_results = (_trainer_results(trainer_metadata) or []) if trainer_metadata else []
    dataset_id = dataset if _looks_like_hub_id(dataset) else None  # free text or a local folder: body text only
    datasets = [dataset_id] if dataset_id else []
    for name in _as_list(trainer_metadata.get("datasets")):
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
    tag_list = list(dict.fromkeys([*tags, *_as_list(trainer_metadata.get("tags"))]))
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


def _as_list(names) -> list:
    """YAML metadata may give one name as a plain string where a list is usual (`datasets: beans`)."""
    return [names] if isinstance(names, str) else list(names or [])


def _python_name(value) -> str | None:
    """`value` if it can stand in an import line (a class name recorded in an adapter config), else None."""
    return value if isinstance(value, str) and value.isidentifier() and not keyword.iskeyword(value) else None


def _module_name(value) -> str | None:
    is_module = isinstance(value, str) and all(_python_name(part) for part in value.split("."))
    return value if is_module else None


def _labels_preview(labels: list[str], shown: int = 5) -> str:
    """The first label names as Python literals, and how many more: a comment line, not a wall of names."""
    names = ", ".join(_python_literal(str(label)) for label in labels[:shown])
    return f"{names} and {len(labels) - shown} more" if len(labels) > shown else names


def render_model_card(config, **card_data) -> str:
    """The README.md of an adapter.

    `card_data` may hold dataset, metrics, command, trainable_parameters, repo_id (or adapter_id, the folder the
    snippet loads), num_labels, labels (class names, in label order), head (the trained head modules), title, tags,
    trainer_card (what `transformers.Trainer.create_model_card` wrote, kept by `write_model_card`), and what picks
    the usage snippet: `task` (one of `TASKS`) or else `base_model_class` (the class name of the model the adapter
    was trained on, see `card_task`), or else `config.auto_mapping` (PEFT records the base class there when it saves
    a model without a task type); `base_model_library` (the module of that class; default transformers) for the
    generic snippet's import. Everything method-specific comes from the method's `MethodSpec` (`hf_vpt.registry`).

    Strings from the config and the card data reach the Markdown only as inline code or escaped text on one line
    (and the snippet only as Python literals), so none of them can add a section or a code block. Up to
    INLINE_LABELS_MAX label names are written into the snippet's `id2label`; with more, the snippet reads them back
    with `adapter_labels` from the `hf_vpt_card.json` that `write_model_card` writes beside the adapter.
    """
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    spec = find_method_spec(config) or find_method_spec(peft_type)
    method_title = spec.title if spec else peft_type
    paper_title, paper_url = (spec.paper_title, spec.paper_url) if spec else (peft_type, "")
    method_tag = peft_type.lower().replace("_", "-")
    # An adapter config read from disk may carry anything in `auto_mapping`: only Python names reach the snippet.
    auto_mapping = getattr(config, "auto_mapping", None)
    auto_mapping = auto_mapping if isinstance(auto_mapping, dict) else {}
    base_model_class = _python_name(card_data.get("base_model_class") or auto_mapping.get("base_model_class"))
    library = _module_name(card_data.get("base_model_library") or auto_mapping.get("parent_library"))
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
    labels = [str(label) for label in card_data.get("labels") or []]
    id2label = dict(enumerate(labels)) if 0 < len(labels) <= INLINE_LABELS_MAX else None
    num_labels = card_data.get("num_labels") or len(labels) or None
    title = card_data.get("title") or f"{method_title} adapter"
    pipeline_tag = _pipeline_tag(task, base_model_class)
    tags = ["peft", "hf_vpt", method_tag, "vision-prompt-tuning", *(card_data.get("tags") or [])]
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
        base_model_library=(library or "transformers").split(".")[0],
        adapter_id=card_data.get("repo_id") or card_data.get("adapter_id") or "<this repo or folder>",
        component=component,
        task=task,
        tags=tags,
        summary=spec.summary(config) if spec else "a few learnable parameters",
        card_usage=spec.card_usage if spec else None,
        settings=_settings(config, hf_vpt_method, spec.card_settings if spec else ()),
        # save_pretrained passes the model's trained heads; a card written from the config alone reads them there
        head=card_data.get("head") or list(getattr(config, "modules_to_save", None) or []),
        dataset=card_data.get("dataset"),
        metrics=card_data.get("metrics"),
        command=card_data.get("command"),
        trainable_parameters=card_data.get("trainable_parameters"),
        num_labels=num_labels,
        id2label=id2label,
        labels_from_file=len(labels) > INLINE_LABELS_MAX,
        labels_preview=_labels_preview(labels),
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
# Card data derived from the model at save time (head, labels, base class): fresh on every save, never carried over
# (only this save's label names are written into CARD_DATA_FILE, for `adapter_labels`).
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


def written_by_hf_vpt(readme_path: str) -> bool:
    with open(readme_path, encoding="utf-8", errors="replace") as handle:
        return CARD_MARKER in handle.read()


def written_by_trainer(readme_path: str) -> bool:
    """A README.md that `transformers.Trainer.create_model_card` has just written (its draft comment is still in)."""
    with open(readme_path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    return CARD_MARKER not in text and trainer_card_comment() in text


def _trainer_card(card) -> dict:
    """The Trainer's card (a `huggingface_hub.ModelCard`) as card data: its YAML metadata and its text from the
    first section on."""
    text = card.text.replace(trainer_card_comment(), "")
    sections = text.split("\n## ", 1)  # the title and the "fine-tuned version of" line are hf_vpt's job
    body = ("## " + sections[1]) if len(sections) == 2 else text
    # Drop the draft's placeholder sections, and put the others one level deeper, under hf_vpt's "## Trainer".
    sections = re.split(r"\n(?=#+ )", body.strip())
    body = "\n".join(part for part in sections if part.split("\n", 1)[-1].strip() != "More information needed")
    body = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", body, flags=re.M)
    metadata = {k: v for k, v in card.data.to_dict().items() if k in TRAINER_METADATA_KEYS and v}
    return {"metadata": metadata, "text": body}


# The keys of `model_card_facts`: facts of the saved model, not training details to keep in CARD_DATA_FILE.
MODEL_FACT_KEYS = frozenset({"base_model_class", "base_model_library", "head", "num_labels", "labels"})
# The Trainer's YAML metadata that the merged card keeps.
TRAINER_METADATA_KEYS = ("model-index", "datasets", "tags", "license")
# hf_vpt writes a few kilobytes into CARD_DATA_FILE; a much bigger file is not hf_vpt's and is not read into memory.
CARD_DATA_MAX_BYTES = 16 * 2**20
# A model-index is about six levels deep; deeper metadata is refused before it can exhaust Python's recursion limit.
TRAINER_METADATA_MAX_DEPTH = 32


def _is_text(value) -> bool:
    return isinstance(value, str)


def _plain_caller_values(card_data: dict) -> dict:
    """A caller's (trusted) card data in the stored types: label names as strings (`labels=[0, 1, 2]`) and
    numpy integers as ints (`num_labels=np.int64(3)`). The stored file gets no such leniency."""
    data = dict(card_data)
    if isinstance(data.get("labels"), (list, tuple)):
        data["labels"] = [str(label) for label in data["labels"]]
    number = data.get("num_labels")
    if number is not None and not isinstance(number, (bool, int)) and hasattr(number, "__index__"):
        data["num_labels"] = int(number.__index__())
    return data


def _is_text_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_metrics(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(name, str) and (isinstance(result, str) or _is_number(result)) for name, result in value.items()
    )


def _nesting_depth(value) -> int:
    """How deeply lists and dicts nest in `value`, counted level by level (no recursion to run out of)."""
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
    return depth


def _trainer_results(metadata: dict) -> list | None:
    """The evaluation results in the Trainer's `model-index`, or None when huggingface_hub cannot read it."""
    from huggingface_hub import ModelCardData

    if _nesting_depth(metadata) > TRAINER_METADATA_MAX_DEPTH:
        return None
    try:
        return ModelCardData(**metadata).eval_results or []
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None


def _is_trainer_metadata(metadata) -> bool:
    if not isinstance(metadata, dict) or not set(metadata) <= set(TRAINER_METADATA_KEYS):
        return False
    names_ok = all(
        _is_text(metadata.get(key)) or _is_text_list(metadata.get(key) or []) for key in ("datasets", "tags")
    )
    license_ok = metadata.get("license") is None or _is_text(metadata["license"])
    return names_ok and license_ok and _trainer_results(metadata) is not None


def _is_trainer_card(value) -> bool:
    if not isinstance(value, dict) or not set(value) <= {"metadata", "text"}:
        return False
    return _is_text(value.get("text") or "") and _is_trainer_metadata(value.get("metadata") or {})


# Every key the card data may hold (in CARD_DATA_FILE or as `write_model_card` arguments): what its value must be,
# and the check. Checked before anything is rendered or written, so a wrong value never breaks a save halfway.
# The model facts are read fresh on every save; older hf_vpt versions stored them, so they are accepted here too.
CARD_DATA_RULES = {
    "task": (f"one of {sorted(TASKS)}", lambda value: _is_text(value) and value in TASKS),
    "dataset": ("a string", _is_text),
    "metrics": ("an object mapping metric names to numbers (or strings)", _is_metrics),
    "command": ("a string", _is_text),
    "trainable_parameters": ("a string or a number", lambda value: _is_text(value) or _is_number(value)),
    "repo_id": ("a string", _is_text),
    "adapter_id": ("a string", _is_text),
    "title": ("a string", _is_text),
    "tags": ("a list of strings", _is_text_list),
    "trainer_card": (
        'an object with "metadata" (model-index, datasets, tags and license, as huggingface_hub reads them) and '
        '"text" (a string)',
        _is_trainer_card,
    ),
    "base_model_class": ("a Python class name", lambda value: _python_name(value) is not None),
    "base_model_library": (
        'a Python module name such as "transformers"',
        lambda value: _module_name(value) is not None,
    ),
    "head": ("a list of module names (strings)", _is_text_list),
    "num_labels": ("a positive integer", _is_positive_int),
    "labels": ("a list of label names (strings)", _is_text_list),
}


def _check_card_data(data: dict, source: str, fix: str) -> None:
    """Raise a ValueError naming `source`, the key and `fix` for an unknown key or a value of the wrong type."""
    for key, value in data.items():
        if key not in CARD_DATA_RULES:
            raise ValueError(
                f"{source} holds an unknown model-card key {key!r}; the known keys are "
                f"{', '.join(sorted(CARD_DATA_RULES))}. {fix}"
            )
        expected, check = CARD_DATA_RULES[key]
        if value is not None and not check(value):
            raise ValueError(
                f"{source}: {key!r} must be {expected}, not {type(value).__name__} {reprlib.repr(value)}. {fix}"
            )


_CARD_DATA_FIX = (
    "Fix the file or delete it (hf_vpt then writes the card from the adapter config alone). Nothing was written."
)


def _load_card_data_file(data_path: str) -> dict:
    """CARD_DATA_FILE parsed and checked key by key (the load note left out)."""
    size = os.path.getsize(data_path)
    if size > CARD_DATA_MAX_BYTES:
        raise ValueError(
            f"'{data_path}' is {size:,} bytes, too big for the model-card details hf_vpt keeps there (a few "
            f"kilobytes). {_CARD_DATA_FIX}"
        )
    try:
        with open(data_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"'{data_path}' is not valid JSON ({exc}). hf_vpt keeps the model card's training details there. "
            f"{_CARD_DATA_FIX}"
        ) from exc
    except RecursionError:
        raise ValueError(
            f"'{data_path}' nests its JSON too deeply for Python to read; hf_vpt writes a flat object of model-card "
            f"details there. {_CARD_DATA_FIX}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"'{data_path}' holds a {type(data).__name__}, not the JSON object of model-card details hf_vpt writes. "
            f"{_CARD_DATA_FIX}"
        )
    data.pop(LOAD_NOTE_KEY, None)
    _check_card_data(data, f"'{data_path}'", _CARD_DATA_FIX)
    return data


def _refuse_links(save_directory: str) -> None:
    """hf_vpt rewrites CARD_DATA_FILE and README.md: through a symbolic link that would change the file it points to,
    wherever on the machine that is, and reading one would pull that file into the card."""
    for name in (CARD_DATA_FILE, "README.md"):
        path = os.path.join(save_directory, name)
        if os.path.islink(path):
            raise ValueError(
                f"'{path}' is a symbolic link (to '{os.readlink(path)}'); hf_vpt does not write model-card files "
                "through links, which would change the file it points to. Replace the link with a copy of the file "
                "or delete it, or save into another folder. Nothing was written."
            )


def _load_readme(readme_path: str):
    """README.md as huggingface_hub reads it (PEFT's card update and the Trainer merge read it so)."""
    import yaml
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme_path)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, yaml.YAMLError) as exc:
        problem = " ".join(str(exc).split())[:500]
        raise ValueError(
            f"'{readme_path}' has YAML metadata (the block between '---' lines at its top) that huggingface_hub "
            f"cannot read: {problem}. Saving an adapter updates that metadata: fix or remove the block, or move "
            "README.md out of the folder. Nothing was written."
        ) from exc


def read_card_data(save_directory: str) -> dict:
    """The model-card details kept in `save_directory`: the training details in `hf_vpt_card.json` and, when
    `transformers.Trainer` has just written README.md, its card (`trainer_card`); {} if there are none.

    `save_pretrained` calls it before anything is written, so every problem is named first: a symbolic link in place
    of either file, a card-data file that is not JSON, too big or nested too deeply, an unknown key or a value of the
    wrong type in it, or a README.md (not written by hf_vpt) whose YAML metadata cannot be read all raise a
    ValueError naming the file and the fix. Model facts an older hf_vpt stored are left out (they are read fresh).
    """
    save_directory = str(save_directory)
    _refuse_links(save_directory)
    data_path = os.path.join(save_directory, CARD_DATA_FILE)
    data = _load_card_data_file(data_path) if os.path.isfile(data_path) else {}
    data = {key: value for key, value in data.items() if key not in MODEL_FACT_KEYS}
    readme = os.path.join(save_directory, "README.md")
    if os.path.isfile(readme) and not written_by_hf_vpt(readme):
        card = _load_readme(readme)
        if written_by_trainer(readme):
            data["trainer_card"] = _trainer_card(card)
            fix = "Fix its YAML metadata or move README.md out of the folder. Nothing was written."
            _check_card_data({"trainer_card": data["trainer_card"]}, f"The Trainer's card in '{readme}'", fix)
    return data


def adapter_labels(adapter: str, **hub_kwargs) -> list[str]:
    """The label names of the head trained with an adapter, in label order, from the `hf_vpt_card.json` saved beside
    it: the model card's snippet builds `id2label` from them when there are more than INLINE_LABELS_MAX.

    `adapter` is a local folder or a Hub repo id; `hub_kwargs` (`revision`, `token`, ...) go to
    `huggingface_hub.hf_hub_download`.
    """
    adapter = str(adapter)
    if os.path.isdir(adapter):
        data_path = os.path.join(adapter, CARD_DATA_FILE)
    else:
        from huggingface_hub import hf_hub_download

        data_path = hf_hub_download(adapter, CARD_DATA_FILE, **hub_kwargs)
    labels = _load_card_data_file(data_path).get("labels") if os.path.isfile(data_path) else None
    if not labels:
        raise ValueError(
            f"'{data_path}' holds no label names (hf_vpt writes them there when it saves an adapter whose trained "
            "head has named labels). Pass the names yourself: `id2label=dict(enumerate(names))`."
        )
    return list(labels)


def _users_readme(readme_path: str) -> bool:
    return os.path.isfile(readme_path) and not written_by_hf_vpt(readme_path) and not written_by_trainer(readme_path)


def _replace_file(path: str, text: str) -> None:
    """Write `text` into a new file that then takes the place of `path`: a failure never leaves `path` truncated, and
    a link at `path` would be replaced, never written through."""
    temporary = f"{path}.{secrets.token_hex(4)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _recorded_base_class(save_directory: str) -> dict:
    """The class PEFT records in `auto_mapping` of the adapter_config.json it has just written, as card data."""
    config_path = os.path.join(save_directory, "adapter_config.json")
    if not os.path.isfile(config_path):
        return {}
    with open(config_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    auto_mapping = (saved.get("auto_mapping") if isinstance(saved, dict) else None) or {}
    if not isinstance(auto_mapping, dict) or not auto_mapping.get("base_model_class"):
        return {}
    return {
        "base_model_class": auto_mapping["base_model_class"],
        "base_model_library": auto_mapping.get("parent_library") or "transformers",
    }


def write_model_card(save_directory: str, config, *, model=None, **card_data) -> str:
    """Write README.md for the adapter in `save_directory`; training details given once are kept on re-save.

    `model` (the PeftModel the adapter was saved from) adds what the card learns from the model itself
    (`model_card_facts`: base class, trained heads, label count and names); `save_pretrained` passes it on its own.

    A README.md that hf_vpt did not write (no `CARD_MARKER`) is the user's: it is kept as it is (PEFT has already
    added its metadata, as it does for every adapter). One that `transformers.Trainer.create_model_card` wrote is
    merged: its metadata (metrics in `model-index`, datasets, tags, license) and its sections are kept in
    `hf_vpt_card.json` and rendered below hf_vpt's card, so a `Trainer` push keeps the import line and the snippet.

    Everything is checked (`read_card_data`, the arguments) and the card is rendered in memory before a file is
    written; each file then replaces the old one whole.
    """
    save_directory = str(save_directory)
    data_path = os.path.join(save_directory, CARD_DATA_FILE)
    path = os.path.join(save_directory, "README.md")
    stored = read_card_data(save_directory)
    if KEEP_USER_MODEL_CARD.get() and _users_readme(path):
        return path
    card_data = _plain_caller_values(card_data)
    _check_card_data(
        card_data, "write_model_card()", "Pass each detail as `render_model_card` documents it. Nothing was written."
    )
    # What the model says about itself (head, labels, base class) is read fresh on every save, so a re-save of another
    # model into the folder cannot show the old one's labels; stored training details (dataset, metrics, command) are
    # kept, and what this call passes wins over both.
    facts = model_card_facts(model) if model is not None else MODEL_CARD_FACTS.get()
    render_data = {**stored, **(facts or {}), **card_data}
    render_data.setdefault("adapter_id", save_directory)
    if "base_model_class" not in render_data:
        # read again on every save, so it is not copied into CARD_DATA_FILE
        render_data.update(_recorded_base_class(save_directory))
    card = render_model_card(config, **render_data).rstrip("\n") + f"\n\n{CARD_MARKER}\n"
    kept = {key: value for key, value in {**stored, **card_data}.items() if key not in MODEL_FACT_KEYS}
    if render_data.get("labels"):
        # this save's label names, for `adapter_labels` (the snippet's id2label); never carried over to the next save
        kept["labels"] = [str(label) for label in render_data["labels"]]
    _replace_file(data_path, json.dumps({LOAD_NOTE_KEY: LOAD_NOTE, **kept}, indent=2, sort_keys=True))
    _replace_file(path, card)
    return path
