"""Paired statistics: is model A better than model B on the same questions?

    comparison = paired_difference(correct_a, correct_b)   # per-question 0/1, same questions
    comparison.difference, comparison.ci_low, comparison.ci_high, comparison.mcnemar_p

    across = seed_paired_difference([correct_a_seed0, correct_a_seed1], correct_theta0)
    across.difference, across.ci_low, across.ci_high, across.p_value

Two models scored on the same questions make paired data: most questions are answered alike by
both, so the difference of accuracies varies much less than the accuracies themselves. Separate
intervals per model (`imm_trl.eval.bootstrap_ci`) that overlap say little about the difference;
these functions resample the questions jointly for both models instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np

__all__ = [
    "PairedComparison",
    "SeedPairedComparison",
    "exact_mcnemar_p",
    "paired_difference",
    "seed_paired_difference",
]

# Resampling is done in chunks of about this many drawn indices, so that 10,000 resamples of
# thousands of questions do not hold one (resamples x questions) matrix at once.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PairedComparison:
    """Model A against model B on the same questions (`paired_difference`).

    Attributes:
        n: number of questions.
        accuracy_a: mean score of A (its accuracy for 0/1 scores).
        accuracy_b: mean score of B.
        difference: accuracy_a - accuracy_b.
        ci_low: lower end of the paired percentile bootstrap interval of `difference`.
        ci_high: upper end of that interval.
        only_a: questions A got right and B wrong (None for non-binary scores).
        only_b: questions B got right and A wrong (None for non-binary scores).
        mcnemar_p: exact two-sided McNemar p-value of `only_a` against `only_b` (None for
            non-binary scores).
    """

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    ci_low: float
    ci_high: float
    only_a: int | None
    only_b: int | None
    mcnemar_p: float | None


@dataclass(frozen=True)
class SeedPairedComparison:
    """Model A against model B over several seeds on the same questions
    (`seed_paired_difference`).

    Attributes:
        n_seeds: number of seeds (runs) compared.
        n_questions: number of questions, the same for every seed.
        accuracy_a: mean score of A over seeds and questions.
        accuracy_b: mean score of B over seeds and questions.
        difference: accuracy_a - accuracy_b, the mean of `per_seed_differences`.
        ci_low: lower end of the two-level (seeds, questions) percentile bootstrap interval.
        ci_high: upper end of that interval.
        per_seed_differences: mean score of A minus mean score of B, one value per seed.
        p_value: two-sided bootstrap p-value of "no difference": the share of resampled
            differences, centred on `difference`, at least as far from 0 as `difference`.
    """

    n_seeds: int
    n_questions: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    ci_low: float
    ci_high: float
    per_seed_differences: tuple[float, ...]
    p_value: float


def exact_mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value for the discordant pairs of a paired 2x2 table.

    Under "both models are equally good" each of the `only_a + only_b` discordant questions is
    won by A or B with probability 1/2, so the p-value is the binomial test
    `min(1, 2 * P[X <= min(only_a, only_b)])` with `X ~ Binomial(only_a + only_b, 1/2)`; 1.0
    without discordant pairs. Computed exactly with integers (no normal approximation, which
    is poor for the few discordant pairs of a small eval set).
    """
    if only_a < 0 or only_b < 0 or int(only_a) != only_a or int(only_b) != only_b:
        raise ValueError(
            f"discordant counts must be non-negative integers, got {only_a} and {only_b}"
        )
    discordant, smaller = int(only_a) + int(only_b), int(min(only_a, only_b))
    if discordant == 0:
        return 1.0
    tail = sum(comb(discordant, i) for i in range(smaller + 1))
    return min(1.0, 2 * tail / 2**discordant)


def _check_interval_settings(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")


def _percentile_interval(statistics: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    return float(low), float(high)


def _resample_counts(rng: np.random.Generator, size: int, resamples: int) -> np.ndarray:
    """How often each of `size` items is drawn in each of `resamples` draws of `size` items with
    replacement: a (resamples, size) matrix of multinomial counts."""
    return rng.multinomial(size, np.full(size, 1.0 / size), size=resamples)


def _binary(scores: np.ndarray) -> bool:
    return bool(np.isin(scores, (0.0, 1.0)).all())


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Difference of the mean scores of two models on the same questions, with a paired
    bootstrap interval and, for 0/1 scores, the exact McNemar test.

    `a[i]` and `b[i]` are the scores of models A and B on question i (bools, 0/1 or floats).
    The interval resamples question indices with replacement, the same indices for both
    models, `resamples` times, and takes the percentile interval of the resampled
    differences. For scores other than 0/1, `only_a`, `only_b` and `mcnemar_p` are None.
    """
    _check_interval_settings(resamples, confidence)
    scores_a = np.asarray(a, dtype=np.float64)
    scores_b = np.asarray(b, dtype=np.float64)
    if scores_a.ndim != 1 or scores_b.ndim != 1:
        raise ValueError(
            f"a and b must be flat lists of per-question scores, got shapes {scores_a.shape} "
            f"and {scores_b.shape}; for several seeds use seed_paired_difference"
        )
    if scores_a.size != scores_b.size:
        raise ValueError(
            f"a and b must be scored on the same questions, got {scores_a.size} and "
            f"{scores_b.size} scores; score both models on the same question set"
        )
    if scores_a.size == 0:
        raise ValueError("a and b hold no scores; a difference needs at least one question")
    n = scores_a.size
    per_question = scores_a - scores_b
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    differences = np.concatenate(
        [
            _resample_counts(rng, n, min(chunk, resamples - start)) @ per_question / n
            for start in range(0, resamples, chunk)
        ]
    )
    ci_low, ci_high = _percentile_interval(differences, confidence)
    only_a = only_b = mcnemar_p = None
    if _binary(scores_a) and _binary(scores_b):
        only_a, only_b = int((per_question > 0).sum()), int((per_question < 0).sum())
        mcnemar_p = exact_mcnemar_p(only_a, only_b)
    return PairedComparison(
        n=n,
        accuracy_a=float(scores_a.mean()),
        accuracy_b=float(scores_b.mean()),
        difference=float(per_question.mean()),
        ci_low=ci_low,
        ci_high=ci_high,
        only_a=only_a,
        only_b=only_b,
        mcnemar_p=mcnemar_p,
    )


def _scores_by_seed(scores, name: str) -> np.ndarray:
    """(seeds, questions) scores; one 1-D array is one score list for every seed."""
    try:
        matrix = np.asarray(scores, dtype=np.float64)
    except ValueError as error:  # ragged: seeds scored on different numbers of questions
        lengths = [len(row) for row in scores]
        raise ValueError(
            f"every seed of {name} must be scored on the same questions, got {lengths} scores"
        ) from error
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(
            f"{name} must be a list of per-question score lists (one per seed) of equal length, "
            f"or one per-question score list; got shape {matrix.shape}"
        )
    return matrix


def seed_paired_difference(
    a_by_seed: Sequence[Sequence[float]] | Sequence[float],
    b_by_seed: Sequence[Sequence[float]] | Sequence[float],
    *,
    resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> SeedPairedComparison:
    """Mean difference of two models over several seeds (training runs) on the same questions,
    with an interval and a p-value that account for both seed and question variability.

    `a_by_seed[s][i]` is the score of model A, trained with seed s, on question i; likewise
    `b_by_seed`. A model without seeds (e.g. theta0) is given as one score list, or a list
    of one, and compared with every seed of the other. When both have seeds, seed s of A is
    compared with seed s of B (for independent runs any pairing is equally valid).

    Why two levels: the reported difference is meant to hold for other seeds and other
    questions from the same sources, so both are random factors. Resampling only questions
    treats the seeds run as the only possible ones and understates the interval when runs
    disagree; resampling only seeds treats the questions as fixed. Each resample therefore
    draws the seeds with replacement, then the question indices with replacement (the same
    indices for every drawn seed and for both models, as seeds and questions are crossed),
    and takes the mean paired difference over the drawn seeds and questions: the "pigeonhole"
    bootstrap for crossed factors (Owen, 2007), which is slightly conservative. The interval
    is the percentile interval of these resamples. With one seed it reduces to the one-level
    paired bootstrap of `paired_difference` and says nothing about seed variability.

    The p-value is a two-sided bootstrap test of "no difference": the resampled differences,
    centred on the observed one, mimic its spread under the null, and the p-value is
    `(1 + #{|resampled - observed| >= |observed|}) / (1 + resamples)`.
    """
    _check_interval_settings(resamples, confidence)
    scores_a = _scores_by_seed(a_by_seed, "a_by_seed")
    scores_b = _scores_by_seed(b_by_seed, "b_by_seed")
    if scores_a.shape[1] != scores_b.shape[1]:
        raise ValueError(
            f"a and b must be scored on the same questions, got {scores_a.shape[1]} and "
            f"{scores_b.shape[1]} scores per seed; score both models on the same question set"
        )
    n_seeds = max(scores_a.shape[0], scores_b.shape[0])
    if {scores_a.shape[0], scores_b.shape[0]} - {1, n_seeds}:
        raise ValueError(
            f"a and b must have the same number of seeds (or one of them a single score list), "
            f"got {scores_a.shape[0]} and {scores_b.shape[0]}"
        )
    per_question = scores_a - scores_b  # (n_seeds, n_questions); one row broadcasts
    n_questions = per_question.shape[1]
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // (n_seeds * n_questions))
    differences = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        seed_counts = _resample_counts(rng, n_seeds, size)  # (size, n_seeds)
        question_counts = _resample_counts(rng, n_questions, size)  # (size, n_questions)
        # sum over drawn seeds s and drawn questions q of D[s, q], as count-weighted sums
        totals = ((seed_counts @ per_question) * question_counts).sum(axis=1)
        differences.append(totals / (n_seeds * n_questions))
    differences = np.concatenate(differences)
    difference = float(per_question.mean())
    ci_low, ci_high = _percentile_interval(differences, confidence)
    as_extreme = int((np.abs(differences - difference) >= abs(difference)).sum())
    return SeedPairedComparison(
        n_seeds=n_seeds,
        n_questions=n_questions,
        accuracy_a=float(scores_a.mean()),
        accuracy_b=float(scores_b.mean()),
        difference=difference,
        ci_low=ci_low,
        ci_high=ci_high,
        per_seed_differences=tuple(float(d) for d in per_question.mean(axis=1)),
        p_value=(1 + as_extreme) / (1 + resamples),
    )
