"""Merging that adapts (tiny model): merge_ratio='auto' picks the candidate the held-out
verifier prefers (ties to the smaller ratio) and ends exactly where a fixed-ratio run with the
recorded picks ends, the retain guard, depth rules and the EMA anchor against independent
computations."""

import json

import pytest
import torch
from test_callback import ALPHA, CrashInIteration, dense_weights, imm_config, user_script
from transformers import TrainerCallback

from imm_trl.adaptive import check_no_overlap, pick_candidate, split_validation
from imm_trl.callback import IMMCallback
from imm_trl.merging.config import expand_depth_rule
from imm_trl.models import tiny_model
from imm_trl.tasks.base import QuestionSet

QUESTIONS = [{"question": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(16)]
PROBE = "model.layers.0.self_attn.q_proj.weight"
WANTED = 0.75


class RatioProbe(TrainerCallback):
    """Knows, at any moment after an iteration's SFT, which ratio alpha the live weights were
    merged at: alpha = <W - theta0, SFT - theta0> / |SFT - theta0|^2 on one LoRA-targeted weight."""

    def __init__(self):
        self.model, self.sft = None, None
        self.theta0 = tiny_model(seed=0)[0].get_parameter(PROBE).detach().clone()  # user_script's

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.sft = dense_weights(model)[PROBE]

    def ratio(self) -> float | None:
        if self.sft is None:
            return None
        live = next(p for n, p in self.model.named_parameters() if n.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
        delta = self.sft - self.theta0
        return float(((live.detach() - self.theta0) * delta).sum() / (delta * delta).sum())


def only_one_ratio_verifier(probe):
    """A reward function that only the model merged at ratio WANTED satisfies (any non-empty
    text passes before the first SFT, when there is nothing to tell apart)."""

    def verify(completions, **columns):
        ratio = probe.ratio()
        passes = ratio is None or abs(ratio - WANTED) < 1e-3
        return [1.0 if passes and c[0]["content"].strip() else 0.0 for c in completions]

    return verify


def auto_script(tmp_path, extra_callbacks=(), **overrides):
    """An auto-ratio run whose verifier accepts only the model merged at WANTED."""
    probe = RatioProbe()
    values = dict(questions=QUESTIONS, merge_ratio="auto", validation_questions=8, verifier=only_one_ratio_verifier(probe))
    config = imm_config(tmp_path, **{**values, **overrides})
    trainer, _, _ = user_script(tmp_path, config, extra_callbacks=[probe, *extra_callbacks])
    return trainer, config


def history(tmp_path):
    return json.loads((tmp_path / "imm" / "imm_metrics.json").read_text())


def test_auto_picks_the_only_candidate_the_verifier_accepts(tmp_path):
    auto_script(tmp_path)
    rows = history(tmp_path)
    assert [row["auto/pick"] for row in rows] == ["0.75", "0.75"]
    for row in rows:
        assert row["auto/score/0.75"] == 1.0
        assert row["auto/score/0.25"] == row["auto/score/0.5"] == row["auto/score/1"] == 0.0


def test_ties_go_to_the_smaller_ratio(tmp_path):
    user_script(tmp_path, imm_config(tmp_path, questions=QUESTIONS, merge_ratio="auto", validation_questions=8))
    rows = history(tmp_path)  # any text passes: every candidate scores the same
    assert [row["auto/pick"] for row in rows] == ["0.25", "0.25"]
    user_script(tmp_path / "depth", imm_config(
        tmp_path / "depth", iterations=1, questions=QUESTIONS, merge_ratio="auto", validation_questions=8,
        auto_ratio_grid=[0.5, {"depth": [0.2, 0.4]}],
    ))
    assert history(tmp_path / "depth")[0]["auto/pick"] == "depth0.2-0.4"  # mean ratio 0.3 < 0.5
    assert pick_candidate([1.0, 0.5, {"depth": [0.2, 0.4]}], [0.3, 0.3, 0.3], None, None) == 2
    assert pick_candidate([0.25, 0.5], [0.2, 0.6], [0.0, 0.5], 0.1) == 0  # 0.5 drifts too far
    assert pick_candidate([0.25, 0.5], [0.2, 0.6], [0.4, 0.3], 0.1) == 1  # none within: least drift


def test_final_weights_equal_a_fixed_ratio_run_with_the_recorded_picks(tmp_path):
    auto, config = auto_script(tmp_path / "auto")
    picks = [float(row["auto/pick"]) for row in history(tmp_path / "auto")]
    training, _ = config.validation_split()
    probe = RatioProbe()
    fixed_config = imm_config(tmp_path / "fixed", questions=training, merge_ratio=picks, verifier=only_one_ratio_verifier(probe))
    fixed, _, _ = user_script(tmp_path / "fixed", fixed_config, extra_callbacks=[probe])
    a, b = dense_weights(auto.model), dense_weights(fixed.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_validation_questions_are_held_out_from_training_and_never_eval_questions(tmp_path):
    training, validation = split_validation(QUESTIONS, 8, seed=7)
    assert len(training) == len(validation) == 8
    assert {r["question"] for r in training}.isdisjoint(r["question"] for r in validation)
    assert {r["question"] for r in training} | {r["question"] for r in validation} == {r["question"] for r in QUESTIONS}
    assert split_validation(QUESTIONS, 8, seed=7) == (training, validation)  # once per run, by seed
    eval_set = QuestionSet("leak", [{"question": validation[0]["question"], "answer": "1", "family": "x"}], "gsm8k")
    with pytest.raises(ValueError, match="also appear in the eval set 'leak'"):
        check_no_overlap(validation, {"leak": eval_set}, "question")
    trainer, _, _ = user_script(tmp_path, imm_config(tmp_path, questions=QUESTIONS, merge_ratio="auto", validation_questions=8))
    imm = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, IMMCallback))
    assert imm.validation_questions == validation and imm.training_questions == training


def test_a_resumed_auto_run_makes_the_same_picks(tmp_path):
    uninterrupted, _ = auto_script(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        auto_script(tmp_path / "b", extra_callbacks=[CrashInIteration(2)])
    resumed, _ = auto_script(tmp_path / "b", resume=True)
    assert [r["auto/pick"] for r in history(tmp_path / "b")] == [r["auto/pick"] for r in history(tmp_path / "a")]
    a, b = dense_weights(uninterrupted.model), dense_weights(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_the_retain_guard_makes_drifting_candidates_ineligible(tmp_path):
    config = imm_config(
        tmp_path, questions=QUESTIONS, merge_ratio="auto", validation_questions=8,
        retain_prompts=["Say hello.", "Name a colour.", "Count to three."], max_retain_drift=0.0,
    )
    user_script(tmp_path, config)
    for row in history(tmp_path):
        drifts = {k.removeprefix("auto/retain_drift/"): v for k, v in row.items() if k.startswith("auto/retain_drift/")}
        assert set(drifts) == {"0.25", "0.5", "0.75", "1"}
        within = [label for label, d in drifts.items() if d <= 0.0]
        expected = within or [label for label, d in drifts.items() if d == min(drifts.values())]
        assert row["auto/pick"] == min(expected, key=float)
    assert json.loads((tmp_path / "imm" / "retain_reference.json").read_text())  # theta0's answers


def test_a_depth_rule_gives_each_layer_its_ratio(tmp_path):
    rule = {"depth": [0.2, 0.8]}
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert expand_depth_rule(rule, names) == {"layers.0": 0.2, "layers.1": 0.8, "default": 0.5}
    trainer, theta0, recorder = user_script(tmp_path, imm_config(tmp_path, iterations=1, merge_ratio=rule), peft=False)
    final, sft = dense_weights(trainer.model), recorder.sft_weights[0]
    for name in final:
        alpha = 0.2 if ".layers.0." in name else 0.8 if ".layers.1." in name else 0.5
        torch.testing.assert_close(final[name], theta0[name] + alpha * (sft[name] - theta0[name]), rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_the_ema_anchor_follows_its_formula(tmp_path, peft):
    decay = 0.6
    trainer, theta0, recorder = user_script(
        tmp_path, imm_config(tmp_path, iterations=3, anchor="ema", anchor_decay=decay), peft=peft
    )
    anchor = dict(theta0)
    for sft in recorder.sft_weights:  # G_t = A_t + alpha (theta_t - A_t); A_{t+1} = d A_t + (1-d) G_t
        merged = {n: anchor[n] + ALPHA * (sft[n] - anchor[n]) for n in sft}
        anchor = {n: decay * anchor[n] + (1 - decay) * merged[n] for n in sft}
    final = dense_weights(trainer.model)
    changed = 0
    for name in merged:
        torch.testing.assert_close(final[name], merged[name], rtol=0, atol=1e-5, msg=name)
        changed += not torch.allclose(merged[name], theta0[name] + ALPHA * (recorder.sft_weights[-1][name] - theta0[name]))
    assert changed, "the EMA anchor made no difference; the test would prove nothing"


def test_auto_with_qlora_scores_on_the_master_weights(tmp_path):
    user_script(
        tmp_path, imm_config(tmp_path, questions=QUESTIONS, merge_ratio="auto", validation_questions=8), load_in_4bit=True
    )
    assert [row["auto/pick"] for row in history(tmp_path)] == ["0.25", "0.25"]
