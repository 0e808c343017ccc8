"""GRPO step time with and without `share_prompt_prefixes`, side by side in one run, on the
default model and suite (the training setup of `grpo_merge_back.py`).

    python benchmarks/grpo_step_time.py [--steps 4] [--repeats 2]

Each repeat trains the plain GRPO arm for --steps steps from theta0 twice, without and with the
shared prompt prefix, alternating so both see the same machine. Per-step times are TRL's own
`step_time`; the sampled rewards must agree (same seed, same weights up to float rounding).
Writes benchmarks/results/grpo_step_time.{json,md}, the machine load beside each row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_merge_back import MergeBackConfig, train_arm  # noqa: E402
from machine_load import describe, machine_load, settle  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed_run(share: bool, steps: int, suite) -> dict:
    config = MergeBackConfig(max_steps=steps, save_steps=10**6, share_prompt_prefixes=share)
    load = settle()
    with tempfile.TemporaryDirectory() as work:
        _, _, extra = train_arm(config, "grpo", suite, Path(work))
    return {"share_prompt_prefixes": share, "step_times": extra["step_times"], "rewards": extra["train_rewards"],
            "load_before": load, "load_after": machine_load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "grpo_step_time.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from imm_trl.files import write_atomically, write_json_atomically
    from imm_trl.tasks import load_suite

    defaults = MergeBackConfig()
    suite = load_suite("default", seed=defaults.seed, n_train=defaults.n_train, n_eval=8)
    runs = [timed_run(share, args.steps, suite) for _ in range(args.repeats) for share in (False, True)]
    for run in runs:
        print(f"share_prompt_prefixes={run['share_prompt_prefixes']}: steps {run['step_times']} s, "
              f"rewards {run['rewards']}, {describe(run['load_before'])}", flush=True)

    def median_step(share):
        return statistics.median(t for run in runs if run["share_prompt_prefixes"] == share for t in run["step_times"])

    summary = {"median_step_s_plain": median_step(False), "median_step_s_shared": median_step(True),
               "rewards_agree": len({tuple(run["rewards"]) for run in runs}) == 1}
    summary["speedup"] = summary["median_step_s_plain"] / summary["median_step_s_shared"]
    print(f"median step {summary['median_step_s_plain']:.1f} s -> {summary['median_step_s_shared']:.1f} s "
          f"({summary['speedup']:.2f}x); rewards agree: {summary['rewards_agree']}")
    write_json_atomically(args.out, {"steps": args.steps, "summary": summary, "runs": runs})
    lines = [
        "# GRPO step time with and without share_prompt_prefixes",
        "",
        f"`python benchmarks/grpo_step_time.py --steps {args.steps} --repeats {args.repeats}`: SmolLM2-135M-Instruct, "
        f"LoRA r={defaults.lora_r}, default suite (few-shot prompts), {defaults.batch_size} completions per step "
        f"({defaults.num_generations} per prompt), HF generation, 2-core CPU. Step time is TRL's `step_time` "
        "(generation, reward, loss, backward, optimizer).",
        "",
        "| run | shared prefix | step times (s) | sampled rewards | load before |",
        "|---|---|---|---|---|",
    ]
    for index, run in enumerate(runs):
        times = ", ".join(f"{t:.1f}" for t in run["step_times"])
        lines.append(f"| {index} | {run['share_prompt_prefixes']} | {times} | {run['rewards']} | "
                     f"{describe(run['load_before'])} |")
    lines += ["", f"Median step: {summary['median_step_s_plain']:.1f} s plain, {summary['median_step_s_shared']:.1f} s "
              f"shared ({summary['speedup']:.2f}x); sampled rewards identical across runs: {summary['rewards_agree']}."]
    write_atomically(args.out.with_suffix(".md"), lambda temporary: temporary.write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
