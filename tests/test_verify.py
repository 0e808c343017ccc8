"""Verifiers: real GSM8K gold solutions, tricky answer formats, reasoning-gym scorers,
reward functions, time limits and malformed gold answers."""

import json
import re
import time
from pathlib import Path

import pytest

from imm_trl.verify import (
    CheckTimeout,
    Verdict,
    call_with_time_limit,
    get_verifier,
    predicted_number,
    reasoning_gym_answer,
)

GSM8K_SAMPLE = Path(__file__).parent / "fixtures" / "gsm8k" / "test_sample.jsonl"


def gsm8k_rows():
    return [json.loads(line) for line in GSM8K_SAMPLE.read_text().splitlines()]


def change_final_number(solution: str) -> str:
    head, final = solution.rsplit("####", 1)
    number = int(final.strip().replace(",", ""))
    return f"{head}#### {number + 1}"


def test_real_gsm8k_gold_solutions_verify_and_altered_ones_do_not():
    verifier = get_verifier("gsm8k")
    rows = gsm8k_rows()
    assert len(rows) == 50
    golds = [row["answer"] for row in rows]
    assert all(v is Verdict.CORRECT for v in verifier.verify_batch(golds, golds))
    altered = [change_final_number(gold) for gold in golds]
    assert all(v is Verdict.WRONG for v in verifier.verify_batch(altered, golds))
    # A completion that ends with the gold number in prose (no ####) also verifies.
    prose = [re.sub(r"####\s*", "The answer is ", gold) + "." for gold in golds]
    assert all(v is Verdict.CORRECT for v in verifier.verify_batch(prose, golds))


GSM8K_CASES = [
    # (completion, gold, correct)
    ("So she pays $1,000.00 in total.", "1000", True),
    ("The answer is 7.", "7", True),
    ("The answer is 7.", "8", False),
    ("The answer is 7. Checking: 7 + 1 = 8", "7", True),  # "answer is" beats the last number
    ("He runs 3 * 4 = 12 miles", "12", True),
    ("Total: 18.50 dollars", "18.5", True),
    ("It costs 1,234,567 cents", "1234567", True),
    ("Thus \\boxed{\\frac{1}{2}}", "0.5", True),
    ("Thus \\boxed{1/4}", "0.25", True),
    ("The temperature is -5 degrees", "-5", True),
    ("The answer is 25%", "25", True),
    ("Answer: 42 apples", "42", True),
    ("#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", True),
    ("I do not know.", "5", False),
    ("", "5", False),
    ("The answer is 1,5", "15", False),  # not a thousands group: 1 then 5
]


@pytest.mark.parametrize("completion,gold,correct", GSM8K_CASES)
def test_gsm8k_tricky_cases(completion, gold, correct):
    assert get_verifier("gsm8k").verify(completion, gold).is_correct is correct


MATH_CASES = [
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("The result is $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{2}{4}}", "\\boxed{\\frac{1}{2}}", True),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{3}", "\\frac{1}{2}", False),
    ("\\boxed{(1,2)}", "(1,2)", True),
    ("no answer here", "7", False),
]


@pytest.mark.parametrize("completion,gold,correct", MATH_CASES)
def test_math_tricky_cases(completion, gold, correct):
    assert get_verifier("math").verify(completion, gold).is_correct is correct


CHOICE_CASES = [
    ("The answer is (B).", "B", True),
    ("The answer is B", "(B)", True),
    ("I pick option C", "C", True),
    ("\\boxed{D}", "D", True),
    ("A train leaves at noon. So the answer is: E", "E", True),
    ("The answer is B", "C", False),
    ("I cannot tell.", "A", False),
]


@pytest.mark.parametrize("completion,gold,correct", CHOICE_CASES)
def test_choice_tricky_cases(completion, gold, correct):
    assert get_verifier("choice").verify(completion, gold).is_correct is correct


PROJECT_TASK_FAMILIES = [
    "products",
    "gcd",
    "syllogism",
    "chain_sum",
    "basic_arithmetic",
    "leg_counting",
    "gsm_symbolic",
]


@pytest.mark.parametrize("task", PROJECT_TASK_FAMILIES)
def test_reasoning_gym_gold_answers_verify(task):
    import reasoning_gym

    entries = list(reasoning_gym.create_dataset(task, size=10, seed=3))
    verifier = get_verifier(f"reasoning_gym:{task}")
    in_tags = [f"Let me think.\n<answer>{e['answer']}</answer>" for e in entries]
    assert all(v is Verdict.CORRECT for v in verifier.verify_batch(in_tags, entries))
    assert all(verifier.verify(e["answer"], e).is_correct for e in entries)
    wrong = [f"<answer>{e['answer']}0 wrong</answer>" for e in entries]
    assert not any(v.is_correct for v in verifier.verify_batch(wrong, entries))


def test_reasoning_gym_scorer_exception_counts_as_wrong():
    verifier = get_verifier("reasoning_gym:gcd")

    def broken_scorer(completion, gold):
        raise RuntimeError("scorer bug")

    verifier.check = broken_scorer
    assert verifier.verify("<answer>1</answer>", {"answer": "1"}) is Verdict.ERROR
    assert verifier.counts["error"] == 1


def test_reward_function_threshold_and_columns():
    def reward_contains_gold(completions, gold, **_):
        return [1.0 if g in c else 0.2 for c, g in zip(completions, gold, strict=True)]

    verifier = get_verifier(reward_contains_gold, threshold=0.5)
    verdicts = verifier.verify_batch(["it is 7", "it is 8"], columns={"gold": ["7", "7"]})
    assert verdicts == [Verdict.CORRECT, Verdict.WRONG]
    assert verifier.counts["checks"] == 2


def test_reward_function_failure_only_affects_its_own_row():
    def picky_reward(completions, **_):
        if any("boom" in c for c in completions):
            raise ValueError("cannot score")
        return [1.0] * len(completions)

    verdicts = get_verifier(picky_reward).verify_batch(["ok", "boom", "ok"], columns={})
    assert verdicts == [Verdict.CORRECT, Verdict.ERROR, Verdict.CORRECT]


def test_time_limit_makes_a_slow_check_a_counted_timeout():
    verifier = get_verifier("gsm8k", time_limit_s=0.05)

    def slow_check(completion, gold):
        time.sleep(1.0)
        return True

    verifier.check = slow_check
    start = time.perf_counter()
    assert verifier.verify("The answer is 1", "1") is Verdict.TIMEOUT
    assert time.perf_counter() - start < 0.5  # interrupted, not waited out
    assert verifier.counts["timeout"] == 1
    with pytest.raises(CheckTimeout):
        call_with_time_limit(lambda: time.sleep(1.0), 0.02)


def test_reward_function_timeout_is_counted():
    def slow_reward(completions, **_):
        time.sleep(1.0)
        return [1.0] * len(completions)

    verifier = get_verifier(slow_reward, time_limit_s=0.02)
    assert verifier.verify_batch(["a", "b"], columns={}) == [Verdict.TIMEOUT] * 2
    assert verifier.counts["timeout"] == 2


@pytest.mark.parametrize(
    "name,bad_gold",
    [
        ("gsm8k", "#### no number here"),
        ("choice", "banana"),
        ("math", "\\frac{"),
        ("math", "\\boxed{}"),
        ("gsm8k", ""),
    ],
)
def test_unparseable_gold_is_reported_not_labelled(name, bad_gold):
    verifier = get_verifier(name)
    assert verifier.gold_problem(bad_gold) is not None
    if bad_gold:
        assert verifier.verify("The answer is 3", bad_gold) is Verdict.BAD_GOLD


def test_unknown_verifier_lists_valid_names():
    with pytest.raises(ValueError, match="gsm8k.*math.*choice.*reasoning_gym:<task>"):
        get_verifier("gsm9k")
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        get_verifier("reasoning_gym:no_such_task")


def test_gsm8k_checks_per_second_meets_target():
    rows = gsm8k_rows()
    golds = [row["answer"] for row in rows] * 40
    completions = [change_final_number(g) if i % 2 else g for i, g in enumerate(golds)]
    verifier = get_verifier("gsm8k")
    start = time.perf_counter()
    verifier.verify_batch(completions, golds)
    rate = len(golds) / (time.perf_counter() - start)
    assert rate >= 2000, f"{rate:.0f} checks/s"


def test_predicted_number_order_of_markers():
    assert predicted_number("\\boxed{3} and later 5") == 3
    assert predicted_number("x = 4, y = 9") == 9
    assert predicted_number("nothing") is None


@pytest.mark.parametrize(
    "completion,answer",
    [
        ("Answer: 12", "12"),
        ("3 + 9 = 12.\nAnswer: 12.", "12"),
        ("The answer is: Yes", "Yes"),
        ("answer: no\nAnswer: Yes", "Yes"),  # the last marker wins
        ("<answer>7</answer> Answer: 8", "7"),  # reasoning-gym's own tags come first
        ("just 5", "just 5"),  # no marker: the last line
    ],
)
def test_reasoning_gym_answer_reads_answer_lines(completion, answer):
    assert reasoning_gym_answer(completion) == answer


def test_reasoning_gym_gold_as_json_and_several_families():
    import reasoning_gym

    gcd_entry = reasoning_gym.create_dataset("gcd", size=1, seed=1)[0]
    sum_entry = reasoning_gym.create_dataset("chain_sum", size=1, seed=1)[0]
    as_json = [
        json.dumps({"answer": e["answer"], "metadata": e["metadata"]})
        for e in (gcd_entry, sum_entry)
    ]
    both = get_verifier("reasoning_gym:gcd,chain_sum")
    for entry, gold in zip((gcd_entry, sum_entry), as_json, strict=True):
        assert both.verify(f"Answer: {entry['answer']}", gold) is Verdict.CORRECT
        assert both.verify(f"Answer: {entry['answer']}1", gold) is Verdict.WRONG
    assert (
        get_verifier("reasoning_gym:gcd")
        .verify(f"Answer: {gcd_entry['answer']}", as_json[0])
        .is_correct
    )
    products_entry = reasoning_gym.create_dataset("products", size=1, seed=1)[0]
    assert both.verify("Answer: 1", products_entry) is Verdict.BAD_GOLD  # a family not listed
