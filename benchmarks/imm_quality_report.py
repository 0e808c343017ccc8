"""The pure half of the IMM quality study (`benchmarks/imm_quality.py`): from the results JSON
to paired comparisons, hypothesis verdicts, tables, curves, plots and the cost projection. No
model is loaded here; everything is a function of the results dictionary, so it is tested on
synthetic results (tests/test_imm_quality.py).

Results layout (written by imm_quality.py):

    settings    the budget, fixed for the whole study (resume refuses others)
    questions   {set: {"ids": [family:hash, ...], "digest": ...}}, in eval order
    runs        {"<arm>/seed<s>": {arm, seed, history, cpu_seconds, wall_seconds, ...}}
                history rows are the callback's metrics; per set they also hold the per-question
                scores: eval/<set>/correct_bits ("0110..."), pass_bits, distinct_2_per_question
    extra_eval  {"settings": ..., "scores": {family: {"theta0" | "<arm>/seed<s>": row}}}

Intervals: every mean over seeds and every difference comes from
`imm_trl.stats.seed_paired_difference` (seeds and questions both resampled); a mean alone is
its difference against an all-zero model. Per-seed McNemar p-values come from
`imm_trl.stats.paired_difference`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imm_trl.stats import paired_difference, seed_paired_difference

THETA0 = "theta0"
SETS = ("id", "ood")
METRICS = ("accuracy", "pass@k", "distinct_2")
# Where each metric's per-question scores are kept in a history row (eval/<set>/<field>).
PER_QUESTION_FIELD = {
    "accuracy": "correct_bits",
    "pass@k": "pass_bits",
    "distinct_2": "distinct_2_per_question",
}
BINARY_METRICS = ("accuracy", "pass@k")
CURVE_RESAMPLES = 2000  # curves and tables: dozens of intervals per rewrite, each only shown
ADAPTIVE_ARMS = ("imm_paper", "imm_auto", "imm_depth", "imm_ema")
# Secondary comparisons of the pre-registered plan (benchmarks/results/imm_quality_plan.md),
# Holm-adjusted together: (arm A, arm B, set, metric), the difference being A - B.
SECONDARY: tuple[tuple[str, str, str, str], ...] = (
    *((arm, "imm_linear", s, "accuracy") for arm in ADAPTIVE_ARMS for s in ("ood", "id")),
    ("imm_linear_full", "self_improve_full", "ood", "accuracy"),
    ("imm_linear_full", "self_improve_full", "id", "accuracy"),
    ("self_improve_full", THETA0, "ood", "accuracy"),
    ("imm_linear", "self_improve", "ood", "pass@k"),
    ("imm_linear", "self_improve", "id", "pass@k"),
    ("imm_linear", "self_improve", "ood", "distinct_2"),
    ("imm_linear", "self_improve", "id", "distinct_2"),
)


# --------------------------------------------------------------------------------------------
# Bookkeeping: which (arm, seed) runs exist
# --------------------------------------------------------------------------------------------


def run_key(arm: str, seed: int) -> str:
    return f"{arm}/seed{seed}"


def planned_runs(arms: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """Every (arm, seed) in the order they run: seed-major (all arms of the first seed, then
    the next), theta0 first within a seed, so partial results are paired as early as possible."""
    ordered = [THETA0, *(arm for arm in arms if arm != THETA0)] if THETA0 in arms else list(arms)
    return [(arm, seed) for seed in seeds for arm in ordered]


def pending_runs(results: dict, arms: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    return [(a, s) for a, s in planned_runs(arms, seeds) if run_key(a, s) not in results["runs"]]


def status_line(results: dict, arms: Sequence[str], seeds: Sequence[int]) -> str:
    planned = planned_runs(arms, seeds)
    done = len(planned) - len(pending_runs(results, arms, seeds))
    if done < len(planned):
        return f"**partial: {done} of {len(planned)} (arm, seed) runs done**"
    return f"complete: {done} of {len(planned)} (arm, seed) runs done"


def done_seeds(results: dict, arm: str) -> list[int]:
    return sorted(run["seed"] for run in results["runs"].values() if run["arm"] == arm)


def arms_done(results: dict) -> list[str]:
    return list(dict.fromkeys(run["arm"] for run in results["runs"].values()))


# --------------------------------------------------------------------------------------------
# Per-question scores
# --------------------------------------------------------------------------------------------


def encode_bits(values: Sequence[int | bool]) -> str:
    return "".join("1" if v else "0" for v in values)


def decode_bits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")


def row_scores(row: dict, set_name: str, metric: str) -> np.ndarray | None:
    """Per-question scores of one history row (None if the row does not hold them)."""
    value = row.get(f"eval/{set_name}/{PER_QUESTION_FIELD[metric]}")
    if value is None:
        return None
    return decode_bits(value).astype(np.float64) if isinstance(value, str) else np.asarray(value, dtype=np.float64)


def family_mask(results: dict, set_name: str, family: str | None) -> np.ndarray | slice:
    if family is None:
        return slice(None)
    return np.array([qid.split(":", 1)[0] == family for qid in results["questions"][set_name]["ids"]])


def run_row(results: dict, arm: str, seed: int, iteration: int | None = None) -> dict | None:
    """A run's history row at `iteration` (None: its last); theta0's only row stands for
    iteration 0 of every arm of its seed."""
    run = results["runs"].get(run_key(THETA0 if iteration == 0 else arm, seed))
    if run is None:
        return None
    if iteration is None or arm == THETA0 or iteration == 0:
        return run["history"][-1]
    return next((row for row in run["history"] if row["iteration"] == iteration), None)


Lookup = Callable[[str, int], "np.ndarray | None"]


def main_lookup(
    results: dict, set_name: str, metric: str, iteration: int | None = None, family: str | None = None
) -> Lookup:
    """(arm, seed) -> per-question scores on a suite set at `iteration` (None: the last)."""

    def lookup(arm: str, seed: int) -> np.ndarray | None:
        row = run_row(results, arm, seed, iteration)
        scores = None if row is None else row_scores(row, set_name, metric)
        return None if scores is None else scores[family_mask(results, set_name, family)]

    return lookup


def extra_lookup(results: dict, family: str) -> Lookup:
    """(arm, seed) -> greedy per-question correctness on an extra-eval family; theta0 is scored
    once (greedy answers do not depend on the seed)."""
    scores = results.get("extra_eval", {}).get("scores", {}).get(family, {})

    def lookup(arm: str, seed: int) -> np.ndarray | None:
        row = scores.get(THETA0 if arm == THETA0 else run_key(arm, seed))
        return None if row is None else decode_bits(row["correct_bits"]).astype(np.float64)

    return lookup


# --------------------------------------------------------------------------------------------
# Statistics over seeds
# --------------------------------------------------------------------------------------------


def mean_with_interval(scores_by_seed: Sequence[np.ndarray], resamples: int) -> tuple[float, float, float]:
    """Mean over seeds and questions with its two-level (seeds x questions) bootstrap interval:
    `seed_paired_difference` against a model that scores 0 everywhere."""
    zeros = np.zeros_like(scores_by_seed[0])
    result = seed_paired_difference(list(scores_by_seed), zeros, resamples=resamples)
    return result.difference, result.ci_low, result.ci_high


def compare(
    lookup: Lookup, arm_a: str, arm_b: str, seeds: Sequence[int], resamples: int, binary: bool = True
) -> dict | None:
    """A - B over the seeds both have: seed_paired_difference (interval, p) and, for 0/1
    scores, the exact McNemar p of each seed; None if no seed has both."""
    pairs = [(s, lookup(arm_a, s), lookup(arm_b, s)) for s in seeds]
    pairs = [(s, a, b) for s, a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    result = seed_paired_difference([a for _, a, _ in pairs], [b for _, _, b in pairs], resamples=resamples)
    mcnemar = [paired_difference(a, b, resamples=1).mcnemar_p if binary else None for _, a, b in pairs]
    return {
        "a": arm_a, "b": arm_b, "seeds": [s for s, _, _ in pairs], "n_questions": result.n_questions,
        "accuracy_a": result.accuracy_a, "accuracy_b": result.accuracy_b,
        "difference": result.difference, "ci_low": result.ci_low, "ci_high": result.ci_high,
        "p_value": result.p_value, "per_seed_differences": list(result.per_seed_differences),
        "per_seed_mcnemar_p": mcnemar,
    }


def gain_kept(lookup: Lookup, arm: str, baseline: str, seeds: Sequence[int], resamples: int, seed: int = 0) -> dict | None:
    """H3: (arm - theta0) / (baseline - theta0), the share of the baseline's gain the arm keeps,
    with a percentile interval from the same two-level bootstrap as `seed_paired_difference`
    (seeds, then questions, drawn with replacement; numerator and denominator from the same
    draw). Unstable when the baseline's own gain is near 0: see `baseline_gain`."""
    rows = [(lookup(arm, s), lookup(baseline, s), lookup(THETA0, s)) for s in seeds]
    rows = [r for r in rows if all(x is not None for x in r)]
    if not rows:
        return None
    gained = np.array([a - t for a, _, t in rows])  # (seeds, questions)
    base_gained = np.array([b - t for _, b, t in rows])
    n_seeds, n_questions = gained.shape
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=resamples)
    question_counts = rng.multinomial(n_questions, np.full(n_questions, 1 / n_questions), size=resamples)
    numerators = ((seed_counts @ gained) * question_counts).sum(axis=1)
    denominators = ((seed_counts @ base_gained) * question_counts).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = numerators / denominators
    ratio = gained.mean() / base_gained.mean() if base_gained.mean() else math.nan
    finite = ratios[np.isfinite(ratios)]  # a resample where the baseline gained nothing has none
    low, high = np.quantile(finite, [0.025, 0.975]) if finite.size else (math.nan, math.nan)
    return {"ratio": float(ratio), "ci_low": float(low), "ci_high": float(high),
            "gain": float(gained.mean()), "baseline_gain": float(base_gained.mean()), "seeds": len(rows)}


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def significant(comparison: dict) -> bool:
    return comparison["ci_low"] > 0 or comparison["ci_high"] < 0


# --------------------------------------------------------------------------------------------
# Curves and verdicts
# --------------------------------------------------------------------------------------------


def curve(results: dict, arm: str, set_name: str, metric: str, resamples: int = CURVE_RESAMPLES) -> list[dict]:
    """Per iteration 0..T: mean over the arm's finished seeds with its two-level interval."""
    seeds, points = done_seeds(results, arm), []
    for iteration in range(results["settings"]["iterations"] + 1):
        lookup = main_lookup(results, set_name, metric, iteration)
        scores = [x for x in (lookup(arm, s) for s in seeds) if x is not None]
        if scores:
            mean, low, high = mean_with_interval(scores, resamples)
            points.append({"iteration": iteration, "mean": mean, "ci_low": low, "ci_high": high, "seeds": len(scores)})
    return points


def pts(value: float) -> str:
    return f"{100 * value:+.1f}"


def describe(comparison: dict) -> str:
    """'+1.2 pts [-0.5, +2.9], p = 0.180, 3 seeds x 1000 questions, per-seed McNemar p 0.21/0.04'"""
    mcnemar = [p for p in comparison["per_seed_mcnemar_p"] if p is not None]
    text = (
        f"{pts(comparison['difference'])} pts [{pts(comparison['ci_low'])}, {pts(comparison['ci_high'])}], "
        f"p = {comparison['p_value']:.3f}, {len(comparison['seeds'])} seed(s) x {comparison['n_questions']} questions"
    )
    return text + (f", per-seed McNemar p {'/'.join(f'{p:.3f}' for p in mcnemar)}" if mcnemar else "")


def verdicts(results: dict, resamples: int) -> list[str]:
    """H1-H3 and the Holm-adjusted secondary set, each line computed from the numbers."""
    seeds = sorted({run["seed"] for run in results["runs"].values()})
    lines = []

    def hypothesis(label: str, a: str, b: str, set_name: str, reading: Callable[[dict], str]) -> None:
        found = compare(main_lookup(results, set_name, "accuracy"), a, b, seeds, resamples)
        if found is None:
            lines.append(f"- {label}: not computable yet ({a} or {b} has no finished seed).")
        else:
            lines.append(f"- {label}: {describe(found)}: **{reading(found)}**.")

    def direction(found: dict, up: str, down: str) -> str:
        return "not significant" if not significant(found) else (up if found["difference"] > 0 else down)

    hypothesis("H1 (the phenomenon) self_improve - θ0, OOD accuracy", "self_improve", THETA0, "ood",
               lambda f: direction(f, "significant, positive (no OOD loss)", "significant, negative (SI loses OOD)"))
    hypothesis("H2 (the fix) imm_linear - self_improve, OOD accuracy", "imm_linear", "self_improve", "ood",
               lambda f: direction(f, "significant, IMM higher", "significant, IMM lower"))
    kept = gain_kept(main_lookup(results, "id", "accuracy"), "imm_linear", "self_improve", seeds, resamples)
    if kept is None:
        lines.append("- H3 (ID gain kept) (imm_linear - θ0) / (self_improve - θ0): not computable yet.")
    else:
        si_gain = compare(main_lookup(results, "id", "accuracy"), "self_improve", THETA0, seeds, resamples)
        caveat = "" if si_gain and si_gain["ci_low"] > 0 else (
            " (self_improve's own ID gain is not significantly above 0, so the ratio is not interpretable)"
        )
        lines.append(
            f"- H3 (ID gain kept) (imm_linear - θ0) / (self_improve - θ0), ID accuracy: {kept['ratio']:.2f} "
            f"[{kept['ci_low']:.2f}, {kept['ci_high']:.2f}] (gains {pts(kept['gain'])} and "
            f"{pts(kept['baseline_gain'])} pts, {kept['seeds']} seed(s)){caveat}."
        )
    lines += secondary_lines(results, seeds, resamples)
    return lines


def secondary_lines(results: dict, seeds: Sequence[int], resamples: int) -> list[str]:
    found = []
    for a, b, set_name, metric in SECONDARY:
        comparison = compare(main_lookup(results, set_name, metric), a, b, seeds, resamples, binary=metric in BINARY_METRICS)
        if comparison is not None:
            found.append((f"{a} - {b}, {set_name.upper()} {metric}", comparison))
    if not found:
        return ["- Secondary comparisons: none computable yet."]
    adjusted = holm_adjust([c["p_value"] for _, c in found])
    lines = [f"- Secondary comparisons ({len(found)} of {len(SECONDARY)} planned computable; Holm-adjusted over those):"]
    for (label, comparison), p_holm in zip(found, adjusted, strict=True):
        verdict = "significant" if p_holm < 0.05 else "not significant"
        lines.append(f"  - {label}: {describe(comparison)}; Holm p = {p_holm:.3f}: **{verdict}**")
    return lines


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _interval(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _diff_cell(comparison: dict | None) -> str:
    if comparison is None:
        return "—"
    mcnemar = [p for p in comparison["per_seed_mcnemar_p"] if p is not None]
    cell = (
        f"{pts(comparison['difference'])} [{pts(comparison['ci_low'])}, {pts(comparison['ci_high'])}] "
        f"p={comparison['p_value']:.3f}"
    )
    return cell + (f" (McNemar {'/'.join(f'{p:.2f}' for p in mcnemar)})" if mcnemar else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def trained_arms(results: dict) -> list[str]:
    return [arm for arm in arms_done(results) if arm != THETA0]


def final_table(results: dict, metric: str, resamples: int) -> str:
    """Final iteration: mean [interval] per arm and set, and the paired differences (in
    points) against theta0 and self_improve."""
    seeds = sorted({run["seed"] for run in results["runs"].values()})
    binary = metric in BINARY_METRICS
    rows = []
    for arm in [THETA0, *trained_arms(results)]:
        for set_name in SETS:
            lookup = main_lookup(results, set_name, metric)
            scores = [x for x in (lookup(arm, s) for s in done_seeds(results, arm)) if x is not None]
            if not scores:
                continue
            vs = [
                None if arm == other else compare(lookup, arm, other, seeds, resamples, binary)
                for other in (THETA0, "self_improve")
            ]
            mean = _interval(*mean_with_interval(scores, resamples))
            rows.append([arm, set_name.upper(), str(len(scores)), mean, _diff_cell(vs[0]), _diff_cell(vs[1])])
    header = [
        "arm", "set", "seeds", f"{metric_label(results, metric)} [95% CI]",
        "Δ vs θ0, pts [95% CI] p (per-seed McNemar p)", "Δ vs self_improve",
    ]
    return _table(header, rows)


def metric_label(results: dict, metric: str) -> str:
    return f"pass@{results['settings']['eval_samples']}" if metric == "pass@k" else metric


def iteration_table(results: dict) -> str:
    """Mean over finished seeds per arm and iteration (iteration 0 = θ0 of the same seeds)."""
    rows = []
    for arm in trained_arms(results):
        curves = {(s, m): {p["iteration"]: p for p in curve(results, arm, s, m)} for s in SETS for m in METRICS}
        for iteration in range(results["settings"]["iterations"] + 1):
            cells = [arm, str(iteration)]
            for set_name in SETS:
                point = curves[(set_name, "accuracy")].get(iteration)
                cells.append(_interval(point["mean"], point["ci_low"], point["ci_high"]) if point else "—")
            for metric in METRICS[1:]:
                cells += [_fmt(curves[(s, metric)].get(iteration, {}).get("mean")) for s in SETS]
            history = [run_row(results, arm, s, iteration) for s in done_seeds(results, arm)] if iteration else []
            history = [row for row in history if row]
            cells.append(_fmt(np.mean([r["sampling/yield_rate"] for r in history])) if history else "—")
            cells.append(f"{np.mean([r['sampling/generated_examples'] for r in history]):.0f}" if history else "—")
            rows.append(cells)
    k = metric_label(results, "pass@k")
    header = [
        "arm", "iter", "ID accuracy [95% CI]", "OOD accuracy [95% CI]", f"ID {k}", f"OOD {k}",
        "ID distinct-2", "OOD distinct-2", "yield", "D_t",
    ]
    return _table(header, rows)


def families(results: dict, set_name: str) -> list[str]:
    return list(dict.fromkeys(qid.split(":", 1)[0] for qid in results["questions"][set_name]["ids"]))


def family_table(results: dict, resamples: int) -> str:
    """Final accuracy per task family of the suite and of the extra-eval families, with the
    paired differences against theta0 and self_improve on that family's questions."""
    seeds = sorted({run["seed"] for run in results["runs"].values()})
    sources = [
        (f"{s.upper()}: {f}", main_lookup(results, s, "accuracy", family=f)) for s in SETS for f in families(results, s)
    ]
    sources += [(f"extra: {f}", extra_lookup(results, f)) for f in results.get("extra_eval", {}).get("scores", {})]
    rows = []
    for label, lookup in sources:
        theta0 = [x for x in (lookup(THETA0, s) for s in seeds) if x is not None]
        for arm in trained_arms(results):
            scores = [x for x in (lookup(arm, s) for s in done_seeds(results, arm)) if x is not None]
            if not scores or not theta0:
                continue
            vs_si = None if arm == "self_improve" else compare(lookup, arm, "self_improve", seeds, resamples)
            vs_theta0 = compare(lookup, arm, THETA0, seeds, resamples)
            cells = [label, arm, f"{np.mean(theta0):.3f}", f"{np.mean(scores):.3f}", _diff_cell(vs_theta0), _diff_cell(vs_si)]
            rows.append(cells)
    return _table(["family", "arm", "θ0", "arm (final)", "Δ vs θ0", "Δ vs self_improve"], rows)


def auto_pick_table(results: dict) -> str:
    """Which candidate the auto arms picked, per seed and iteration."""
    rows = []
    for key, run in results["runs"].items():
        picks = [str(row.get("auto/pick")) for row in run["history"] if "auto/pick" in row]
        if picks:
            rows.append([key, ", ".join(picks)])
    return _table(["run", "pick per iteration"], rows) if rows else ""


def extra_eval_cost(results: dict) -> list[str]:
    extra = results.get("extra_eval", {})
    if "cpu_seconds" not in extra:
        return []
    models = set().union(*(scores.keys() for scores in extra["scores"].values()))
    return [f"Extra-eval ({', '.join(extra['scores'])}; {extra['settings']['n']} questions each, greedy): "
            f"{len(models)} models, {extra['cpu_seconds'] / 60:.1f} CPU min, {extra['wall_seconds'] / 60:.1f} wall min.", ""]


def timing_table(results: dict) -> str:
    rows = []
    for arm in arms_done(results):
        runs = [r for r in results["runs"].values() if r["arm"] == arm]
        loads = [r["load_before"]["load_1m"] for r in runs if r.get("load_before")]
        cpu, wall = [r["cpu_seconds"] / 60 for r in runs], [r["wall_seconds"] / 60 for r in runs]
        rows.append([
            arm, str(len(runs)), f"{sum(cpu):.1f}", f"{np.mean(cpu):.1f}", f"{np.mean(wall):.1f}",
            str(sum(r.get("attempts", 1) for r in runs)), _fmt(float(np.mean(loads)) if loads else None, 2),
        ])
    header = ["arm", "runs", "CPU min (all runs)", "CPU min per run", "wall min per run", "child attempts", "load 1m before"]
    return _table(header, rows)


# --------------------------------------------------------------------------------------------
# Cost projection (pilot -> study)
# --------------------------------------------------------------------------------------------

# How the CPU time of each phase of an iteration grows with the budget (IMMCallback's phase
# names); other per-iteration phases (merge, checkpoint, sampler refresh) stay constant, and
# ONCE_PER_RUN phases are paid once per child process.
PHASE_SCALES: dict[str, Callable[[dict], float]] = {
    "sampling": lambda s: s["n_train"] * s["samples_per_question"],
    "train": lambda s: s["n_train"] * s["epochs"],
    "auto ratio": lambda s: s["n_train"],
    "eval": lambda s: s["n_eval"] * (1 + s["eval_samples"]),
}
ONCE_PER_RUN = ("start-up", "engine start")


def project_run(run: dict, measured: dict, target: dict) -> float:
    """CPU seconds one (arm, seed) run would take at the `target` budget, from its measured CPU
    seconds per phase (`phase_cpu_seconds`, at the `measured` budget): start-up and engine
    start once, every other phase's CPU per iteration scaled by its PHASE_SCALES ratio, times
    the target's iterations (theta0: one evaluation). Training follows D_t, which grows as the
    model improves, so a one-iteration pilot underestimates it."""
    phases = run["phase_cpu_seconds"]
    iterations_run = max(len(run["history"]), 1)
    per_iteration = 0.0
    for phase, seconds in phases.items():
        if phase not in ONCE_PER_RUN:
            scale = PHASE_SCALES.get(phase)
            per_iteration += seconds / iterations_run * (scale(target) / scale(measured) if scale else 1.0)
    iterations = 1 if run["arm"] == THETA0 else target["iterations"]
    return sum(phases.get(p, 0.0) for p in ONCE_PER_RUN) + iterations * per_iteration


def projection(results: dict, target: dict, arms: Sequence[str], seeds: Sequence[int]) -> dict:
    """The study's projected CPU seconds: per arm, its first finished run projected, x seeds."""
    per_arm, missing = {}, []
    for arm in arms:
        runs = [r for r in results["runs"].values() if r["arm"] == arm and r.get("phase_cpu_seconds")]
        if runs:
            per_arm[arm] = project_run(runs[0], results["settings"], target) * len(seeds)
        else:
            missing.append(arm)
    return {"per_arm": per_arm, "missing": missing, "cpu_seconds": sum(per_arm.values()), "seeds": list(seeds), "target": target}


def projection_text(found: dict) -> str:
    target = found["target"]
    lines = [
        f"Projected cost at n_train {target['n_train']}, n_eval {target['n_eval']}, {target['iterations']} iterations, "
        f"eval_samples {target['eval_samples']}, {len(found['seeds'])} seeds: **{found['cpu_seconds'] / 3600:.1f} CPU hours** "
        f"(so at least {found['cpu_seconds'] / 7200:.1f} wall hours on 2 cores). Each phase's CPU time scaled linearly "
        "with its budget; training follows D_t, which grows over iterations: a lower bound.",
        "",
        _table(["arm", "CPU h (all seeds)"], [[a, f"{v / 3600:.2f}"] for a, v in found["per_arm"].items()]),
    ]
    if found["missing"]:
        lines += ["", f"Not projected (no finished run with phase timings): {', '.join(found['missing'])}."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plot and markdown
# --------------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> None:
    """Per-iteration mean over seeds with its 95% interval: ID and OOD x accuracy, pass@k,
    distinct-2, one line per arm."""
    from imm_trl.plots import new_figure, save_png

    figure, axes = new_figure(2, 3, figsize=(14, 7.5), squeeze=False)
    arms = trained_arms(results)
    for row, set_name in enumerate(SETS):
        for col, metric in enumerate(METRICS):
            ax = axes[row][col]
            for offset, arm in enumerate(arms):
                points = curve(results, arm, set_name, metric)
                x = [p["iteration"] + 0.03 * (offset - (len(arms) - 1) / 2) for p in points]
                y = [p["mean"] for p in points]
                errors = [[p["mean"] - p["ci_low"] for p in points], [p["ci_high"] - p["mean"] for p in points]]
                ax.errorbar(x, y, yerr=errors, marker="o", markersize=3, capsize=2, label=arm)
            ax.set_title(f"{set_name.upper()}: {metric_label(results, metric)} (mean over seeds, 95% CI)", fontsize=9)
            ax.set_xticks(range(results["settings"]["iterations"] + 1))
            ax.set_xlabel("iteration (0 = θ0)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_png(figure, path)


def settings_table(settings: dict) -> str:
    shown = {k: v for k, v in settings.items() if k != "base_recipe"}
    return _table(["setting", "value"], [[k, f"`{v}`"] for k, v in shown.items()])


def commands_line(commands: list[str]) -> str:
    """Each distinct command once, in first-use order; a resume repeats the command it continues."""
    distinct = list(dict.fromkeys(commands))
    runs = f" ({len(commands)} invocations, resumes included)" if len(commands) > len(distinct) else ""
    return f"Commands{runs}: {'; '.join(f'`{c}`' for c in distinct)}"


def markdown(results: dict, stem: str, resamples: int, projected: dict | None = None) -> str:
    requested = results["requested"]
    lines = [
        "# IMM quality study v2 (benchmarks/imm_quality.py)",
        "",
        f"Status: {status_line(results, requested['arms'], requested['seeds'])}. "
        "Plan: `imm_quality_plan.md` (pre-registered).",
        "",
        f"{commands_line(results['commands'])}  ",
        f"Machine: {results['machine']}",
        "",
        "Budget and settings (fixed for the whole study):",
        "",
        settings_table(results["settings"]),
        "",
        "Every arm starts from θ0 = SmolLM2-135M-Instruct and differs from the others only in its merge "
        "(and, for the *_full arms, full fine-tuning at its own learning rate). Accuracy is greedy; "
        f"{metric_label(results, 'pass@k')} and distinct-2 come from {results['settings']['eval_samples']} samples per "
        "eval question. Intervals: two-level bootstrap over seeds and questions (`seed_paired_difference`; "
        f"{resamples} resamples for the verdicts, {min(resamples, CURVE_RESAMPLES)} for the tables and curves); "
        "differences are paired (same questions, same seed), in points.",
        "",
    ]
    if not results["runs"]:
        return "\n".join(lines + ["No run has finished yet."])
    lines += ["## Verdicts (computed from the numbers below)", "", *verdicts(results, resamples), ""]
    table_resamples = min(resamples, CURVE_RESAMPLES)  # dozens of intervals per rewrite
    for metric in METRICS:
        table = final_table(results, metric, table_resamples)
        lines += [f"## Final iteration: {metric_label(results, metric)}", "", table, ""]
    lines += ["## Per iteration (mean over seeds)", "", iteration_table(results), "", f"![curves]({stem}.png)", ""]
    lines += ["## Per task family (final iteration)", "", family_table(results, table_resamples), ""]
    picks = auto_pick_table(results)
    if picks:
        lines += ["## Auto-ratio picks", "", picks, ""]
    lines += ["## Cost", "", timing_table(results), "", *extra_eval_cost(results)]
    if projected is not None:
        lines += [projection_text(projected), ""]
    return "\n".join(lines)
