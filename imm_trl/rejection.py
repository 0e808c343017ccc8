"""Rejection sampling: questions -> k samples each -> verifier -> an SFT dataset of the correct ones.

    sampler = VLLMSampler(model_dir, tokenizer)          # or HFSampler(model, tokenizer)
    result = RejectionSampler(sampler, RejectionSamplingConfig(verifier="gsm8k")).run(questions)
    SFTTrainer(..., train_dataset=result.dataset)        # conversational prompt/completion:
                                                         # completion-only loss
    result.stats                                         # yield, pass@1, pass@k, ...

Bad input never stops a run and never becomes a label: a row without a question or gold answer,
or whose gold the verifier cannot parse, is skipped and listed in `stats.malformed_rows` (with
its row id and the reason); empty completions are counted wrong and listed by row id.

Over 400 lines because the config, the per-row checks that make those skips, and the pass
itself are one unit a user reads together; the metrics it reports live in `metrics/functional.py`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from datasets import Dataset

from imm_trl.metrics.functional import pass_at_k
from imm_trl.sampling.base import Sampler, SamplingParams
from imm_trl.validation import check_dataclass
from imm_trl.verify import Verdict, Verifier, get_verifier


@dataclass(frozen=True)
class SharedDefaults:
    """The defaults `IMMConfig` and `RejectionSamplingConfig` share: both dataclasses read them
    from `SHARED_DEFAULTS`, so they cannot drift apart. They are `IMMConfig`'s (what users of
    the callback get); `solution_column=None` means "the gold column"."""

    samples_per_question: int = 4
    max_correct_per_question: int | None = None
    real_data_ratio: float = 0.0
    verifier: str = "gsm8k"
    question_column: str = "question"
    gold_column: str = "answer"
    solution_column: str | None = None
    system_prompt: str | None = None
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256


SHARED_DEFAULTS = SharedDefaults()


def default_sampling() -> SamplingParams:
    """The sampling parameters of `SHARED_DEFAULTS`."""
    return SamplingParams(
        temperature=SHARED_DEFAULTS.temperature,
        top_p=SHARED_DEFAULTS.top_p,
        max_new_tokens=SHARED_DEFAULTS.max_new_tokens,
    )


@dataclass
class RejectionSamplingConfig:
    """Everything `RejectionSampler` reads."""

    samples_per_question: int = field(
        default=SHARED_DEFAULTS.samples_per_question,
        metadata={"help": "k: samples drawn per question."},
    )
    max_correct_per_question: int | None = field(
        default=SHARED_DEFAULTS.max_correct_per_question,
        metadata={"help": "m: keep at most this many correct samples per question."},
    )
    drop_duplicates: bool = field(
        default=True,
        metadata={"help": "Keep one copy of completions identical after stripping whitespace."},
    )
    real_data_ratio: float = field(
        default=SHARED_DEFAULTS.real_data_ratio,
        metadata={
            "help": "Share of the returned dataset made of gold (real) solutions from "
            "`solution_column`, in [0, 1); 0 returns generated solutions only."
        },
    )
    verifier: str | Callable | Verifier = field(
        default=SHARED_DEFAULTS.verifier,
        metadata={
            "help": "gsm8k, math, choice, reasoning_gym:<task>, or a TRL reward function "
            "f(completions, **columns) -> list[float]."
        },
    )
    verifier_time_limit_s: float = field(
        default=1.0, metadata={"help": "Time limit per check; a timeout counts as wrong."}
    )
    reward_threshold: float = field(
        default=1.0, metadata={"help": "Score at or above which a reward/score counts as correct."}
    )
    reward_completions_as_messages: bool = field(
        default=True,
        metadata={
            "help": "Give a reward-function verifier conversational completions "
            "([{'role': 'assistant', 'content': ...}]) and message-list `prompts`, as TRL does "
            "for conversational datasets; False gives plain strings."
        },
    )
    question_column: str = field(
        default=SHARED_DEFAULTS.question_column,
        metadata={"help": "Column with the question: a string or a list of chat messages."},
    )
    gold_column: str = field(
        default=SHARED_DEFAULTS.gold_column,
        metadata={"help": "Column with the gold answer the verifier checks."},
    )
    solution_column: str | None = field(
        default=SHARED_DEFAULTS.solution_column,
        metadata={
            "help": "Column with a gold worked solution, used for real-data mixing; None uses "
            "gold_column (GSM8K's gold answer is its solution)."
        },
    )
    system_prompt: str | None = field(
        default=SHARED_DEFAULTS.system_prompt,
        metadata={"help": "System message put before string questions."},
    )
    sampling: SamplingParams = field(
        default_factory=default_sampling,
        metadata={"help": "Sampling parameters for every question."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for sampling and real-data mixing."})

    def __post_init__(self):
        check_dataclass(self)

    @property
    def solution_source(self) -> str:
        """The column real-data mixing takes gold solutions from."""
        return self.solution_column or self.gold_column


@dataclass
class RejectionStats:
    """What one rejection-sampling pass produced, and what it had to skip."""

    questions: int = 0
    usable_questions: int = 0
    samples: int = 0
    correct_samples: int = 0
    generated_examples: int = 0
    real_examples: int = 0
    yield_rate: float = 0.0  # correct samples / samples
    pass_at_1: float = 0.0
    pass_at_k: float = 0.0
    k: int = 0
    solved_share: float = 0.0  # questions with at least one correct sample
    mean_completion_chars: float = 0.0
    mean_completion_tokens: float | None = None
    distinct_completions_per_question: float = 0.0
    duplicates_dropped: int = 0
    over_cap_dropped: int = 0
    timeouts: int = 0
    verifier_errors: int = 0
    empty_completions: int = 0
    empty_completion_rows: list[int] = field(default_factory=list)
    malformed_rows: list[tuple[int, str]] = field(default_factory=list)
    generation_seconds: float = 0.0
    verification_seconds: float = 0.0
    total_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RejectionResult:
    dataset: Dataset  # columns: prompt, completion (TRL conversational prompt/completion)
    stats: RejectionStats
    example_rows: list[int]  # the question row each dataset example came from
    example_sources: list[str]  # "generated" or "real", per dataset example


def as_messages(question: Any, system_prompt: str | None) -> list[dict[str, str]]:
    if isinstance(question, list):
        return question
    messages = [{"role": "user", "content": str(question)}]
    return [{"role": "system", "content": system_prompt}, *messages] if system_prompt else messages


def a_type(value: Any) -> str:
    """`value`'s type name with its article: 'a dict', 'an int'."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def question_problem(question: Any) -> str | None:
    """Why this question cannot be prompted, or None: it must be text or a list of chat
    messages, each a mapping with `role` and `content`."""
    if question is None or (isinstance(question, str | list) and len(question) == 0):
        return "missing question"
    if isinstance(question, str):
        return None
    if not isinstance(question, list):
        return f"question is {a_type(question)}, expected text or a list of chat messages"
    for position, message in enumerate(question):
        if not isinstance(message, Mapping):
            return f"chat message {position} is {a_type(message)}, expected a mapping"
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            return f"chat message {position} has no {' or '.join(repr(k) for k in missing)}"
    return None


def row_shape_problem(
    row: Mapping[str, Any], question_column: str, gold_column: str, needs_gold: bool
) -> str | None:
    """Why this row cannot be used, from its shape alone (no verifier), or None."""
    problem = question_problem(row.get(question_column))
    if problem is None and needs_gold and row.get(gold_column) is None:
        return "missing gold answer"
    return problem


def row_problem(row: Mapping[str, Any], config: RejectionSamplingConfig, verifier: Verifier):
    """Why this question row cannot be used, or None."""
    needs_gold = verifier.reward_function is None  # a reward function reads what it needs
    problem = row_shape_problem(row, config.question_column, config.gold_column, needs_gold)
    if problem is not None or not needs_gold:
        return problem
    return verifier.gold_problem(row[config.gold_column])


def check_questions(
    questions: Sequence[Mapping[str, Any]], question_column: str, gold_column: str, needs_gold: bool
) -> None:
    """Raise a ValueError now, before any model loads, if no row can ever be used: no rows, a
    column that no row has, or every row malformed. Single bad rows are skipped later."""
    if isinstance(questions, str | bytes | Mapping) or not isinstance(questions, Iterable):
        raise TypeError(
            f"questions must be a Dataset or a list of rows (got a {type(questions).__name__}); "
            "e.g. [{'question': 'What is 2+3?', 'answer': '5'}]"
        )
    rows = list(questions)
    if not rows:
        raise ValueError("questions is empty; give the in-domain training questions")
    for row_id, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"question row {row_id} is a {type(row).__name__}, not a mapping of column -> "
                "value; give rows like {'question': 'What is 2+3?', 'answer': '5'}"
            )
    present = sorted({name for row in rows for name in row})
    for what, column in [("question_column", question_column), ("gold_column", gold_column)]:
        if column not in present and (what == "question_column" or needs_gold):
            raise ValueError(
                f"{what} {column!r} is in none of the {len(rows)} question rows; the rows have "
                f"columns {present}: set {what} to one of them"
            )
    problems = [
        (row_id, problem)
        for row_id, row in enumerate(rows)
        if (problem := row_shape_problem(row, question_column, gold_column, needs_gold))
    ]
    if len(problems) == len(rows):
        raise ValueError(
            f"all {len(rows)} question rows are malformed, e.g. {problems[:3]} (row id, "
            "reason); fix the rows or the column names"
        )


def select_correct(
    completions: Sequence[str], verdicts: Sequence[Verdict], config: RejectionSamplingConfig
) -> tuple[list[str], int, int]:
    """The correct completions to keep, in sampling order, plus how many were dropped as
    duplicates and how many over the per-question cap."""
    kept, seen, duplicates, over_cap = [], set(), 0, 0
    for text, verdict in zip(completions, verdicts, strict=True):
        if not verdict.is_correct:
            continue
        key = text.strip()
        if config.drop_duplicates and key in seen:
            duplicates += 1
            continue
        if (
            config.max_correct_per_question is not None
            and len(kept) >= config.max_correct_per_question
        ):
            over_cap += 1
            continue
        seen.add(key)
        kept.append(text)
    return kept, duplicates, over_cap


def real_examples_needed(generated: int, ratio: float) -> int:
    """How many real examples make them `ratio` of the final dataset."""
    return round(ratio * generated / (1.0 - ratio)) if ratio > 0 else 0


class RejectionSampler:
    """Samples k answers per question, keeps the verified-correct ones as SFT examples."""

    def __init__(self, sampler: Sampler, config: RejectionSamplingConfig | None = None):
        self.sampler = sampler
        self.config = config or RejectionSamplingConfig()
        self.verifier = get_verifier(
            self.config.verifier,
            time_limit_s=self.config.verifier_time_limit_s,
            threshold=self.config.reward_threshold,
            completions_as_messages=self.config.reward_completions_as_messages,
        )

    def run(self, questions: Dataset | Sequence[Mapping[str, Any]]) -> RejectionResult:
        config, start = self.config, time.perf_counter()
        rows = [dict(row) for row in questions]
        stats = RejectionStats(questions=len(rows), k=config.samples_per_question)
        usable = []
        for row_id, row in enumerate(rows):
            problem = row_problem(row, config, self.verifier)
            if problem is None:
                usable.append(row_id)
            else:
                stats.malformed_rows.append((row_id, problem))
        stats.usable_questions = len(usable)
        prompts = [
            as_messages(rows[i][config.question_column], config.system_prompt) for i in usable
        ]

        generation_start = time.perf_counter()
        sampling = config.sampling
        if sampling.seed is None:
            sampling = SamplingParams(**{**asdict(sampling), "seed": config.seed})
        completions = (
            self.sampler.generate(prompts, config.samples_per_question, sampling) if prompts else []
        )
        stats.generation_seconds = time.perf_counter() - generation_start

        verification_start = time.perf_counter()
        verdicts = self._verify(rows, usable, completions, stats)
        stats.verification_seconds = time.perf_counter() - verification_start

        examples, example_rows, sources = [], [], []
        correct_counts = []
        for row_id, prompt, texts, row_verdicts in zip(
            usable, prompts, completions, verdicts, strict=True
        ):
            correct_counts.append(sum(v.is_correct for v in row_verdicts))
            kept, duplicates, over_cap = select_correct(texts, row_verdicts, config)
            stats.duplicates_dropped += duplicates
            stats.over_cap_dropped += over_cap
            for text in kept:
                examples.append(
                    {"prompt": prompt, "completion": [{"role": "assistant", "content": text}]}
                )
                example_rows.append(row_id)
                sources.append("generated")
        stats.generated_examples = len(examples)

        for row_id in self._real_rows(rows, usable, len(examples)):
            prompt = as_messages(rows[row_id][config.question_column], config.system_prompt)
            solution = str(rows[row_id][config.solution_source])
            examples.append(
                {"prompt": prompt, "completion": [{"role": "assistant", "content": solution}]}
            )
            example_rows.append(row_id)
            sources.append("real")
        stats.real_examples = len(examples) - stats.generated_examples

        self._fill_sample_stats(stats, completions, correct_counts)
        stats.total_seconds = time.perf_counter() - start
        dataset = (
            Dataset.from_list(examples)
            if examples
            else Dataset.from_dict({"prompt": [], "completion": []})
        )
        return RejectionResult(dataset, stats, example_rows, sources)

    def _verify(self, rows, usable, completions, stats) -> list[list[Verdict]]:
        """Verdicts per question, verified in one flat batch; empty completions are wrong
        without asking the verifier."""
        config = self.config
        flat_texts, flat_golds, flat_rows, positions = [], [], [], []
        verdicts = [[Verdict.WRONG] * len(texts) for texts in completions]
        for q, (row_id, texts) in enumerate(zip(usable, completions, strict=True)):
            for j, text in enumerate(texts):
                if not text.strip():
                    stats.empty_completions += 1
                    stats.empty_completion_rows.append(row_id)
                    continue
                flat_texts.append(text)
                flat_golds.append(rows[row_id].get(config.gold_column))
                flat_rows.append(row_id)
                positions.append((q, j))
        columns = None
        if self.verifier.reward_function is not None:
            names = {name for row_id in usable for name in rows[row_id]} - {config.question_column}
            columns = {name: [rows[r].get(name) for r in flat_rows] for name in sorted(names)}
            columns["prompts"] = [
                as_messages(rows[r][config.question_column], config.system_prompt)
                if config.reward_completions_as_messages
                else rows[r][config.question_column]
                for r in flat_rows
            ]
        before = dict(self.verifier.counts)
        flat_verdicts = (
            self.verifier.verify_batch(flat_texts, flat_golds, columns) if flat_texts else []
        )
        for (q, j), verdict in zip(positions, flat_verdicts, strict=True):
            verdicts[q][j] = verdict
        stats.timeouts = self.verifier.counts["timeout"] - before.get("timeout", 0)
        stats.verifier_errors = self.verifier.counts["error"] - before.get("error", 0)
        bad_gold_rows = sorted(
            {flat_rows[i] for i, v in enumerate(flat_verdicts) if v is Verdict.BAD_GOLD}
        )
        stats.malformed_rows.extend(
            (row_id, "verifier could not parse the gold answer") for row_id in bad_gold_rows
        )
        return verdicts

    def _real_rows(self, rows, usable, generated: int) -> list[int]:
        config = self.config
        wanted = real_examples_needed(generated, config.real_data_ratio)
        if not wanted:
            return []
        candidates = [r for r in usable if rows[r].get(config.solution_source)]
        random.Random(config.seed).shuffle(candidates)
        return sorted(candidates[:wanted])

    def _fill_sample_stats(self, stats, completions, correct_counts) -> None:
        k = self.config.samples_per_question
        all_texts = [text for texts in completions for text in texts]
        stats.samples = len(all_texts)
        stats.correct_samples = sum(correct_counts)
        if not all_texts:
            return
        questions = len(completions)
        stats.yield_rate = stats.correct_samples / stats.samples
        stats.pass_at_1 = sum(pass_at_k(k, c, 1) for c in correct_counts) / questions
        stats.pass_at_k = sum(pass_at_k(k, c, k) for c in correct_counts) / questions
        stats.solved_share = sum(c > 0 for c in correct_counts) / questions
        stats.mean_completion_chars = sum(map(len, all_texts)) / len(all_texts)
        tokenizer = getattr(self.sampler, "tokenizer", None)
        if tokenizer is not None:
            lengths = [
                len(ids) for ids in tokenizer(all_texts, add_special_tokens=False)["input_ids"]
            ]
            stats.mean_completion_tokens = sum(lengths) / len(lengths)
        distinct = [len({text.strip() for text in texts}) for texts in completions]
        stats.distinct_completions_per_question = sum(distinct) / questions
