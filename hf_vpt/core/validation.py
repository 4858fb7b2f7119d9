"""Typed checks of config fields, in one place: used when a config is built and when it is read from JSON.

A config class declares `FIELD_RULES = {field name: rule}`; `PromptConfigBase.__post_init__` applies the rules of
the class and of its bases before any other check, so `True`, `"0.1"`, NaN, `inf` or a 2**40 prompt count never
reach torch. Every message names the field, the value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


# Upper bounds that no real adapter comes near (VPT uses up to 200 prompts, APT a rank of 4, the generative
# prompts 32-128) but that stop a typo or a hostile adapter_config.json before it reaches the allocator.
MAX_PROMPT_TOKENS = 4096
MAX_WIDTH = 65536
MAX_CLASSES = 1_000_000
MAX_LAYERS = 4096


class ConfigValueError(ValueError):
    """A config field has a value of the wrong type or outside its range."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _fail(name: str, value, allowed: str) -> ConfigValueError:
    return ConfigValueError(f"`{name}` must be {allowed}; got {value!r}.")


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    optional: bool = False
    note: str = ""

    def describe(self) -> str:
        if self.low == 1:
            text = f"a positive integer (at most {self.high})"
        elif self.low == 0:
            text = f"0 or a positive integer (at most {self.high})"
        else:
            text = f"an integer in [{self.low}, {self.high}]"
        return text + (" or None" if self.optional else "") + (f"; {self.note}" if self.note else "")

    def check(self, name: str, value):
        if value is None and self.optional:
            return None
        if not _is_int(value) or not self.low <= value <= self.high:
            raise _fail(name, value, self.describe())
        return int(value)


@dataclass(frozen=True)
class Real:
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    text: str = ""  # how to say the range, when a plainer phrase helps; the interval is added

    def describe(self) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        interval = f"{left}{self.low:g}, {self.high:g}{right}"
        return f"{self.text} in {interval}" if self.text else f"in {interval} (a finite number)"

    def check(self, name: str, value):
        ok = _is_real(value)
        if ok:
            ok = (value > self.low if self.low_open else value >= self.low) and (
                value < self.high if self.high_open else value <= self.high
            )
        if not ok:
            raise _fail(name, value, self.describe())
        return float(value)


@dataclass(frozen=True)
class Bool:
    def check(self, name: str, value):
        if not isinstance(value, bool):
            raise _fail(name, value, "True or False")
        return value


@dataclass(frozen=True)
class OptionalStr:
    def check(self, name: str, value):
        if value is not None and not isinstance(value, str):
            raise _fail(name, value, "a string or None")
        return value


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def check(self, name: str, value):
        if not isinstance(value, str) or value not in self.values:
            raise _fail(name, value, f"one of {self.values}")
        return value


@dataclass(frozen=True)
class StrList:
    """None or a list of strings (a single string is taken as a one-element list); `choices` limits the values."""

    choices: tuple[str, ...] | None = None

    def check(self, name: str, value):
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        allowed = f"a non-empty list of strings{f' drawn from {self.choices}' if self.choices else ''}, or None"
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            raise _fail(name, value, allowed)
        if self.choices and any(v not in self.choices for v in value):
            raise _fail(name, list(value), allowed)
        return list(value)


@dataclass(frozen=True)
class TowerShapes:
    """None or {tower kind: [number of blocks, hidden size]}, as hf_vpt records it when an adapter is created."""

    kinds: tuple[str, ...]

    def check(self, name: str, value):
        if value is None:
            return None
        allowed = (
            f"None or a mapping {{tower kind in {self.kinds}: [number of blocks in [1, {MAX_LAYERS}], hidden size in "
            f"[1, {MAX_WIDTH}]]}} (hf_vpt records it; restore the adapter_config.json that was saved with the "
            "weights)"
        )
        if not isinstance(value, dict) or not value:
            raise _fail(name, value, allowed)
        checked = {}
        for kind, shape in value.items():
            if (
                kind not in self.kinds
                or not isinstance(shape, (list, tuple))
                or len(shape) != 2
                or not all(_is_int(v) for v in shape)
                or not 1 <= shape[0] <= MAX_LAYERS
                or not 1 <= shape[1] <= MAX_WIDTH
            ):
                raise _fail(name, value, allowed)
            checked[kind] = [int(shape[0]), int(shape[1])]
        return checked


def apply_field_rules(config) -> None:
    """Check (and normalise) every field that a rule of the config's class or its bases covers."""
    rules: dict = {}
    for cls in reversed(type(config).__mro__):
        rules.update(getattr(cls, "FIELD_RULES", {}) if "FIELD_RULES" in vars(cls) else {})
    for name, rule in rules.items():
        setattr(config, name, rule.check(name, getattr(config, name)))
