"""The study v2 script's pure parts (benchmarks/imm_quality.py, imm_quality_report.py): run
bookkeeping, arm recipes, per-question scoring, paired tables, verdicts, projection. No model
is loaded and nothing is trained; results are synthetic with hand-checkable numbers."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import imm_quality as study  # noqa: E402
import imm_quality_report as report  # noqa: E402

from imm_trl.stats import exact_mcnemar_p  # noqa: E402

N = 40  # questions per set; families alternate a, b
IDS = [f"{'ab'[i % 2]}:{i:04d}" for i in range(N)]
RESAMPLES = 400


def bits(right: set[int]) -> str:
    return "".join("1" if i in right else "0" for i in range(N))


def row(iteration: int, id_right: set[int], ood_right: set[int], distinct: float = 0.5) -> dict:
    values = {"iteration": iteration, "sampling/yield_rate": 0.25, "sampling/generated_examples": 20}
    for name, right in (("id", id_right), ("ood", ood_right)):
        values.update({
            f"eval/{name}/accuracy": len(right) / N, f"eval/{name}/correct_bits": bits(right),
            f"eval/{name}/pass_bits": bits(right | {39}), f"eval/{name}/distinct_2_per_question": [distinct] * N,
            f"eval/{name}/questions_digest": "d",
        })
    return values


def run(arm: str, seed: int, history: list[dict], cpu: float = 600.0) -> dict:
    return {"arm": arm, "seed": seed, "history": history, "cpu_seconds": cpu, "wall_seconds": cpu / 2, "attempts": 1,
            "load_before": {"load_1m": 1.0}}


THETA0_ID, THETA0_OOD = set(range(10)), set(range(12))  # 0.25 and 0.30


def synthetic(seeds=(0, 1, 2), arms=("theta0", "self_improve", "imm_linear")) -> dict:
    """theta0 ID 10/40, OOD 12/40. self_improve: ID 20/40, OOD drops questions 8-11 (seed 1:
    only 10-11). imm_linear: ID 16/40, OOD as theta0. Two iterations; iteration 1 halfway."""
    runs = {}
    for seed in seeds:
        drop = {10, 11} if seed == 1 else {8, 9, 10, 11}
        histories = {
            "theta0": [row(0, THETA0_ID, THETA0_OOD)],
            "self_improve": [row(1, set(range(15)), THETA0_OOD - drop, 0.4), row(2, set(range(20)), THETA0_OOD - drop, 0.3)],
            "imm_linear": [row(1, set(range(13)), THETA0_OOD), row(2, set(range(16)), THETA0_OOD)],
        }
        for arm in arms:
            runs[report.run_key(arm, seed)] = run(arm, seed, histories[arm])
    settings = {"iterations": 2, "n_train": 32, "n_eval": N, "eval_samples": 4, "samples_per_question": 4, "epochs": 1}
    return {"settings": settings, "questions": {s: {"ids": IDS, "digest": "d"} for s in ("id", "ood")}, "runs": runs,
            "requested": {"arms": list(arms), "seeds": list(seeds)}, "commands": ["python benchmarks/imm_quality.py"],
            "machine": "test"}


# -- bookkeeping ---------------------------------------------------------------------------


def test_runs_are_planned_seed_major_with_theta0_first():
    assert report.planned_runs(["imm_linear", "theta0", "self_improve"], [0, 1]) == [
        ("theta0", 0), ("imm_linear", 0), ("self_improve", 0), ("theta0", 1), ("imm_linear", 1), ("self_improve", 1)]


def test_pending_runs_and_the_partial_line_follow_what_is_done():
    results = synthetic(seeds=(0,))
    arms, seeds = ["theta0", "self_improve", "imm_linear", "imm_paper"], [0, 1]
    assert report.pending_runs(results, arms, seeds) == [("imm_paper", 0), ("theta0", 1), ("self_improve", 1), ("imm_linear", 1), ("imm_paper", 1)]
    assert report.status_line(results, arms, seeds) == "**partial: 3 of 8 (arm, seed) runs done**"
    assert report.status_line(results, ["theta0", "self_improve", "imm_linear"], [0]) == "complete: 3 of 3 (arm, seed) runs done"


def test_a_run_counts_as_finished_only_with_every_iteration_and_the_final_model(tmp_path):
    imm = tmp_path / "imm"
    (imm / "final").mkdir(parents=True)
    (imm / "imm_metrics.json").write_text(json.dumps([{"iteration": 1}, {"iteration": 2}]))
    assert study.finished_history(tmp_path, 2) is None  # no final model yet
    (imm / "final" / "model.safetensors").write_bytes(b"x")
    assert [r["iteration"] for r in study.finished_history(tmp_path, 2)] == [1, 2]
    assert study.finished_history(tmp_path, 3) is None  # interrupted after iteration 2 of 3


def test_results_of_other_settings_are_refused(tmp_path):
    config = study.StudyConfig(results_dir=str(tmp_path), n_train=32)
    stored = {"version": study.VERSION, "settings": {**config.settings(), "n_train": 64}, "commands": []}
    config.results_path(".json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="other settings"):
        study.load_results(config, "cmd", fresh=False)
    stored["settings"] = json.loads(json.dumps(config.settings()))  # a JSON round trip still matches
    config.results_path(".json").write_text(json.dumps(stored))
    assert study.load_results(config, "cmd", fresh=False)["commands"] == ["cmd"]


# -- arms -> recipes -------------------------------------------------------------------------


def test_every_arm_gives_a_recipe_the_package_accepts(tmp_path):
    config = study.StudyConfig(n_train=256, work_dir=str(tmp_path), full_learning_rate=2e-5, ema_decay=0.6)
    base = study.base_recipe()
    imm = {}
    for arm in [a for a in study.ARMS if study.ARMS[a].trains]:
        raw = study.arm_recipe(config, arm, seed=2)
        recipe, imm[arm] = study.check_arm_recipe(raw, config.n_train)
        assert (recipe.data.seed, recipe.sft["seed"], imm[arm].seed) == (0, 2, 2)  # questions fixed, seed varies
        assert (imm[arm].iterations, imm[arm].eval_samples, imm[arm].eval_at_start, imm[arm].resume) == (4, 4, False, True)
        assert (imm[arm].temperature, imm[arm].samples_per_question) == (base["imm"]["temperature"], base["imm"]["samples_per_question"])
        assert recipe.sft["per_device_train_batch_size"] == base["sft"]["per_device_train_batch_size"]
        assert Path(recipe.sft["output_dir"]) == tmp_path / "seed2" / arm
        full = arm.endswith("_full")
        assert (recipe.peft is None) == full
        assert recipe.sft["learning_rate"] == (2e-5 if full else base["sft"]["learning_rate"])
    merges = {arm: (c.merge_method, c.merge_ratio, c.merge_config.density) for arm, c in imm.items()}
    assert merges["self_improve"] == merges["self_improve_full"] == ("linear", 1.0, 1.0)
    assert merges["imm_linear"] == merges["imm_linear_full"] == merges["imm_ema"] == ("linear", 0.5, 1.0)
    assert merges["imm_paper"] == ("dare_linear", 0.5, 0.8)
    assert (imm["imm_ema"].anchor, imm["imm_ema"].anchor_decay) == ("ema", 0.6)
    assert imm["imm_auto"].ratio_candidates == [0.25, 0.5, 0.75, 1.0]
    assert imm["imm_depth"].ratio_candidates == [{"depth": [0.25, 0.75]}, {"depth": [0.5, 0.5]}, {"depth": [0.75, 0.25]}]
    training, validation = imm["imm_auto"].validation_split()
    assert (len(training), len(validation)) == (205, 51)  # the auto arms train on fewer questions


def test_small_budgets_still_hold_out_eight_validation_questions():
    assert study.validation_count(24, 0.2) == 8 and study.validation_count(256, 0.2) == 51


def test_settings_resolve_unset_budget_values_from_the_recipe():
    base = study.base_recipe()
    settings = study.StudyConfig(epochs=2.0).settings()
    assert settings["epochs"] == 2.0 and settings["lora_learning_rate"] == base["sft"]["learning_rate"]
    assert settings["samples_per_question"] == base["imm"]["samples_per_question"] and settings["base_recipe"] == base


def test_extra_eval_families_are_split_deduplicated_and_checked():
    assert study.parse_families(["gcd,chain_sum", " leg_counting ", "gcd"]) == ["gcd", "chain_sum", "leg_counting"]
    assert study.parse_families([]) == []
    with pytest.raises(ValueError, match="did you mean gcd"):
        study.parse_families(["gcdd"])


def test_extra_eval_scores_each_kept_model_once_and_names_those_not_on_disk(tmp_path):
    config = study.StudyConfig(arms=["theta0", "self_improve", "imm_linear"], seeds=[0, 1], keep_models=str(tmp_path),
                               extra_eval=["gcd", "chain_sum"])
    for arm in ("self_improve", "imm_linear"):
        (tmp_path / arm / "seed1").mkdir(parents=True)
        (tmp_path / arm / "seed1" / "model.safetensors").write_bytes(b"")
    done = ("theta0/seed0", "self_improve/seed0", "self_improve/seed1", "imm_linear/seed1")
    results = {"runs": dict.fromkeys(done, {}), "extra_eval": {"scores": {
        "gcd": {"theta0": {}, "self_improve/seed1": {}}, "chain_sum": {"theta0": {}}}}}
    models, missing = study.extra_eval_models(config, results)
    assert [m["key"] for m in models] == ["self_improve/seed1", "imm_linear/seed1"]  # chain_sum still lacks them
    assert models[1]["path"] == str(tmp_path / "imm_linear" / "seed1")
    assert missing == ["self_improve/seed0"]  # finished in a session whose keep directory is gone
    results["extra_eval"]["scores"]["gcd"].pop("theta0")
    assert [m["key"] for m in study.extra_eval_models(config, results)[0]][0] == "theta0"


def test_pilot_fills_only_the_budget_not_given():
    config, _ = study.parse_args(["--pilot", "--n-eval", "64", "--extra-eval", "gcd"])
    assert (config.n_train, config.n_eval, config.iterations, config.seeds) == (48, 64, 1, [0])
    assert (config.stem, config.work_dir, config.extra_eval) == ("imm_quality_pilot", "runs/imm_quality_pilot", ["gcd"])
    config, _ = study.parse_args(["--arms", "theta0", "imm_linear"])
    assert (config.n_train, config.n_eval, config.iterations, config.seeds, config.stem) == (256, 1000, 4, [0, 1, 2], "imm_quality")


# -- per-question scoring -----------------------------------------------------------------------


class ScriptedSampler:
    """Greedy: the gold solution for even questions; samples: question 1 right once."""

    def __init__(self, rows):
        self.rows = rows

    def generate(self, prompts, n, params):
        wrong = "Answer: 123456789"
        if n == 1:
            return [[r["solution"] if i % 2 == 0 else wrong] for i, r in enumerate(self.rows)]
        return [[r["solution"] if i % 2 == 0 or (i == 1 and j == 0) else f"Answer: {j}9{j}" for j in range(n)]
                for i, r in enumerate(self.rows)]


def test_per_question_scores_agree_with_the_evaluators_own_figures():
    from imm_trl.eval import evaluate_question_set
    from imm_trl.tasks.gym import FamilySpec, family_question_set

    questions = family_question_set(FamilySpec("basic_arithmetic"), 6, seed=0)
    result = study.per_question_report(evaluate_question_set, ScriptedSampler(questions.rows), questions, samples=3, temperature=0.7, max_new_tokens=16)
    assert result["correct_bits"] == "101010" and result["accuracy"] == 0.5
    assert result["pass_bits"] == "111010" and result["pass@3"] == pytest.approx(4 / 6)
    assert np.mean(result["distinct_2_per_question"]) == pytest.approx(result["distinct_2"], abs=1e-4)
    ids = [study.question_id(r) for r in questions.rows]
    assert result["questions_digest"] == study.questions_digest(ids) and all(i.startswith("basic_arithmetic:") for i in ids)


# -- statistics, verdicts, tables -------------------------------------------------------------


def test_paired_comparison_against_theta0_has_the_known_difference_and_mcnemar_p():
    results = synthetic()
    found = report.compare(report.main_lookup(results, "ood", "accuracy"), "self_improve", "theta0", [0, 1, 2], RESAMPLES)
    assert found["per_seed_differences"] == pytest.approx([-0.1, -0.05, -0.1])
    assert found["difference"] == pytest.approx(-0.25 / 3)
    assert found["per_seed_mcnemar_p"] == pytest.approx([exact_mcnemar_p(0, 4), exact_mcnemar_p(0, 2), exact_mcnemar_p(0, 4)])
    assert found["per_seed_mcnemar_p"][0] == pytest.approx(0.125)
    assert found["ci_high"] < 0 and report.significant(found)
    missing = report.compare(report.main_lookup(results, "ood", "accuracy"), "imm_paper", "theta0", [0, 1, 2], RESAMPLES)
    assert missing is None


def test_verdict_lines_are_computed_from_the_numbers():
    lines = report.verdicts(synthetic(), RESAMPLES)
    h1, h2, h3 = lines[:3]
    assert h1.startswith("- H1") and "-8.3 pts" in h1 and "significant, negative (SI loses OOD)" in h1
    assert h2.startswith("- H2") and "+8.3 pts" in h2 and "significant, IMM higher" in h2
    assert "0.60 [" in h3 and "gains +15.0 and +25.0 pts" in h3
    none_yet = report.verdicts(synthetic(arms=("theta0", "imm_linear")), RESAMPLES)
    assert "not computable yet" in none_yet[0]


def test_no_difference_reads_not_significant():
    results = synthetic()
    for seed in (0, 1, 2):  # imm_linear's OOD equals theta0's on every question
        found = report.compare(report.main_lookup(results, "ood", "accuracy"), "imm_linear", "theta0", [seed], RESAMPLES)
        assert found["difference"] == 0 and not report.significant(found) and found["per_seed_mcnemar_p"] == [1.0]


def test_gain_kept_ratio():
    found = report.gain_kept(report.main_lookup(synthetic(), "id", "accuracy"), "imm_linear", "self_improve", [0, 1, 2], RESAMPLES)
    assert found["ratio"] == pytest.approx(0.6) and found["gain"] == pytest.approx(0.15) and found["baseline_gain"] == pytest.approx(0.25)
    assert found["ci_low"] <= 0.6 <= found["ci_high"]


def test_gain_kept_is_flagged_when_self_improvement_gained_nothing():
    results = synthetic()
    for seed in (0, 1, 2):  # self_improve's final ID answers = theta0's
        results["runs"][report.run_key("self_improve", seed)]["history"][-1]["eval/id/correct_bits"] = bits(THETA0_ID)
    found = report.gain_kept(report.main_lookup(results, "id", "accuracy"), "imm_linear", "self_improve", [0, 1, 2], RESAMPLES)
    assert np.isnan(found["ratio"]) and np.isnan(found["ci_low"]) and found["baseline_gain"] == 0
    assert "ratio is not interpretable" in report.verdicts(results, RESAMPLES)[2]


def test_holm_adjustment():
    assert report.holm_adjust([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_curves_start_at_theta0_and_average_over_seeds():
    points = report.curve(synthetic(), "self_improve", "ood", "accuracy", resamples=RESAMPLES)
    assert [p["iteration"] for p in points] == [0, 1, 2]
    assert points[0]["mean"] == pytest.approx(0.3) and points[2]["mean"] == pytest.approx(0.3 - 0.25 / 3)
    assert points[2]["ci_low"] < points[2]["mean"] < points[2]["ci_high"] and points[2]["seeds"] == 3
    distinct = report.curve(synthetic(), "self_improve", "id", "distinct_2", resamples=RESAMPLES)
    assert [round(p["mean"], 3) for p in distinct] == [0.5, 0.4, 0.3]


def test_family_and_extra_eval_comparisons_use_the_same_questions():
    results = synthetic()
    lookup = report.main_lookup(results, "ood", "accuracy", family="a")  # even questions: 8, 10 dropped
    found = report.compare(lookup, "self_improve", "theta0", [0, 2], RESAMPLES)
    assert found["n_questions"] == 20 and found["difference"] == pytest.approx(-2 / 20)
    results["extra_eval"] = {"settings": {}, "scores": {"gcd": {
        "theta0": {"correct_bits": bits({0, 1})},
        **{report.run_key("self_improve", s): {"correct_bits": bits({0})} for s in (0, 1, 2)}}}}
    extra = report.compare(report.extra_lookup(results, "gcd"), "self_improve", "theta0", [0, 1, 2], RESAMPLES)
    assert extra["difference"] == pytest.approx(-1 / N) and extra["per_seed_mcnemar_p"] == [1.0, 1.0, 1.0]
    assert "extra: gcd" in report.family_table(results, RESAMPLES)
    results["extra_eval"].update(settings={"n": N}, cpu_seconds=90.0, wall_seconds=60.0)
    assert report.extra_eval_cost(results)[0] == f"Extra-eval (gcd; {N} questions each, greedy): 4 models, 1.5 CPU min, 1.0 wall min."


def test_secondary_comparisons_are_holm_adjusted_over_those_available():
    results = synthetic(arms=("theta0", "self_improve", "imm_linear"))
    lines = report.secondary_lines(results, [0, 1, 2], RESAMPLES)
    assert lines[0].startswith("- Secondary comparisons (4 of 15 planned computable")  # pass@k and distinct-2, ID and OOD
    assert sum("Holm p =" in line for line in lines) == 4


def test_markdown_marks_partial_results_and_the_plot_is_written(tmp_path):
    results = synthetic(seeds=(0,))
    results["requested"] = {"arms": ["theta0", "self_improve", "imm_linear"], "seeds": [0, 1]}
    text = report.markdown(results, "imm_quality", RESAMPLES)
    assert "**partial: 3 of 6 (arm, seed) runs done**" in text
    assert "## Verdicts" in text and "| imm_linear | OOD | 1 |" in text and "![curves](imm_quality.png)" in text
    report.plot(results, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resumes_fold_repeated_commands_and_count_invocations():
    assert report.commands_line(["a --x", "a --x", "a --x --extra-eval gcd"]) == (
        "Commands (3 invocations, resumes included): `a --x`; `a --x --extra-eval gcd`")
    assert report.commands_line(["a"]) == "Commands: `a`"


def test_report_only_renders_the_stored_results_and_runs_nothing(tmp_path):
    with pytest.raises(SystemExit, match="no study results to report"):
        study.main(["--report-only", "--results-dir", str(tmp_path)])
    results = synthetic(seeds=(0,))
    stored = tmp_path / "imm_quality.json"
    stored.write_text(json.dumps(results))
    before = stored.stat().st_mtime_ns
    study.main(["--report-only", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "never")])
    assert json.loads(stored.read_text()) == results and stored.stat().st_mtime_ns == before
    assert "| imm_linear | OOD | 1 |" in (tmp_path / "imm_quality.md").read_text()
    assert (tmp_path / "imm_quality.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "never").exists()


def test_phase_cpu_follows_the_callbacks_phases_and_adds_up_over_attempts(tmp_path):
    import logging

    from imm_trl.progress import PHASE_LOGGER, PHASE_MESSAGE

    path = tmp_path / study.PHASE_CPU_FILE
    meter, level = study.PhaseCPU(path), logging.getLogger(PHASE_LOGGER).level
    handler = meter.follow_callback_phases()
    try:
        logging.getLogger(PHASE_LOGGER).info(PHASE_MESSAGE, 1, 2, "sampling")
        logging.getLogger(PHASE_LOGGER).info("iteration %d: reusing the D_t saved in %s", 1, "x")  # not a phase
        assert meter.current == "sampling"
        logging.getLogger(PHASE_LOGGER).info(PHASE_MESSAGE, 1, 2, "train")
    finally:
        logging.getLogger(PHASE_LOGGER).removeHandler(handler)
        logging.getLogger(PHASE_LOGGER).setLevel(level)
    first = json.loads(path.read_text())
    assert set(first) == {"start-up", "sampling"} and first["start-up"] > 0
    study.PhaseCPU(path).switch("eval")  # a resumed attempt: its start-up is added to the first's
    assert json.loads(path.read_text())["start-up"] > first["start-up"]


def test_projection_scales_each_phase_cpu_with_its_budget():
    measured = {"n_train": 32, "n_eval": 100, "eval_samples": 4, "samples_per_question": 4, "epochs": 1, "iterations": 2}
    target = {**measured, "n_train": 256, "n_eval": 1000, "iterations": 4}
    phases = {"start-up": 60.0, "engine start": 40.0, "sampling": 20.0, "train": 40.0, "eval": 60.0, "merge": 10.0}
    arm = {"arm": "imm_linear", "history": [{"iteration": 1}, {"iteration": 2}], "phase_cpu_seconds": phases}
    # per iteration: sampling 10 x 8, train 20 x 8, eval 30 x 10, merge 5 (constant)
    assert report.project_run(arm, measured, target) == pytest.approx(100 + 4 * (80 + 160 + 300 + 5))
    theta0 = {"arm": "theta0", "history": [{"iteration": 0}], "phase_cpu_seconds": {"start-up": 30.0, "engine start": 20.0, "eval": 30.0}}
    assert report.project_run(theta0, measured, target) == pytest.approx(50 + 300)
    results = {"settings": measured, "runs": {"a": arm, "t": theta0}}
    found = report.projection(results, target, ["theta0", "imm_linear", "imm_paper"], [0, 1, 2])
    assert found["cpu_seconds"] == pytest.approx(3 * (350 + 100 + 4 * 545)) and found["missing"] == ["imm_paper"]
    assert "CPU hours" in report.projection_text(found)


def test_the_plan_names_every_secondary_comparison():
    plan = (Path(__file__).resolve().parent.parent / "benchmarks/results/imm_quality_plan.md").read_text()
    assert f"Holm-adjusted together, {len(report.SECONDARY)} comparisons" in plan
    for arm_a, arm_b, _, _ in report.SECONDARY:
        assert arm_a in plan and arm_b.replace("theta0", "θ0") in plan
