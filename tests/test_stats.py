"""Paired statistics on hand-computed cases: exact McNemar, the paired bootstrap of one
comparison, and the two-level (seeds x questions) bootstrap across seeds."""

import numpy as np
import pytest

from imm_trl.stats import exact_mcnemar_p, paired_difference, seed_paired_difference

N = 200


def right_on(first: int, last: int | None = None) -> np.ndarray:
    """0/1 scores on N questions: right on questions [first, last) (or [0, first))."""
    scores = np.zeros(N)
    scores[slice(0, first) if last is None else slice(first, last)] = 1.0
    return scores


# -- exact McNemar ------------------------------------------------------------------------------


def test_exact_mcnemar_p_by_hand():
    # 10 discordant pairs, 1 of them won by A: 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert exact_mcnemar_p(1, 9) == 0.021484375
    assert exact_mcnemar_p(9, 1) == 0.021484375
    assert exact_mcnemar_p(0, 3) == 0.25  # 2 * 1/8
    assert exact_mcnemar_p(0, 20) == 2 / 2**20
    assert exact_mcnemar_p(0, 1) == 1.0  # 2 * 1/2
    assert exact_mcnemar_p(5, 5) == 1.0
    assert exact_mcnemar_p(0, 0) == 1.0  # no discordant pair: no evidence either way
    with pytest.raises(ValueError, match="non-negative integers"):
        exact_mcnemar_p(-1, 3)
    with pytest.raises(ValueError, match="non-negative integers"):
        exact_mcnemar_p(1.5, 3)


def test_exact_mcnemar_p_agrees_with_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    for only_a in range(16):
        for only_b in range(16):
            if only_a + only_b:
                expected = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
                assert exact_mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)
    assert exact_mcnemar_p(480, 520) == pytest.approx(stats.binomtest(480, 1000).pvalue)


# -- one comparison: paired_difference ------------------------------------------------------------


def test_paired_difference_covers_a_known_difference_and_is_narrower_than_unpaired():
    a = right_on(60)  # 0.3
    b = a.copy()
    b[60:80] = 1.0  # B is also right on 20 questions A gets wrong: exactly -0.1
    result = paired_difference(a, b, resamples=4000, seed=1)
    assert (result.n, result.accuracy_a, result.accuracy_b) == (200, 0.3, 0.4)
    assert result.difference == pytest.approx(-0.1)
    assert (result.only_a, result.only_b) == (0, 20)
    assert result.mcnemar_p == 2 / 2**20
    # Per-question differences are -1 (10%) or 0: sd 0.3, so -0.1 +- 1.96 * 0.3 / sqrt(200)
    assert result.ci_low == pytest.approx(-0.142, abs=0.01)
    assert result.ci_high == pytest.approx(-0.058, abs=0.01)
    # Bootstrapping each model on its own ignores the pairing: sqrt(0.21 + 0.24) / sqrt(200)
    rng = np.random.default_rng(1)
    unpaired = [
        a[rng.integers(0, N, N)].mean() - b[rng.integers(0, N, N)].mean() for _ in range(4000)
    ]
    unpaired_low, unpaired_high = np.quantile(unpaired, [0.025, 0.975])
    assert unpaired_high - unpaired_low == pytest.approx(2 * 1.96 * 0.0474, abs=0.02)
    assert result.ci_high - result.ci_low < 0.5 * (unpaired_high - unpaired_low)


def test_paired_difference_agrees_with_scipy_paired_bootstrap():
    stats = pytest.importorskip("scipy.stats")
    a, b = right_on(0, 15) + right_on(20, 80), right_on(15, 80)  # only_a 15, only_b 5
    result = paired_difference(a, b, resamples=5000)
    reference = stats.bootstrap(
        (a, b),
        lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis),
        paired=True,
        n_resamples=5000,
        method="percentile",
        random_state=0,
    ).confidence_interval
    assert result.difference == pytest.approx(0.05)
    assert result.ci_low == pytest.approx(reference.low, abs=0.01)
    assert result.ci_high == pytest.approx(reference.high, abs=0.01)
    assert result.mcnemar_p == exact_mcnemar_p(15, 5) == pytest.approx(0.041389, abs=1e-6)


def test_paired_difference_of_identical_scores_is_exactly_zero():
    scores = [True, False, True, True, False]
    result = paired_difference(scores, scores, resamples=100)
    assert result.difference == 0.0 and (result.ci_low, result.ci_high) == (0.0, 0.0)
    assert (result.only_a, result.only_b, result.mcnemar_p) == (0, 0, 1.0)
    assert result.accuracy_a == result.accuracy_b == 0.6


def test_paired_difference_of_non_binary_scores_has_no_mcnemar():
    result = paired_difference([0.5, 1.0, 0.25], [0.5, 0.0, 0.25], resamples=200)
    assert result.difference == pytest.approx(1 / 3)
    assert (result.only_a, result.only_b, result.mcnemar_p) == (None, None, None)
    assert 0.0 <= result.ci_low <= result.ci_high <= 1.0


def test_paired_difference_is_reproducible_by_seed():
    a, b = right_on(0, 30), right_on(10, 50)
    assert paired_difference(a, b, seed=3) == paired_difference(a, b, seed=3)
    # Intervals lie on a grid of 1/200; with few resamples two seeds give different ones.
    assert paired_difference(a, b, resamples=20, seed=3) != paired_difference(
        a, b, resamples=20, seed=4
    )


def test_paired_difference_rejects_bad_input():
    with pytest.raises(ValueError, match="got 3 and 4 scores"):
        paired_difference([1, 0, 1], [1, 0, 1, 1])
    with pytest.raises(ValueError, match="at least one question"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="seed_paired_difference"):
        paired_difference([[1, 0]], [[1, 0]])
    with pytest.raises(ValueError, match="resamples"):
        paired_difference([1], [0], resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1], [0], confidence=95)


# -- across seeds: seed_paired_difference ---------------------------------------------------------


def test_seed_bootstrap_with_identical_seeds_matches_the_one_level_interval():
    theta0 = np.zeros(N)  # no seed: one score list for every seed of the other model
    same = seed_paired_difference([right_on(20)] * 3, theta0, resamples=4000)
    one_level = paired_difference(right_on(20), theta0, resamples=4000)
    assert (same.n_seeds, same.n_questions) == (3, N)
    assert same.per_seed_differences == (0.1, 0.1, 0.1)
    assert same.difference == pytest.approx(0.1)
    assert same.ci_low == pytest.approx(one_level.ci_low, abs=0.01)
    assert same.ci_high == pytest.approx(one_level.ci_high, abs=0.01)
    # theta0 given once or repeated per seed is the same comparison
    assert same == seed_paired_difference([right_on(20)] * 3, [theta0] * 3, resamples=4000)


def test_seed_bootstrap_widens_when_seeds_disagree():
    theta0 = np.zeros(N)
    agreeing = seed_paired_difference([right_on(20)] * 3, theta0, resamples=4000)
    disagreeing = seed_paired_difference(
        [right_on(10), right_on(20), right_on(30)], theta0, resamples=4000
    )
    assert disagreeing.per_seed_differences == (0.05, 0.1, 0.15)
    assert disagreeing.difference == pytest.approx(agreeing.difference)
    assert disagreeing.ci_low < agreeing.ci_low - 0.01
    assert disagreeing.ci_high > agreeing.ci_high + 0.01
    # Averaging over seeds first and resampling questions only hides the seed spread.
    averaged = paired_difference(
        np.mean([right_on(10), right_on(20), right_on(30)], axis=0), theta0, resamples=4000
    )
    assert averaged.ci_high - averaged.ci_low < disagreeing.ci_high - disagreeing.ci_low


def test_seed_bootstrap_p_value():
    a, b = right_on(0, 15) + right_on(20, 80), right_on(15, 80)  # +0.05, only_a 15, only_b 5
    one_seed = seed_paired_difference(a, b, resamples=10000)
    # Normal approximation: z = 0.05 / (sqrt(0.1 - 0.05^2) / sqrt(200)) = 2.26, p = 0.024
    assert one_seed.p_value == pytest.approx(0.024, abs=0.01)
    assert seed_paired_difference([a, a], [a, a], resamples=500).p_value == 1.0
    # 0.1 is 4.7 standard errors from 0: almost no resample is that far from 0.1, and the
    # p-value counts the observed difference itself, so it is never 0.
    strong = seed_paired_difference([right_on(20)] * 2, np.zeros(N), resamples=2000)
    assert 1 / 2001 <= strong.p_value <= 3 / 2001


def test_seed_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="got 3 and 2"):
        seed_paired_difference([np.ones(4)] * 3, [np.ones(4)] * 2)
    with pytest.raises(ValueError, match="got 4 and 5 scores per seed"):
        seed_paired_difference([np.ones(4)] * 2, np.ones(5))
    with pytest.raises(ValueError, match=r"got \[4, 5\] scores"):
        seed_paired_difference([[1, 0, 1, 1], [1, 0, 1, 1, 0]], np.ones(4))
    with pytest.raises(ValueError, match="confidence"):
        seed_paired_difference([np.ones(4)], np.ones(4), confidence=0)
