"""Verifiers by name, with a time limit per check and counters for everything not a clean
right/wrong answer.

    verifier = get_verifier("gsm8k")            # or "math", "choice", "reasoning_gym:gcd",
                                                # or a TRL reward function
    verdicts = verifier.verify_batch(completions, golds)
    verifier.counts                             # {"checks": .., "correct": .., "timeouts": .., ...}
"""

from __future__ import annotations

import difflib
import enum
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imm_trl.verify.checks import (
    GoldParseError,
    check_choice,
    check_gsm8k,
    check_math,
    make_reasoning_gym_check,
)
from imm_trl.verify.timeout import CheckTimeout, call_with_time_limit

NAMED_CHECKS: dict[str, Callable[[str, Any], bool]] = {
    "gsm8k": check_gsm8k,
    "math": check_math,
    "choice": check_choice,
}
REASONING_GYM_PREFIX = "reasoning_gym:"
RewardFunction = Callable[..., list[float]]


class Verdict(str, enum.Enum):
    CORRECT = "correct"
    WRONG = "wrong"
    TIMEOUT = "timeout"  # counted as wrong
    ERROR = "error"  # the check raised; counted as wrong
    BAD_GOLD = "bad_gold"  # the gold answer cannot be parsed: the row must be skipped

    @property
    def is_correct(self) -> bool:
        return self is Verdict.CORRECT


def valid_verifier_names() -> list[str]:
    return [*NAMED_CHECKS, f"{REASONING_GYM_PREFIX}<task>", "<callable reward function>"]


def check_verifier(spec: Any) -> None:
    """Raise now if `spec` names no verifier; reasoning-gym task names are looked up in its
    registry, without building any data."""
    if isinstance(spec, Verifier) or callable(spec):
        return
    if not isinstance(spec, str):
        raise TypeError(
            f"verifier must be a name or a reward function (got {spec!r}, a "
            f"{type(spec).__name__}); valid verifiers: {', '.join(valid_verifier_names())}"
        )
    if spec in NAMED_CHECKS:
        return
    if not spec.startswith(REASONING_GYM_PREFIX):
        raise ValueError(
            f"unknown verifier {spec!r}; valid verifiers: {', '.join(valid_verifier_names())}"
        )
    from reasoning_gym.factory import DATASETS

    families = [name.strip() for name in spec[len(REASONING_GYM_PREFIX) :].split(",")]
    unknown = [name for name in families if name not in DATASETS]
    if unknown:
        near = sorted({m for name in unknown for m in difflib.get_close_matches(name, DATASETS)})
        raise ValueError(
            f"unknown reasoning-gym task {unknown} in verifier {spec!r}; write "
            f"reasoning_gym:<task>[,<task>...] with tasks such as {', '.join(near or sorted(DATASETS)[:5])}"
            " (reasoning_gym.factory.DATASETS lists all)"
        )


@dataclass
class Verifier:
    """Checks completions against gold answers.

    `check(completion, gold) -> bool` for named verifiers; `reward_function(completions,
    **columns) -> list[float]` (TRL's reward signature) otherwise, where a score of at least
    `threshold` is correct. Every check runs under `time_limit_s`.
    """

    name: str
    check: Callable[[str, Any], bool] | None = None
    reward_function: RewardFunction | None = None
    threshold: float = 1.0
    time_limit_s: float = 1.0
    # TRL hands reward functions conversational completions ([{"role": "assistant", ...}]) when
    # the dataset is conversational, plain strings otherwise; this picks which they get here.
    completions_as_messages: bool = False
    counts: Counter = field(default_factory=Counter)

    def gold_problem(self, gold: Any) -> str | None:
        """Why this gold answer cannot be used, or None if it can."""
        if gold is None or (isinstance(gold, str) and not gold.strip()):
            return "missing gold answer"
        if self.check is None:
            return None
        try:
            call_with_time_limit(lambda: self.check("", gold), self.time_limit_s)
        except GoldParseError as error:
            return str(error)
        except CheckTimeout:
            return f"reading the gold answer took over {self.time_limit_s}s"
        except Exception:  # the empty completion may upset a scorer; the gold itself is fine
            return None
        return None

    def verify(self, completion: str, gold: Any) -> Verdict:
        return self.verify_batch([completion], [gold])[0]

    def verify_batch(
        self,
        completions: Sequence[str],
        golds: Sequence[Any] | None = None,
        columns: dict[str, Sequence[Any]] | None = None,
    ) -> list[Verdict]:
        """One verdict per completion. `columns` (dataset columns, one value per completion)
        go to a reward function as keyword arguments; named checks use `golds`."""
        if self.reward_function is not None:
            verdicts = self._verify_with_reward(
                list(completions), columns if columns is not None else {"gold": list(golds)}
            )
        else:
            verdicts = [self._verify_one(c, g) for c, g in zip(completions, golds, strict=True)]
        self.counts["checks"] += len(verdicts)
        self.counts.update(verdict.value for verdict in verdicts)
        return verdicts

    def _verify_one(self, completion: str, gold: Any) -> Verdict:
        try:
            ok = call_with_time_limit(lambda: self.check(completion, gold), self.time_limit_s)
        except CheckTimeout:
            return Verdict.TIMEOUT
        except GoldParseError:
            return Verdict.BAD_GOLD
        except Exception:
            return Verdict.ERROR
        return Verdict.CORRECT if ok else Verdict.WRONG

    def _verify_with_reward(
        self, completions: list[str], columns: dict[str, Sequence[Any]]
    ) -> list[Verdict]:
        if self.completions_as_messages:
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        # Whole batch first (reward functions are often vectorised); if it fails or runs over,
        # score item by item so that one bad completion does not sink the others.
        try:
            scores = call_with_time_limit(
                lambda: self.reward_function(completions, **columns),
                self.time_limit_s * len(completions),
            )
        except Exception:
            return [self._verify_one_with_reward(c, i, columns) for i, c in enumerate(completions)]
        return [self._score_verdict(s) for s in self._checked_scores(scores, len(completions))]

    def _verify_one_with_reward(self, completion, index: int, columns) -> Verdict:
        row_columns = {key: [values[index]] for key, values in columns.items()}
        try:
            scores = call_with_time_limit(
                lambda: self.reward_function([completion], **row_columns), self.time_limit_s
            )
        except CheckTimeout:
            return Verdict.TIMEOUT
        except Exception:
            return Verdict.ERROR
        return self._score_verdict(self._checked_scores(scores, 1)[0])

    def _checked_scores(self, scores: Any, expected: int) -> list:
        """`scores` if it is one score per completion; otherwise the reward function is wrong
        for every row, so this raises instead of counting rows."""
        if not hasattr(scores, "__len__") or isinstance(scores, str | bytes | dict):
            raise TypeError(
                f"reward function {self.name} returned {scores!r} (a {type(scores).__name__}); it "
                "must return a list with one score (a number or None) per completion"
            )
        if len(scores) != expected:
            raise ValueError(
                f"reward function {self.name} returned {len(scores)} scores for {expected} "
                "completions; it must return one score (a number or None) per completion"
            )
        return list(scores)

    def _score_verdict(self, score: Any) -> Verdict:
        """CORRECT at or above the threshold; None (TRL: the function does not apply to the row)
        and NaN are verifier errors, counted."""
        if score is None:
            return Verdict.ERROR
        try:
            value = float(score) if not isinstance(score, str | bytes) else None
        except (TypeError, ValueError):
            value = None
        if value is None:
            raise TypeError(
                f"reward function {self.name} returned the score {score!r} (a "
                f"{type(score).__name__}); scores must be numbers or None"
            )
        if math.isnan(value):
            return Verdict.ERROR
        return Verdict.CORRECT if value >= self.threshold else Verdict.WRONG


def get_verifier(
    spec: str | RewardFunction | Verifier,
    time_limit_s: float = 1.0,
    threshold: float = 1.0,
    completions_as_messages: bool = False,
) -> Verifier:
    """A `Verifier` from a name (`gsm8k`, `math`, `choice`, `reasoning_gym:<task>`), a TRL-style
    reward function, or an existing `Verifier` (returned as is).

    A reward function that itself uses SIGALRM (math-verify's default timeouts, as in
    `trl.rewards.accuracy_reward`) replaces our per-check timer with its own for that call."""
    check_verifier(spec)
    if isinstance(spec, Verifier):
        return spec
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        return Verifier(
            name,
            reward_function=spec,
            threshold=threshold,
            time_limit_s=time_limit_s,
            completions_as_messages=completions_as_messages,
        )
    if spec == "math":
        # The first call imports sympy and builds math-verify's parsers (seconds); doing it here
        # keeps that out of the first check's time limit.
        check_math("\\boxed{1}", "1")
    if spec in NAMED_CHECKS:
        return Verifier(spec, check=NAMED_CHECKS[spec], time_limit_s=time_limit_s)
    task = spec[len(REASONING_GYM_PREFIX) :]  # check_verifier left only reasoning_gym:<task>
    try:
        check = make_reasoning_gym_check(task, threshold)
    except Exception as error:
        raise ValueError(f"unknown reasoning-gym task {task!r}: {error}") from error
    return Verifier(spec, check=check, threshold=threshold, time_limit_s=time_limit_s)
