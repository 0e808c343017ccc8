"""A user's TRL SFT script with IMM, run by tests/test_distributed.py under
`accelerate launch --config_file recipes/accelerate_configs/ddp_cpu.yaml` (2 CPU processes).

Each process writes what the test compares: a digest of every weight after the run, the
completions of its D_t, and how many prompts its own sampler generated for."""

import hashlib
import json
import sys
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from imm_trl import IMMCallback, IMMConfig
from imm_trl.models import tiny_model
from imm_trl.sampling import HFSampler

QUESTIONS = [{"question": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(8)]
# merge_ratio='auto' holds 8 of them out to score the candidates.
AUTO_QUESTIONS = [{"question": f"What is {a} + {a + 2}?", "answer": str(2 * a + 2)} for a in range(16)]


def half_the_text(completions, **columns):
    """Passes completions of even length: candidates score differently, not all alike."""
    return [1.0 if len(completion[0]["content"].strip()) % 2 == 0 else 0.0 for completion in completions]


def any_text(completions, **columns):
    return [1.0 if completion[0]["content"].strip() else 0.0 for completion in completions]


class CountingSampler(HFSampler):
    prompts_seen = 0

    def generate(self, prompts, n, params):
        self.prompts_seen += len(prompts)
        return super().generate(prompts, n, params)


def digests(model) -> dict[str, str]:
    return {
        name: hashlib.sha256(param.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for name, param in model.named_parameters()
    }


def main(out_dir: Path, peft: bool, auto: bool = False) -> None:
    model, tokenizer = tiny_model(seed=0)
    args = SFTConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, max_steps=3, per_device_train_batch_size=2,
        learning_rate=5e-3, logging_steps=1, report_to="none", save_strategy="no",
        gradient_checkpointing=False, max_length=96, seed=0,
    )
    seed_data = Dataset.from_list([{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=seed_data, processing_class=tokenizer, peft_config=lora if peft else None)
    theta0 = digests(trainer.model)
    sampler = CountingSampler(trainer.model, tokenizer)
    config = IMMConfig(
        iterations=2, merge_method="dare_linear", merge_ratio=0.5, density=0.8, samples_per_question=2,
        temperature=1.0, max_new_tokens=12, verifier=any_text, questions=QUESTIONS, seed=3,
        output_dir=str(out_dir / "imm"),
    )
    if auto:
        config = config.with_overrides(
            merge_ratio="auto", questions=AUTO_QUESTIONS, validation_questions=8, verifier=half_the_text
        )
    imm = IMMCallback(trainer, config, sampler=sampler)
    trainer.add_callback(imm)
    trainer.train()

    rank = trainer.accelerator.process_index
    final = digests(trainer.model)
    report = {
        "world_size": trainer.accelerator.num_processes,
        "weights": final,
        "changed_by_imm": sorted(name for name in final if "lora_" not in name and final[name] != theta0[name]),
        "dataset": [row["completion"][0]["content"] for row in imm.last_dataset],
        "prompts_sampled_here": sampler.prompts_seen,
        "iterations": [row["iteration"] for row in imm.history],
        "auto": [{k: v for k, v in row.items() if k.startswith("auto/")} for row in imm.history],
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), peft=sys.argv[2].startswith("lora"), auto=sys.argv[2].endswith("auto"))
