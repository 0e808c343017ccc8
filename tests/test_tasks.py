"""Task suites: determinism by seed, disjoint splits, gold answers that verify, templates,
worked steps, and the JSONL / HF dataset loaders."""

import json
from pathlib import Path

import pytest

from imm_trl.tasks import (
    SUITE_SPECS,
    SUITES,
    TEMPLATES,
    FamilySpec,
    family_question_set,
    get_template,
    load_hf_questions,
    load_jsonl_questions,
    load_suite,
)
from imm_trl.tasks.base import interleave, split_evenly
from imm_trl.tasks.gym import additive_steps, divisor_steps, leg_steps, product_steps
from imm_trl.verify import Verdict, get_verifier

GSM8K_FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k" / "test_sample.jsonl"


def question_text(row) -> str:
    return row["question"][-1]["content"]


def shot_texts(row) -> list[str]:
    return [m["content"] for m in row["question"][:-1] if m["role"] == "user"]


@pytest.fixture(scope="module")
def small_suites():
    return {name: load_suite(name, seed=0, n_train=30, n_eval=20) for name in SUITE_SPECS}


def test_suites_are_listed_with_descriptions():
    assert "default" in SUITES
    assert set(SUITES) == set(SUITE_SPECS)
    assert all(isinstance(text, str) and text for text in SUITES.values())


def test_unknown_suite_names_the_valid_ones():
    with pytest.raises(ValueError, match="default"):
        load_suite("no-such-suite")


def test_suite_sizes_and_family_balance(small_suites):
    suite = load_suite("default", seed=0, n_train=31, n_eval=20)
    spec = SUITE_SPECS["default"]
    assert len(suite.train) == 31 and set(suite.eval_sets) >= {"id", "ood"}
    id_families = [f.task for f in spec.id_families]
    counts = [sum(r["family"] == f for r in suite.train.rows) for f in id_families]
    assert counts == split_evenly(31, len(id_families))
    # Interleaved: the first rows cycle through the families in order.
    assert [r["family"] for r in suite.train.rows[: len(id_families)]] == id_families
    assert suite.eval_sets["id"].families() == id_families
    assert suite.eval_sets["ood"].families() == [f.task for f in spec.ood_families]
    assert not set(id_families) & set(suite.eval_sets["ood"].families())


@pytest.mark.parametrize("name", sorted(SUITE_SPECS))
def test_suite_is_deterministic_by_seed(name, small_suites):
    again = load_suite(name, seed=0, n_train=30, n_eval=20)
    first = small_suites[name]
    assert again.train.rows == first.train.rows
    assert {k: v.rows for k, v in again.eval_sets.items()} == {
        k: v.rows for k, v in first.eval_sets.items()
    }
    other = load_suite(name, seed=1, n_train=30, n_eval=20)
    assert [question_text(r) for r in other.train.rows] != [
        question_text(r) for r in first.train.rows
    ]


def test_eval_sets_do_not_depend_on_n_train(small_suites):
    bigger = load_suite("default", seed=0, n_train=60, n_eval=20)
    first = small_suites["default"]
    assert {k: v.rows for k, v in bigger.eval_sets.items()} == {
        k: v.rows for k, v in first.eval_sets.items()
    }
    # More training questions extend each family's list; they never replace earlier ones.
    for family in first.train.families():
        small = [r for r in first.train.rows if r["family"] == family]
        large = [r for r in bigger.train.rows if r["family"] == family]
        assert large[: len(small)] == small


def test_a_family_alone_draws_the_questions_a_suite_evaluates_first():
    spec = SUITE_SPECS["default"].ood_families[0]
    alone = family_question_set(spec, 10, seed=0)
    suite = load_suite(
        "default", seed=0, n_train=0, n_eval=10 * len(SUITE_SPECS["default"].ood_families)
    )
    in_suite = [r for r in suite.eval_sets["ood"].rows if r["family"] == spec.task]
    assert [r["question"] for r in in_suite] == [r["question"] for r in alone.rows]


@pytest.mark.parametrize("name", sorted(SUITE_SPECS))
def test_suite_sets_share_no_question(name, small_suites):
    suite = small_suites[name]
    sets = {"train": suite.train, **suite.eval_sets}
    questions = {key: [question_text(r) for r in qs.rows] for key, qs in sets.items()}
    for key, texts in questions.items():
        assert len(set(texts)) == len(texts), f"duplicate question inside {key}"
    keys = list(questions)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not set(questions[a]) & set(questions[b]), f"{a} and {b} overlap"
    # Few-shot examples are never asked as questions.
    all_questions = {t for texts in questions.values() for t in texts}
    shots = {t for qs in sets.values() for r in qs.rows for t in shot_texts(r)}
    assert shots and not shots & all_questions


@pytest.mark.parametrize("name", sorted(SUITE_SPECS))
def test_suite_gold_answers_verify_after_a_dataset_round_trip(name, small_suites):
    suite = small_suites[name]
    for questions in [suite.train, *suite.eval_sets.values()]:
        rows = questions.to_dataset().to_list()  # Arrow-safe columns, same values back
        assert rows == questions.rows
        verifier = get_verifier(questions.verifier)
        golds = [r["answer"] for r in rows]
        verdicts = verifier.verify_batch([r["solution"] for r in rows], golds)
        assert all(v is Verdict.CORRECT for v in verdicts), questions.name
        wrong = verifier.verify_batch(["Answer: no idea"] * len(rows), golds)
        assert not any(v.is_correct for v in wrong)
        assert verifier.counts["bad_gold"] == 0


def test_mixed_verifier_dispatches_by_family_and_rejects_unlisted_families():
    suite = load_suite("default", seed=0, n_train=6, n_eval=6)
    id_row, ood_row = suite.eval_sets["id"].rows[0], suite.eval_sets["ood"].rows[0]
    verifier = get_verifier(suite.eval_sets["id"].verifier)
    assert verifier.verify(id_row["solution"], id_row["answer"]) is Verdict.CORRECT
    assert verifier.verify(ood_row["solution"], ood_row["answer"]) is Verdict.BAD_GOLD


def test_single_family_verifier_takes_json_dict_and_bare_golds():
    questions = family_question_set(FamilySpec("gcd", {"max_value": 20}), 5, seed=3)
    assert questions.verifier == "reasoning_gym:gcd"
    verifier = get_verifier(questions.verifier)
    for row in questions.rows:
        entry = json.loads(row["answer"])
        for gold in (row["answer"], entry, entry["answer"]):
            assert verifier.verify(f"Answer: {entry['answer']}", gold).is_correct
            assert not verifier.verify(f"Answer: {int(entry['answer']) + 1}", gold).is_correct


def test_too_small_a_family_fails_loudly():
    # Single-digit products: only 100 distinct questions exist.
    with pytest.raises(ValueError, match="distinct"):
        family_question_set(FamilySpec("products", {"min_digits": 1, "max_digits": 1}), 120)


def test_templates():
    answer = get_template("answer")
    messages = answer.messages("What is 2 + 3?", [("What is 1 + 1?", "Answer: 2")])
    assert messages == [
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "Answer: 2"},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    assert answer.solution("5") == "Answer: 5"
    assert TEMPLATES["cot"].solution("5", "2 + 3 = 5.") == "2 + 3 = 5.\nAnswer: 5"
    with pytest.raises(ValueError, match="worked steps"):
        TEMPLATES["cot"].solution("5")
    zero = get_template("zero_shot")
    assert zero.shots == 0
    assert zero.messages("Q?") == [{"role": "user", "content": f"Q?\n\n{zero.instruction}"}]
    with pytest.raises(ValueError, match="answer, cot"):
        get_template("nope")


def test_split_and_interleave():
    assert split_evenly(7, 3) == [3, 2, 2]
    assert split_evenly(2, 3) == [1, 1, 0]
    assert interleave([[1, 2, 3], ["a"], [10, 20]]) == [1, "a", 10, 2, 20, 3]


def test_worked_steps_by_hand():
    assert additive_steps("4 - 1 - 7") == "4 - 1 = 3. 3 - 7 = -4."
    assert additive_steps("12 + 30") == "12 + 30 = 42."
    assert additive_steps("3 * 4") is None
    assert product_steps("23 * 7") == "23 * 7 = 20 * 7 + 3 * 7 = 140 + 21 = 161."
    assert product_steps("6 * 40") == "6 * 40 = 240."
    assert product_steps("7 * 105") == "7 * 105 = 100 * 7 + 5 * 7 = 700 + 35 = 735."
    assert product_steps("4 * 3") == "4 * 3 = 12."
    assert divisor_steps([12, 18]) == (
        "Divisors of 12: 1, 2, 3, 4, 6, 12. Divisors of 18: 1, 2, 3, 6, 9, 18. "
        "Common divisors: 1, 2, 3, 6. The greatest is 6."
    )
    assert divisor_steps([12, 180]) is None
    assert leg_steps({"duck": 2, "spider": 1}) == (
        "2 ducks: 2 * 2 = 4 legs. 1 spider: 1 * 8 = 8 legs. Total: 4 + 8 = 12."
    )


@pytest.mark.parametrize(
    "family",
    [
        FamilySpec("chain_sum", {"min_terms": 2, "max_terms": 3, "max_digits": 2}),
        FamilySpec("products", {"max_digits": 2}),
        FamilySpec("gcd", {"max_value": 50}),
        FamilySpec("leg_counting", {"min_animals": 2, "max_animals": 2, "max_instances": 3}),
    ],
)
def test_cot_solutions_end_with_the_gold_their_steps_reach(family):
    questions = family_question_set(family, 10, seed=0, template="cot")
    verifier = get_verifier(questions.verifier)
    for row in questions.rows:
        steps, answer_line = row["solution"].rsplit("\n", 1)
        gold = json.loads(row["answer"])["answer"]
        assert answer_line == f"Answer: {gold}"
        assert steps.rstrip(".").split()[-1] == gold  # the steps end on the answer
        assert verifier.verify(row["solution"], row["answer"]).is_correct
        assert "\nAnswer: " in row["question"][1]["content"]  # few-shot turns show steps too


def test_jsonl_questions():
    questions = load_jsonl_questions(GSM8K_FIXTURE, limit=10, seed=0)
    assert questions.verifier == "gsm8k" and len(questions) == 10
    records = [json.loads(line) for line in GSM8K_FIXTURE.read_text().splitlines()]
    by_question = {r["question"]: r["answer"] for r in records}
    shots = shot_texts(questions.rows[0])
    assert len(shots) == 3
    asked = [question_text(r) for r in questions.rows]
    assert not set(shots) & set(asked)
    assert all(shot_texts(r) == shots for r in questions.rows)
    verifier = get_verifier("gsm8k")
    for row in questions.rows:
        assert row["answer"] == by_question[question_text(row)]
        assert "<<" not in row["solution"] and row["solution"].splitlines()[-1].startswith(
            "Answer: "
        )
        assert verifier.verify(row["solution"], row["answer"]).is_correct
    assert load_jsonl_questions(GSM8K_FIXTURE, limit=10, seed=0).rows == questions.rows
    other = load_jsonl_questions(GSM8K_FIXTURE, limit=10, seed=1)
    assert [question_text(r) for r in other.rows] != asked
    short = load_jsonl_questions(GSM8K_FIXTURE, limit=2, template="answer", shots=1)
    assert short.rows[0]["question"][1]["content"].startswith("Answer: ")
    assert len(short.rows[0]["question"]) == 3
    assert len(load_jsonl_questions(GSM8K_FIXTURE, template="zero_shot")) == len(records)


def test_hf_questions_with_column_mapping(tmp_path):
    renamed = tmp_path / "renamed.jsonl"
    with renamed.open("w") as out:
        for line in GSM8K_FIXTURE.read_text().splitlines():
            record = json.loads(line)
            out.write(json.dumps({"problem": record["question"], "gold": record["answer"]}) + "\n")
    questions = load_hf_questions(
        "json",
        "train",
        "problem",
        "gold",
        "gsm8k",
        data_files=str(renamed),
        limit=6,
        template="cot",
        seed=2,
    )
    expected = load_jsonl_questions(GSM8K_FIXTURE, limit=6, seed=2, template="cot")
    assert [r["question"] for r in questions.rows] == [r["question"] for r in expected.rows]
    assert [r["answer"] for r in questions.rows] == [r["answer"] for r in expected.rows]
    assert questions.name == "json:train"
    with pytest.raises(ValueError, match="no column"):
        load_hf_questions("json", "train", "question", "gold", "gsm8k", data_files=str(renamed))
