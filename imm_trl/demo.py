"""`imm-trl demo`: self-improvement against IMM on the offline default model, in one command.

    imm-trl demo                 # 2 iterations of each arm, report in runs/demo
    imm-trl demo --quick         # a minute-scale budget (what the integration tests run)
    imm-trl demo --imm.merge_ratio 0.7 --sft.learning_rate 1e-4   # any recipe value, dotted

It runs the packaged default recipe (`imm_trl/recipes/default.yaml`, package data, so a
non-editable install has it too) with a smaller budget (`demo_recipe`), twice from the same
base model theta0, on the same questions with the same seeds, one arm after the other through
the same code path
(`SFTTrainer` + `IMMCallback`, as `imm_trl.loop.run_imm` builds them):

- self-improvement: the `self_improve` preset, G_t = theta0 + 1.0 * (theta_t - theta0), i.e.
  the fine-tuned model is kept as it is (no merging back);
- IMM: the recipe's merge, G_t = theta0 + 0.5 * linear(theta_t - theta0).

Both arms sample with one vLLM engine (loaded with theta0's weights again before the second),
and the random state is reset before each arm, so iteration 1 samples the same D_1 for both:
the arms differ by the merge alone. theta0 is scored once (iteration 0 of both arms); each
G_t is scored by the callback after its merge; theta0 and each G_T are also scored question by
question (greedy), for the paired comparisons (`imm_trl.stats.paired_difference`).

The console shows one progress line per iteration (`imm_trl.progress`), then the table and
the paired comparisons; `--verbose` brings back the libraries' own bars and logs. It writes:

    <out>/report.md       the tables and what the run was
    <out>/report.json     settings, recipes, table rows, paired comparisons, both histories
    <out>/accuracy.png    ID and OOD accuracy per iteration, both arms, with CI error bars
    <out>/diversity.png   distinct-2 and answer entropy of the eval completions per iteration
    <out>/self_improve/imm/, <out>/imm/imm/   each arm's checkpoints, imm_metrics.json, final/

Slightly over 400 lines: the demo's recipes, its two arms and the command line read best as one
story; the report (tables, paired comparisons, plots) is `demo_report.py`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from imm_trl.demo_report import (
    ARMS,
    CONSOLE_COLUMNS,
    THETA0,
    arm_title,
    format_paired_table,
    format_table,
    paired_comparisons,
    side_by_side_rows,
    write_report,
)

# The full budget is sized for two arms in 10 minutes on 2 idle cores with warm caches. Training
# dominates and its cost follows the D_t size, i.e. n_train: one arm of 128 questions took
# ~100 s per iteration, 80 of them training (benchmarks/results/demo/report.md), so two arms of
# 96 come to ~7 minutes by that measurement (an estimate: not yet timed on an idle machine).
# The --quick budget is a few minutes of actual work (engine start aside).
QUICK = {"n_train": 16, "n_eval": 24, "max_steps": 2, "eval_samples": 1}



@dataclass
class DemoConfig:
    """What `run_demo` runs: the default recipe with these values in place of its own."""

    out_dir: str = field(
        default="runs/demo", metadata={"help": "Where the report and the arms' runs go."}
    )
    quick: bool = field(
        default=False,
        metadata={"help": "Use the QUICK budget (n_train, n_eval, max_steps, eval_samples)."},
    )
    n_train: int = field(default=96, metadata={"help": "ID training questions."})
    n_eval: int = field(default=100, metadata={"help": "Questions in each eval set (ID, OOD)."})
    iterations: int = field(default=2, metadata={"help": "Iterations T of each arm."})
    epochs: float = field(
        default=1.0, metadata={"help": "SFT epochs over D_t per iteration (unless max_steps)."}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "SFT steps per iteration; None trains `epochs` epochs."}
    )
    eval_samples: int = field(
        default=4,
        metadata={
            "help": "Samples per eval question: k > 1 adds pass@k and per-question diversity; "
            "1 measures diversity over the greedy answers of the whole set."
        },
    )
    sampler: str = field(default="vllm", metadata={"help": "Sampling backend: vllm or hf."})
    cpu_kv_cache_gib: float = field(
        default=1.0, metadata={"help": "vLLM-cpu KV cache, GiB (the 135M model needs little)."}
    )
    verbose: bool = field(
        default=False,
        metadata={"help": "Keep the libraries' progress bars, INFO logs and warnings."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the questions, sampling and SFT."})
    overrides: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Recipe overrides applied last, to both arms except the self-improvement "
            "arm's merge: ['--imm.merge_ratio', '0.7', ...]."
        },
    )

    def __post_init__(self) -> None:
        if self.quick:
            for key, value in QUICK.items():
                setattr(self, key, value)


# --------------------------------------------------------------------------------------------
# The recipes
# --------------------------------------------------------------------------------------------


def run_dir(config: DemoConfig, arm: str = "imm") -> Path:
    """An arm's trainer output_dir; its callback writes to <run_dir>/imm."""
    return Path(config.out_dir) / arm


def demo_recipe(config: DemoConfig) -> dict[str, Any]:
    """The raw default recipe with the demo's budget (then `config.overrides`) applied: the
    IMM arm's recipe."""
    from imm_trl.loop import apply_overrides
    from imm_trl.recipes import read_recipe

    raw = read_recipe("default")
    raw["data"].update(n_train=config.n_train, n_eval=config.n_eval, seed=config.seed)
    raw["sft"].update(output_dir=str(run_dir(config)), seed=config.seed, logging_steps=1)
    if config.max_steps is not None:
        raw["sft"]["max_steps"] = config.max_steps
    else:
        raw["sft"]["num_train_epochs"] = config.epochs
    sampler_kwargs: dict[str, Any] = {"show_progress": config.verbose}
    if config.sampler == "vllm":
        sampler_kwargs["cpu_kv_cache_gib"] = config.cpu_kv_cache_gib
        if not config.verbose:  # vLLM's bar over the weight files at engine start
            sampler_kwargs["engine_kwargs"] = {"use_tqdm_on_load": False}
    raw["imm"].update(
        iterations=config.iterations,
        eval_samples=config.eval_samples,
        # theta0 is scored once, by the demo, for both arms (and question by question).
        eval_at_start=False,
        overwrite=True,  # running the demo again into the same directory starts it over
        sampler=config.sampler,
        sampler_kwargs=sampler_kwargs,
        seed=config.seed,
    )
    if not config.verbose:  # nothing to pin without an accelerator; torch warns about it
        raw["sft"]["dataloader_pin_memory"] = False
    return apply_overrides(raw, config.overrides)


def arm_recipes(config: DemoConfig) -> dict[str, dict[str, Any]]:
    """The raw recipe of each arm: the IMM one (`demo_recipe`), and the same with the
    `self_improve` preset's merge (ratio 1.0, linear) and its own output directory."""
    from imm_trl.config import PRESETS

    imm = demo_recipe(config)
    self_improve = copy.deepcopy(imm)
    self_improve["imm"].update(PRESETS["self_improve"])
    self_improve["sft"]["output_dir"] = str(run_dir(config, "self_improve"))
    return {"self_improve": self_improve, "imm": imm}


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {load}, Python {platform.python_version()}"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def start_shared_sampler(recipe, display):
    """One vLLM engine over theta0's files for both arms (an engine start is the slowest step
    on CPU), counting completions on `display` unless the recipe shows vLLM's own bars; None
    for the HF backend, whose sampler is the trainer's model itself."""
    if recipe.imm.get("sampler") != "vllm":
        return None
    from transformers import AutoTokenizer

    from imm_trl.loop import DEFAULT_MODEL
    from imm_trl.models import default_model_dir, ensure_chat_ready
    from imm_trl.progress import generation_progress
    from imm_trl.sampling import VLLMSampler, VLLMSamplerConfig

    name = recipe.model.model_name_or_path
    model_dir = default_model_dir() if name == DEFAULT_MODEL else Path(name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ensure_chat_ready(tokenizer)
    settings = VLLMSamplerConfig(**recipe.imm.get("sampler_kwargs", {}))
    if not settings.show_progress:
        # vLLM's `use_tqdm` takes a tqdm factory as well as a bool: count, draw no bar.
        settings.show_progress = generation_progress(display)
    return VLLMSampler(model_dir, tokenizer, settings)


def build_arm(recipe, sampler, display, verbose: bool):
    """`imm_trl.loop.build_trainer` for one arm, with its IMM callback sampling through
    `sampler` (None: the callback's own) and, unless `verbose`, the trainer's progress bar and
    printed logs replaced by `display`'s step count (the loss still reaches `report_to`)."""
    from transformers import PrinterCallback, ProgressCallback

    from imm_trl.loop import build_trainer
    from imm_trl.progress import TrainingProgress

    trainer, callback = build_trainer(recipe, sampler=sampler)
    if not verbose:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingProgress(display))
    return trainer, callback


def score_sets(sampler, config, *, greedy_only: bool) -> dict[str, dict[str, Any]]:
    """Each eval set of the IMM `config` scored as its callback scores it, plus the greedy
    verdict of every question (`correct`); `greedy_only` skips the k samples."""
    from imm_trl.eval import evaluate_question_set

    return {
        name: evaluate_question_set(
            sampler,
            questions,
            samples=1 if greedy_only else config.eval_samples,
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
            seed=config.seed,
            per_question=True,
        )
        for name, questions in config.eval_sets.items()
    }


def history_entry(iteration: int, scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The callback's form of an eval (`eval/<set>/<metric>`), without the verdict lists."""
    entry: dict[str, Any] = {"iteration": iteration}
    for name, report in scores.items():
        entry.update({f"eval/{name}/{k}": v for k, v in report.items() if k != "correct"})
    return entry


def run_arms(
    recipes: dict[str, Any], display, verbose: bool
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Score theta0, then run each arm's iterations, save its G_T and score it question by
    question; returns theta0's history entry and, per arm, its history (theta0's entry first),
    files and per-question verdicts (`correct`, also theta0's under "theta0")."""
    from transformers import set_seed

    from imm_trl.callback import METRICS_FILE
    from imm_trl.loop import save_final_model
    from imm_trl.progress import PhaseLogHandler, phase_label, phase_logs

    first = next(iter(recipes.values()))
    display.phase(THETA0, "engine start")
    sampler = start_shared_sampler(first, display)
    theta0_entry, arms, correct = None, {}, {}
    try:
        for index, (arm, recipe) in enumerate(recipes.items()):
            title = arm_title(arm)
            # theta0's line tells everything about theta0, the first arm's model load included.
            display.phase(THETA0 if index == 0 else title, "load")
            trainer, callback = build_arm(recipe, sampler, display, verbose)
            if index > 0:
                display.phase(title, "sampler refresh")
                callback.refresh_sampler()  # the shared engine holds the last arm's G_T: theta0 again
            if theta0_entry is None:
                display.phase(THETA0, "eval")
                scores = score_sets(callback.sampler, callback.config, greedy_only=False)
                theta0_entry = history_entry(0, scores)
                correct["theta0"] = {name: report["correct"] for name, report in scores.items()}
            # The same random state at the start of every arm: both sample the same D_1 from theta0.
            set_seed(callback.config.seed)
            with phase_logs(PhaseLogHandler(display, title)):
                trainer.train()
            last = phase_label(title, callback.config.iterations, callback.config.iterations)
            display.phase(last, "save G_T")
            final_model = save_final_model(trainer, callback)
            display.phase(last, "final eval")
            # Reloading G_T also empties the engine's prefix cache, as before the callback's eval:
            # cached keys computed in another batch can flip a near-tied greedy token, and this
            # eval must give the callback's accuracy, question by question.
            callback.refresh_sampler()
            scores = score_sets(callback.sampler, callback.config, greedy_only=True)
            correct[arm] = {name: report["correct"] for name, report in scores.items()}
            arms[arm] = {
                "history": [theta0_entry, *callback.history],
                "metrics_file": str(callback.output_dir / METRICS_FILE),
                "final_model": str(final_model),
                "final_greedy": {
                    name: {k: v for k, v in report.items() if k != "correct"}
                    for name, report in scores.items()
                },
            }
            callback.close()  # the engine it started, if any; the shared one is closed below
            del trainer, callback
            gc.collect()
    finally:
        if sampler is not None:
            sampler.close()
    display.end_line()
    return theta0_entry, {"arms": arms, "correct": correct}


def run_demo(
    config: DemoConfig, command: str | None = None, stream: TextIO | None = None
) -> dict[str, Any]:
    """Run both arms on the default model and suite, write the report, print the tables;
    returns the report (what report.json holds). Progress goes to `stream` (stderr)."""
    from imm_trl.progress import ProgressDisplay, quiet_libraries

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    display = ProgressDisplay(stream if stream is not None else sys.stderr)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    with nullcontext() if config.verbose else quiet_libraries():
        from imm_trl.loop import parse_recipe

        raws = arm_recipes(config)  # imports the libraries (bitsandbytes warns on import)
        theta0_entry, results = run_arms(
            {arm: parse_recipe(raw) for arm, raw in raws.items()}, display, config.verbose
        )
    wall_seconds = time.perf_counter() - started
    arms = results["arms"]
    rows = side_by_side_rows(theta0_entry, {arm: arms[arm]["history"] for arm in ARMS})
    report = {
        "command": command
        or f"imm-trl demo{' --quick' if config.quick else ''} --out {config.out_dir}",
        "machine": machine(),
        "wall_seconds": wall_seconds,
        # On a shared machine wall time mostly measures the neighbours; CPU time does not.
        "cpu_seconds": cpu_seconds() - cpu_started,
        "config": asdict(config),
        "recipes": raws,
        "table": rows,
        "paired": paired_comparisons(results["correct"], seed=config.seed),
        "correct": results["correct"],
        "arms": arms,
    }
    write_report(Path(config.out_dir), report)
    print()
    print(format_table(rows, CONSOLE_COLUMNS))
    print()
    print(format_paired_table(report["paired"]))
    print(f"\nreport: {Path(config.out_dir) / 'report.md'} ({wall_seconds:.0f} s)", flush=True)
    return report


def add_demo_parser(commands) -> argparse.ArgumentParser:
    """Register `imm-trl demo` on an argparse subparsers object; recipe overrides
    (`--imm.merge_ratio 0.7`) arrive as `args.overrides`, as for `imm-trl run`."""
    parser = commands.add_parser(
        "demo",
        help="run self-improvement and IMM from the default model on the default suite, side "
        "by side; prints a table and paired comparisons and writes a report with plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a minute-scale budget (tests, CI)")
    parser.add_argument(
        "--out", default=DemoConfig.out_dir, help="report directory (default: %(default)s)"
    )
    parser.add_argument(
        "--iterations", type=int, default=DemoConfig.iterations, help="iterations of each arm"
    )
    parser.add_argument(
        "--seed", type=int, default=DemoConfig.seed, help="seed of questions and sampling"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep the libraries' progress bars, INFO logs and warnings",
    )
    parser.set_defaults(func=_demo_command, accepts_overrides=True)
    return parser


def demo_command_line(args: argparse.Namespace, overrides: Sequence[str]) -> str:
    """The `imm-trl demo ...` line that reproduces a run (for the report)."""
    words = ["imm-trl demo", *(["--quick"] if args.quick else []), "--out", str(args.out)]
    if args.iterations != DemoConfig.iterations:
        words += ["--iterations", str(args.iterations)]
    if args.seed != DemoConfig.seed:
        words += ["--seed", str(args.seed)]
    return " ".join([*words, *overrides])


def quiet_imports() -> None:
    """Silence what libraries print while they are first imported (call before importing
    them; `imm_trl.progress.quiet_libraries` handles the rest): C++ warnings from torch's c10
    (vLLM-cpu's NUMA binding notice), vLLM's start-up logs, and bitsandbytes' warning that
    its optional CPU kernels package is missing (transformers' Trainer imports it)."""
    import logging

    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _demo_command(args: argparse.Namespace) -> int:
    if not args.verbose:
        quiet_imports()  # the CLI has imported none of them yet
    config = DemoConfig(
        out_dir=args.out,
        quick=args.quick,
        iterations=args.iterations,
        seed=args.seed,
        verbose=args.verbose,
        overrides=list(getattr(args, "overrides", None) or []),
    )
    run_demo(config, command=demo_command_line(args, config.overrides))
    return 0
