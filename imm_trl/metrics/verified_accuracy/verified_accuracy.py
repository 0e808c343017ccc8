"""Verified accuracy: the share of completions an imm-trl verifier accepts against the gold
answers, with a percentile-bootstrap confidence interval."""

import datasets
import evaluate

from imm_trl.metrics.functional import bootstrap_ci
from imm_trl.verify import get_verifier

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: one completion (str) per question.
    references: the gold answer per question, as the verifier reads it (a GSM8K solution
        ending in '#### n', a reasoning-gym entry as JSON, a letter, ...).
    verifier: 'gsm8k', 'math', 'choice' or 'reasoning_gym:<family>[,<family>...]'.
    bootstrap: resamples for the confidence interval (default 1000).
    confidence: the interval's coverage (default 0.95).
    seed: seed of the resampling (default 0).
Returns:
    accuracy, accuracy_ci_low, accuracy_ci_high.
Examples:
    >>> metric = evaluate.load("imm_trl/metrics/verified_accuracy")
    >>> metric.compute(predictions=["Answer: 4", "5"], references=["#### 4", "#### 6"],
    ...                verifier="gsm8k")["accuracy"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VerifiedAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions, references, verifier="gsm8k", bootstrap=1000, confidence=0.95, seed=0
    ):
        verdicts = get_verifier(verifier).verify_batch(predictions, references)
        correct = [v.is_correct for v in verdicts]
        low, high = bootstrap_ci(correct, resamples=bootstrap, confidence=confidence, seed=seed)
        return {
            "accuracy": sum(correct) / len(correct) if correct else float("nan"),
            "accuracy_ci_low": low,
            "accuracy_ci_high": high,
        }
