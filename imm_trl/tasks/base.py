"""Question sets, task suites and prompt templates: the data every other part reads.

A row of a `QuestionSet` is what `RejectionSampler` and the evaluator take:

    {"question": [chat messages: few-shot turns, then the user question],
     "answer":   the gold the verifier checks (a reasoning-gym entry as a JSON string, or a
                 GSM8K solution ending in "#### n", ...),
     "solution": the gold written the way the template's assistant turns are written, for
                 real-data mixing (`RejectionSamplingConfig(solution_column="solution")`),
     "family":   where the question comes from (a reasoning-gym family, "gsm8k", ...)}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ChatMessages = list[dict[str, str]]


@dataclass
class QuestionSet:
    """Questions with gold answers and the name of the verifier that checks them."""

    name: str = field(metadata={"help": "Name shown in reports, e.g. 'default/id'."})
    rows: list[dict[str, Any]] = field(
        metadata={"help": "Rows with 'question' (chat messages), 'answer', 'solution', 'family'."}
    )
    verifier: str = field(
        metadata={"help": "Verifier name for `imm_trl.verify.get_verifier`, e.g. 'gsm8k'."}
    )

    def __len__(self) -> int:
        return len(self.rows)

    def to_dataset(self):
        """The rows as a `datasets.Dataset` (every column Arrow-safe)."""
        from datasets import Dataset

        return Dataset.from_list(self.rows)

    def families(self) -> list[str]:
        """The families present, in order of first appearance."""
        return list(dict.fromkeys(row["family"] for row in self.rows))


@dataclass
class TaskSuite:
    """A training set of in-distribution (ID) questions and the sets a model is evaluated on.

    `eval_sets["id"]` holds held-out questions of the training families; `eval_sets["ood"]`
    questions of families never trained on. Both may mix families: each row has a `family`
    column and the evaluator reports accuracy per family as well. No question text appears in
    two of the suite's sets (few-shot examples included).
    """

    name: str = field(metadata={"help": "Suite name, as passed to `load_suite`."})
    train: QuestionSet = field(metadata={"help": "ID questions to train on."})
    eval_sets: dict[str, QuestionSet] = field(
        metadata={"help": "Evaluation sets by name: at least 'id' and 'ood'."}
    )
    description: str = field(default="", metadata={"help": "What the suite is for."})
    max_new_tokens: int = field(
        default=64,
        metadata={"help": "Tokens a completion needs with the suite's prompts (16 for 'answer')."},
    )


@dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes chat messages, and how a gold answer is written out.

    Few-shot templates put `shots` solved examples of the question's own family as earlier
    chat turns; the assistant turns show the answer format the model should copy (and, with
    `rationale=True`, worked steps before it).
    """

    name: str = field(metadata={"help": "Template name, a key of `TEMPLATES`."})
    description: str = field(metadata={"help": "One line for docs and reports."})
    shots: int = field(default=3, metadata={"help": "Solved examples shown before the question."})
    rationale: bool = field(
        default=False,
        metadata={"help": "Assistant turns show worked steps, then the answer line."},
    )
    instruction: str | None = field(
        default=None, metadata={"help": "Text appended to every user question."}
    )

    def solution(self, answer: str, rationale: str | None = None) -> str:
        """The assistant turn for a solved example: optional steps, then `Answer: <answer>`."""
        if self.rationale:
            if not rationale:
                raise ValueError(f"template {self.name!r} needs worked steps for every example")
            return f"{rationale}\nAnswer: {answer}"
        return f"Answer: {answer}"

    def user_turn(self, question: str) -> str:
        question = question.strip()
        return f"{question}\n\n{self.instruction}" if self.instruction else question

    def messages(self, question: str, shots: Sequence[tuple[str, str]] = ()) -> ChatMessages:
        """Chat messages: each (question, solution) shot as a user/assistant pair, then the
        question as the last user turn."""
        messages: ChatMessages = []
        for shot_question, shot_solution in shots:
            messages.append({"role": "user", "content": self.user_turn(shot_question)})
            messages.append({"role": "assistant", "content": shot_solution})
        messages.append({"role": "user", "content": self.user_turn(question)})
        return messages


TEMPLATES: dict[str, PromptTemplate] = {
    template.name: template
    for template in (
        PromptTemplate(
            "answer",
            "3 solved examples of the same family as chat turns, each answered "
            "'Answer: <gold>'; then the question. Short completions (<= 16 tokens).",
        ),
        PromptTemplate(
            "cot",
            "3 solved examples with worked steps, then 'Answer: <gold>'; then the question. "
            "Only for families with written-out steps (see `imm_trl.tasks.gym.RATIONALES`).",
            rationale=True,
        ),
        PromptTemplate(
            "zero_shot",
            "The question alone, with an instruction to end with 'Answer: <answer>'.",
            shots=0,
            instruction="End your reply with 'Answer: <answer>'.",
        ),
    )
}


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` items over `parts` groups, the first groups one larger when it does not divide."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def interleave(groups: Sequence[Sequence[Any]]) -> list[Any]:
    """Round-robin over groups (a1, b1, a2, b2, ...): every prefix stays balanced."""
    merged = []
    for i in range(max((len(group) for group in groups), default=0)):
        merged.extend(group[i] for group in groups if i < len(group))
    return merged
