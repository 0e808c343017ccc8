"""Merging that adapts: the merge ratio chosen each iteration on held-out questions, a guard
against drifting from theta0, and the pure pieces both need.

With `IMMConfig(merge_ratio="auto")` the ID training questions are split once, at the start
of the run, into training and validation questions (`split_validation`; the eval sets are
never used for selection). After each iteration's SFT, every candidate of `auto_ratio_grid`
(numbers or depth rules) is merged, the sampler refreshed in place, and the validation
questions scored greedily with the run's verifier (`greedy_accuracy`); with `retain_prompts`,
each candidate's greedy answers to those prompts are compared with theta0's (`retain_drift`)
and candidates beyond `max_retain_drift` are not eligible. The best eligible candidate wins,
ties going to the smaller ratio (closer to theta0 generalizes better: `pick_candidate`), and
the merge is redone exactly as a fixed-ratio merge with it would be.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from imm_trl.merging.config import check_depth_rule, check_ratio_value, is_depth_rule

AUTO = "auto"
DEFAULT_AUTO_GRID = (0.25, 0.5, 0.75, 1.0)
DEFAULT_VALIDATION_SHARE = 0.2
MIN_SPLIT_QUESTIONS = 8
ANCHORS = ("theta0", "ema")


def candidate_label(candidate: Any) -> str:
    """A short name for a grid entry: '0.5', 'depth0.2-0.8'."""
    if is_depth_rule(candidate):
        first, last, _ = check_depth_rule(candidate)
        return f"depth{first:g}-{last:g}"
    return f"{float(candidate):g}"


def candidate_strength(candidate: Any) -> float:
    """How far a candidate moves from the anchor: the ratio, or a depth rule's mean ratio."""
    if is_depth_rule(candidate):
        first, last, _ = check_depth_rule(candidate)
        return (first + last) / 2
    return float(candidate)


def check_grid(grid: Sequence[Any]) -> None:
    """At least two distinct candidates, each a ratio in (0, 2] or a depth rule within it."""
    if not isinstance(grid, (list, tuple)) or len({candidate_label(c) for c in grid}) < 2:
        raise ValueError(
            f"auto_ratio_grid must hold at least two different candidates (got {grid!r}); e.g. "
            f"{list(DEFAULT_AUTO_GRID)}, or fix the ratio with merge_ratio=<number>"
        )
    for candidate in grid:
        values = check_depth_rule(candidate)[:2] if is_depth_rule(candidate) else [candidate]
        for value in values:
            if not 0 < check_ratio_value(value, "auto_ratio_grid entry") <= 2:
                raise ValueError(
                    f"auto_ratio_grid entry {candidate!r} is outside (0, 2]; a merge ratio of 0 "
                    "is theta0 itself and above 2 extrapolates far past the fine-tuned model"
                )


def validation_count(share: int | float | None, questions: int) -> int:
    """How many of `questions` training questions are held out for validation: `share` is a
    count (int) or a fraction in (0, 1); both parts must keep at least 8 questions."""
    share = DEFAULT_VALIDATION_SHARE if share is None else share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or share <= 0:
        raise ValueError(f"validation_questions must be a count >= 1 or a fraction in (0, 1), got {share!r}")
    if isinstance(share, float) and share >= 1:
        raise ValueError(f"validation_questions {share!r} is a fraction and must be below 1; give a count as an int")
    count = share if isinstance(share, int) else round(share * questions)
    if count < MIN_SPLIT_QUESTIONS or questions - count < MIN_SPLIT_QUESTIONS:
        raise ValueError(
            f"validation_questions={share!r} splits {questions} training questions into "
            f"{questions - count} for training and {count} for validation; both need at least "
            f"{MIN_SPLIT_QUESTIONS}: give more questions or another share"
        )
    return count


def split_validation(rows: Sequence[Mapping], share: int | float | None, seed: int) -> tuple[list, list]:
    """(training rows, validation rows): a seeded random split, made once per run."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: validation_count(share, len(rows))])
    training = [dict(row) for i, row in enumerate(rows) if i not in held_out]
    return training, [dict(row) for i, row in enumerate(rows) if i in held_out]


def question_key(row: Mapping, column: str) -> str:
    return repr(row.get(column))


def check_no_overlap(validation: Sequence[Mapping], eval_sets: Mapping[str, Any], column: str) -> None:
    """Selection must never see eval data: refuse validation questions that an eval set holds."""
    held_out = {question_key(row, column) for row in validation}
    for name, question_set in eval_sets.items():
        shared = [row for row in getattr(question_set, "rows", question_set) if question_key(row, "question") in held_out]
        if shared:
            raise ValueError(
                f"{len(shared)} validation question(s) also appear in the eval set {name!r} (e.g. "
                f"{shared[0].get('question')!r}); the merge ratio would be chosen on eval data. "
                "Remove them from the training questions or the eval set"
            )


def greedy_accuracy(sampler, rows: Sequence[Mapping], rejection_config) -> float:
    """Share of `rows` whose greedy answer the run's verifier accepts (rows the verifier cannot
    use are left out, as in rejection sampling)."""
    from imm_trl.rejection import RejectionSampler

    greedy = replace(
        rejection_config, samples_per_question=1, max_correct_per_question=None, real_data_ratio=0.0,
        sampling=replace(rejection_config.sampling, temperature=0.0),
    )
    stats = RejectionSampler(sampler, greedy).run(rows).stats
    return stats.correct_samples / stats.usable_questions if stats.usable_questions else 0.0


def retain_answers(sampler, prompts: Sequence[Any], max_new_tokens: int) -> list[str]:
    """Greedy answers to the retain prompts (text or chat messages)."""
    from imm_trl.rejection import as_messages
    from imm_trl.sampling.base import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    return [texts[0] for texts in sampler.generate([as_messages(p, None) for p in prompts], 1, params)]


def retain_drift(reference: Sequence[str], answers: Sequence[str]) -> float:
    """Share of retain prompts whose greedy answer differs from theta0's."""
    return sum(a.strip() != b.strip() for a, b in zip(reference, answers, strict=True)) / len(reference)


def pick_candidate(
    candidates: Sequence[Any], scores: Sequence[float], drifts: Sequence[float] | None, max_drift: float | None
) -> int:
    """Index of the best eligible candidate: highest score among those within `max_drift`
    (all, without a guard; the least drifting if none is within it), ties to the smallest."""
    indices = range(len(candidates))
    eligible = [i for i in indices if drifts is None or drifts[i] <= max_drift]
    if not eligible:
        least = min(drifts)
        eligible = [i for i in indices if drifts[i] == least]
    best = max(scores[i] for i in eligible)
    return min((i for i in eligible if scores[i] == best), key=lambda i: candidate_strength(candidates[i]))
