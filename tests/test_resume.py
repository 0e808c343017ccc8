"""A run is what was asked for: the output directory is checked against the run before any
engine starts, resume continues from the newest durable state (iteration checkpoint, saved D_t,
the trainer's own checkpoints), and a crash leaves nothing a later run mistakes for data.
Each test here failed on the code before the run fingerprint (issue 10)."""

import json
import logging
import os

import pytest
import torch
from test_callback import CrashInIteration, dense_weights, imm_config, user_script

from imm_trl.callback import NoVerifiedDataError
from imm_trl.checkpoints import RUN_FILE, WEIGHTS_FILE, iteration_checkpoints

IMM_LOGGER = "imm_trl.callback"


def checkpoints(tmp_path):
    return sorted(path.name for _, path in iteration_checkpoints(tmp_path / "imm"))


def assert_same_weights(a, b):
    wa, wb = dense_weights(a.model), dense_weights(b.model)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path):
    user_script(tmp_path, imm_config(tmp_path, iterations=1))
    with pytest.raises(FileExistsError, match=r"holds another run \(iteration-1\).*resume=True.*overwrite=True"):
        user_script(tmp_path, imm_config(tmp_path, iterations=1, merge_ratio=0.1))
    # overwrite starts over: the old run's files are gone, the new run's fingerprint is saved
    user_script(tmp_path, imm_config(tmp_path, iterations=1, merge_ratio=0.1, overwrite=True))
    saved = json.loads((tmp_path / "imm" / RUN_FILE).read_text())
    assert saved["fingerprint"]["imm"]["merge_ratio"] == 0.1
    assert checkpoints(tmp_path) == ["iteration-1"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(merge_ratio=0.1), r"imm\.merge_ratio: 0\.5 -> 0\.1"),
        (dict(merge_method="dare_linear", density=0.8), r"imm\.density: 1\.0 -> 0\.8; imm\.merge_method"),
        (dict(seed=8), r"imm\.seed: 7 -> 8"),
        (dict(questions=[{"question": "What is 1 + 1?", "answer": "2"}]), r"imm\.questions"),
        (dict(user_seed=1), r"model\.weights"),
        (dict(lora_rank=8), r"peft\.r: 4 -> 8"),
        (dict(learning_rate=1e-3), r"sft\.learning_rate: 0\.005 -> 0\.001"),
    ],
    ids=["ratio", "method", "seed", "questions", "base-model", "lora-rank", "sft-lr"],
)
def test_resume_refuses_a_different_run_naming_each_field(tmp_path, change, field):
    user_script(tmp_path, imm_config(tmp_path, iterations=1))
    change = dict(change)
    script = {k: change.pop(k) for k in ("lora_rank", "learning_rate") if k in change}
    if "user_seed" in change:
        script["seed"] = change.pop("user_seed")
    with pytest.raises(ValueError, match=field):
        user_script(tmp_path, imm_config(tmp_path, iterations=2, resume=True, **change), **script)


def test_resume_refuses_fewer_iterations_than_done_and_extends_a_finished_run(tmp_path):
    user_script(tmp_path, imm_config(tmp_path, iterations=2))
    with pytest.raises(ValueError, match=r"holds 2 completed iterations but iterations=1; ask for at least 2"):
        user_script(tmp_path, imm_config(tmp_path, iterations=1, resume=True))
    _, _, recorder = user_script(tmp_path, imm_config(tmp_path, iterations=3, resume=True))
    assert len(recorder.sft_weights) == 1, "only iteration 3 runs"
    history = json.loads((tmp_path / "imm" / "imm_metrics.json").read_text())
    assert [row["iteration"] for row in history] == [1, 2, 3]


def test_only_iteration_int_directories_count_and_stale_staging_is_removed(tmp_path):
    user_script(tmp_path, imm_config(tmp_path, iterations=1))
    imm = tmp_path / "imm"
    for name in ("iteration-2.bak", "iteration-10-old"):
        (imm / name).mkdir()
    dead_pid = 2**22 + 12345  # above pid_max: no such process
    stale = imm / f".iteration-2.staging-{dead_pid}-abc"
    stale.mkdir()
    (stale / WEIGHTS_FILE).write_bytes(b"half a checkpoint")
    _, _, recorder = user_script(tmp_path, imm_config(tmp_path, iterations=2, resume=True))
    assert len(recorder.sft_weights) == 1, "resumed after iteration 1, not after '10'"
    assert not stale.exists()
    assert (imm / "iteration-2.bak").is_dir() and (imm / "iteration-10-old").is_dir()  # not ours to delete
    assert not [p for p in imm.iterdir() if ".staging-" in p.name]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    uninterrupted, _, _ = user_script(tmp_path / "a", imm_config(tmp_path / "a", temperature=0.0))
    user_script(tmp_path / "b", imm_config(tmp_path / "b", temperature=0.0))
    weights = tmp_path / "b" / "imm" / "iteration-2" / WEIGHTS_FILE
    os.truncate(weights, weights.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        resumed, _, recorder = user_script(tmp_path / "b", imm_config(tmp_path / "b", temperature=0.0, resume=True))
    assert "iteration-2 is damaged" in caplog.text and "falling back" in caplog.text
    assert len(recorder.sft_weights) == 1, "iteration 2 runs again from iteration 1's checkpoint"
    assert_same_weights(resumed, uninterrupted)


def test_iteration_checkpoints_rotate_to_save_total_limit(tmp_path):
    user_script(tmp_path, imm_config(tmp_path, iterations=3, save_total_limit=1))
    assert checkpoints(tmp_path) == ["iteration-3"]
    assert not list((tmp_path / "imm").glob("work-*")), "work directories are dropped once an iteration is done"


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_a_crash_in_training_resumes_from_the_saved_dataset_and_trainer_checkpoint(tmp_path, caplog, peft):
    """Killed at step 2 of iteration 2's SFT, with the trainer saving every step: the resume
    reads D_2 back instead of sampling, continues SFT from checkpoint-1, and ends bit-identical
    to a run that was never interrupted."""
    save_every_step = dict(save_strategy="steps", save_steps=1)
    config = dict(temperature=1.0)
    uninterrupted, _, _ = user_script(tmp_path / "a", imm_config(tmp_path / "a", **config), peft=peft, **save_every_step)
    with pytest.raises(KeyboardInterrupt):
        user_script(tmp_path / "b", imm_config(tmp_path / "b", **config), peft=peft,
                    extra_callbacks=[CrashInIteration(2)], **save_every_step)
    work = tmp_path / "b" / "imm" / "work-2"
    assert (work / "dataset.json").is_file() and (work / "trainer" / "checkpoint-1").is_dir()
    with caplog.at_level(logging.INFO, logger=IMM_LOGGER):
        resumed, _, recorder = user_script(
            tmp_path / "b", imm_config(tmp_path / "b", resume=True, **config), peft=peft, **save_every_step
        )
    assert "reusing the D_t saved" in caplog.text
    assert "continuing SFT from the trainer checkpoint" in caplog.text and "checkpoint-1" in caplog.text
    assert "iteration 2/2: sampling" in caplog.text
    assert_same_weights(resumed, uninterrupted)
    assert not work.exists(), "the work directory goes once iteration 2 is checkpointed"


def test_no_verified_data_quotes_the_counts_that_explain_it(tmp_path):
    rows = [{"question": "", "answer": "1"}, {"question": "What is 1 + 1?", "answer": "2"}]
    with pytest.raises(NoVerifiedDataError) as error:
        user_script(tmp_path, imm_config(tmp_path, verifier=lambda completions, **_: [0.0] * len(completions), questions=rows))
    message = str(error.value)
    for part in ("Of 2 questions 1 were usable (1 malformed: row 0: missing question)", "2 samples, 0 correct", "verifier errors"):
        assert part in message, message


def test_an_unwritable_output_directory_fails_at_config_time(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match="is under the file"):
        imm_config(tmp_path, output_dir=str(blocker / "imm"))


def test_epochs_per_iteration_beside_max_steps_is_refused_before_sampling(tmp_path):
    with pytest.raises(ValueError, match=r"epochs_per_iteration=2 would be ignored: the trainer's max_steps=3"):
        user_script(tmp_path, imm_config(tmp_path, epochs_per_iteration=2))
