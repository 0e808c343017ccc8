"""`imm-trl demo`: the in-code recipe is recipes/default.yaml, the table shows the history's
numbers, and (integration tier) the quick demo runs end to end and writes its report."""

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from imm_trl.demo import (
    DEFAULT_RECIPE,
    QUICK,
    DemoConfig,
    add_demo_parser,
    demo_recipe,
    format_table,
    parse_table,
    summary,
    table_rows,
    write_report,
)

RECIPE = Path(__file__).resolve().parents[2] / "recipes/default.yaml"


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imm-trl")
    add_demo_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_in_code_recipe_is_the_default_yaml():
    assert DEFAULT_RECIPE == yaml.safe_load(RECIPE.read_text())


def test_quick_budget_replaces_the_full_one_and_overrides_come_last(tmp_path):
    from imm_trl.loop import parse_recipe

    config = DemoConfig(out_dir=str(tmp_path), quick=True, overrides=["--imm.merge_ratio", "0.7"])
    assert (config.n_train, config.n_eval, config.max_steps, config.eval_samples) == tuple(
        QUICK[k] for k in ("n_train", "n_eval", "max_steps", "eval_samples")
    )
    raw = demo_recipe(config)
    recipe = parse_recipe(raw)  # every key is valid for its section
    assert recipe.data.n_train == 16 and recipe.data.n_eval == 24
    assert raw["sft"]["max_steps"] == 4 and raw["sft"]["output_dir"] == str(tmp_path / "run")
    assert raw["imm"]["iterations"] == 2 and raw["imm"]["merge_ratio"] == 0.7
    assert raw["imm"]["sampler_kwargs"] == {"show_progress": True, "cpu_kv_cache_gib": 1.0}
    full = demo_recipe(DemoConfig(out_dir=str(tmp_path)))
    assert "max_steps" not in full["sft"] and full["sft"]["num_train_epochs"] == 1.0
    assert full["data"]["n_train"] == 128 and full["imm"]["eval_samples"] == 4
    assert DEFAULT_RECIPE["imm"]["iterations"] == 3  # the module constant is not mutated


def test_demo_parser_passes_recipe_overrides():
    args, extra = demo_parser().parse_known_args(
        ["demo", "--quick", "--out", "x", "--imm.merge_ratio", "0.7"]
    )
    assert args.quick and args.out == "x" and args.accepts_overrides
    assert extra == ["--imm.merge_ratio", "0.7"]


def history_fixture():
    base = {"iteration": 0}
    for name, acc in (("id", 0.25), ("ood", 0.5)):
        base.update(
            {
                f"eval/{name}/accuracy": acc,
                f"eval/{name}/accuracy_ci_low": acc - 0.125,
                f"eval/{name}/accuracy_ci_high": acc + 0.125,
                f"eval/{name}/distinct_2": 0.4567,
                f"eval/{name}/answer_entropy": 2.345,
            }
        )
    after = {
        **base,
        "iteration": 1,
        "eval/id/accuracy": 0.375,
        "sampling/yield_rate": 0.3125,
        "sampling/generated_examples": 12,
    }
    return [base, after]


def test_table_shows_the_history_numbers():
    rows = table_rows(history_fixture())
    assert (
        rows[0]["yield"] is None and rows[1]["yield"] == 0.3125 and rows[1]["id_accuracy"] == 0.375
    )
    cells = parse_table(format_table(rows))
    assert cells[0]["ID accuracy [95% CI]"] == "0.250 [0.125, 0.375]"
    assert cells[0]["yield"] == "—" and cells[0]["D_t size"] == "—"
    assert cells[1]["ID accuracy [95% CI]"] == "0.375 [0.125, 0.375]"
    assert cells[1]["OOD accuracy [95% CI]"] == "0.500 [0.375, 0.625]"
    assert cells[1]["yield"] == "0.312" and cells[1]["D_t size"] == "12"
    assert cells[1]["ID distinct-2"] == "0.457" and cells[1]["OOD answer entropy"] == "2.35"


def test_report_files_are_written_from_a_history(tmp_path):
    config = DemoConfig(out_dir=str(tmp_path), quick=True)
    rows = table_rows(history_fixture())
    report = {
        "command": "imm-trl demo --quick",
        "machine": "test",
        "wall_seconds": 12.0,
        "cpu_seconds": 20.0,
        "config": asdict(config),
        "recipe": demo_recipe(config),
        "metrics_file": "run/imm/imm_metrics.json",
        "table": rows,
        "summary": summary(rows),
        "history": history_fixture(),
    }
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    for name in ("accuracy.png", "diversity.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "report.md").read_text()
    assert parse_table(markdown) == parse_table(format_table(rows))
    assert "ID +0.125, OOD +0.000" in markdown and "over the greedy completions" in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy.png",
        "diversity.png",
        "report.json",
        "report.md",
    ]


def cell_numbers(cell: str) -> list[float]:
    return [float(x) for x in cell.replace("[", " ").replace("]", " ").replace(",", " ").split()]


@pytest.mark.integration
def test_quick_demo_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    args, extra = demo_parser().parse_known_args(
        ["demo", "--quick", "--out", str(out), "--no-progress"]
    )
    args.overrides = extra
    assert args.func(args) == 0
    printed = capsys.readouterr().out

    for name in ("report.md", "report.json", "accuracy.png", "diversity.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no temporary files left behind
    report = json.loads((out / "report.json").read_text())

    # report.json holds the callback's own history, and the table is computed from it.
    callback_history = json.loads((out / "run" / "imm" / "imm_metrics.json").read_text())
    assert report["history"] == callback_history
    assert [row["iteration"] for row in callback_history] == [0, 1, 2]
    assert report["table"] == table_rows(callback_history)
    for row in callback_history:
        assert row["eval/id/n"] == 24 and row["eval/ood/n"] == 24
    for row in callback_history[1:]:
        assert row["sampling/samples"] == 16 * 4
    assert (out / "run" / "imm" / "final" / "model.safetensors").is_file()
    assert report["summary"]["ood_accuracy_change"] == pytest.approx(
        callback_history[-1]["eval/ood/accuracy"] - callback_history[0]["eval/ood/accuracy"]
    )

    # The printed table and the one in report.md show the JSON's numbers, rounded.
    for text in (printed, (out / "report.md").read_text()):
        cells = parse_table(text)
        assert [int(c["iteration"]) for c in cells] == [0, 1, 2]
        for cell, row in zip(cells, report["table"], strict=True):
            for name, label in (("id", "ID"), ("ood", "OOD")):
                shown = cell_numbers(cell[f"{label} accuracy [95% CI]"])
                wanted = [
                    row[f"{name}_accuracy"],
                    row[f"{name}_accuracy_ci_low"],
                    row[f"{name}_accuracy_ci_high"],
                ]
                assert shown == pytest.approx(wanted, abs=5e-4)
                assert float(cell[f"{label} distinct-2"]) == pytest.approx(
                    row[f"{name}_distinct_2"], abs=5e-4
                )
                assert float(cell[f"{label} answer entropy"]) == pytest.approx(
                    row[f"{name}_answer_entropy"], abs=5e-3
                )
            if row["iteration"] == 0:
                assert cell["yield"] == "—"
            else:
                assert float(cell["yield"]) == pytest.approx(row["yield"], abs=5e-4)
                assert int(cell["D_t size"]) == row["train_examples"] > 0
    assert math.isfinite(report["wall_seconds"]) and report["command"].startswith(
        "imm-trl demo --quick"
    )
