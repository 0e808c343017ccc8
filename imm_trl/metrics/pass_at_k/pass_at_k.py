"""pass@k: the unbiased estimate (Chen et al., 2021) of the chance that at least one of k
samples is correct, from n >= k verified samples per question, averaged over questions."""

import datasets
import evaluate

from imm_trl.metrics.functional import pass_at_k
from imm_trl.verify import get_verifier

_DESCRIPTION = __doc__
_CITATION = """@article{chen2021codex, title={Evaluating Large Language Models Trained on Code},
author={Chen, Mark and others}, journal={arXiv:2107.03374}, year={2021}}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: a list of n sampled completions (str) per question (the same n for all).
    references: the gold answer per question, as the verifier reads it.
    k: an int or a list of ints, each at most n (default [1]).
    verifier: 'gsm8k', 'math', 'choice' or 'reasoning_gym:<family>[,<family>...]'.
Returns:
    'pass@<k>' for each k.
Examples:
    >>> metric = evaluate.load("imm_trl/metrics/pass_at_k")
    >>> metric.compute(predictions=[["4", "5"], ["1", "2"]], references=["#### 4", "#### 3"],
    ...                k=[1, 2], verifier="gsm8k")
    {'pass@1': 0.25, 'pass@2': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PassAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1,), verifier="gsm8k"):
        ks = [k] if isinstance(k, int) else list(k)
        checker = get_verifier(verifier)
        correct = [
            sum(v.is_correct for v in checker.verify_batch(samples, [gold] * len(samples)))
            for samples, gold in zip(predictions, references, strict=True)
        ]
        return {
            f"pass@{kk}": sum(
                pass_at_k(len(samples), c, kk)
                for samples, c in zip(predictions, correct, strict=True)
            )
            / len(predictions)
            for kk in ks
        }
