"""Task suites: seeded question sets with gold answers, split into ID (trained on) and OOD
(only evaluated), from reasoning-gym families, GSM8K-format JSONL or any HF dataset.

    suite = load_suite("default", seed=0)          # SUITES lists the names
    suite.train.rows[0]   # {"question": [chat messages], "answer": gold, "solution", "family"}
    suite.eval_sets       # {"id": QuestionSet, "ood": QuestionSet}
    load_jsonl_questions("gsm8k/test.jsonl", limit=200)
"""

from imm_trl.tasks.base import (
    TEMPLATES,
    PromptTemplate,
    QuestionSet,
    TaskSuite,
    get_template,
)
from imm_trl.tasks.files import load_hf_questions, load_jsonl_questions
from imm_trl.tasks.gym import RATIONALES, FamilySpec, family_question_set
from imm_trl.tasks.suites import SUITE_SPECS, SUITES, SuiteSpec, load_suite

__all__ = [
    "RATIONALES",
    "SUITES",
    "SUITE_SPECS",
    "TEMPLATES",
    "FamilySpec",
    "PromptTemplate",
    "QuestionSet",
    "SuiteSpec",
    "TaskSuite",
    "family_question_set",
    "get_template",
    "load_hf_questions",
    "load_jsonl_questions",
    "load_suite",
]
