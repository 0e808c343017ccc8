"""Answer verifiers: `get_verifier(name_or_reward_function)` -> `Verifier`."""

from imm_trl.verify.checks import GoldParseError, choice_letter, reasoning_gym_answer
from imm_trl.verify.core import (
    Verdict,
    Verifier,
    check_verifier,
    get_verifier,
    valid_verifier_names,
)
from imm_trl.verify.numbers import predicted_number
from imm_trl.verify.timeout import CheckTimeout, call_with_time_limit

__all__ = [
    "CheckTimeout",
    "GoldParseError",
    "Verdict",
    "Verifier",
    "call_with_time_limit",
    "check_verifier",
    "choice_letter",
    "get_verifier",
    "predicted_number",
    "reasoning_gym_answer",
    "valid_verifier_names",
]
