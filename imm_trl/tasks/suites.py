"""Named task suites: which reasoning-gym families are trained on (ID) and which are only
evaluated (OOD), at which sizes, with which prompt template.

Family configs are calibrated so that the default model (SmolLM2-135M-Instruct) answers
between 5% and 60% of each eval set greedily: hard enough to improve, easy enough that
rejection sampling finds correct answers. The figures are in
`benchmarks/results/task_calibration.md` (`benchmarks/task_calibration.py` measures them).
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
    template: str = field(default="answer", metadata={"help": "Prompt template name."})


ARITHMETIC_ID = (
    FamilySpec("chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}),
    FamilySpec("gcd", {"min_value": 1, "max_value": 50}),
    FamilySpec("products", {"min_digits": 1, "max_digits": 2}),
)
REASONING_OOD = (
    FamilySpec("syllogism"),
    FamilySpec("leg_counting", {"min_animals": 2, "max_animals": 2, "max_instances": 3}),
)

SUITE_SPECS: dict[str, SuiteSpec] = {
    "default": SuiteSpec(
        "ID: small arithmetic (chain_sum, gcd, products); OOD: syllogism, leg_counting. "
        "3-shot 'Answer: <x>' prompts; answers fit in 16 tokens.",
        ARITHMETIC_ID,
        REASONING_OOD,
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
    shots = get_template(spec.template).shots
    seen: set[str] = set()
    # Each family's pool is split in order: few-shot examples, eval questions, training
    # questions. Eval sets therefore depend only on (seed, n_eval), never on n_train.
    id_draws = mixed_splits(
        spec.id_families, [n_eval, n_train], shots=shots, seed=seed, exclude=seen
    )
    ood_draws = mixed_splits(spec.ood_families, [n_eval], shots=shots, seed=seed, exclude=seen)
    return TaskSuite(
        name=name,
        train=question_set(f"{name}/train", id_draws, 1, spec.template),
        eval_sets={
            "id": question_set(f"{name}/id", id_draws, 0, spec.template),
            "ood": question_set(f"{name}/ood", ood_draws, 0, spec.template),
        },
        description=spec.description,
    )
