"""Question sets from files and datasets: GSM8K-format JSONL, or any Hugging Face dataset with
a question column and a gold-answer column."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imm_trl.tasks.base import PromptTemplate, QuestionSet, get_template
from imm_trl.verify.numbers import last_boxed

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


def gsm8k_parts(solution: str) -> tuple[str, str]:
    """A GSM8K solution as (worked steps without the <<...>> calculator notes, final answer)."""
    steps, _, final = str(solution).rpartition("####")
    if not _:
        return "", str(solution).strip()
    return _CALCULATOR_RE.sub("", steps).strip(), final.strip()


def answer_parts(gold: Any, verifier: str) -> tuple[str | None, str]:
    """(worked steps or None, short final answer) of a gold answer, for writing solutions.

    gsm8k golds are worked solutions ending in '#### n'; math golds may hold a `\\boxed{}`;
    anything else is taken as the short answer itself."""
    if verifier == "gsm8k":
        steps, final = gsm8k_parts(gold)
        return steps or None, final
    text = str(gold).strip()
    boxed = last_boxed(text) if verifier == "math" else None
    return None, boxed.strip() if boxed is not None else text


def records_to_question_set(
    records: Sequence[Mapping[str, Any]],
    *,
    name: str,
    question_column: str,
    answer_column: str,
    verifier: str,
    template: str | PromptTemplate,
    shots: int | None,
    limit: int | None,
    seed: int,
    family: str,
) -> QuestionSet:
    """Shuffle the records with `seed`, keep the first `shots` as few-shot examples and the next
    `limit` (all if None) as questions. Few-shot solutions are written from the gold answers."""
    template = get_template(template)
    shots = template.shots if shots is None else shots
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if len(order) < shots + (limit or 1):
        raise ValueError(f"{name}: {len(order)} records, fewer than {shots} shots + questions")

    def solution(record) -> str:
        steps, final = answer_parts(record[answer_column], verifier)
        return template.solution(final, steps)

    shot_turns = [(str(records[i][question_column]), solution(records[i])) for i in order[:shots]]
    chosen = order[shots:] if limit is None else order[shots : shots + limit]
    rows = [
        {
            "question": template.messages(str(records[i][question_column]), shot_turns),
            "answer": str(records[i][answer_column]),
            "solution": solution(records[i]),
            "family": family,
        }
        for i in chosen
    ]
    return QuestionSet(name, rows, verifier)


def load_jsonl_questions(
    path: str | Path,
    *,
    name: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    template: str | PromptTemplate = "cot",
    shots: int | None = None,
    question_column: str = "question",
    answer_column: str = "answer",
    verifier: str = "gsm8k",
) -> QuestionSet:
    """Questions from a GSM8K-format JSONL file (one `{"question", "answer"}` object a line, the
    answer a worked solution ending in '#### n').

    `limit` questions (all if None) after a seeded shuffle; `shots` solved examples from the
    same file (the template's default if None), never among the questions. The default "cot"
    template shows the gold solutions, calculator notes removed, ending 'Answer: n'.
    """
    path = Path(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records_to_question_set(
        records,
        name=name or path.stem,
        question_column=question_column,
        answer_column=answer_column,
        verifier=verifier,
        template=template,
        shots=shots,
        limit=limit,
        seed=seed,
        family=path.stem,
    )


def load_hf_questions(
    name: str,
    split: str,
    question_column: str,
    answer_column: str,
    verifier: str,
    *,
    config_name: str | None = None,
    data_files: str | Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    template: str | PromptTemplate = "zero_shot",
    shots: int | None = None,
) -> QuestionSet:
    """Questions from any dataset `datasets.load_dataset` can open (a hub name when online, or a
    builder like "json" with `data_files`), mapping its columns to question and gold answer.

        load_hf_questions("openai/gsm8k", "test", "question", "answer", "gsm8k",
                          config_name="main", template="cot", limit=200)
    """
    from datasets import load_dataset

    dataset = load_dataset(name, config_name, split=split, data_files=data_files)
    missing = {question_column, answer_column} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"{name} has no column(s) {sorted(missing)}; it has {dataset.column_names}"
        )
    records = dataset.select_columns([question_column, answer_column]).to_list()
    label = name if config_name is None else f"{name}/{config_name}"
    return records_to_question_set(
        records,
        name=f"{label}:{split}",
        question_column=question_column,
        answer_column=answer_column,
        verifier=verifier,
        template=template,
        shots=shots,
        limit=limit,
        seed=seed,
        family=label,
    )
