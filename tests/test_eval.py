"""Evaluation: metric functions on hand-computed cases, scoring of given completions, a real
(tiny) model through HFSampler, the `eval` command, and the local `evaluate` modules."""

import argparse
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from imm_trl.eval import (
    add_eval_parser,
    answer_entropy,
    bootstrap_ci,
    collapse_metrics,
    distinct_n,
    duplicate_share,
    evaluate_question_set,
    final_answer,
    has_answer_marker,
    pass_at_k,
    score_completions,
)
from imm_trl.sampling import SamplerBase
from imm_trl.stats import paired_difference
from imm_trl.tasks import QuestionSet, load_jsonl_questions, load_suite

GSM8K_FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k" / "test_sample.jsonl"


def gsm8k_set(golds: list[int]) -> QuestionSet:
    rows = [
        {
            "question": [{"role": "user", "content": f"question {i}"}],
            "answer": f"steps\n#### {gold}",
            "solution": f"Answer: {gold}",
            "family": "gsm8k",
        }
        for i, gold in enumerate(golds)
    ]
    return QuestionSet("hand", rows, "gsm8k")


# -- pure metric functions --------------------------------------------------------------------


def test_distinct_n_by_hand():
    assert distinct_n(["a b a b"], 1) == 0.5  # a, b of a, b, a, b
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a) of 3 bigrams
    assert distinct_n(["a b", "a c"], 1) == 0.75  # a, b, c of 4 words
    assert distinct_n(["a b", "a b"], 2) == 0.5
    assert distinct_n(["one"], 2) == 0.0  # no bigram at all
    assert distinct_n([], 1) == 0.0


def test_answer_entropy_by_hand():
    assert answer_entropy(["1", "1", "1", "1"]) == 0.0
    assert answer_entropy(["1", "1", "2", "2"]) == pytest.approx(1.0)
    assert answer_entropy(["1", "2", "3", "4"]) == pytest.approx(2.0)
    # p = (1/2, 1/4, 1/4): 0.5 * 1 + 2 * 0.25 * 2 = 1.5 bits
    assert answer_entropy(["7", "7", "8", ""]) == pytest.approx(1.5)
    assert answer_entropy([]) == 0.0


def test_duplicate_share_by_hand():
    assert duplicate_share(["a", "a", "b", " a "]) == 0.5  # 2nd and 4th repeat the 1st
    assert duplicate_share(["a", "b", "c"]) == 0.0
    assert duplicate_share(["x"] * 5) == pytest.approx(0.8)
    assert duplicate_share([]) == 0.0


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10


def test_bootstrap_ci():
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    assert bootstrap_ci([0, 0, 0]) == (0.0, 0.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    values = [1] * 200 + [0] * 200
    low, high = bootstrap_ci(values, resamples=2000, seed=1)
    # Normal approximation: 0.5 +- 1.96 * sqrt(0.25 / 400) = 0.5 +- 0.049
    assert low == pytest.approx(0.451, abs=0.01) and high == pytest.approx(0.549, abs=0.01)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    narrow = bootstrap_ci(values * 4, seed=3)
    assert narrow[1] - narrow[0] < high - low
    with pytest.raises(ValueError):
        bootstrap_ci(values, resamples=0)


def test_bootstrap_ci_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    values = [1] * 30 + [0] * 70
    low, high = bootstrap_ci(values, resamples=5000, seed=0)
    reference = stats.bootstrap(
        ([float(v) for v in values],),
        lambda x: sum(x) / len(x),
        n_resamples=5000,
        method="percentile",
        vectorized=False,
        random_state=0,
    ).confidence_interval
    assert low == pytest.approx(reference.low, abs=0.015)
    assert high == pytest.approx(reference.high, abs=0.015)


def test_final_answer_and_format_marker():
    assert final_answer("so 3 + 4 = 7. Answer: 7", "gsm8k") == "7"
    assert final_answer("The answer is 18.00", "gsm8k") == "18"
    assert final_answer("no number", "gsm8k") == ""
    assert final_answer("Answer: Yes", "reasoning_gym:syllogism") == "yes"
    assert final_answer("Steps.\nAnswer: -4.", "reasoning_gym:chain_sum") == "-4"
    assert has_answer_marker("x\nAnswer: 3") and has_answer_marker("The answer is 3")
    assert not has_answer_marker("I think 3")


def test_collapse_metrics_by_hand():
    groups = [["Answer: 1", "Answer: 1"], ["Answer: 1", "Answer: 2"]]
    metrics = collapse_metrics(groups, "gsm8k")
    # distinct_1: {Answer:, 1} of 4 words = 0.5; {Answer:, 1, 2} of 4 = 0.75 -> mean 0.625
    assert metrics["distinct_1"] == pytest.approx(0.625)
    # distinct_2: one bigram of 2 = 0.5; two of 2 = 1.0 -> 0.75
    assert metrics["distinct_2"] == pytest.approx(0.75)
    assert metrics["answer_entropy"] == pytest.approx(0.5)  # 0 and 1 bit
    assert metrics["duplicate_share"] == pytest.approx(0.25)  # 0.5 and 0


# -- scoring completions ------------------------------------------------------------------------


def test_score_completions_by_hand():
    questions = gsm8k_set([4, 6, 10, 3])
    greedy = ["Answer: 4", "The answer is 6.", "Answer: 11", "no idea"]
    sampled = [
        ["Answer: 4", "Answer: 4"],  # 2 correct
        ["Answer: 6", "Answer: 5"],  # 1 correct
        ["Answer: 9", "Answer: 9"],  # 0
        ["Answer: 2", "Answer: 1"],  # 0
    ]
    report = score_completions(questions, greedy, sampled, bootstrap=500)
    assert report["n"] == 4 and report["samples"] == 2
    assert report["accuracy"] == 0.5
    assert 0.0 <= report["accuracy_ci_low"] <= 0.5 <= report["accuracy_ci_high"] <= 1.0
    assert report["format_share"] == 0.75
    assert report["pass@1"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert report["pass@2"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert report["duplicate_share"] == pytest.approx((0.5 + 0 + 0.5 + 0) / 4)
    assert report["answer_entropy"] == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert report["distinct_1"] == pytest.approx((0.5 + 0.75 + 0.5 + 0.75) / 4)
    assert report["bad_gold"] == 0 and report["timeouts"] == 0


def test_score_greedy_only_measures_collapse_across_questions():
    questions = gsm8k_set([1, 2, 3, 4])
    report = score_completions(questions, ["Answer: 1"] * 4)
    assert report["samples"] == 1 and "pass@1" not in report
    assert report["accuracy"] == 0.25
    assert report["duplicate_share"] == 0.75  # one text answered to every question
    assert report["answer_entropy"] == 0.0
    varied = score_completions(questions, [f"Answer: {i}" for i in range(1, 5)])
    assert varied["accuracy"] == 1.0 and varied["accuracy_ci_low"] == 1.0
    assert varied["answer_entropy"] == pytest.approx(2.0) and varied["duplicate_share"] == 0.0


def test_score_reports_accuracy_per_family():
    questions = load_suite("default", seed=0, n_train=3, n_eval=9).eval_sets["id"]
    families = questions.families()
    first = families[0]
    completions = [r["solution"] if r["family"] == first else "Answer: ?" for r in questions.rows]
    report = score_completions(questions, completions)
    assert report[f"accuracy/{first}"] == 1.0
    assert all(report[f"accuracy/{f}"] == 0.0 for f in families[1:])
    first_share = sum(r["family"] == first for r in questions.rows) / len(questions)
    assert report["accuracy"] == pytest.approx(first_share)


def test_bad_gold_counts_as_wrong_and_is_reported():
    questions = gsm8k_set([5, 7])
    questions.rows[1]["answer"] = "no number here"
    report = score_completions(questions, ["Answer: 5", "Answer: 7"])
    assert report["accuracy"] == 0.5 and report["bad_gold"] == 1
    sampled = score_completions(questions, ["Answer: 5", "Answer: 7"], [["5", "5"], ["7", "7"]])
    assert sampled["bad_gold"] == 1 and sampled["pass@2"] == 0.5


def test_score_reports_per_question_verdicts_on_request():
    questions = gsm8k_set([4, 6, 10, 3])
    greedy = ["Answer: 4", "The answer is 6.", "Answer: 11", "no idea"]
    assert "correct" not in score_completions(questions, greedy)  # scalars only, for loggers
    report = score_completions(questions, greedy, per_question=True)
    assert report["correct"] == [1, 1, 0, 0] and report["accuracy"] == 0.5
    assert "passed" not in report  # no samples, no pass@k
    sampled = [["Answer: 1", "Answer: 4"], ["6", "6"], ["Answer: 9", "Answer: 8"], ["3 3", "x y"]]
    report = score_completions(questions, greedy, sampled, per_question=True)
    assert report["passed"] == [1, 1, 0, 1] and report["pass@2"] == 0.75
    # distinct bigrams over all bigrams of a question's samples
    assert report["distinct_2_by_question"] == [1.0, 0.0, 1.0, 1.0]


def test_score_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one greedy completion"):
        score_completions(gsm8k_set([1, 2]), ["Answer: 1"])


# -- a real (tiny) model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sampler():
    from imm_trl.models import tiny_model
    from imm_trl.sampling import HFSampler, HFSamplerConfig

    model, tokenizer = tiny_model(seed=0)
    return HFSampler(model, tokenizer, HFSamplerConfig(batch_size=8, show_progress=False))


def test_evaluate_question_set_on_tiny_model(tiny_sampler):
    questions = load_jsonl_questions(GSM8K_FIXTURE, limit=4, template="zero_shot")
    report = evaluate_question_set(
        tiny_sampler, questions, samples=3, temperature=1.0, max_new_tokens=4, bootstrap=200
    )
    assert report["n"] == 4 and report["samples"] == 3
    for key in (
        "accuracy",
        "accuracy_ci_low",
        "accuracy_ci_high",
        "pass@1",
        "pass@3",
        "distinct_1",
        "distinct_2",
        "duplicate_share",
    ):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["pass@1"] <= report["pass@3"]
    assert report["accuracy_ci_low"] <= report["accuracy"] <= report["accuracy_ci_high"]
    assert 0.0 <= report["answer_entropy"] <= math.log2(3)
    greedy_again = evaluate_question_set(tiny_sampler, questions, max_new_tokens=4)
    assert greedy_again["accuracy"] == report["accuracy"]
    assert greedy_again["mean_completion_chars"] == report["mean_completion_chars"]


def test_sampled_metrics_need_a_temperature(tiny_sampler):
    questions = gsm8k_set([1])
    with pytest.raises(ValueError, match="temperature"):
        evaluate_question_set(tiny_sampler, questions, samples=2, temperature=0.0)


def test_eval_command_on_a_saved_tiny_model(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from imm_trl.models import tiny_model

    model, tokenizer = tiny_model(seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")  # B = 0: the adapter changes nothing yet
    parser = argparse.ArgumentParser(prog="imm-trl")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "report.json"
    args = parser.parse_args(
        [
            "eval",
            str(tmp_path / "model"),
            "--jsonl",
            str(GSM8K_FIXTURE),
            "--limit",
            "3",
            "--template",
            "zero_shot",
            "--samples",
            "2",
            "--max-new-tokens",
            "3",
            "--bootstrap",
            "100",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["adapter"] is None and report["settings"]["samples"] == 2
    (only,) = report["sets"].values()
    assert only["n"] == 3 and only["samples"] == 2 and "pass@2" in only
    assert report["settings"]["max_new_tokens"] == 3
    assert "accuracy=" in capsys.readouterr().out
    # A suite brings its own token budget and set names.
    args = parser.parse_args(
        [
            "eval",
            str(tmp_path / "model"),
            "--suite",
            "default",
            "--sets",
            "ood",
            "--limit",
            "2",
            "--bootstrap",
            "100",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert list(report["sets"]) == ["ood"] and report["sets"]["ood"]["n"] == 2
    assert report["settings"]["max_new_tokens"] == load_suite("default", n_eval=2).max_new_tokens
    base = report["sets"]["ood"]
    args = parser.parse_args(
        [
            "eval",
            str(tmp_path / "model"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--suite",
            "default",
            "--sets",
            "ood",
            "--limit",
            "2",
            "--bootstrap",
            "100",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["adapter"] == str(tmp_path / "adapter")
    with_adapter = report["sets"]["ood"]
    assert with_adapter["mean_completion_chars"] == base["mean_completion_chars"]
    assert with_adapter["accuracy"] == base["accuracy"]
    with pytest.raises(SystemExit):  # --suite and --jsonl exclude each other
        parser.parse_args(["eval", "m", "--suite", "default", "--jsonl", "x.jsonl"])


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imm-trl")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_eval_command_against_the_same_and_another_tiny_model(tmp_path, capsys):
    from imm_trl.models import tiny_model

    for seed in (0, 1):
        model, tokenizer = tiny_model(seed=seed)
        model.save_pretrained(tmp_path / f"seed{seed}")
        tokenizer.save_pretrained(tmp_path / f"seed{seed}")
    out = tmp_path / "report.json"
    common = ["--suite", "default", "--sets", "ood", "--limit", "4", "--max-new-tokens", "4"]
    common += ["--bootstrap", "100", "--out", str(out)]
    parser = eval_parser()

    args = parser.parse_args(
        ["eval", str(tmp_path / "seed0"), "--against", str(tmp_path / "seed0")] + common
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["against"]["model"] == str(tmp_path / "seed0")
    assert report["against"]["sets"]["ood"]["correct"] == report["sets"]["ood"]["correct"]
    assert report["paired"]["ood"] == {
        "n": 4,
        "accuracy_a": report["sets"]["ood"]["accuracy"],
        "accuracy_b": report["sets"]["ood"]["accuracy"],
        "difference": 0.0,
        "ci_low": 0.0,
        "ci_high": 0.0,
        "only_a": 0,
        "only_b": 0,
        "mcnemar_p": 1.0,
    }
    printed = capsys.readouterr().out
    assert "ood (against)" in printed
    assert "paired n=4    difference=+0.000 [+0.000, +0.000] mcnemar_p=1 " in printed

    args = parser.parse_args(
        ["eval", str(tmp_path / "seed0"), "--against", str(tmp_path / "seed1")] + common
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    mine, theirs = report["sets"]["ood"], report["against"]["sets"]["ood"]
    assert mine["mean_completion_chars"] != theirs["mean_completion_chars"]  # another model
    expected = paired_difference(mine["correct"], theirs["correct"], resamples=100, seed=0)
    assert report["paired"]["ood"] == asdict(expected)
    assert (
        f"paired n=4    difference={expected.difference:+.3f} "
        f"[{expected.ci_low:+.3f}, {expected.ci_high:+.3f}] mcnemar_p={expected.mcnemar_p:.4g} "
        f"only_model={expected.only_a} only_against={expected.only_b}"
    ) in capsys.readouterr().out


class ScriptedSampler(SamplerBase):
    """Answers "question i" right when i is in `right`, wrong otherwise; records its closing."""

    def __init__(self, right, log):
        self.right, self.log = right, log

    def generate(self, prompts, n, params):
        numbers = [int(re.findall(r"question (\d+)", str(prompt))[-1]) for prompt in prompts]
        return [[f"Answer: {i if i in self.right else -1}"] * n for i in numbers]

    def close(self):
        self.log.append(f"close {sorted(self.right)}")


def test_eval_command_against_reports_the_paired_figures(tmp_path, monkeypatch, capsys):
    # 12 questions: A right on question 0 only, B right on 1..9: only_a 1, only_b 9.
    questions = tmp_path / "hand.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question": f"question {i}", "answer": f"#### {i}"}) + "\n"
            for i in range(12)
        )
    )
    log = []

    def load_scripted(model_dir, adapter=None, backend="hf", dtype="float32"):
        log.append(f"load {model_dir} {adapter}")
        return ScriptedSampler({0} if model_dir == "a" else set(range(1, 10)), log)

    monkeypatch.setattr("imm_trl.eval_cli.load_sampler", load_scripted)
    out = tmp_path / "report.json"
    args = eval_parser().parse_args(
        ["eval", "a", "--against", "b", "--jsonl", str(questions), "--template", "zero_shot"]
        + ["--bootstrap", "500", "--out", str(out)]
    )
    assert args.func(args) == 0
    # the first sampler is closed before the second one is loaded
    assert log == ["load a None", "close [0]", "load b None", f"close {list(range(1, 10))}"]
    paired = json.loads(out.read_text())["paired"]["hand"]
    assert (paired["n"], paired["only_a"], paired["only_b"]) == (12, 1, 9)
    assert (paired["accuracy_a"], paired["accuracy_b"]) == (1 / 12, 0.75)
    assert paired["difference"] == pytest.approx(-8 / 12)
    assert paired["mcnemar_p"] == 0.021484375  # 2 * (1 + 10) / 2^10
    assert paired["ci_low"] < -8 / 12 < paired["ci_high"] < 0
    assert "difference=-0.667" in capsys.readouterr().out
    # --against-adapter alone compares two adapters of model_dir
    args = eval_parser().parse_args(
        ["eval", "a", "--against-adapter", "lora", "--jsonl", str(questions)]
        + ["--template", "zero_shot", "--bootstrap", "50"]
    )
    log.clear()
    assert args.func(args) == 0
    assert log[2] == "load a lora"


# -- local evaluate modules ------------------------------------------------------------------


def test_local_evaluate_modules_match_the_functions():
    pytest.importorskip("evaluate")
    from imm_trl.metrics import load_metric

    accuracy = load_metric("verified_accuracy").compute(
        predictions=["Answer: 4", "5", "Answer: 10"],
        references=["#### 4", "#### 6", "#### 10"],
        verifier="gsm8k",
        bootstrap=300,
    )
    assert accuracy["accuracy"] == pytest.approx(2 / 3)
    assert (accuracy["accuracy_ci_low"], accuracy["accuracy_ci_high"]) == bootstrap_ci(
        [1, 0, 1], resamples=300
    )
    passes = load_metric("pass_at_k").compute(
        predictions=[["4", "5", "4", "1"], ["1", "2", "0", "9"]],
        references=["#### 4", "#### 3"],
        k=[1, 2],
        verifier="gsm8k",
    )
    assert passes["pass@1"] == pytest.approx((0.5 + 0) / 2)
    assert passes["pass@2"] == pytest.approx((1 - 1 / 6 + 0) / 2)  # 1 - C(2,2)/C(4,2)
    groups = [["Answer: 1", "Answer: 1"], ["Answer: 1", "Answer: 2"]]
    collapse = load_metric("collapse").compute(predictions=groups, verifier="gsm8k")
    assert collapse == pytest.approx(collapse_metrics(groups, "gsm8k"))
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("accuracy")


@pytest.mark.integration
def test_default_model_follows_the_answer_format_on_the_default_suite(default_model_dir):
    """The real default model with 3-shot prompts states 'Answer: ...' and is scored; kept to
    a few questions (greedy, 16 tokens) so that it stays cheap on 2 CPU cores."""
    from imm_trl.eval import load_sampler

    sampler = load_sampler(default_model_dir, backend="hf")
    questions = load_suite("default", seed=0, n_train=0, n_eval=6).eval_sets["id"]
    report = evaluate_question_set(sampler, questions, max_new_tokens=16, bootstrap=200)
    assert report["n"] == 6
    assert report["format_share"] >= 0.8
    assert 0.0 <= report["accuracy"] <= 1.0
