"""IMM under `accelerate launch` with 2 CPU processes (DDP over gloo), as a user runs it with
recipes/accelerate_configs/ddp_cpu.yaml."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["lora", "full", "lora-auto"])
def test_two_processes_sample_their_share_and_end_with_identical_weights(tmp_path, mode):
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes/accelerate_configs/ddp_cpu.yaml"),
        "--main_process_port", str(free_port()),
        str(ROOT / "tests/scripts/ddp_imm.py"), str(tmp_path), mode,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["iterations"] for r in ranks] == [[1, 2], [1, 2]]
    if mode == "lora-auto":
        # Every process scored every candidate alike and made the same pick.
        assert ranks[0]["auto"] == ranks[1]["auto"] and all(row["auto/pick"] for row in ranks[0]["auto"])
        assert len({v for row in ranks[0]["auto"] for k, v in row.items() if k.startswith("auto/score/")}) > 1
    else:
        # 8 questions, 2 iterations: each process generated for its half (4 questions) each time.
        assert [r["prompts_sampled_here"] for r in ranks] == [8, 8]
    # Every process built the same D_t from the gathered completions ...
    assert ranks[0]["dataset"] == ranks[1]["dataset"] and ranks[0]["dataset"]
    if mode != "lora-auto":  # the auto run's verifier keeps only some completions
        assert len(ranks[0]["dataset"]) == 16
    # ... and merged to bit-identical weights, which IMM did change.
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["changed_by_imm"], "the merge changed no weight; the comparison proves nothing"
    # Only the main process wrote the checkpoints.
    assert sorted(p.name for p in (tmp_path / "imm").iterdir()) == ["imm_metrics.json", "iteration-1", "iteration-2", "run.json"]
