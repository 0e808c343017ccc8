"""Step-mode IMM in a GRPO run under `accelerate launch` with 2 CPU processes (DDP over gloo),
as a user runs it with recipes/accelerate_configs/ddp_cpu.yaml."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_processes_hold_identical_weights_after_every_merge(tmp_path, mode):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes/accelerate_configs/ddp_cpu.yaml"),
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests/scripts/ddp_step_mode.py"),
        str(tmp_path),
        mode,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Merges at step 2 and (final) 3, on both processes, with bit-identical weights after each.
    assert [[m["step"] for m in r["merges"]] for r in ranks] == [[2, 3], [2, 3]]
    for merge_0, merge_1 in zip(ranks[0]["merges"], ranks[1]["merges"], strict=True):
        assert merge_0["weights"] == merge_1["weights"], (
            f"processes differ after the merge at step {merge_0['step']}"
        )
    assert ranks[0]["changed_by_training"], "the weights never moved; the comparison proves nothing"
    # Only the main process wrote the metrics.
    rows = json.loads((tmp_path / "imm" / "step_metrics.json").read_text())
    assert [row["step"] for row in rows] == [2, 3]
