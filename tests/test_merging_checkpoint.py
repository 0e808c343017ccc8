"""The out-of-core checkpoint merger: equality with the in-memory merge, atomicity, refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from imm_trl.cli import main as cli_main
from imm_trl.merging import merge_checkpoints, merge_state_dicts
from imm_trl.models import tiny_model

REPO = Path(__file__).resolve().parents[1]


def _save(model, tokenizer, directory):
    model.to(torch.bfloat16).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base, tokenizer = tiny_model(seed=0)
    tuned_a, _ = tiny_model(seed=1)
    tuned_b, _ = tiny_model(seed=2)
    return (
        _save(base, tokenizer, root / "base"),
        _save(tuned_a, None, root / "tuned_a"),
        _save(tuned_b, None, root / "tuned_b"),
    )


def _state(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).state_dict()


def _no_partials(parent):
    return not [p for p in Path(parent).iterdir() if ".staging-" in p.name]


@pytest.mark.parametrize("method", ["linear", "dare_linear", "ties", "dare_ties"])
def test_output_loads_and_equals_in_memory_merge(checkpoints, tmp_path, method):
    base, tuned_a, tuned_b = checkpoints
    ratio = {"layers.0": 0.3, "default": 0.6}
    density = 1.0 if method == "linear" else 0.7  # linear reads no density
    out = merge_checkpoints(
        base,
        [tuned_a, tuned_b],
        tmp_path / "out",
        method=method,
        ratio=ratio,
        density=density,
        seed=3,
        weights=[0.5, 0.5],
        max_shard_bytes=400_000,
    )
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "model-00002-of-00002.safetensors" in files
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(files)
    expected = merge_state_dicts(
        _state(base),
        [_state(tuned_a), _state(tuned_b)],
        method=method,
        ratio=ratio,
        density=density,
        seed=3,
        weights=[0.5, 0.5],
    )
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert _no_partials(tmp_path)


def test_cli_merge(checkpoints, tmp_path, capsys):
    base, tuned_a, _ = checkpoints
    code = cli_main(
        [
            "merge",
            str(base),
            str(tuned_a),
            "--out",
            str(tmp_path / "o"),
            "--method",
            "dare_linear",
            "--ratio",
            '{"layers.1": 0.9, "default": 0.5}',
            "--density",
            "0.8",
        ]
    )
    assert code == 0 and capsys.readouterr().out.strip() == str(tmp_path / "o")
    expected = merge_state_dicts(
        _state(base),
        _state(tuned_a),
        method="dare_linear",
        ratio={"layers.1": 0.9, "default": 0.5},
        density=0.8,
    )
    got = load_file(tmp_path / "o" / "model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in got)


def _copy_with(src, dst, edit):
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.norm.weight"), r"missing model\.norm\.weight, extra none"),
        (lambda t: t.update(extra=torch.zeros(2)), r"missing none, extra extra"),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(5, dtype=torch.bfloat16)}),
            r"shape mismatch for model\.norm\.weight",
        ),
        (
            lambda t: t.update({"model.norm.weight": t["model.norm.weight"].float()}),
            r"dtype mismatch for model\.norm\.weight",
        ),
        (
            lambda t: t["model.norm.weight"].fill_(float("nan")),
            r"model\.norm\.weight contains NaN or Inf",
        ),
        (
            lambda t: t["model.norm.weight"].__setitem__(3, float("-inf")),
            r"model\.norm\.weight contains NaN or Inf",
        ),
    ],
    ids=["missing", "extra", "shape", "dtype", "nan", "inf"],
)
def test_refusals_leave_nothing_behind(checkpoints, tmp_path, edit, message):
    base, tuned_a, _ = checkpoints
    bad = _copy_with(tuned_a, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        merge_checkpoints(base, bad, tmp_path / "out", ratio=0.5)
    assert not (tmp_path / "out").exists() and _no_partials(tmp_path)


def test_refuses_different_architecture(checkpoints, tmp_path):
    base, tuned_a, _ = checkpoints
    other = _copy_with(tuned_a, tmp_path / "other", lambda t: None)
    config = json.loads((other / "config.json").read_text())
    config["model_type"], config["architectures"] = "mistral", ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="different architectures.*model_type: 'llama' vs 'mistral'"
    ):
        merge_checkpoints(base, other, tmp_path / "out")


def test_pickle_only_refused_unless_opted_in_to_safe_load(checkpoints, tmp_path):
    base, tuned_a, _ = checkpoints
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_file(tuned_a / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "config.json").write_text((tuned_a / "config.json").read_text())
    with pytest.raises(ValueError, match="only pickle weight files.*allow_pickle=True"):
        merge_checkpoints(base, pickled, tmp_path / "out")
    out = merge_checkpoints(base, pickled, tmp_path / "out", allow_pickle=True, ratio=0.5)
    expected = merge_state_dicts(_state(base), _state(tuned_a), ratio=0.5)
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in got)
    # weights_only=True: a pickle that carries code is refused by torch itself.
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"model.norm.weight": torch.ones(2), "payload": _Evil()}, evil / "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        merge_checkpoints(base, evil, tmp_path / "out2", allow_pickle=True)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_existing_output_refused(checkpoints, tmp_path):
    base, tuned_a, _ = checkpoints
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_checkpoints(base, tuned_a, tmp_path / "out")
    merge_checkpoints(base, tuned_a, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_killed_merge_leaves_no_output_directory(tmp_path):
    # Big enough that the merge is still writing when it is killed.
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    for directory, shift in ((base, 0.0), (tuned, 0.01)):
        directory.mkdir()
        tensors = {
            f"model.layers.{i}.w": torch.full((1024, 4096), shift + i, dtype=torch.bfloat16)
            for i in range(40)
        }
        save_file(tensors, directory / "model.safetensors")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "imm_trl.cli",
        "merge",
        str(base),
        str(tuned),
        "--out",
        str(out),
        "--max-shard-gb",
        "0.01",
    ]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    shards_written = []
    while time.time() < deadline and process.poll() is None and not shards_written:
        partials = [p for p in tmp_path.iterdir() if ".staging-" in p.name]
        shards_written = [
            f for p in partials for f in p.glob("*.safetensors") if f.stat().st_size > 0
        ]
        time.sleep(0.01)
    assert process.poll() is None, "merge finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert shards_written and not out.exists()
    # The next merge removes the dead process's partial directory and completes.
    merge_checkpoints(base, tuned, out, ratio=0.5)
    assert _no_partials(tmp_path)
    merged = load_file(out / "model.safetensors")
    assert torch.equal(
        merged["model.layers.3.w"],
        torch.full((1024, 4096), 3.005, dtype=torch.float32).to(torch.bfloat16),
    )
