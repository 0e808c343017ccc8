"""Collapse metrics of groups of completions (say, the k samples of each question): distinct-1
and distinct-2 (distinct word n-grams / all word n-grams), the Shannon entropy in bits of the
final answers, and the share of duplicate completions; each within a group, averaged over
groups. Lower values mean less diverse, more collapsed outputs."""

import datasets
import evaluate

from imm_trl.eval import collapse_metrics

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: a list of completions (str) per group.
    verifier: how final answers are read: 'gsm8k'/'math' (numbers) or any other name
        (the answer text). Default 'gsm8k'.
Returns:
    distinct_1, distinct_2, answer_entropy, duplicate_share.
Examples:
    >>> metric = evaluate.load("imm_trl/metrics/collapse")
    >>> metric.compute(predictions=[["Answer: 1", "Answer: 1"]])["duplicate_share"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Collapse(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, verifier="gsm8k"):
        return collapse_metrics(predictions, verifier)
