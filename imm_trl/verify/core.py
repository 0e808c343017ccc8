"""Verifiers by name, with a time limit per check and counters for everything not a clean
right/wrong answer.

    verifier = get_verifier("gsm8k")            # or "math", "choice", "reasoning_gym:gcd",
                                                # or a TRL reward function
    verdicts = verifier.verify_batch(completions, golds)
    verifier.counts                             # {"checks": .., "correct": .., "timeouts": .., ...}
"""

from __future__ import annotations

import enum
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
            if len(scores) != len(completions):
                raise ValueError("reward function returned the wrong number of scores")
            return [self._score_verdict(score) for score in scores]
        except Exception:
            pass
        verdicts = []
        for i, completion in enumerate(completions):
            row_columns = {key: [values[i]] for key, values in columns.items()}
            try:
                (score,) = call_with_time_limit(
                    lambda c=completion, rc=row_columns: self.reward_function([c], **rc),
                    self.time_limit_s,
                )
                verdicts.append(self._score_verdict(score))
            except CheckTimeout:
                verdicts.append(Verdict.TIMEOUT)
            except Exception:
                verdicts.append(Verdict.ERROR)
        return verdicts

    def _score_verdict(self, score: float | None) -> Verdict:
        if score is None:  # TRL reward functions return None for rows they do not apply to
            return Verdict.ERROR
        return Verdict.CORRECT if float(score) >= self.threshold else Verdict.WRONG


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
    if isinstance(spec, str) and spec.startswith(REASONING_GYM_PREFIX):
        task = spec[len(REASONING_GYM_PREFIX) :]
        try:
            check = make_reasoning_gym_check(task, threshold)
        except Exception as error:
            raise ValueError(f"unknown reasoning-gym task {task!r}: {error}") from error
        return Verifier(spec, check=check, threshold=threshold, time_limit_s=time_limit_s)
    raise ValueError(
        f"unknown verifier {spec!r}; valid verifiers: {', '.join(valid_verifier_names())}"
    )
