"""RejectionSampler: statistics, filtering, malformed input, real-data mixing, TRL format."""

import itertools
import json
import time
from pathlib import Path

import pytest

from imm_trl.rejection import (
    RejectionSampler,
    RejectionSamplingConfig,
    pass_at_k,
    real_examples_needed,
)
from imm_trl.sampling import SamplingParams

GSM8K_SAMPLE = Path(__file__).parent / "fixtures" / "gsm8k" / "test_sample.jsonl"


def gsm8k_rows(count):
    return [json.loads(line) for line in GSM8K_SAMPLE.read_text().splitlines()[:count]]


def altered(solution):
    head, final = solution.rsplit("####", 1)
    return f"{head}#### {int(final.strip().replace(',', '')) + 1}"


class ScriptedSampler:
    """A Sampler whose completions are fixed per question text: tests the rejection logic on
    known answers. (Real backends are tested in test_sampling*.py and in the end-to-end test
    below.)"""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def generate(self, prompts, n, params):
        self.calls.append((prompts, n, params))
        return [list(self.script[prompt[-1]["content"]])[:n] for prompt in prompts]


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 4, 4) == 1.0
    # Brute force: the share of k-subsets of the n samples that contain a correct one.
    for n, c, k in [(5, 2, 2), (6, 1, 3), (8, 3, 4)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_stats_filtering_and_trl_format_on_real_gsm8k_rows():
    rows = gsm8k_rows(3)
    gold0, gold1, gold2 = (row["answer"] for row in rows)
    script = {
        rows[0]["question"]: [
            gold0,
            altered(gold0),
            gold0 + "  ",
            "",
            gold0.replace("####", "The answer is"),
        ],
        rows[1]["question"]: [altered(gold1)] * 5,
        rows[2]["question"]: [gold2, gold2, gold2, gold2, gold2],
    }
    sampler = ScriptedSampler(script)
    config = RejectionSamplingConfig(
        samples_per_question=5, sampling=SamplingParams(max_new_tokens=64)
    )
    result = RejectionSampler(sampler, config).run(rows)
    stats = result.stats

    assert sampler.calls[0][1] == 5 and sampler.calls[0][2].seed == 0  # config seed applied
    assert stats.samples == 15
    assert stats.correct_samples == 3 + 0 + 5  # the empty completion is wrong
    assert stats.empty_completions == 1 and stats.empty_completion_rows == [0]
    assert stats.yield_rate == pytest.approx(8 / 15)
    assert stats.pass_at_1 == pytest.approx((3 / 5 + 0 + 1) / 3)
    assert stats.pass_at_k == pytest.approx(2 / 3)
    assert stats.solved_share == pytest.approx(2 / 3)
    assert stats.distinct_completions_per_question == pytest.approx((4 + 1 + 1) / 3)
    assert stats.duplicates_dropped == 1 + 4  # "gold0  " duplicates gold0 after stripping
    assert stats.generated_examples == 2 + 1 == len(result.dataset)
    assert result.example_rows == [0, 0, 2]
    assert stats.malformed_rows == [] and stats.timeouts == 0 and stats.verifier_errors == 0
    assert stats.mean_completion_chars > 0

    example = result.dataset[0]
    assert set(result.dataset.column_names) == {"prompt", "completion"}
    assert example["prompt"] == [{"role": "user", "content": rows[0]["question"]}]
    assert example["completion"] == [{"role": "assistant", "content": gold0}]


def test_cap_per_question_and_keeping_duplicates():
    rows = gsm8k_rows(1)
    gold = rows[0]["answer"]
    sampler = ScriptedSampler({rows[0]["question"]: [gold, gold, gold + "\n", gold]})
    capped = RejectionSampler(
        sampler,
        RejectionSamplingConfig(
            samples_per_question=4, max_correct_per_question=2, drop_duplicates=False
        ),
    ).run(rows)
    assert len(capped.dataset) == 2 and capped.stats.over_cap_dropped == 2
    deduplicated = RejectionSampler(sampler, RejectionSamplingConfig(samples_per_question=4)).run(
        rows
    )
    assert len(deduplicated.dataset) == 1 and deduplicated.stats.duplicates_dropped == 3


def test_malformed_rows_are_reported_skipped_and_counted():
    good = gsm8k_rows(2)
    rows = [
        good[0],
        {"question": "What is 1 + 1?"},  # no gold
        {"question": "", "answer": "#### 2"},  # no question
        {"question": "How many?", "answer": "#### lots"},  # gold without a number
        {"question": "And now?", "answer": None},
        good[1],
    ]
    script = {row["question"]: [row["answer"]] * 2 for row in good}
    sampler = ScriptedSampler(script)
    result = RejectionSampler(sampler, RejectionSamplingConfig(samples_per_question=2)).run(rows)
    stats = result.stats
    assert [row_id for row_id, _ in stats.malformed_rows] == [1, 2, 3, 4]
    reasons = dict(stats.malformed_rows)
    assert reasons[1] == "missing gold answer" and reasons[2] == "missing question"
    assert "no number" in reasons[3]
    assert stats.questions == 6 and stats.usable_questions == 2
    assert len(sampler.calls[0][0]) == 2  # malformed rows were never sampled
    assert result.example_rows == [0, 5]


def test_real_data_mixing_ratio():
    rows = gsm8k_rows(10)
    script = {
        row["question"]: [row["answer"] if i < 4 else "no idea"] for i, row in enumerate(rows)
    }
    config = RejectionSamplingConfig(
        samples_per_question=1, real_data_ratio=0.5, system_prompt="Be brief."
    )
    result = RejectionSampler(ScriptedSampler(script), config).run(rows)
    assert result.stats.generated_examples == 4
    assert result.stats.real_examples == real_examples_needed(4, 0.5) == 4
    assert result.example_sources.count("real") == 4
    real = [result.dataset[i] for i, s in enumerate(result.example_sources) if s == "real"]
    assert all(ex["prompt"][0] == {"role": "system", "content": "Be brief."} for ex in real)
    assert real_examples_needed(6, 0.25) == 2
    with pytest.raises(ValueError):
        RejectionSamplingConfig(real_data_ratio=1.0)


def test_verifier_timeouts_and_errors_are_counted():
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(3)]

    def slow_or_broken_reward(completions, **_):
        if any("slow" in c for c in completions):
            time.sleep(0.5)
        if any("broken" in c for c in completions):
            raise RuntimeError("cannot score")
        return [1.0] * len(completions)

    script = {"q0": ["fine", "slow"], "q1": ["broken", "fine"], "q2": ["fine", "fine again"]}
    config = RejectionSamplingConfig(
        samples_per_question=2,
        verifier=slow_or_broken_reward,
        verifier_time_limit_s=0.05,
        reward_completions_as_messages=False,
    )
    stats = RejectionSampler(ScriptedSampler(script), config).run(rows).stats
    assert stats.timeouts == 1 and stats.verifier_errors == 1
    assert stats.correct_samples == 4


def test_unknown_verifier_name_fails_before_sampling():
    with pytest.raises(ValueError, match="valid verifiers"):
        RejectionSampler(ScriptedSampler({}), RejectionSamplingConfig(verifier="gsm8"))


def test_end_to_end_with_hf_sampler_and_sft_trainer(tmp_path):
    """A real sampler (tiny model) feeds the dataset straight into TRL's SFTTrainer with
    completion-only loss."""
    from trl import SFTConfig, SFTTrainer

    from imm_trl.models import tiny_model
    from imm_trl.sampling import HFSampler, HFSamplerConfig

    model, tokenizer = tiny_model(seed=0)
    sampler = HFSampler(model, tokenizer, HFSamplerConfig(show_progress=False))

    def non_empty(completions, prompts, **_):  # the tiny model cannot do maths; accept any text
        assert prompts[0][-1]["role"] == "user"  # TRL-style conversational arguments
        return [1.0 if c[0]["content"].strip() else 0.0 for c in completions]

    config = RejectionSamplingConfig(
        samples_per_question=2, verifier=non_empty, sampling=SamplingParams(max_new_tokens=8)
    )
    result = RejectionSampler(sampler, config).run(gsm8k_rows(4))
    assert len(result.dataset) >= 4
    assert result.stats.mean_completion_tokens is not None
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=2,
            use_cpu=True,
            report_to=[],
            max_length=256,
            gradient_checkpointing=False,
        ),
        train_dataset=result.dataset,
        processing_class=tokenizer,
    )
    sample = trainer.train_dataset[0]
    # Completion-only loss: the prompt's labels are masked, the completion's are kept.
    masked = [label == -100 for label in sample["labels"]]
    assert masked[0] and not all(masked)
    assert masked == sorted(masked, reverse=True)  # masked prompt first, then completion
    trainer.train()


def test_trl_accuracy_reward_works_as_a_verifier():
    """TRL's own reward function, fed conversational completions and the `solution` column."""
    from trl.rewards import accuracy_reward

    rows = [
        {"question": "What is half of one?", "solution": "$\\frac{1}{2}$"},
        {"question": "What is 2 + 2?", "solution": "$4$"},
    ]
    script = {
        "What is half of one?": ["It is \\boxed{\\frac{1}{2}}", "It is \\boxed{0.4}"],
        "What is 2 + 2?": ["\\boxed{4}", "\\boxed{5}"],
    }
    config = RejectionSamplingConfig(samples_per_question=2, verifier=accuracy_reward)
    result = RejectionSampler(ScriptedSampler(script), config).run(rows)
    assert result.stats.correct_samples == 2 and result.stats.verifier_errors == 0
    assert [ex["completion"][0]["content"] for ex in result.dataset] == [
        "It is \\boxed{\\frac{1}{2}}",
        "\\boxed{4}",
    ]
