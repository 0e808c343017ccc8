"""The answer checks, one small function per verifier name: `check(completion, gold) -> bool`.

A check raises `GoldParseError` when the gold answer itself cannot be read: that is a problem
with the data, not a wrong completion, and callers report it instead of labelling anything.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

from imm_trl.verify.numbers import gsm8k_gold_number, last_boxed, predicted_number


class GoldParseError(ValueError):
    """The gold answer cannot be parsed by this verifier."""


def check_gsm8k(completion: str, gold: str) -> bool:
    """GSM8K: the number after `####` in the gold solution (or a bare gold number) must equal
    the completion's final number, compared exactly as fractions (18.00 == 18, 1/2 == 0.5)."""
    gold_value = gsm8k_gold_number(str(gold))
    if gold_value is None:
        raise GoldParseError(f"no number in gsm8k gold answer {str(gold)[-80:]!r}")
    return predicted_number(completion) == gold_value


def check_math(completion: str, gold: str) -> bool:
    """MATH-style answers through math-verify; the gold may be bare LaTeX or contain `\\boxed{}`.

    math-verify's own SIGALRM timeouts are switched off: they would cancel our per-check timer.
    A gold answer that math-verify can only keep as a raw string (no mathematical object) is
    unparseable: comparing such strings would silently turn into exact string matching.
    """
    from math_verify import parse, verify
    from sympy import Basic, MatrixBase

    gold_text = str(gold)
    gold_boxed = last_boxed(gold_text)
    gold_parsed = parse(
        f"${gold_boxed if gold_boxed is not None else gold_text}$", parsing_timeout=None
    )
    if not any(isinstance(item, Basic | MatrixBase) for item in gold_parsed):
        raise GoldParseError(f"math-verify cannot parse gold answer {gold_text[-80:]!r}")
    predicted = parse(completion, parsing_timeout=None)
    return bool(predicted) and verify(gold_parsed, predicted, timeout_seconds=None)


_CHOICE_MARKER_RE = re.compile(
    r"(?:answer\s*(?:is|:)|option|choice)\s*:?\s*\(?\**([A-E])\b", re.IGNORECASE
)
_CHOICE_ALONE_RE = re.compile(r"(?:^|[\s(\[{*])\(?([A-E])\)?(?=[\s.,:;)\]}*]|$)")


def choice_letter(text: str) -> str | None:
    """The chosen letter A-E: after "answer is"/"option"/"choice", in `\\boxed{}`, or the last
    standalone capital letter A-E (so the "A" of "A train leaves" is not taken when a later
    letter exists; a bare "A" sentence start is still a known weakness of letter parsing)."""
    marked = _CHOICE_MARKER_RE.findall(text)
    if marked:
        return marked[-1].upper()
    boxed = last_boxed(text)
    if boxed is not None:
        found = _CHOICE_ALONE_RE.findall(boxed.strip())
        if found:
            return found[-1]
    found = _CHOICE_ALONE_RE.findall(text)
    return found[-1] if found else None


def check_choice(completion: str, gold: str) -> bool:
    """Multiple choice A-E: the completion's chosen letter equals the gold letter."""
    gold_letter = choice_letter(str(gold).strip())
    if gold_letter is None:
        raise GoldParseError(f"gold answer {str(gold)[:80]!r} is not a letter A-E")
    return choice_letter(completion) == gold_letter


@cache
def reasoning_gym_scorer(task: str):
    """The `score_answer` of a reasoning-gym task family (one small dataset built per task)."""
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=1, seed=0).score_answer


# "answer is 7", "answer is: 7", "Answer: 7" (the few-shot format of `imm_trl.tasks`).
_ANSWER_MARKER_RE = re.compile(r"answer\s*(?:is\b\s*:?|:)\s*(.+)", re.IGNORECASE)


def reasoning_gym_answer(completion: str) -> str:
    """The answer part of a completion: `<answer>...</answer>` (reasoning-gym's own format),
    else a final `\\boxed{}`, else the text after the last "The answer is" / "Answer:" on its
    line, else the last line."""
    tagged = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    marked = _ANSWER_MARKER_RE.findall(completion)
    if marked:
        return marked[-1].strip().rstrip(".")
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def reasoning_gym_entry(gold: Any) -> dict:
    """A reasoning-gym gold as the entry its scorer takes: `{"answer": ..., "metadata": ...}`.

    Accepts the entry itself, the entry as a JSON string (how `imm_trl.tasks` stores it, since
    metadata schemas differ between families and Arrow wants one schema per column), or a bare
    answer string."""
    if isinstance(gold, str) and gold.lstrip().startswith("{"):
        try:
            decoded = json.loads(gold)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict) and "answer" in decoded and "metadata" in decoded:
            gold = decoded
    entry = gold if isinstance(gold, dict) else {"answer": gold, "metadata": {}}
    if entry.get("answer") in (None, ""):
        raise GoldParseError(f"reasoning-gym entry without an answer: {str(gold)[:80]!r}")
    return entry


def make_reasoning_gym_check(task: str, threshold: float = 1.0):
    """A check for reasoning-gym task families, scored by each task's own `score_answer`.

    The gold is the dataset entry (a dict with `answer` and `metadata`, as reasoning-gym makes
    them, or that dict as a JSON string) or a bare answer string. `task` may list several
    families separated by commas ("gcd,chain_sum"): one verifier then serves a set mixing them,
    each gold picking its scorer through `metadata["source_dataset"]`. Scorers are built here,
    outside any per-check time limit. A scorer exception propagates; the caller counts it wrong.
    """
    families = [name.strip() for name in task.split(",") if name.strip()]
    if not families:
        raise ValueError("no reasoning-gym task given")
    scorers = {family: reasoning_gym_scorer(family) for family in families}

    def check(completion: str, gold: Any) -> bool:
        entry = reasoning_gym_entry(gold)
        family = families[0]
        if len(families) > 1:
            family = entry["metadata"].get("source_dataset")
            if family not in scorers:
                raise GoldParseError(
                    f"gold of family {family!r}, not one of {families}: {str(gold)[:80]!r}"
                )
        return scorers[family](reasoning_gym_answer(completion), entry) >= threshold

    return check
