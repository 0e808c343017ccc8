"""A few kill -9 trials of the fault-injection harness (benchmarks/fault_injection.py runs 20+):
a real child process running IMM on the tiny model is killed with SIGKILL inside a phase, then
resumed; the final weights must equal the uninterrupted run's bit for bit, nothing may be left
behind, and the resume must continue from the newest durable state."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fault_injection  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    run = fault_injection.run_child("tiny", directory, resume=False)
    assert run.returncode == 0, "\n".join(run.log[-20:])
    return run, fault_injection.final_weights(directory)


@pytest.mark.parametrize(
    ("phase", "continues_from"),
    [
        ("sampling", None),
        ("train", "D_t"),
        ("trainer checkpoint", "trainer checkpoint"),
        ("checkpoint", None),
        ("eval", None),
    ],
)
def test_a_killed_run_resumes_to_identical_weights_with_nothing_left(tmp_path, reference, phase, continues_from):
    """Killed as `phase` of iteration 2 of 3 begins (a kill later in a phase is the benchmark's
    job: the phases of this tiny run last milliseconds to seconds, so a delay measured on the
    reference run could land after the run ended on a faster machine)."""
    run, weights = reference
    trial = fault_injection.run_trial(
        "tiny", tmp_path, run, weights, random.Random(1), phase=phase, fraction=0.0, iteration=2
    )
    assert trial["killed"], trial
    assert trial["resumed"], trial["error"]
    assert trial["identical"], trial
    assert trial["junk"] == [], trial
    assert "iteration checkpoint" in trial["reused"], trial  # iteration 1's
    if continues_from and trial["killed_in"] == f"2:{phase}":
        assert continues_from in trial["reused"], trial
    # the work thrown away is bounded by the time since the last durable state, which is at
    # most one phase of this tiny run
    assert trial["lost_s"] is None or trial["lost_s"] < run.seconds, trial
