"""Question sets from reasoning-gym task families (procedural, seeded, offline).

A `FamilySpec` names a family and the config that sizes its questions. Each family draws one
seeded pool of distinct questions, split in order into few-shot examples, training questions
and evaluation questions, so the splits never share a question. Gold answers are stored as
the reasoning-gym entry in JSON (`{"answer": ..., "metadata": ...}`), which the
`reasoning_gym:<family>` verifier decodes: metadata schemas differ between families and Arrow
wants one schema per column.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imm_trl.tasks.base import PromptTemplate, QuestionSet, get_template, interleave, split_evenly


@dataclass(frozen=True)
class FamilySpec:
    """One reasoning-gym task family with the config that sizes its questions."""

    task: str = field(metadata={"help": "reasoning-gym family name, e.g. 'chain_sum'."})
    config: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Overrides of the family's reasoning-gym config (sizes, operators)."},
    )

    @property
    def label(self) -> str:
        """The family name as reports show it (the reasoning-gym name)."""
        return self.task

    def describe(self) -> str:
        settings = ", ".join(f"{key}={value}" for key, value in sorted(self.config.items()))
        return f"{self.task}({settings})"


def family_seed(seed: int, family: FamilySpec) -> int:
    """A seed per (suite seed, family, config), stable across Python runs (unlike `hash`)."""
    key = f"{seed}/{family.describe()}".encode()
    return zlib.crc32(key) & 0x7FFFFFFF


def draw_entries(family: FamilySpec, count: int, seed: int, exclude: set[str]) -> list[dict]:
    """`count` reasoning-gym entries with distinct questions, none of them in `exclude`.

    reasoning-gym derives entry i from (seed, i), so a larger draw only appends entries; the
    draw grows until enough distinct questions are found, and fails on a family whose config
    allows too few.
    """
    import reasoning_gym

    size = 2 * count + 16
    while True:
        dataset = reasoning_gym.create_dataset(
            family.task, size=size, seed=family_seed(seed, family), **family.config
        )
        entries, seen = [], set(exclude)
        for entry in dataset:
            if entry["question"] not in seen:
                seen.add(entry["question"])
                entries.append(entry)
                if len(entries) == count:
                    return entries
        if size >= 16 * count + 64:
            raise ValueError(
                f"{family.describe()} gives only {len(entries)} distinct new questions out of "
                f"{size} drawn, fewer than the {count} needed: widen its config or ask for fewer"
            )
        size *= 4


def gold_json(entry: dict) -> str:
    """The entry's gold (answer and metadata) as JSON; fails loudly on metadata JSON cannot
    hold, rather than storing a lossy copy the scorer would misread."""
    try:
        return json.dumps({"answer": entry["answer"], "metadata": entry["metadata"]})
    except TypeError as error:
        family = entry.get("metadata", {}).get("source_dataset", "?")
        raise ValueError(
            f"reasoning-gym family {family!r} has metadata JSON cannot hold"
        ) from error


# --------------------------------------------------------------------------------------------
# Worked steps for the "cot" template, from each entry's metadata. Each returns None when it
# cannot write steps for an entry (say, an operator it does not handle).
# --------------------------------------------------------------------------------------------

_TERM_RE = re.compile(r"^-?\d+$")


def additive_steps(expression: str) -> str | None:
    """'4 - 1 - 7' -> '4 - 1 = 3. 3 - 7 = -4.': a running total, left to right."""
    tokens = expression.split()
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        return None
    if not all(_TERM_RE.match(t) for t in tokens[::2]) or not set(tokens[1::2]) <= {"+", "-"}:
        return None
    total, steps = int(tokens[0]), []
    for operator, term in zip(tokens[1::2], tokens[2::2], strict=True):
        new_total = total + int(term) if operator == "+" else total - int(term)
        steps.append(f"{total} {operator} {term} = {new_total}.")
        total = new_total
    return " ".join(steps)


def product_steps(expression: str) -> str | None:
    """'23 * 7' -> '23 * 7 = 20 * 7 + 3 * 7 = 140 + 21 = 161.': split the larger factor by
    place value; single-digit products are stated directly."""
    parts = [p.strip() for p in expression.split("*")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    a, b = (int(p) for p in parts)
    big, small = (a, b) if a >= b else (b, a)
    if big < 10:
        return f"{a} * {b} = {a * b}."
    pieces = [int(d) * 10**i for i, d in enumerate(reversed(str(big))) if d != "0"][::-1]
    if len(pieces) == 1:
        return f"{a} * {b} = {a * b}."
    split = " + ".join(f"{p} * {small}" for p in pieces)
    partial = " + ".join(str(p * small) for p in pieces)
    return f"{a} * {b} = {split} = {partial} = {a * b}."


def divisor_steps(numbers: Sequence[int]) -> str | None:
    """'Divisors of 12: 1, 2, 3, 4, 6, 12. Divisors of 18: ... Common: 1, 2, 3, 6. Largest: 6.'
    (kept to small numbers, where listing divisors is short)."""
    if len(numbers) != 2 or max(numbers) > 100 or min(numbers) < 1:
        return None
    lines = [
        f"Divisors of {n}: {', '.join(str(d) for d in range(1, n + 1) if n % d == 0)}."
        for n in numbers
    ]
    common = [d for d in range(1, min(numbers) + 1) if all(n % d == 0 for n in numbers)]
    lines.append(f"Common divisors: {', '.join(map(str, common))}. The greatest is {common[-1]}.")
    return " ".join(lines)


def leg_steps(animals: dict[str, int]) -> str | None:
    """'2 ducks: 2 * 2 = 4 legs. 1 spider: 1 * 8 = 8 legs. Total: 4 + 8 = 12.'"""
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    # Plurals as the question writes them ("woodlouses"): the steps repeat its words.
    lines = [
        f"{count} {animal}{'s' if count > 1 else ''}: {count} * {ANIMALS[animal]} = "
        f"{count * ANIMALS[animal]} legs."
        for animal, count in animals.items()
    ]
    legs = [count * ANIMALS[animal] for animal, count in animals.items()]
    if len(legs) > 1:
        lines.append(f"Total: {' + '.join(map(str, legs))} = {sum(legs)}.")
    return " ".join(lines)


RATIONALES: dict[str, Callable[[dict], str | None]] = {
    "chain_sum": lambda meta: additive_steps(meta["expression"]),
    "basic_arithmetic": lambda meta: additive_steps(meta["expression"]),
    "products": lambda meta: product_steps(meta["expression"]),
    "gcd": lambda meta: divisor_steps(meta["numbers"]),
    "leg_counting": lambda meta: leg_steps(meta["animals"]),
}


def rationale(entry: dict) -> str | None:
    """Worked steps for a reasoning-gym entry, or None if its family has none written."""
    family = entry["metadata"].get("source_dataset")
    write = RATIONALES.get(family)
    return write(entry["metadata"]) if write else None


# --------------------------------------------------------------------------------------------
# Building question sets
# --------------------------------------------------------------------------------------------


@dataclass
class FamilyDraw:
    """One family's questions for a suite: few-shot examples, then one list per split."""

    family: FamilySpec
    shots: list[dict]
    splits: list[list[dict]]


def draw_family(
    family: FamilySpec,
    split_sizes: Sequence[int],
    *,
    shots: int,
    seed: int,
    exclude: set[str],
) -> FamilyDraw:
    """Draw a family's few-shot examples and splits from one pool of distinct questions; the
    drawn questions are added to `exclude` so that later families cannot reuse them."""
    entries = draw_entries(family, shots + sum(split_sizes), seed, exclude)
    exclude.update(entry["question"] for entry in entries)
    splits, start = [], shots
    for size in split_sizes:
        splits.append(entries[start : start + size])
        start += size
    return FamilyDraw(family, entries[:shots], splits)


def entry_row(entry: dict, template: PromptTemplate, shots: Sequence[tuple[str, str]]) -> dict:
    return {
        "question": template.messages(entry["question"], shots),
        "answer": gold_json(entry),
        "solution": template.solution(entry["answer"], rationale(entry)),
        "family": entry["metadata"]["source_dataset"],
    }


def question_set(
    name: str, draws: Sequence[FamilyDraw], split: int, template: str | PromptTemplate
) -> QuestionSet:
    """The `split`-th split of each family's draw as one question set, families interleaved;
    each row's few-shot turns come from its own family."""
    template = get_template(template)
    per_family = []
    for draw in draws:
        shots = [(e["question"], template.solution(e["answer"], rationale(e))) for e in draw.shots]
        per_family.append([entry_row(e, template, shots) for e in draw.splits[split]])
    return QuestionSet(name, interleave(per_family), reasoning_gym_verifier(draws))


def reasoning_gym_verifier(draws: Sequence[FamilyDraw]) -> str:
    """'reasoning_gym:<family>' or, for a mix, 'reasoning_gym:<family>,<family>,...'."""
    tasks = list(dict.fromkeys(draw.family.task for draw in draws))
    return "reasoning_gym:" + ",".join(tasks)


def family_question_set(
    family: FamilySpec,
    count: int,
    *,
    seed: int = 0,
    template: str | PromptTemplate = "answer",
    name: str | None = None,
) -> QuestionSet:
    """`count` questions of one family (for calibration and quick experiments)."""
    template = get_template(template)
    draw = draw_family(family, [count], shots=template.shots, seed=seed, exclude=set())
    return question_set(name or family.describe(), [draw], 0, template)


def mixed_splits(
    families: Sequence[FamilySpec],
    sizes: Sequence[int],
    *,
    shots: int,
    seed: int,
    exclude: set[str],
) -> list[FamilyDraw]:
    """Each family's draw, with every split size spread evenly over the families."""
    per_family = [split_evenly(size, len(families)) for size in sizes]
    return [
        draw_family(
            family,
            [counts[i] for counts in per_family],
            shots=shots,
            seed=seed,
            exclude=exclude,
        )
        for i, family in enumerate(families)
    ]
