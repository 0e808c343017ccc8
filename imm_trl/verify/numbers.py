"""Reading a final numeric answer out of free text (GSM8K style), and normalising it."""

from __future__ import annotations

import re
from fractions import Fraction

# A signed number with optional thousands separators (groups of three), decimals, or a simple fraction a/b.
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+"
NUMBER_RE = re.compile(_NUMBER)
_FRAC_LATEX_RE = re.compile(r"\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.*)", re.IGNORECASE)
_HASH_RE = re.compile(r"####\s*(.*)")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def to_fraction(text: str) -> Fraction | None:
    """The first number in `text` as an exact Fraction: '$1,000.00' -> 1000, '\\frac{1}{2}' -> 1/2.

    Currency signs, units, percent signs and trailing punctuation are ignored because only the
    number is kept; thousands separators are dropped. None when there is no number.
    """
    text = _FRAC_LATEX_RE.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    text = text.replace("−", "-").replace("\\!", "").replace("{,}", ",")
    match = NUMBER_RE.search(text)
    return _parse_number(match.group(0)) if match else None


def _parse_number(token: str) -> Fraction | None:
    token = token.replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            numerator, denominator = token.split("/")
            return Fraction(numerator) / Fraction(denominator)
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """The last number in `text`, or None."""
    text = _FRAC_LATEX_RE.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    matches = NUMBER_RE.findall(text.replace("−", "-"))
    for token in reversed(matches):
        value = _parse_number(token)
        if value is not None:
            return value
    return None


def predicted_number(completion: str) -> Fraction | None:
    """The model's final numeric answer, by the most explicit marker present.

    Order: the last "The answer is ..." / "Answer: ...", a final `\\boxed{}`, a "#### ...", then
    the last number in the text.
    """
    answer_is = _ANSWER_IS_RE.findall(completion)
    if answer_is:
        value = to_fraction(answer_is[-1])
        if value is not None:
            return value
    boxed = last_boxed(completion)
    if boxed is not None:
        value = to_fraction(boxed)
        if value is not None:
            return value
    hashed = _HASH_RE.findall(completion)
    if hashed:
        value = to_fraction(hashed[-1])
        if value is not None:
            return value
    return last_number(completion)


def gsm8k_gold_number(gold: str) -> Fraction | None:
    """The gold answer of a GSM8K solution (the number after `####`), or of a bare answer."""
    hashed = _HASH_RE.findall(gold)
    return to_fraction(hashed[-1]) if hashed else to_fraction(gold)
