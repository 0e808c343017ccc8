"""The demo's report: tables, paired comparisons, plots and report.md/report.json, as pure
functions of the arms' histories and per-question verdicts (`imm_trl.demo` runs the arms and
hands their results here). See `imm_trl.demo` for what the demo runs and what each file holds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from imm_trl.files import write_atomically
from imm_trl.plots import new_figure, save_png

# The arms, in the order they run: directory name -> how tables and plots call it.
ARMS: dict[str, str] = {"self_improve": "self-improve", "imm": "IMM"}
THETA0 = "θ0"
SETS = ("id", "ood")


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


def arm_title(arm: str) -> str:
    return ARMS.get(arm, arm)


# (header, cell) for each column of the table: the console shows CONSOLE_COLUMNS, report.md all.
CONSOLE_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("arm", lambda r: arm_title(r["arm"])),
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
                label=arm_title(arm),
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
            label = f"{arm_title(arm)} {name.upper()}"
            for axes, metric in ((left, "distinct_2"), (right, "answer_entropy")):
                values = [row[f"{name}_{metric}"] for row in curve]
                axes.plot(iterations, values, style, marker="o", label=label)
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


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(
        out_dir / "report.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n")
    )
    write_atomically(out_dir / "accuracy.png", lambda p: plot_accuracy(report["table"], p))
    write_atomically(out_dir / "diversity.png", lambda p: plot_diversity(report["table"], p))
    write_atomically(out_dir / "report.md", lambda p: p.write_text(render_markdown(report)))
