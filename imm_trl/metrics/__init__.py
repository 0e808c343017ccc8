"""The evaluation metrics as local `evaluate` modules: `evaluate.load` needs no hub fetch.

    from imm_trl.metrics import load_metric
    load_metric("verified_accuracy").compute(predictions=completions, references=golds,
                                             verifier="gsm8k")
    load_metric("pass_at_k").compute(predictions=[[s1, s2, ...], ...], references=golds,
                                     k=[1, 4], verifier="gsm8k")
    load_metric("collapse").compute(predictions=[[s1, s2, ...], ...], verifier="gsm8k")

or `evaluate.load(str(metric_path("pass_at_k")))`. Each module computes with `imm_trl.metrics.functional` (collapse: `imm_trl.eval`).
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("verified_accuracy", "pass_at_k", "collapse")


def metric_path(name: str) -> Path:
    """The module directory of a metric, as `evaluate.load` takes it."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRIC_NAMES)}")
    return METRICS_DIR / name


def load_metric(name: str, **kwargs):
    """`evaluate.load` on one of our local metric modules."""
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)
