"""IMMCallback on a plain TRL SFT script (tiny model): the two-line integration, checked
against an independent computation of the IMM formula."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import BitsAndBytesConfig, LlamaForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from imm_trl.callback import METRICS_FILE, IMMCallback
from imm_trl.config import IMMConfig
from imm_trl.models import tiny_model
from imm_trl.sampling import HFSampler

ALPHA = 0.5
QUESTIONS = [{"question": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(6)]


def any_text(completions, **columns):
    """A TRL reward function (conversational completions): every non-empty completion passes,
    since the tiny random model knows no maths."""
    return [1.0 if completion[0]["content"].strip() else 0.0 for completion in completions]


class Recorder(TrainerCallback):
    """What a test needs to see inside each iteration's training run."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.at_begin, self.sft_weights, self.logs = [], [], []

    def on_train_begin(self, args, state, control, **kwargs):
        model, optimizer = self.trainer.model, self.trainer.optimizer
        lora_b = [p.detach().abs().max().item() for n, p in model.named_parameters() if "lora_B" in n]
        self.at_begin.append({"lora_b_max": max(lora_b, default=0.0), "optimizer_state": len(optimizer.state)})

    def on_train_end(self, args, state, control, **kwargs):
        imm = next(cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, IMMCallback))
        quantized = [t for t in getattr(imm.merger, "targets", {}).values() if t.quantized]
        if quantized:  # QLoRA: G is the master copy; the adapter delta is kept apart
            self.sft_weights.append({
                t.name: (t.master.float().clone(), t.layers[0].get_delta_weight("default").float().clone())
                for t in quantized
            })
        else:
            self.sft_weights.append(dense_weights(self.trainer.model))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def dense_weights(model) -> dict[str, torch.Tensor]:
    """theta as the model computes with it: base weight plus the LoRA delta, by HF name."""
    from peft.tuners.lora import LoraLayer

    from imm_trl.merging.quantization import dequantize

    if not hasattr(model, "peft_config"):
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            hf_name = name.removeprefix("base_model.model.") + ".weight"
            delta = module.get_delta_weight("default") if module.merged is False else 0
            weights[hf_name] = (dequantize(module.get_base_layer()).float() + delta).clone()
    return weights


def user_script(
    output_dir, imm_config, peft=True, seed=0, extra_callbacks=(), load_in_4bit=False, lora_rank=4, **sft
):
    """A TRL SFT script as a user writes it, plus the two IMM lines."""
    model, tokenizer = tiny_model(seed=seed)
    if load_in_4bit:  # QLoRA: the user loads their checkpoint in 4 bits
        model.save_pretrained(output_dir / "base")
        model = LlamaForCausalLM.from_pretrained(
            output_dir / "base", dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        )
    args = SFTConfig(**{
        **dict(
            output_dir=str(output_dir), use_cpu=True, bf16=False, max_steps=3,
            per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, report_to="none",
            save_strategy="no", gradient_checkpointing=False, max_length=96, seed=seed,
        ),
        **sft,
    })
    seed_data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": q["question"]}], "completion": [{"role": "assistant", "content": q["answer"]}]} for q in QUESTIONS]
    )
    lora = LoraConfig(r=lora_rank, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=seed_data, processing_class=tokenizer, peft_config=lora if peft else None)
    theta0 = dense_weights(trainer.model)
    recorder = Recorder(trainer)
    for callback in (recorder, *extra_callbacks):
        trainer.add_callback(callback)
    trainer.add_callback(IMMCallback(trainer, imm_config))  # the two lines a user adds
    trainer.train()
    return trainer, theta0, recorder


def imm_config(tmp_path, **overrides):
    values = dict(
        iterations=2, merge_method="linear", merge_ratio=ALPHA, density=1.0, samples_per_question=2,
        temperature=1.0, max_new_tokens=12, verifier=any_text, questions=QUESTIONS, seed=7,
        output_dir=str(tmp_path / "imm"),
    )
    values.update(overrides)
    return IMMConfig(**values)


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_two_iterations_follow_the_imm_formula(tmp_path, peft):
    trainer, theta0, recorder = user_script(tmp_path, imm_config(tmp_path), peft=peft)
    assert len(recorder.sft_weights) == 2
    last_sft = recorder.sft_weights[-1]
    expected_final = {n: theta0[n] + ALPHA * (last_sft[n] - theta0[n]) for n in last_sft}
    final = dense_weights(trainer.model)
    changed = 0
    for name, expected in expected_final.items():
        torch.testing.assert_close(final[name], expected, rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(final[name], theta0[name])
    assert changed > 0, "training changed nothing; the test would prove nothing"

    # Each iteration starts fresh: zero LoRA B (adapter re-initialised) and empty optimizer state.
    for begin in recorder.at_begin:
        assert begin["optimizer_state"] == 0
        if peft:
            assert begin["lora_b_max"] == 0.0

    # Metrics went through the trainer's loggers and into the JSON file.
    imm_logs = [row for row in recorder.logs if "imm/iteration" in row]
    assert [row["imm/iteration"] for row in imm_logs] == [1, 2]
    assert all("imm/train_loss" in row and "imm/sampling/yield_rate" in row for row in imm_logs)
    history = json.loads((tmp_path / "imm" / METRICS_FILE).read_text())
    assert [row["iteration"] for row in history] == [1, 2]


def test_iteration_two_samples_from_the_merged_model(tmp_path):
    config = imm_config(tmp_path)
    trainer, theta0, recorder = user_script(tmp_path, config)
    imm = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, IMMCallback))
    data_2 = sorted(row["completion"][0]["content"] for row in imm.last_dataset)

    def completions_of(weights):
        model, tokenizer = tiny_model(seed=0)
        model.load_state_dict({**model.state_dict(), **weights})
        params = config.rejection_config(2).sampling
        texts = HFSampler(model, tokenizer).generate([[{"role": "user", "content": q["question"]}] for q in QUESTIONS], 2, params)
        return sorted({t.strip() for row in texts for t in row if t.strip()})

    merged_1 = {n: theta0[n] + ALPHA * (w - theta0[n]) for n, w in recorder.sft_weights[0].items()}
    assert sorted({t.strip() for t in data_2}) == completions_of(merged_1)
    assert sorted({t.strip() for t in data_2}) != completions_of(recorder.sft_weights[0])


def test_self_improve_preset_keeps_the_sft_weights(tmp_path):
    config = IMMConfig.preset(
        "self_improve", iterations=1, samples_per_question=2, temperature=1.0, max_new_tokens=12,
        verifier=any_text, questions=QUESTIONS, seed=7, output_dir=str(tmp_path / "imm"),
    )
    trainer, _, recorder = user_script(tmp_path, config)
    final = dense_weights(trainer.model)
    for name, sft in recorder.sft_weights[0].items():
        torch.testing.assert_close(final[name], sft, rtol=0, atol=1e-6, msg=name)


def test_missing_questions_is_a_clear_error(tmp_path):
    model, tokenizer = tiny_model()
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer,
        args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}]),
    )
    with pytest.raises(ValueError, match="questions"):
        IMMCallback(trainer, IMMConfig(questions=None))


class CrashInIteration(TrainerCallback):
    """Kills the run (an exception, as a crash would) in the middle of iteration `iteration`."""

    def __init__(self, iteration):
        self.iteration, self.train_runs = iteration, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_runs += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.train_runs == self.iteration and state.global_step == 2:
            raise KeyboardInterrupt("simulated kill during iteration 2")


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_resume_after_a_kill_in_iteration_two_matches_an_uninterrupted_run(tmp_path, peft):
    uninterrupted, _, _ = user_script(tmp_path / "a", imm_config(tmp_path / "a", temperature=0.0), peft=peft)

    config = imm_config(tmp_path / "b", temperature=0.0)
    with pytest.raises(KeyboardInterrupt):
        user_script(tmp_path / "b", config, peft=peft, extra_callbacks=[CrashInIteration(2)])
    assert (tmp_path / "b" / "imm" / "iteration-1").is_dir()
    assert not (tmp_path / "b" / "imm" / "iteration-2").exists()

    resumed, _, recorder = user_script(tmp_path / "b", config.with_overrides(resume=True), peft=peft)
    assert len(recorder.sft_weights) == 1, "only iteration 2 should have run again"
    final, expected = dense_weights(resumed.model), dense_weights(uninterrupted.model)
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6, msg=name)
    history = json.loads((tmp_path / "b" / "imm" / METRICS_FILE).read_text())
    assert [row["iteration"] for row in history] == [1, 2]



def test_qlora_follows_the_imm_formula_on_the_master_weights(tmp_path):
    """QLoRA: G_t lives in bf16 master copies (the 4-bit weights are their rounding), so the
    formula holds on the masters, and the 4-bit layers are re-quantized from them."""
    from imm_trl.merging.quantization import dequantize

    trainer, _, recorder = user_script(tmp_path, imm_config(tmp_path), load_in_4bit=True)
    imm = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, IMMCallback))
    masters, anchors = imm.merger.master_tensors(), imm.merger.anchor_tensors()
    assert masters and set(masters) == set(imm.merger.merged_parameter_names())  # all quantized
    assert len(recorder.sft_weights) == 2

    base_model = trainer.model.get_base_model()
    changed = 0
    for name, master in masters.items():
        theta0 = anchors[name].float()
        g_1, delta_2 = recorder.sft_weights[1][name]  # master and adapter delta at SFT end
        expected = (theta0 + ALPHA * (g_1 + delta_2 - theta0)).to(torch.bfloat16)
        torch.testing.assert_close(master, expected, rtol=0, atol=0, msg=name)
        changed += not torch.equal(master, anchors[name])
        # The live 4-bit weight is NF4 of the master (error below a block's absmax/8), not the
        # accumulation of two iterations of rounding.
        layer = base_model.get_submodule(name.removesuffix(".weight")).get_base_layer()
        error = (dequantize(layer).float() - master.float()).abs().max()
        assert error < master.float().abs().max() / 8, name
    assert changed > 0, "training changed nothing; the test would prove nothing"
    for begin in recorder.at_begin:
        assert begin["lora_b_max"] == 0.0 and begin["optimizer_state"] == 0
