"""`imm-trl demo` without running it: it reads the packaged default recipe, the two arms
differ only by the merge, and the side-by-side table, the paired comparisons and the report
files show a synthetic history's numbers."""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from imm_trl.demo import QUICK, DemoConfig, add_demo_parser, arm_recipes, demo_recipe, history_entry
from imm_trl.demo_report import (
    CONSOLE_COLUMNS,
    THETA0,
    format_paired_table,
    format_table,
    paired_comparisons,
    parse_table,
    side_by_side_rows,
    table_rows,
    write_report,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes/default.yaml"


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imm-trl")
    add_demo_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_demo_starts_from_the_default_yaml_with_only_its_budget_changed(tmp_path):
    default = yaml.safe_load(RECIPE.read_text())
    raw = demo_recipe(DemoConfig(out_dir=str(tmp_path), quick=True))
    for section in ("model", "peft"):
        assert raw[section] == default[section]
    budget = {"n_train", "n_eval", "seed", "output_dir", "logging_steps", "max_steps",
              "num_train_epochs", "dataloader_pin_memory", "iterations", "eval_samples",
              "eval_at_start", "overwrite", "sampler", "sampler_kwargs"}
    for section in ("data", "sft", "imm"):
        kept = {k: v for k, v in default[section].items() if k not in budget}
        assert {k: raw[section][k] for k in kept} == kept


def test_quick_budget_replaces_the_full_one_and_overrides_come_last(tmp_path):
    from imm_trl.loop import parse_recipe

    config = DemoConfig(out_dir=str(tmp_path), quick=True, overrides=["--imm.merge_ratio", "0.7"])
    assert (config.n_train, config.n_eval, config.max_steps, config.eval_samples) == tuple(
        QUICK[k] for k in ("n_train", "n_eval", "max_steps", "eval_samples")
    )
    raw = demo_recipe(config)
    recipe = parse_recipe(raw)  # every key is valid for its section
    assert recipe.data.n_train == QUICK["n_train"] and recipe.data.n_eval == QUICK["n_eval"]
    assert raw["sft"]["max_steps"] == QUICK["max_steps"]
    assert raw["sft"]["output_dir"] == str(tmp_path / "imm")
    assert raw["imm"]["iterations"] == 2 and raw["imm"]["merge_ratio"] == 0.7
    assert raw["imm"]["eval_at_start"] is False  # theta0 is scored once, by the demo
    assert raw["imm"]["overwrite"] is True
    assert raw["imm"]["sampler_kwargs"] == {
        "show_progress": False,
        "cpu_kv_cache_gib": 1.0,
        "engine_kwargs": {"use_tqdm_on_load": False},
    }
    full = demo_recipe(DemoConfig(out_dir=str(tmp_path)))
    assert "max_steps" not in full["sft"] and full["sft"]["num_train_epochs"] == 1.0
    assert full["data"]["n_train"] == 96 and full["imm"]["eval_samples"] == 4
    assert yaml.safe_load(RECIPE.read_text())["imm"]["iterations"] == 3  # the file is not changed
    verbose = demo_recipe(DemoConfig(out_dir=str(tmp_path), verbose=True))
    assert verbose["imm"]["sampler_kwargs"] == {"show_progress": True, "cpu_kv_cache_gib": 1.0}


def test_arms_differ_only_by_the_merge_and_the_directory(tmp_path):
    from imm_trl.config import IMMConfig
    from imm_trl.loop import parse_recipe

    config = DemoConfig(out_dir=str(tmp_path), overrides=["--imm.merge_ratio", "0.7"])
    arms = arm_recipes(config)
    assert list(arms) == ["self_improve", "imm"]  # the order they run in
    merge = {"merge_method": "linear", "merge_ratio": 1.0, "density": 1.0}
    assert {k: arms["self_improve"]["imm"][k] for k in merge} == merge
    assert IMMConfig.from_dict(arms["self_improve"]["imm"]).merge_ratio == 1.0
    assert arms["imm"]["imm"]["merge_ratio"] == 0.7  # overrides reach the IMM arm
    assert arms["self_improve"]["sft"]["output_dir"] == str(tmp_path / "self_improve")
    assert arms["imm"]["sft"]["output_dir"] == str(tmp_path / "imm")
    for raw in arms.values():
        parse_recipe(raw)
    same = {**arms["self_improve"]}
    same["imm"] = {**same["imm"], **{k: arms["imm"]["imm"][k] for k in merge}}
    same["sft"] = {**same["sft"], "output_dir": arms["imm"]["sft"]["output_dir"]}
    assert same == arms["imm"]


def test_demo_parser_passes_recipe_overrides():
    args, extra = demo_parser().parse_known_args(
        ["demo", "--quick", "--out", "x", "--verbose", "--imm.merge_ratio", "0.7"]
    )
    assert args.quick and args.out == "x" and args.verbose and args.accepts_overrides
    assert extra == ["--imm.merge_ratio", "0.7"]


def eval_scores(accuracy: dict[str, float]) -> dict[str, dict[str, float]]:
    return {
        name: {
            "n": 8,
            "accuracy": acc,
            "accuracy_ci_low": acc - 0.125,
            "accuracy_ci_high": acc + 0.125,
            "distinct_2": 0.4567,
            "answer_entropy": 2.345,
            "correct": [1, 0],
        }
        for name, acc in accuracy.items()
    }


def histories_fixture():
    """theta0's entry and each arm's history (theta0's entry first, as run_arms gives them)."""
    theta0 = history_entry(0, eval_scores({"id": 0.25, "ood": 0.5}))
    histories = {}
    for arm, id_accuracy in (("self_improve", 0.5), ("imm", 0.375)):
        after = {
            **history_entry(1, eval_scores({"id": id_accuracy, "ood": 0.5})),
            "sampling/yield_rate": 0.3125,
            "sampling/generated_examples": 12,
            "train_loss": 0.2,
        }
        histories[arm] = [theta0, after]
    return theta0, histories


def test_history_entry_is_the_callbacks_form_without_the_verdicts():
    entry = history_entry(0, eval_scores({"id": 0.25}))
    assert entry["iteration"] == 0 and entry["eval/id/accuracy"] == 0.25
    assert "eval/id/correct" not in entry


def test_side_by_side_table_shows_theta0_once_then_each_arm():
    theta0, histories = histories_fixture()
    rows = side_by_side_rows(theta0, histories)
    assert [(row["arm"], row["iteration"]) for row in rows] == [
        (THETA0, 0),
        ("self_improve", 1),
        ("imm", 1),
    ]
    assert rows[0]["yield"] is None and rows[2]["id_accuracy"] == 0.375
    for text, columns in ((format_table(rows), 10), (format_table(rows, CONSOLE_COLUMNS), 6)):
        cells = parse_table(text)
        assert len(cells[0]) == columns
        assert [c["arm"] for c in cells] == ["θ0", "self-improve", "IMM"]
        assert cells[0]["ID accuracy [95% CI]"] == "0.250 [0.125, 0.375]"
        assert cells[0]["yield"] == "—" and cells[0]["D_t size"] == "—"
        assert cells[1]["ID accuracy [95% CI]"] == "0.500 [0.375, 0.625]"
        assert cells[2]["OOD accuracy [95% CI]"] == "0.500 [0.375, 0.625]"
        assert cells[2]["yield"] == "0.312" and cells[2]["D_t size"] == "12"
    full = parse_table(format_table(rows))
    assert full[1]["ID distinct-2"] == "0.457" and full[1]["OOD answer entropy"] == "2.35"
    assert table_rows(histories["imm"], "imm")[0]["arm"] == "imm"


CORRECT = {
    # 10 questions per set: IMM right on 6 ID questions, self-improvement on 3, theta0 on 4.
    "theta0": {"id": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], "ood": [1] * 5 + [0] * 5},
    "self_improve": {"id": [1, 1, 1, 0, 0, 0, 0, 0, 0, 0], "ood": [1] * 3 + [0] * 7},
    "imm": {"id": [1, 1, 1, 1, 1, 1, 0, 0, 0, 0], "ood": [1] * 5 + [0] * 5},
}


def test_paired_comparisons_of_the_final_models():
    from imm_trl.stats import paired_difference

    comparisons = paired_comparisons(CORRECT, resamples=2000)
    assert [(c["comparison"], c["set"]) for c in comparisons] == [
        ("IMM − self-improve", "id"),
        ("IMM − self-improve", "ood"),
        ("IMM − θ0", "id"),
        ("IMM − θ0", "ood"),
        ("self-improve − θ0", "id"),
        ("self-improve − θ0", "ood"),
    ]
    first = comparisons[0]
    assert (first["a"], first["b"]) == ("imm", "self_improve")
    assert first["difference"] == pytest.approx(0.3)
    assert (first["only_a"], first["only_b"]) == (3, 0)
    assert first["mcnemar_p"] == pytest.approx(0.25)  # exact: 2 * 0.5**3
    expected = paired_difference(
        CORRECT["imm"]["id"], CORRECT["self_improve"]["id"], resamples=2000
    )
    assert (first["ci_low"], first["ci_high"]) == (expected.ci_low, expected.ci_high)
    cells = parse_table(format_paired_table(comparisons))
    assert cells[0]["final models"] == "IMM − self-improve" and cells[0]["set"] == "ID"
    assert cells[0]["McNemar p"] == "0.250"
    assert cells[0]["right only in A / only in B"] == "3 / 0"
    low, high = f"{expected.ci_low:+.3f}", f"{expected.ci_high:+.3f}"
    assert cells[0]["accuracy difference [95% CI]"] == f"+0.300 [{low}, {high}]"
    assert cells[3]["accuracy difference [95% CI]"] == "+0.000 [+0.000, +0.000]"
    assert cells[3]["McNemar p"] == "1.000"


def test_parse_table_finds_a_table_by_its_first_header():
    theta0, histories = histories_fixture()
    text = (
        format_table(side_by_side_rows(theta0, histories))
        + "\n\ntext\n\n"
        + format_paired_table(paired_comparisons(CORRECT, resamples=100))
    )
    assert len(parse_table(text)) == 3
    assert len(parse_table(text, "final models")) == 6
    with pytest.raises(ValueError, match="no table"):
        parse_table(text, "nothing")


def test_report_files_are_written_from_the_histories(tmp_path):
    config = DemoConfig(out_dir=str(tmp_path), quick=True)
    theta0, histories = histories_fixture()
    rows = side_by_side_rows(theta0, histories)
    paired = paired_comparisons(CORRECT, resamples=100)
    report = {
        "command": "imm-trl demo --quick",
        "machine": "test",
        "wall_seconds": 12.0,
        "cpu_seconds": 20.0,
        "config": asdict(config),
        "recipes": arm_recipes(config),
        "table": rows,
        "paired": paired,
        "correct": CORRECT,
        "arms": {
            arm: {"history": history, "metrics_file": f"{arm}/imm/imm_metrics.json"}
            for arm, history in histories.items()
        },
    }
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    for name in ("accuracy.png", "diversity.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "report.md").read_text()
    assert parse_table(markdown) == parse_table(format_table(rows))
    assert parse_table(markdown, "final models") == parse_table(format_paired_table(paired))
    assert "over the greedy completions" in markdown and "merge ratio 1.0" in markdown
    assert "`self_improve/imm/imm_metrics.json`, `imm/imm/imm_metrics.json`" in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy.png",
        "diversity.png",
        "report.json",
        "report.md",
    ]
