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

`imm-trl eval MODEL --against OTHER` scores a second model on the same questions and adds the
paired comparison of each set (`imm_trl.stats.paired_difference`): the difference of
accuracies with a paired bootstrap interval, the exact McNemar p-value and the discordant counts.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from imm_trl.rejection import pass_at_k
from imm_trl.sampling.base import Sampler, SamplingParams
from imm_trl.stats import PairedComparison, paired_difference
from imm_trl.tasks.base import QuestionSet, TaskSuite
from imm_trl.validation import positive_int
from imm_trl.verify import get_verifier, predicted_number, reasoning_gym_answer

__all__ = [
    "add_eval_parser",
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
# Pure metric functions
# --------------------------------------------------------------------------------------------


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values`: resample them with
    replacement `resamples` times and take the (1-confidence)/2 and (1+confidence)/2 quantiles
    of the resampled means. NaNs for no values."""
    import numpy as np

    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams in `texts` (pooled); 0.0 if there are none."""
    grams = [
        tuple(words[i : i + n])
        for words in (text.split() for text in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def answer_entropy(answers: Sequence[Any]) -> float:
    """Shannon entropy in bits of the empirical distribution of `answers` (0.0 when all agree
    or there are none). A missing answer counts as one more distinct value."""
    counts = Counter(answers)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def duplicate_share(texts: Sequence[str]) -> float:
    """Share of `texts` equal (after stripping whitespace) to an earlier one; 0.0 for none."""
    if not texts:
        return 0.0
    return 1.0 - len({text.strip() for text in texts}) / len(texts)


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
    (1 or 0, in question order), for paired comparisons of two models. It is off by default
    because every other value is a scalar that training callbacks log as a metric."""
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
# imm-trl eval
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


def question_sets_from_args(args: argparse.Namespace) -> tuple[dict[str, QuestionSet], int]:
    """The question sets to evaluate and the token budget per completion (the suite's own,
    256 for worked GSM8K solutions, or --max-new-tokens)."""
    if args.jsonl is not None:
        from imm_trl.tasks import load_jsonl_questions

        template = args.template or "cot"
        questions = load_jsonl_questions(
            args.jsonl, limit=args.limit, seed=args.seed, template=template
        )
        budget = args.max_new_tokens or (256 if template == "cot" else 64)
        return {questions.name: questions}, budget
    from imm_trl.tasks import load_suite

    suite = load_suite(args.suite, seed=args.seed, n_train=0, n_eval=args.limit or 100)
    names = args.sets or list(suite.eval_sets)
    unknown = set(names) - set(suite.eval_sets)
    if unknown:
        raise SystemExit(f"suite {args.suite!r} has no set(s) {sorted(unknown)}")
    budget = args.max_new_tokens or suite.max_new_tokens
    return {name: suite.eval_sets[name] for name in names}, budget


def format_report_line(name: str, report: dict[str, float]) -> str:
    line = (
        f"{name:<24} n={report['n']:<4} accuracy={report['accuracy']:.3f} "
        f"[{report['accuracy_ci_low']:.3f}, {report['accuracy_ci_high']:.3f}] "
        f"format={report['format_share']:.2f}"
    )
    k = int(report["samples"])
    if k > 1:
        line += f" pass@1={report['pass@1']:.3f} pass@{k}={report[f'pass@{k}']:.3f}"
    return line + (
        f" distinct_2={report['distinct_2']:.3f} entropy={report['answer_entropy']:.2f}"
        f" dup={report['duplicate_share']:.2f}"
    )


def format_paired_line(name: str, comparison: PairedComparison) -> str:
    return (
        f"{name:<24} paired n={comparison.n:<4} difference={comparison.difference:+.3f} "
        f"[{comparison.ci_low:+.3f}, {comparison.ci_high:+.3f}] "
        f"mcnemar_p={comparison.mcnemar_p:.4g} only_model={comparison.only_a} "
        f"only_against={comparison.only_b}"
    )


def evaluate_model(
    model_dir: str | Path,
    adapter: str | Path | None,
    question_sets: dict[str, QuestionSet],
    max_new_tokens: int,
    args: argparse.Namespace,
    label: str = "",
) -> dict[str, dict[str, Any]]:
    """One model's reports on every question set (with per-question verdicts), each printed as
    it is done; the sampler is closed before returning, so that a second vLLM engine can start."""
    reports = {}
    with load_sampler(model_dir, adapter, args.sampler, args.dtype) as sampler:
        for name, questions in question_sets.items():
            reports[name] = evaluate_question_set(
                sampler,
                questions,
                samples=args.samples,
                temperature=args.temperature if args.samples > 1 else 0.0,
                max_new_tokens=max_new_tokens,
                seed=args.seed,
                bootstrap=args.bootstrap,
                per_question=True,
            )
            print(format_report_line(name + label, reports[name]), flush=True)
    return reports


def run_eval(args: argparse.Namespace) -> int:
    """`imm-trl eval`: evaluate a model (or adapter) on a suite's eval sets or a JSONL file,
    and with --against (or --against-adapter) compare it with a second one, paired by question."""
    question_sets, max_new_tokens = question_sets_from_args(args)
    reports = evaluate_model(args.model_dir, args.adapter, question_sets, max_new_tokens, args)
    against = args.against
    if against is None and args.against_adapter is not None:
        against = args.model_dir  # another adapter on the same base model
    comparison_out: dict[str, Any] = {}  # the --out keys of a comparison
    if against is not None:
        against_reports = evaluate_model(
            against, args.against_adapter, question_sets, max_new_tokens, args, " (against)"
        )
        paired = {
            name: paired_difference(
                reports[name]["correct"],
                against_reports[name]["correct"],
                resamples=args.bootstrap,
                seed=args.seed,
            )
            for name in question_sets
        }
        for name, comparison in paired.items():
            print(format_paired_line(name, comparison), flush=True)
        comparison_out = {
            "against": {
                "model": str(against),
                "adapter": None if args.against_adapter is None else str(args.against_adapter),
                "sets": against_reports,
            },
            "paired": {name: asdict(comparison) for name, comparison in paired.items()},
        }
    if args.out is not None:
        out = {
            "model": str(args.model_dir),
            "adapter": None if args.adapter is None else str(args.adapter),
            "settings": {
                **{
                    key: (str(value) if isinstance(value, Path) else value)
                    for key, value in vars(args).items()
                    if key not in ("func", "command")
                },
                "max_new_tokens": max_new_tokens,
            },
            "sets": reports,
            **comparison_out,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def add_eval_parser(commands) -> argparse.ArgumentParser:
    """Register `eval` on an argparse subparsers object (as `imm_trl.cli` does for its
    commands); the parsed arguments' `func` runs it."""
    parser = commands.add_parser(
        "eval",
        help="greedy accuracy (bootstrap CI), pass@k and collapse metrics of a model or adapter "
        "on a task suite or a GSM8K-format JSONL file",
    )
    parser.add_argument("model_dir", help="model directory, or 'default' for the default model")
    parser.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory")
    parser.add_argument(
        "--against",
        help="a second model directory ('default': the default model) scored on the same "
        "questions with the same settings; adds the paired difference of each set",
    )
    parser.add_argument(
        "--against-adapter",
        type=Path,
        help="PEFT LoRA adapter of the second model (without --against: on model_dir)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--suite", help="task suite name (see imm_trl.tasks.SUITES)")
    source.add_argument("--jsonl", type=Path, help="GSM8K-format JSONL file (question, answer)")
    parser.add_argument("--sets", nargs="+", help="eval sets of the suite (default: all)")
    parser.add_argument(
        "--limit",
        type=positive_int,
        help="questions per set (suite default 100; JSONL default all)",
    )
    parser.add_argument("--template", help="prompt template for --jsonl (default: cot)")
    parser.add_argument("--sampler", choices=["hf", "vllm"], default="hf", help="backend")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument(
        "--samples", type=positive_int, default=1, help="k for pass@k (1: greedy only)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="temperature of the k samples"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help="tokens per completion (default: the suite's; 256 for JSONL with worked solutions)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of questions and sampling")
    parser.add_argument(
        "--out",
        type=Path,
        help="write the report as JSON here (with --against: also 'against' and 'paired')",
    )
    parser.set_defaults(func=run_eval)
    return parser
