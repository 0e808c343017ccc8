"""A user's TRL GRPO script with step-mode IMM, run by tests/test_distributed_step_mode.py under
`accelerate launch --config_file recipes/accelerate_configs/ddp_cpu.yaml` (2 CPU processes).

Each process writes a digest of every weight right after each merge, for the test to compare
across processes."""

import hashlib
import json
import sys
from pathlib import Path

from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from imm_trl import IMMCallback, IMMConfig
from imm_trl.models import tiny_model

PROMPTS = [{"prompt": [{"role": "user", "content": f"What is {a} + {a + 1}?"}]} for a in range(8)]


def length_reward(completions, **columns):
    return [len(completion[0]["content"]) / 10 for completion in completions]


def digests(model) -> dict[str, str]:
    return {
        name: hashlib.sha256(param.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for name, param in model.named_parameters()
    }


class AfterMerges(TrainerCallback):
    """Digests of the weights after each merge (added after IMMCallback, so it runs after it)."""

    def __init__(self, trainer, imm):
        self.trainer, self.imm, self.seen = trainer, imm, []

    def record(self, state):
        if self.imm.step_merging.last_merge_step == state.global_step:
            self.seen.append({"step": state.global_step, "weights": digests(self.trainer.model)})

    def on_step_end(self, args, state, control, **kwargs):
        self.record(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.record(state)


def main(out_dir: Path, peft: bool) -> None:
    model, tokenizer = tiny_model(seed=0)
    args = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        max_steps=3,
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
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_list(PROMPTS),
        processing_class=tokenizer,
        peft_config=lora if peft else None,
    )
    theta0 = digests(trainer.model)
    imm = IMMCallback(
        trainer,
        IMMConfig(
            merge_every_steps=2, merge_method="dare_linear", merge_ratio=0.5, density=0.8, seed=3
        ),
    )
    trainer.add_callback(imm)
    after = AfterMerges(trainer, imm)
    trainer.add_callback(after)
    trainer.train()

    final = after.seen[-1]["weights"]
    report = {
        "world_size": trainer.accelerator.num_processes,
        "merges": after.seen,
        "changed_by_training": sorted(
            n for n in final if "lora_" not in n and final[n] != theta0[n]
        ),
    }
    (out_dir / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), peft=sys.argv[2] == "lora")
