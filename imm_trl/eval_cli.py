"""`imm-trl eval`: evaluate a model directory (or adapter) on a task suite or a JSONL file, and
with `--against` compare it with a second model, paired by question; the library it calls is
`imm_trl.eval`. The JSON report (`--out`) is written atomically.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from imm_trl.eval import evaluate_question_set, load_sampler
from imm_trl.files import write_atomically
from imm_trl.stats import PairedComparison, paired_difference
from imm_trl.tasks.base import QuestionSet
from imm_trl.validation import positive_int


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
        write_atomically(Path(args.out), lambda temporary: temporary.write_text(json.dumps(out, indent=2) + "\n"))
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
