"""Task calibration: greedy base accuracy of the default model (SmolLM2-135M-Instruct) on
candidate reasoning-gym families and prompt templates, and on the eval sets of the built-in
suites, so that suite choices can cite a measurement (target: 5-60% greedy accuracy per set).

One vLLM engine, one batched generate call per token budget; 100 questions per candidate.
Writes benchmarks/results/task_calibration.json and task_calibration.md.

    VLLM_CPU_KVCACHE_SPACE=2 .venv/bin/python benchmarks/task_calibration.py
    # all sections: ~15 min on 2 free cores (48 min measured on 2 cores shared with 3 other
    # jobs); --sections suites --update re-measures only the built-in suites
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from imm_trl.eval import final_answer, score_completions  # noqa: E402
from imm_trl.models import DEFAULT_MODEL_NAME, default_model_dir  # noqa: E402
from imm_trl.sampling import SamplingParams  # noqa: E402
from imm_trl.tasks import (  # noqa: E402
    SUITE_SPECS,
    FamilySpec,
    QuestionSet,
    family_question_set,
    load_jsonl_questions,
    load_suite,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
FIXTURE_GSM8K = REPO / "tests" / "fixtures" / "gsm8k" / "test_sample.jsonl"
LOW, HIGH = 0.05, 0.60

# Most new tokens per template: answers are one short line; worked steps need more.
MAX_NEW_TOKENS = {"answer": 16, "cot": 96, "zero_shot": 64, "gsm8k": 256}

ANSWER_CANDIDATES = [
    FamilySpec("products", {"min_digits": 1, "max_digits": 2}),
    FamilySpec("gcd", {"min_value": 1, "max_value": 20}),
    FamilySpec("gcd", {"min_value": 1, "max_value": 50}),
    FamilySpec("lcm", {"min_value": 1, "max_value": 20}),
    FamilySpec("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    FamilySpec("chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}),
    FamilySpec(
        "basic_arithmetic",
        {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 1,
            "operators": ("+", "-"),
            "allow_parentheses": False,
            "allow_negation": False,
        },
    ),
    FamilySpec(
        "basic_arithmetic",
        {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 2,
            "operators": ("+", "-"),
            "allow_parentheses": False,
            "allow_negation": False,
        },
    ),
    FamilySpec("simple_equations", {"min_terms": 2, "max_terms": 2, "max_value": 20}),
    FamilySpec("count_bits", {"min_n": 1, "max_n": 1000}),
    FamilySpec("leg_counting", {"min_animals": 2, "max_animals": 2, "max_instances": 3}),
    FamilySpec("leg_counting", {"min_animals": 1, "max_animals": 1, "max_instances": 5}),
    FamilySpec("syllogism"),
    FamilySpec("letter_counting", {"min_words": 1, "max_words": 3}),
    FamilySpec("spell_backward", {"min_word_len": 3, "max_word_len": 5}),
    FamilySpec("word_sequence_reversal", {"min_words": 3, "max_words": 3}),
    FamilySpec("aiw", {"max_entities": 3}),
    FamilySpec("family_relationships", {"min_family_size": 4, "max_family_size": 4}),
    FamilySpec("calendar_arithmetic", {"tasks": ["weekday_of_date"]}),
    FamilySpec("number_format", {"min_num_candidates": 2, "max_num_candidates": 2}),
]
COT_CANDIDATES = [
    FamilySpec("products", {"min_digits": 1, "max_digits": 2}),
    FamilySpec("gcd", {"min_value": 1, "max_value": 50}),
    FamilySpec("chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}),
    FamilySpec(
        "basic_arithmetic",
        {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 2,
            "operators": ("+", "-"),
            "allow_parentheses": False,
            "allow_negation": False,
        },
    ),
    FamilySpec("leg_counting", {"min_animals": 2, "max_animals": 2, "max_instances": 3}),
]
ZERO_SHOT_CANDIDATES = [
    FamilySpec("chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}),
    FamilySpec("syllogism"),
]


@dataclass
class Candidate:
    section: str  # "families", "suites" or "gsm8k"
    template: str
    questions: QuestionSet
    max_new_tokens: int

    @property
    def key(self) -> str:
        return f"{self.section}|{self.questions.name}|{self.template}"


SECTIONS = ("families", "suites", "gsm8k")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=100, help="questions per candidate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="what to measure: candidate families, the built-in suites, GSM8K (long)",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the rows of sections not measured now from the existing results",
    )
    parser.add_argument(
        "--data", type=Path, default=SHARED_GSM8K if SHARED_GSM8K.exists() else FIXTURE_GSM8K
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args()


def build_candidates(args) -> list[Candidate]:
    n, seed = args.questions, args.seed
    candidates = []
    for template, families in (
        ("answer", ANSWER_CANDIDATES),
        ("cot", COT_CANDIDATES),
        ("zero_shot", ZERO_SHOT_CANDIDATES),
    ):
        for family in families:
            questions = family_question_set(family, n, seed=seed, template=template)
            candidates.append(Candidate("families", template, questions, MAX_NEW_TOKENS[template]))
    for name, spec in SUITE_SPECS.items():
        suite = load_suite(name, seed=seed, n_train=0, n_eval=n)
        for set_name, questions in suite.eval_sets.items():
            template = spec.ood_template if set_name == "ood" else spec.template
            candidates.append(Candidate("suites", template, questions, spec.max_new_tokens))
    questions = load_jsonl_questions(
        args.data, limit=min(n, 100), seed=seed, template="cot", name="gsm8k"
    )
    candidates.append(Candidate("gsm8k", "cot", questions, MAX_NEW_TOKENS["gsm8k"]))
    return candidates


def majority_share(questions: QuestionSet) -> float:
    """Accuracy of answering every question with the set's most common gold answer."""
    answers = Counter(final_answer(row["solution"], questions.verifier) for row in questions.rows)
    return answers.most_common(1)[0][1] / len(questions) if len(questions) else 0.0


def generate_greedy(sampler, candidates: list[Candidate]) -> list[list[str]]:
    """Greedy completions for every candidate, one generate call per token budget."""
    results: list[list[str] | None] = [None] * len(candidates)
    for budget in sorted({c.max_new_tokens for c in candidates}):
        chosen = [i for i, c in enumerate(candidates) if c.max_new_tokens == budget]
        prompts = [row["question"] for i in chosen for row in candidates[i].questions.rows]
        params = SamplingParams(temperature=0.0, max_new_tokens=budget)
        start = time.perf_counter()
        texts = [t[0] for t in sampler.generate(prompts, 1, params)]
        print(
            f"  {len(prompts)} prompts, {budget} new tokens max: {time.perf_counter() - start:.0f}s"
        )
        position = 0
        for i in chosen:
            size = len(candidates[i].questions)
            results[i] = texts[position : position + size]
            position += size
    return results


def measure(candidates: list[Candidate], args) -> tuple[list[dict], float]:
    """Rows of accuracy figures for the candidates, from one vLLM engine."""
    from transformers import AutoTokenizer

    from imm_trl.sampling import VLLMSampler, VLLMSamplerConfig

    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sampler = VLLMSampler(
        model_dir, tokenizer, VLLMSamplerConfig(dtype=args.dtype, show_progress=False)
    )
    start = time.perf_counter()
    completions = generate_greedy(sampler, candidates)
    seconds = time.perf_counter() - start
    sampler.close()
    measured_on = datetime.date.today().isoformat()
    rows = []
    for candidate, texts in zip(candidates, completions, strict=True):
        report = score_completions(candidate.questions, texts, seed=args.seed)
        rows.append(
            {
                "key": candidate.key,
                "section": candidate.section,
                "set": candidate.questions.name,
                "template": candidate.template,
                "verifier": candidate.questions.verifier,
                "max_new_tokens": candidate.max_new_tokens,
                "measured_on": measured_on,
                "n": report["n"],
                "accuracy": report["accuracy"],
                "ci_low": report["accuracy_ci_low"],
                "ci_high": report["accuracy_ci_high"],
                "format_share": report["format_share"],
                "answer_entropy_bits": report["answer_entropy"],
                "report": report,
                "examples": [
                    {"completion": text, "gold": row["solution"]}
                    for text, row in list(zip(texts, candidate.questions.rows, strict=True))[:3]
                ],
            }
        )
        print(
            f"{candidate.questions.name[:70]:<70} {candidate.template:<9} "
            f"acc={report['accuracy']:.2f} format={report['format_share']:.2f}"
        )
    return rows, seconds


def markdown(result: dict) -> str:
    lines = [
        "# Task calibration: greedy base accuracy of the default model",
        "",
        f"Model {result['model']} ({result['dtype']}) on vLLM-cpu {result['vllm']}, "
        f"reasoning-gym {result['reasoning_gym']}, {result['questions']} questions per row "
        f"(GSM8K: 100 from test.jsonl), seed {result['seed']}, greedy decoding. "
        "95% percentile-bootstrap CI (1000 resamples).",
        "",
        f"Target for the suites: {LOW:.0%} <= accuracy <= {HIGH:.0%} ('in range'), and clearly "
        "above 'majority': the accuracy of answering every question with the set's most common "
        "gold answer. Where accuracy is near or below it, the model repeats one answer rather "
        "than working anything out (see 'entropy': bits of the model's answers over the set; "
        "0 = the same answer to every question). 'format': share of completions stating "
        "'Answer: ...'.",
        "",
        "Command: `VLLM_CPU_KVCACHE_SPACE=2 .venv/bin/python benchmarks/task_calibration.py` "
        "(`--sections suites --update` re-measures only the suites). Runs:",
        "",
    ]
    for run in result["runs"]:
        lines.append(
            f"- {run['date']}: {', '.join(run['sections'])}; generation {run['seconds']:.0f} s "
            f"on {run['machine']}"
        )
    lines.append("")
    for section, title in (
        ("suites", "Built-in suites (the eval sets `load_suite(name)` returns)"),
        ("families", "Candidate families"),
        ("gsm8k", "GSM8K-format JSONL (`load_jsonl_questions`, 3 worked solutions shown)"),
    ):
        rows = [r for r in result["rows"] if r["section"] == section]
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            "| set | template | n | accuracy [95% CI] | majority | entropy | format "
            "| in range | per family |",
            "|---|---|---:|---|---:|---:|---:|:-:|---|",
        ]
        for r in rows:
            in_range = "yes" if LOW <= r["accuracy"] <= HIGH else "no"
            per_family = ", ".join(
                f"{key.split('/', 1)[1]} {value:.0%}"
                for key, value in r["report"].items()
                if key.startswith("accuracy/")
            )
            lines.append(
                f"| {r['set']} | {r['template']} | {r['n']} | {r['accuracy']:.0%} "
                f"[{r['ci_low']:.0%}, {r['ci_high']:.0%}] | {r['majority']:.0%} "
                f"| {r['answer_entropy_bits']:.1f} | {r['format_share']:.0%} "
                f"| {in_range} | {per_family} |"
            )
        lines.append("")
    return "\n".join(lines)


def main():
    args = parse_args()
    candidates = build_candidates(args)
    chosen = [c for c in candidates if c.section in args.sections]
    print(f"{len(chosen)} sets, {sum(len(c.questions) for c in chosen)} questions to generate")
    rows, seconds = measure(chosen, args)

    json_path = args.out / "task_calibration.json"
    previous = json.loads(json_path.read_text()) if args.update and json_path.exists() else {}
    runs = previous.get("runs", [])
    runs.append(
        {
            "date": datetime.date.today().isoformat(),
            "sections": list(args.sections),
            "seconds": seconds,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
        }
    )
    # Keep earlier rows of the sections not measured now, for candidates that still exist.
    by_key = {row["key"]: row for row in previous.get("rows", [])}
    by_key.update({row["key"]: row for row in rows})
    majority = {c.key: majority_share(c.questions) for c in candidates}
    ordered = [dict(by_key[c.key], majority=majority[c.key]) for c in candidates if c.key in by_key]
    result = {
        "model": DEFAULT_MODEL_NAME,
        "dtype": args.dtype,
        "vllm": version("vllm-cpu") if _installed("vllm-cpu") else version("vllm"),
        "reasoning_gym": version("reasoning-gym"),
        "questions": args.questions,
        "seed": args.seed,
        "runs": runs,
        "rows": ordered,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "task_calibration.md").write_text(markdown(result))
    print(f"wrote {args.out / 'task_calibration.md'}")


def _installed(distribution: str) -> bool:
    try:
        version(distribution)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    main()
