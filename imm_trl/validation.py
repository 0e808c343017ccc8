"""Checks of user-given settings, driven by the dataclass field annotations: one rule per
field name, so `IMMConfig`, `RejectionSamplingConfig`, `SamplingParams` and the recipe
sections all say the same thing about the same setting.

    check_dataclass(config)                     # in a dataclass's __post_init__
    check_values("peft", {"r": "sixteen"}, LoraConfig)   # raw values against a class's fields

Imports nothing heavy: `imm-trl merge --help` must not import torch.
"""

from __future__ import annotations

import argparse
import numbers
import os
import tempfile
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Interval:
    """The allowed range of a number; a None end is unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE_INT = Interval(1)
# The range of every numeric setting, by field name, wherever the field appears.
RANGES: dict[str, Interval] = {
    "iterations": POSITIVE_INT,
    "samples_per_question": POSITIVE_INT,
    "max_correct_per_question": POSITIVE_INT,
    "max_new_tokens": POSITIVE_INT,
    "eval_samples": POSITIVE_INT,
    "save_total_limit": POSITIVE_INT,
    "merge_every_steps": POSITIVE_INT,
    "n_train": POSITIVE_INT,
    "n_eval": POSITIVE_INT,
    "epochs_per_iteration": Interval(0, low_open=True),
    "verifier_time_limit_s": Interval(0, low_open=True),
    "temperature": Interval(0),
    "top_p": Interval(0, 1, low_open=True),
    "density": Interval(0, 1, low_open=True),
    "real_data_ratio": Interval(0, 1, high_open=True),
}
# Text settings that name something (a column, a model) and so cannot be empty.
NON_EMPTY_TEXT = frozenset({"question_column", "gold_column", "solution_column"})


def describe(annotation: Any) -> str:
    """A type annotation in words: `int | None` -> 'an integer or None'."""
    if annotation is type(None):
        return "None"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin in (list, tuple):
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    return getattr(annotation, "__name__", str(annotation))


def matches(value: Any, annotation: Any) -> bool:
    """Whether `value` fits `annotation`: int means an integer (not a bool), float any real
    number, list[X]/tuple[X, ...] a list or tuple of X; what this cannot read is accepted."""
    if annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, Mapping)
    if origin is Callable or annotation is Callable:
        return callable(value)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def field_default(cls: type, name: str) -> Any:
    """A dataclass field's default (MISSING if it has none)."""
    spec = cls.__dataclass_fields__[name]
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default


def fix_hint(cls: type, name: str) -> str:
    """How to fix a bad value: the field's default as an example."""
    default = field_default(cls, name)
    return "" if default is MISSING else f"; e.g. {name}={default!r} (the default)"


def check_value(owner: str, cls: type, name: str, value: Any, annotation: Any) -> None:
    """Raise a TypeError if `value` does not fit `annotation`, a ValueError if it is outside
    the field's range (`RANGES`) or empty where text must name something."""
    if not matches(value, annotation):
        hint = "; write true or false without quotes" if annotation is bool else ""
        raise TypeError(
            f"{owner}.{name} must be {describe(annotation)} (got {value!r}, a "
            f"{type(value).__name__}){hint or fix_hint(cls, name)}"
        )
    interval = RANGES.get(name)
    if interval is not None and isinstance(value, numbers.Real) and value not in interval:
        raise ValueError(f"{owner}.{name} must be {interval} (got {value!r}){fix_hint(cls, name)}")
    if name in NON_EMPTY_TEXT and isinstance(value, str) and not value.strip():
        raise ValueError(f"{owner}.{name} is empty (got {value!r}){fix_hint(cls, name)}")


def annotations_of(cls: type) -> dict[str, Any]:
    """Resolved field annotations of a dataclass (none if they cannot be resolved)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation naming a type its module only imports for checking
        return {}


def check_values(owner: str, values: Mapping[str, Any], cls: type) -> None:
    """Check raw `values` meant for dataclass `cls` (a recipe section) against its fields."""
    hints = annotations_of(cls)
    for name, value in values.items():
        if name in hints:
            check_value(owner, cls, name, value, hints[name])


def check_dataclass(obj: Any) -> None:
    """Check every field of the dataclass instance `obj` against its annotation and range."""
    assert is_dataclass(obj)
    cls = type(obj)
    check_values(cls.__name__, {f.name: getattr(obj, f.name) for f in fields(obj)}, cls)


def check_choice(owner: str, value: Any, choices: typing.Iterable[str]) -> Any:
    """Return `value` if it is one of `choices`, else raise a ValueError listing them."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{owner} must be one of {', '.join(choices)} (got {value!r})")
    return value


def check_writable_dir(path: str | os.PathLike, owner: str) -> None:
    """Raise if a directory cannot be created or written at `path`: tried for real (a
    temporary directory made and removed in the nearest existing ancestor), since
    `os.access` says yes to root everywhere, /proc included."""
    ancestor = Path(path).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(
            f"{owner} {str(path)!r} is under the file {ancestor}; choose a directory path"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".imm-trl-write-check-", dir=ancestor))
    except OSError as error:
        raise PermissionError(
            f"{owner} {str(path)!r} is not writable ({ancestor}: {error.strerror}); "
            "choose a directory you can write to"
        ) from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {text!r})")
    return value
