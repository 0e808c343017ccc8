"""`imm-trl demo --quick` end to end (integration tier): both arms run from theta0 and write
their report; the console shows progress lines and the tables, no library bars. The fast
tests of the recipe, tables and report files are in tests/test_demo_report.py."""

import argparse
import json
import math

import pytest

from imm_trl.demo import QUICK, add_demo_parser
from imm_trl.demo_report import ARMS, paired_comparisons, parse_table, side_by_side_rows


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imm-trl")
    add_demo_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def cell_numbers(cell: str) -> list[float]:
    return [float(x) for x in cell.replace("[", " ").replace("]", " ").replace(",", " ").split()]


@pytest.mark.integration
def test_quick_demo_runs_both_arms_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    args, extra = demo_parser().parse_known_args(["demo", "--quick", "--out", str(out)])
    args.overrides = extra
    assert args.func(args) == 0
    captured = capsys.readouterr()
    printed = captured.out

    # The console: progress lines, the two tables, the report path; no library bars or logs.
    console = captured.out + captured.err
    assert len(console.splitlines()) < 40, console
    for bar_mark in ("\r", "it/s", "%|", "Processed prompts", "{'loss'"):
        assert bar_mark not in console, (bar_mark, console)
    assert "[self-improve 2/2] sampling" in captured.err and "[IMM 1/2]" in captured.err

    for name in ("report.md", "report.json", "accuracy.png", "diversity.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no temporary files left behind
    report = json.loads((out / "report.json").read_text())

    # Each arm ran through the IMM callback in its own directory; report.json holds theta0's
    # eval and then the callback's own history, and the table is computed from them.
    theta0 = report["arms"]["imm"]["history"][0]
    for arm in ARMS:
        history = report["arms"][arm]["history"]
        callback_history = json.loads((out / arm / "imm" / "imm_metrics.json").read_text())
        assert history == [theta0, *callback_history]
        assert [row["iteration"] for row in history] == [0, 1, 2]
        for row in history:
            assert row["eval/id/n"] == QUICK["n_eval"] and row["eval/ood/n"] == QUICK["n_eval"]
        for row in callback_history:
            assert row["sampling/samples"] == QUICK["n_train"] * 4
        assert (out / arm / "imm" / "final" / "model.safetensors").is_file()
        # The question-by-question greedy eval of G_T agrees with the callback's last eval.
        for name in ("id", "ood"):
            correct = report["correct"][arm][name]
            assert len(correct) == QUICK["n_eval"]
            assert sum(correct) / len(correct) == pytest.approx(
                history[-1][f"eval/{name}/accuracy"]
            )
            theta0_correct = report["correct"]["theta0"][name]
            assert sum(theta0_correct) / len(correct) == pytest.approx(
                theta0[f"eval/{name}/accuracy"]
            )
    # Same theta0, questions and random state: iteration 1 sampled the same D_1 in both arms.
    first = {arm: report["arms"][arm]["history"][1] for arm in ARMS}
    for key in ("sampling/generated_examples", "sampling/correct_samples", "train_loss"):
        assert first["self_improve"][key] == first["imm"][key], key
    assert report["table"] == side_by_side_rows(
        theta0, {arm: report["arms"][arm]["history"] for arm in ARMS}
    )
    assert report["paired"] == paired_comparisons(report["correct"], seed=0)

    # The printed tables and those in report.md show the JSON's numbers, rounded.
    for text in (printed, (out / "report.md").read_text()):
        cells = parse_table(text)
        assert [(c["arm"], int(c["t"])) for c in cells] == [
            ("θ0", 0),
            ("self-improve", 1),
            ("self-improve", 2),
            ("IMM", 1),
            ("IMM", 2),
        ]
        for cell, row in zip(cells, report["table"], strict=True):
            for name, label in (("id", "ID"), ("ood", "OOD")):
                shown = cell_numbers(cell[f"{label} accuracy [95% CI]"])
                wanted = [
                    row[f"{name}_accuracy"],
                    row[f"{name}_accuracy_ci_low"],
                    row[f"{name}_accuracy_ci_high"],
                ]
                assert shown == pytest.approx(wanted, abs=5e-4)
            if row["iteration"] == 0:
                assert cell["yield"] == "—"
            else:
                assert float(cell["yield"]) == pytest.approx(row["yield"], abs=5e-4)
                assert int(cell["D_t size"]) == row["train_examples"] > 0
        paired = parse_table(text, "final models")
        assert len(paired) == 6
        for cell, comparison in zip(paired, report["paired"], strict=True):
            shown = cell_numbers(cell["accuracy difference [95% CI]"])
            wanted = [comparison[k] for k in ("difference", "ci_low", "ci_high")]
            assert shown == pytest.approx(wanted, abs=5e-4)
    assert math.isfinite(report["wall_seconds"]) and report["command"].startswith(
        "imm-trl demo --quick"
    )
