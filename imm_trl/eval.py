"""Evaluation: greedy accuracy with a bootstrap confidence interval, pass@k, and collapse
metrics, on any sampler (so on any model directory or adapter), plus `imm-trl eval`.

    report = evaluate_question_set(sampler, suite.eval_sets["ood"], samples=8, temperature=0.8)
    report["accuracy"], report["accuracy_ci_low"], report["pass@8"], report["distinct_2"]

Accuracy is always measured on one greedy completion per question. With `samples` > 1, a second
pass draws `samples` completions per question at `temperature` for pass@k and the collapse
metrics. Collapse metrics (lower = more collapsed) are computed within groups and averaged over
groups: a group is the samples of one question when `samples` > 1, or the greedy completions of
the whole set when `samples` = 1 (then they measure answering every question alike):

- `distinct_1`, `distinct_2`: distinct word n-grams / all word n-grams of the group (Li et al.,
  2016), 0 for a group without any n-gram;
- `answer_entropy`: Shannon entropy, in bits, of the final answers of the group;
- `duplicate_share`: share of the group's completions equal to an earlier one (after strip).

The pure functions are exposed too, and as local `evaluate` modules (`imm_trl.metrics`).

The pure metrics live in `imm_trl.metrics.functional` (re-exported here); the command line is
`imm_trl.eval_cli`: `imm-trl eval MODEL --against OTHER` scores a second model on the same questions and adds the
paired comparison of each set (`imm_trl.stats.paired_difference`): the difference of
accuracies with a paired bootstrap interval, the exact McNemar p-value and the discordant counts.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imm_trl.metrics.functional import (
    answer_entropy,
    bootstrap_ci,
    distinct_n,
    duplicate_share,
    pass_at_k,
)
from imm_trl.sampling.base import Sampler, SamplingParams
from imm_trl.tasks.base import QuestionSet, TaskSuite
from imm_trl.verify import get_verifier, predicted_number, reasoning_gym_answer

__all__ = [
    "answer_entropy",
    "bootstrap_ci",
    "collapse_metrics",
    "distinct_n",
    "duplicate_share",
    "evaluate_question_set",
    "evaluate_suite",
    "final_answer",
    "pass_at_k",
    "score_completions",
]

# --------------------------------------------------------------------------------------------
# Completions to final answers and collapse metrics (the pure metrics: imm_trl.metrics.functional)
# --------------------------------------------------------------------------------------------


_ANSWER_MARKER_RE = re.compile(r"<answer>|\\boxed\{|answer\s*(?:is\b|:)|####", re.IGNORECASE)


def has_answer_marker(completion: str) -> bool:
    """Whether the completion states a final answer explicitly (the format the prompts ask)."""
    return bool(_ANSWER_MARKER_RE.search(completion))


def final_answer(completion: str, verifier: str) -> str:
    """The completion's final answer, normalised the way its verifier reads it: a number for
    gsm8k/math ('' if none), the answer text otherwise."""
    if verifier in ("gsm8k", "math"):
        value = predicted_number(completion)
        return "" if value is None else str(value)
    return reasoning_gym_answer(completion).strip().lower()


def collapse_metrics(groups: Sequence[Sequence[str]], verifier: str) -> dict[str, float]:
    """Collapse metrics within each group of completions, averaged over groups."""
    groups = [list(group) for group in groups if group]
    if not groups:
        return {"distinct_1": 0.0, "distinct_2": 0.0, "answer_entropy": 0.0, "duplicate_share": 0.0}

    def mean(values):
        return sum(values) / len(values)

    return {
        "distinct_1": mean([distinct_n(group, 1) for group in groups]),
        "distinct_2": mean([distinct_n(group, 2) for group in groups]),
        "answer_entropy": mean(
            [answer_entropy([final_answer(text, verifier) for text in group]) for group in groups]
        ),
        "duplicate_share": mean([duplicate_share(group) for group in groups]),
    }


# --------------------------------------------------------------------------------------------
# Scoring completions of a question set, and evaluating a sampler on it
# --------------------------------------------------------------------------------------------


def score_completions(
    question_set: QuestionSet,
    greedy: Sequence[str],
    sampled: Sequence[Sequence[str]] | None = None,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    verifier_time_limit_s: float = 1.0,
    per_question: bool = False,
) -> dict[str, Any]:
    """The report for given completions: `greedy` (one per question) and optionally `sampled`
    (k per question). Rows whose gold the verifier cannot read count as wrong and are counted
    in `bad_gold`; check timeouts count as wrong and are counted in `timeouts`.

    With `per_question`, the report also holds `correct`: the greedy verdict of each question
    (1 or 0, in question order), for paired comparisons of two models, and with samples
    `passed` (1 if any of the k samples is correct: pass@k per question) and
    `distinct_2_by_question`. It is off by default because every other value is a scalar that
    training callbacks log as a metric."""
    rows = question_set.rows
    if len(greedy) != len(rows) or (sampled is not None and len(sampled) != len(rows)):
        raise ValueError("one greedy completion (and one list of samples) per question needed")
    verifier = get_verifier(question_set.verifier, time_limit_s=verifier_time_limit_s)
    golds = [row["answer"] for row in rows]
    correct = [v.is_correct for v in verifier.verify_batch(list(greedy), golds)]
    bad_gold = verifier.counts["bad_gold"]  # rows, counted once (the samples would repeat it)
    low, high = bootstrap_ci(correct, resamples=bootstrap, seed=seed)
    report: dict[str, float] = {
        "n": len(rows),
        "accuracy": sum(correct) / len(rows) if rows else math.nan,
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "format_share": sum(map(has_answer_marker, greedy)) / len(rows) if rows else math.nan,
        "mean_completion_chars": sum(map(len, greedy)) / len(rows) if rows else math.nan,
    }
    families = [row.get("family") for row in rows]
    if len(set(families)) > 1:
        for family in dict.fromkeys(families):
            hits = [c for c, f in zip(correct, families, strict=True) if f == family]
            report[f"accuracy/{family}"] = sum(hits) / len(hits)

    if sampled is None or not sampled or len(sampled[0]) < 2:
        groups = [list(greedy)]
        report["samples"] = 1
    else:
        k = len(sampled[0])
        flat = [text for texts in sampled for text in texts]
        flat_golds = [gold for gold, texts in zip(golds, sampled, strict=True) for _ in texts]
        verdicts = verifier.verify_batch(flat, flat_golds)
        counts = [
            sum(v.is_correct for v in verdicts[i * k : (i + 1) * k]) for i in range(len(rows))
        ]
        report["samples"] = k
        report["pass@1"] = sum(pass_at_k(k, c, 1) for c in counts) / len(rows)
        report[f"pass@{k}"] = sum(pass_at_k(k, c, k) for c in counts) / len(rows)
        groups = [list(texts) for texts in sampled]
    report.update(collapse_metrics(groups, question_set.verifier))
    report["bad_gold"] = bad_gold
    report["timeouts"] = verifier.counts["timeout"]  # over all checks, greedy and sampled
    if per_question:
        report["correct"] = [int(c) for c in correct]
        if report["samples"] > 1:
            report["passed"] = [int(c > 0) for c in counts]
            report["distinct_2_by_question"] = [distinct_n(group, 2) for group in groups]
    return report


def evaluate_question_set(
    sampler: Sampler,
    question_set: QuestionSet,
    *,
    samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    bootstrap: int = 1000,
    per_question: bool = False,
) -> dict[str, Any]:
    """Greedy accuracy (one greedy completion per question) with a bootstrap CI and collapse
    metrics; with `samples` > 1 also pass@1 and pass@`samples` from that many completions per
    question at `temperature` (which must then be above 0). `per_question` adds the greedy
    verdicts as `correct` (see `score_completions`)."""
    if samples < 1:
        raise ValueError("samples must be at least 1")
    if samples > 1 and temperature <= 0:
        raise ValueError("pass@k with samples > 1 needs temperature > 0 (greedy samples agree)")
    prompts = [row["question"] for row in question_set.rows]
    start = time.perf_counter()
    greedy_params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)
    greedy = [texts[0] for texts in sampler.generate(prompts, 1, greedy_params)]
    sampled = None
    if samples > 1:
        sampled_params = SamplingParams(
            temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed
        )
        sampled = sampler.generate(prompts, samples, sampled_params)
    generation_seconds = time.perf_counter() - start
    report = score_completions(
        question_set, greedy, sampled, bootstrap=bootstrap, seed=seed, per_question=per_question
    )
    report["generation_seconds"] = generation_seconds
    return report


def evaluate_suite(
    sampler: Sampler, suite: TaskSuite, sets: Sequence[str] | None = None, **kwargs
) -> dict[str, dict[str, float]]:
    """`evaluate_question_set` on each of the suite's eval sets (or the named ones)."""
    names = list(suite.eval_sets) if sets is None else list(sets)
    return {name: evaluate_question_set(sampler, suite.eval_sets[name], **kwargs) for name in names}


# --------------------------------------------------------------------------------------------
# A sampler over a model directory (or adapter)
# --------------------------------------------------------------------------------------------


def load_sampler(
    model_dir: str | Path,
    adapter: str | Path | None = None,
    backend: str = "hf",
    dtype: str = "float32",
):
    """A sampler over a model directory ("default": the default model), optionally through a
    PEFT LoRA adapter: HF generate (adapter merged in memory) or vLLM (a LoRA request)."""
    import torch
    from transformers import AutoTokenizer

    from imm_trl.models import default_model_dir, ensure_chat_ready

    model_dir = default_model_dir() if str(model_dir) == "default" else Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ensure_chat_ready(tokenizer)
    if backend == "vllm":
        from imm_trl.sampling import VLLMSampler, VLLMSamplerConfig

        config = VLLMSamplerConfig(dtype=dtype, show_progress=False)
        if adapter is not None:
            rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
            # vLLM accepts only some ranks as its maximum (8, 16, 32, ...): round up.
            config.enable_lora, config.max_lora_rank = True, max(8, 1 << (rank - 1).bit_length())
        sampler = VLLMSampler(model_dir, tokenizer, config)
        sampler.set_lora_adapter(adapter)
        return sampler
    if backend != "hf":
        raise ValueError(f"unknown sampler {backend!r}; valid: hf, vllm")
    from transformers import AutoModelForCausalLM

    from imm_trl.sampling import HFSampler, HFSamplerConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    check_finite_weights(model, adapter or model_dir)
    return HFSampler(model, tokenizer, HFSamplerConfig(show_progress=False))


def check_finite_weights(model, source) -> None:
    """Raise a ValueError naming the first parameter with NaN or Inf: such a model scores
    0.000 on everything, which would read as a result rather than as broken weights."""
    import torch

    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise ValueError(
                f"the weights loaded from {source} contain NaN or Inf (first: {name}); "
                "re-create or re-merge that checkpoint"
            )


# The `imm-trl eval` command lives in imm_trl.eval_cli; its names stay importable from here.
CLI_NAMES = (
    "add_eval_parser",
    "evaluate_model",
    "format_paired_line",
    "format_report_line",
    "question_sets_from_args",
    "run_eval",
)


def __getattr__(name):
    if name in CLI_NAMES:
        from imm_trl import eval_cli

        return getattr(eval_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
