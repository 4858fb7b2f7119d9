"""One registry of what hf_vpt knows about each method: read by the model cards, FLOP counts, recipes and benches.

A method declares itself once, in its folder's `__init__.py`, with one `register(MethodSpec(...))` line; the
baselines the recipes train next to the methods (linear probing, LoRA, full fine-tuning) are declared in
`hf_vpt/baselines.py` through the same functions. Nothing else in hf_vpt, `recipes/` or `bench/` keeps a list of
methods, titles or config factories: they ask this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from . import _registry


TRAINS = ("adapter", "head", "all")
# What a variant adapts a model for: image classification (a ViT and its kin), vision-language understanding (ViLT's
# joint transformer: VQA, NLVR2), text-to-image (the text encoder of a Stable Diffusion pipeline), and generation.
TASKS = ("image-classification", "vision-language", "text-to-image", "class-conditional-generation")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainingVariant:
    """One trainable setting the recipes and benches offer under a command-line name (`--method vpt_deep`).

    `build_config(model, *, num_prompt_tokens, head_modules, **overrides)` returns the PEFT config to apply to
    `model` (`head_modules` go to `modules_to_save`; `overrides` are fields of the config, e.g. `rank=4`); methods
    without prompt tokens (LoRA) ignore `num_prompt_tokens`. It is None for the variants that apply no adapter
    (`trains` "head" or "all"). `optimizer`, `learning_rate` and `weight_decay` are the recipes' defaults for a
    real pretrained backbone, measured as `defaults_source` says.
    """

    name: str
    title: str
    trains: str
    optimizer: str
    learning_rate: float
    weight_decay: float
    defaults_source: str
    build_config: Callable | None
    # What the variant adapts a model for (`TASKS`); the recipes and benches offer the variants of their task. The
    # learning-rate defaults were measured on the first.
    tasks: tuple[str, ...] = ("image-classification",)
    # Set by `register`: the `MethodSpec.name` this variant belongs to (None for linear probing and full tuning).
    method: str | None = None

    def __post_init__(self):
        unknown = [task for task in self.tasks if task not in TASKS] if isinstance(self.tasks, tuple) else [self.tasks]
        if unknown or not self.tasks:
            raise ValueError(
                f"TrainingVariant {self.name!r}: `tasks` must be a non-empty tuple of {TASKS}; got {self.tasks!r}."
            )
        if self.trains not in TRAINS:
            raise ValueError(f"TrainingVariant {self.name!r}: `trains` must be one of {TRAINS}; got {self.trains!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"TrainingVariant {self.name!r}: `optimizer` must be one of {OPTIMIZERS}; got {self.optimizer!r}."
            )
        if (self.build_config is None) != (self.trains != "adapter"):
            raise ValueError(
                f"TrainingVariant {self.name!r}: a variant that trains an adapter needs a `build_config`, and one "
                f"that trains {self.trains!r} takes none."
            )

    @property
    def config_cls(self) -> type | None:
        """The PEFT config class `build_config` returns (None for linear probing and full fine-tuning)."""
        return method_spec(self.method).config_cls if self.method else None

    def accepts(self, option: str) -> bool:
        """Whether `build_config` takes `option` as an override (a field of its config class, e.g. "readout")."""
        cls = self.config_cls
        return cls is not None and option in {item.name for item in dataclasses.fields(cls)}


# Where the image-classification defaults come from (the `defaults_source` of the variants measured there).
MEASURED_ON_REAL_VIT = (
    "bench/recipe_defaults.py (bench/results/recipe_defaults.json): a learning-rate sweep on the ImageNet ViT-Ti/16 "
    "AugReg of ../shared/weights, 400 digits (40 per class) at 64 px, batch 32, 10 epochs, warm-up 1 epoch then "
    "cosine; the chosen setting confirmed on DeiT-Tiny and on ViT-Ti at 224 px"
)


def adapter_variant(
    name: str,
    title: str,
    config_cls: type,
    *,
    optimizer: str,
    learning_rate: float,
    weight_decay: float,
    defaults_source: str,
    tasks: tuple[str, ...] = ("image-classification",),
    **fixed_fields,
) -> TrainingVariant:
    """A variant that trains the adapter `config_cls(num_prompt_tokens=..., **fixed_fields)`, the classification head
    (`head_modules`) in `modules_to_save`: the usual shape of a prompt method's variant (`fixed_fields` e.g.
    `depth="deep"` tell two variants of one config apart; a caller's overrides win over them)."""

    def build_config(model, *, num_prompt_tokens: int, head_modules, **overrides):
        fields = {**fixed_fields, **overrides}
        return config_cls(num_prompt_tokens=num_prompt_tokens, modules_to_save=list(head_modules) or None, **fields)

    return TrainingVariant(
        name=name,
        title=title,
        trains="adapter",
        optimizer=optimizer,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        defaults_source=defaults_source,
        build_config=build_config,
        tasks=tasks,
    )


@dataclass(frozen=True)
class MethodSpec:
    """One PEFT method as hf_vpt describes it, declared in the method's folder.

    `summary(config)` is the card's one-line description of what the adapter adds; `card_usage` extra lines for the
    end of the card's usage snippet (they may use `model`, the loaded PeftModel); `flops(tower, config, *, seq_len,
    batch_size, mode)` the extra forward FLOPs of the adapter on one prompted tower (`hf_vpt.flops`), or None when
    the method has no closed-form count. `peft_builtin` marks PEFT's own methods (LoRA), which hf_vpt describes but
    does not register with PEFT.
    """

    name: str
    peft_type: str
    config_cls: type
    model_cls: type
    title: str
    paper_title: str
    paper_url: str
    summary: Callable
    card_usage: str | None
    flops: Callable | None
    variants: tuple[TrainingVariant, ...] = ()
    peft_builtin: bool = False
    # The config fields the card's settings table always shows (PEFT's own configs have dozens; by default the card
    # shows an hf_vpt config's set fields, and only the non-default ones of a PEFT config).
    card_settings: tuple[str, ...] = ()


_METHODS: dict[str, MethodSpec] = {}  # by name
_BASELINES: dict[str, TrainingVariant] = {}  # variants that belong to no method (linear, full)


def register(spec: MethodSpec):
    """Declare a method (its folder's one registration line) and register it with PEFT; returns its `PeftType`.

    Registering the same name again replaces the entry (a notebook that re-imports a module).
    """
    if spec.peft_type != spec.peft_type.upper():
        raise ValueError(f"MethodSpec {spec.name!r}: `peft_type` must be upper case; got {spec.peft_type!r}.")
    if not spec.peft_builtin and spec.peft_type != spec.name.upper():
        raise ValueError(
            f"MethodSpec {spec.name!r}: `peft_type` must be the upper-cased name ({spec.name.upper()!r}), as PEFT "
            f"looks it up from adapter_config.json; got {spec.peft_type!r}."
        )
    variants = tuple(dataclasses.replace(variant, method=spec.name) for variant in spec.variants)
    for variant in variants:
        _check_variant_name(variant, owner=spec.name)
    if spec.peft_builtin:
        peft_type = _registry.peft_type(spec.peft_type.lower())
    else:
        peft_type = _registry.register_method(spec.name, spec.config_cls, spec.model_cls)
    _METHODS[spec.name] = dataclasses.replace(spec, variants=variants)
    return peft_type


def unregister(name: str) -> None:
    """Forget a method declared with `register` (tests declare throw-away methods). PEFT has no way to forget a
    registration, so PEFT still knows its peft_type; hf_vpt's cards, FLOPs, recipes and benches no longer do."""
    if name not in _METHODS:
        raise ValueError(f"No registered method {name!r}; registered: {', '.join(_METHODS)}.")
    del _METHODS[name]


def register_variant(variant: TrainingVariant) -> TrainingVariant:
    """Declare a training variant that applies no PEFT method (linear probing, full fine-tuning)."""
    if variant.trains == "adapter":
        raise ValueError(
            f"TrainingVariant {variant.name!r} trains an adapter: declare it in its method's `MethodSpec.variants`."
        )
    _check_variant_name(variant, owner=None)
    _BASELINES[variant.name] = variant
    return variant


def _check_variant_name(variant: TrainingVariant, owner: str | None) -> None:
    for existing in training_variants():
        if existing.name == variant.name and existing.method != owner:
            raise ValueError(
                f"Training variant {variant.name!r} is already declared by "
                f"{existing.method or 'the baselines'}; choose another name."
            )


def registered_methods() -> tuple[MethodSpec, ...]:
    """Every registered method, hf_vpt's own and the PEFT baselines, in registration order."""
    return tuple(_METHODS.values())


def find_method_spec(key) -> MethodSpec | None:
    """Like `method_spec`, but None for a method nobody registered (e.g. one of PEFT's other methods)."""
    if isinstance(key, str):  # a name, a peft_type string or a PeftType member (a str enum)
        text = str(getattr(key, "value", key))
        for spec in _METHODS.values():
            if text in (spec.name, spec.peft_type):
                return spec
        return None
    cls = key if isinstance(key, type) else type(key)
    for base in cls.__mro__:  # the closest registered class: GatedPromptConfig before its parent VisualPromptConfig
        for spec in _METHODS.values():
            if spec.config_cls is base:
                return spec
    return None


def method_spec(key) -> MethodSpec:
    """The spec of a method, by name ("visual_prompt"), peft_type ("VISUAL_PROMPT"), or config instance or class."""
    spec = find_method_spec(key)
    if spec is None:
        shown = key if isinstance(key, str) else getattr(key, "__name__", type(key).__name__)
        known = ", ".join(f"{spec.name} ({spec.peft_type})" for spec in _METHODS.values())
        raise ValueError(f"No registered method for {shown!r}; hf_vpt knows: {known}.")
    return spec


def training_variants(task: str | None = None) -> tuple[TrainingVariant, ...]:
    """The variants of every registered method, then the baselines without a method; only those of `task` (one of
    `TASKS`) when it is given."""
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of: {', '.join(TASKS)}.")
    variants = (*(variant for spec in _METHODS.values() for variant in spec.variants), *_BASELINES.values())
    return tuple(variant for variant in variants if task is None or task in variant.tasks)


def training_variant(name: str) -> TrainingVariant:
    """The training variant called `name` ("vpt_deep", "linear", ...); a ValueError lists the choices."""
    for variant in training_variants():
        if variant.name == name:
            return variant
    choices = ", ".join(variant.name for variant in training_variants())
    raise ValueError(f"Unknown training variant {name!r}; choose one of: {choices}.")
