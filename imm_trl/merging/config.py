"""Merge settings: the method, the ratio (a number, a per-layer map, or a per-iteration
schedule of either), and checks that turn config typos into errors that name the fix.

A ratio map gives alpha per parameter name. Keys are tried in the order given; the first
that matches a parameter decides its ratio, and `"default"` covers the rest:

    {"layers.0-7": 0.3, "layers.8-": 0.6, "mlp": 0.4, "default": 0.5}

- `<prefix>.A-B`, `<prefix>.A-`, `<prefix>.A`: decoder-layer index range (inclusive) after
  the name segment `<prefix>` (e.g. `layers`, `h`), so `layers.0-7` matches
  `model.layers.3.self_attn.q_proj.weight`.
- a key with `*` or `?`: a glob over the whole name (`*.q_proj.*`).
- anything else: matches names containing it as whole dot-separated segments (`mlp`,
  `self_attn.q_proj`, `lm_head`).

A depth rule gives alpha as a straight line over decoder-layer depth, as LiNeS does:

    {"depth": [0.2, 0.8]}                  # layer 0 gets 0.2, the last layer 0.8
    {"depth": [0.2, 0.8], "default": 0.5}  # parameters outside the layers (embeddings, norm)

Parameters outside the decoder layers get `default` (the mean of the two ends if not given).
A depth rule needs the model's layer count, so it is expanded into a per-layer map
(`expand_depth_rules`) once the model is known.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from imm_trl.merging.methods import (  # noqa: F401 (MERGE_METHODS, MergeMethod: re-exported)
    MERGE_METHODS,
    METHOD_TABLE,
    MergeMethod,
    merge_method,
)
from imm_trl.validation import RANGES

Ratio = float | Mapping[str, float]
RatioSchedule = Ratio | Sequence[Ratio]

# The methods whose delta operator reads `density`; linear keeps every element.
DENSITY_METHODS = tuple(name for name, method in METHOD_TABLE.items() if method.uses_density)
DEFAULT_DENSITY = 0.8  # the paper's DARE drop rate 0.2

_RANGE_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<start>\d+)(?P<dash>-)?(?P<end>\d+)?$")


def check_method(method: str) -> str:
    """Return `method` if it is a known merge method, else raise a ValueError naming the choices."""
    return merge_method(method).name


def check_density(density: float) -> float:
    """Return `density` if it is in (0, 1], else raise a ValueError that says so."""
    if (
        isinstance(density, bool)
        or not isinstance(density, (int, float))
        or density not in RANGES["density"]
    ):
        raise ValueError(
            f"density must be in (0, 1] (the fraction of delta elements kept), got {density!r}; "
            "e.g. density=0.8 keeps 80% (the paper's DARE drop rate 0.2)"
        )
    return float(density)


def default_density(method: str) -> float:
    """The density used when none is given: DEFAULT_DENSITY for DARE/TIES, 1.0 for linear."""
    return DEFAULT_DENSITY if merge_method(method).uses_density else 1.0


def check_density_applies(method: str, density: float | None) -> None:
    """Raise a ValueError if `density` < 1 is given with a method that ignores it."""
    if density is not None and not merge_method(method).uses_density and density < 1.0:
        raise ValueError(
            f"density applies only to {', '.join(DENSITY_METHODS)} (got density={density!r} with "
            f"merge method {method!r}, which keeps every element); remove density or choose "
            "one of those methods"
        )


def check_ratio_value(value: float, where: str = "ratio") -> float:
    """Return `value` as float if it is a finite number >= 0, else raise a ValueError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"{where} must be a finite number >= 0 (the merge ratio alpha), got {value!r}; e.g. "
            "0.5, or a per-layer map {'layers.0-7': 0.3, 'default': 0.5}"
        )
    return float(value)


@dataclass(frozen=True)
class RatioRule:
    """One key of a ratio map, parsed."""

    key: str
    ratio: float
    prefix: str | None = None  # layer-range rules: the segment before the index
    first: int | None = None
    last: int | None = None  # None: open-ended

    def matches(self, name: str) -> bool:
        """Whether this rule applies to parameter `name`."""
        if self.prefix is not None:
            return _layer_index_matches(name, self.prefix, self.first, self.last)
        if any(ch in self.key for ch in "*?["):
            return fnmatch.fnmatchcase(name, self.key)
        return f".{self.key}." in f".{name}."


def _layer_index_matches(name: str, prefix: str, first: int, last: int | None) -> bool:
    wrapped = f".{name}."
    marker = f".{prefix}."
    position = wrapped.find(marker)
    while position != -1:
        rest = wrapped[position + len(marker) :]
        index_text = rest.split(".", 1)[0]
        if index_text.isdigit():
            index = int(index_text)
            return index >= first and (last is None or index <= last)
        position = wrapped.find(marker, position + 1)
    return False


def parse_ratio_rule(key: str, value: float) -> RatioRule:
    """Parse one ratio-map entry; raise a ValueError for bad range syntax."""
    ratio = check_ratio_value(value, f"ratio for {key!r}")
    last_segment = key.rsplit(".", 1)[-1]
    if "-" not in last_segment and not re.fullmatch(r"\d+", last_segment):
        return RatioRule(key=key, ratio=ratio)
    match = _RANGE_KEY.match(key)
    if match is None:
        raise ValueError(
            f"bad layer range {key!r} in ratio map; write '<prefix>.A-B', '<prefix>.A-' or "
            "'<prefix>.A' with integer layer indices, e.g. 'layers.0-7' or 'layers.8-'"
        )
    first = int(match["start"])
    if match["dash"] is None:
        last: int | None = first
    else:
        last = int(match["end"]) if match["end"] is not None else None
    if last is not None and last < first:
        raise ValueError(
            f"bad layer range {key!r}: the end {last} is below the start {first}; write 'layers.{last}-{first}'"
        )
    return RatioRule(key=key, ratio=ratio, prefix=match["prefix"], first=first, last=last)


@dataclass(frozen=True)
class RatioMap:
    """A parsed ratio map: ordered rules plus the default ratio."""

    rules: tuple[RatioRule, ...]
    default: float

    def ratio_for(self, name: str) -> float:
        """Alpha for parameter `name`: the first matching rule's, else the default."""
        for rule in self.rules:
            if rule.matches(name):
                return rule.ratio
        return self.default


LAYER_PREFIX = "layers"


def layer_index(name: str, prefix: str = LAYER_PREFIX) -> int | None:
    """The decoder-layer index in a parameter name (`model.layers.3.mlp...` -> 3), or None."""
    parts = name.split(".")
    for position, part in enumerate(parts[:-1]):
        if part == prefix and parts[position + 1].isdigit():
            return int(parts[position + 1])
    return None


def is_depth_rule(ratio) -> bool:
    return isinstance(ratio, Mapping) and "depth" in ratio


def check_depth_rule(rule: Mapping) -> tuple[float, float, float]:
    """(first, last, default) of a depth rule; a ValueError naming the fix if it is malformed."""
    unknown = sorted(set(rule) - {"depth", "default"})
    ends = rule.get("depth")
    if unknown or not isinstance(ends, (list, tuple)) or len(ends) != 2:
        raise ValueError(
            f"bad depth rule {dict(rule)!r}; write {{'depth': [first_layer_ratio, "
            "last_layer_ratio]}, optionally with 'default' for parameters outside the layers"
        )
    first = check_ratio_value(ends[0], "depth rule first-layer ratio")
    last = check_ratio_value(ends[1], "depth rule last-layer ratio")
    default = check_ratio_value(rule.get("default", (first + last) / 2), "depth rule 'default'")
    return first, last, default


def expand_depth_rule(rule: Mapping, names: Sequence[str]) -> dict[str, float]:
    """A depth rule as a per-layer ratio map over the decoder layers found in `names`:
    layer i of L gets first + (last - first) * i / (L - 1)."""
    first, last, default = check_depth_rule(rule)
    indices = sorted({i for name in names if (i := layer_index(name)) is not None})
    if not indices:
        raise ValueError(
            f"the depth rule {dict(rule)!r} needs decoder layers named '{LAYER_PREFIX}.<i>', and "
            f"none of the merged parameters is (e.g. {', '.join(list(names)[:3])}); use a number "
            "or a per-layer map"
        )
    count = indices[-1] + 1
    span = max(count - 1, 1)
    mapping = {f"{LAYER_PREFIX}.{i}": first + (last - first) * i / span for i in range(count)}
    return {**mapping, "default": default}


def expand_depth_rules(schedule: RatioSchedule, names: Sequence[str]) -> RatioSchedule:
    """`schedule` with every depth rule replaced by its per-layer map over `names`."""
    if isinstance(schedule, (list, tuple)):
        return [expand_depth_rules(entry, names) for entry in schedule]
    return expand_depth_rule(schedule, names) if is_depth_rule(schedule) else schedule


def parse_ratio(ratio: Ratio | RatioMap) -> RatioMap:
    """A number or a `{pattern: ratio, "default": ratio}` mapping, as a `RatioMap`."""
    if isinstance(ratio, RatioMap):
        return ratio
    if is_depth_rule(ratio):
        raise ValueError(
            f"the depth rule {dict(ratio)!r} must be expanded with the model's parameter names "
            "first (expand_depth_rules)"
        )
    if isinstance(ratio, Mapping):
        if "default" not in ratio:
            raise ValueError(
                f"ratio map {dict(ratio)!r} has no 'default' entry; add one, e.g. "
                "{'layers.0-7': 0.3, 'default': 0.5}, so every parameter gets a ratio"
            )
        rules = tuple(parse_ratio_rule(str(k), v) for k, v in ratio.items() if k != "default")
        return RatioMap(rules=rules, default=check_ratio_value(ratio["default"], "ratio 'default'"))
    return RatioMap(rules=(), default=check_ratio_value(ratio))


def unmatched_patterns(ratio_map: RatioMap, names: Sequence[str]) -> list[str]:
    """The keys of `ratio_map` that match none of the parameter `names`."""
    return [rule.key for rule in ratio_map.rules if not any(rule.matches(n) for n in names)]


def check_ratio_patterns(schedule: RatioSchedule, names: Sequence[str], what: str) -> None:
    """Raise a ValueError naming every ratio-map key that matches none of `names` (the
    parameters merged, described by `what`): such a key would silently leave them at the
    default ratio."""
    entries = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule]
    unmatched = {
        key: None for entry in entries for key in unmatched_patterns(parse_ratio(entry), names)
    }
    if unmatched:
        raise ValueError(
            f"merge ratio pattern(s) {list(unmatched)} match none of the {len(names)} parameters "
            f"merged ({what}, e.g. {', '.join(list(names)[:3])}); fix the pattern, e.g. "
            "'layers.0-7', 'mlp' or '*.q_proj.*'"
        )


def ratio_for_iteration(schedule: RatioSchedule, iteration: int) -> RatioMap:
    """The ratio map of IMM iteration `iteration` (1-based, as t in docs/design.md).

    `schedule` is one ratio (number or map) used every iteration, or a list with one entry
    per iteration.
    """
    if iteration < 1:
        raise ValueError(f"iterations count from 1, got {iteration}")
    if isinstance(schedule, (list, tuple)):
        if not schedule:
            raise ValueError("the ratio schedule is empty; give one ratio per iteration")
        if iteration > len(schedule):
            raise ValueError(
                f"the ratio schedule has {len(schedule)} entries but iteration {iteration} was "
                f"requested; give one ratio per iteration (or a single ratio for all)"
            )
        return parse_ratio(schedule[iteration - 1])
    return parse_ratio(schedule)


def check_schedule(schedule: RatioSchedule, iterations: int | None = None) -> None:
    """Parse every entry of `schedule` (raising on typos) and, if given, check its length."""
    entries = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule]
    for entry in entries:
        check_depth_rule(entry) if is_depth_rule(entry) else parse_ratio(entry)
    if (
        isinstance(schedule, (list, tuple))
        and iterations is not None
        and len(schedule) != iterations
    ):
        raise ValueError(
            f"the ratio schedule has {len(schedule)} entries for {iterations} iterations; "
            "give exactly one per iteration"
        )


@dataclass
class MergeConfig:
    """How to merge tuned weights back into the original model.

    `result = base + ratio * M(tuned - base)`, per tensor.
    """

    method: str = field(
        default="linear",
        metadata={"help": "Delta operator M: linear, dare_linear, ties or dare_ties."},
    )
    ratio: RatioSchedule = field(
        default=0.5,
        metadata={
            "help": "Merge ratio alpha: a number, a per-layer map like "
            "{'layers.0-7': 0.3, 'default': 0.5}, or a list of either, one per iteration."
        },
    )
    density: float = field(
        default=1.0,
        metadata={"help": "Fraction of delta elements kept by DARE / TIES, in (0, 1]."},
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the DARE masks, keyed with each tensor's name; the IMM mergers use "
            "seed + t at iteration t so each iteration drops different elements."
        },
    )
    weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per tuned model when merging several; default 1.0 each."},
    )
    compute_dtype: str = field(
        default="float32", metadata={"help": "Dtype the merge arithmetic is done in."}
    )

    def __post_init__(self) -> None:
        check_method(self.method)
        check_density(self.density)
        check_density_applies(self.method, self.density)
        check_schedule(self.ratio)
        import torch

        if not isinstance(getattr(torch, self.compute_dtype, None), torch.dtype):
            raise ValueError(
                f"compute_dtype {self.compute_dtype!r} is not a torch dtype; use e.g. 'float32'"
            )

    @property
    def torch_compute_dtype(self):
        import torch

        return getattr(torch, self.compute_dtype)

    def kernel_kwargs(self, iteration: int = 0) -> dict:
        """The keyword arguments every merge kernel (`merge_tensors`, `merge_into_`,
        `merge_low_rank_into_`) takes from this config at IMM iteration `iteration`: the DARE
        seed is `seed + iteration`, so each iteration drops different elements (0 outside IMM).
        The ratio and `weights` are per tensor and per call, so they are not here."""
        return dict(
            method=self.method,
            density=self.density,
            seed=self.seed + iteration,
            compute_dtype=self.torch_compute_dtype,
        )

    def ratio_map(self, iteration: int = 1) -> RatioMap:
        """The parsed ratio map for IMM iteration `iteration` (1-based)."""
        return ratio_for_iteration(self.ratio, iteration)
