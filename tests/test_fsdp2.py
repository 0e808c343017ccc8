"""IMM merges under FSDP2 (`fully_shard`, DTensor-sharded parameters) on 2 CPU processes
(gloo), compared bit for bit with the same merges done in this process on unsharded tensors.

tests/scripts/fsdp2_imm.py shards a tiny Llama over a real 2-process CPU device mesh, captures
theta0, trains, merges (linear, dare_linear, ties; LoRA with dare_linear) and writes the
gathered full weights of every stage; this test replays each merge unsharded. It also writes an
iteration checkpoint of the sharded model and restores it into a freshly sharded one.

Why no SFTTrainer + IMMCallback run under `accelerate launch`, as tests/test_distributed.py
does for DDP: on CPU, accelerate 1.15 never selects FSDP, and says nothing. With
`distributed_type: FSDP`, `fsdp_version: 2`, `use_cpu: true`, `Accelerator(cpu=True)` reports
`DistributedType.MULTI_CPU` with no fsdp_plugin (`_prepare_backend` maps a CPU launch to
MULTI_CPU; FSDP is only considered for the accelerator types) and the Trainer wraps the model
in DDP; `SFTConfig(fsdp="full_shard", fsdp_config={"version": 2})` ends the same way. Without
`use_cpu` the processes do not even join one group (`DistributedType.NO`, both rank 0). Handing
the Trainer a model already `fully_shard`-ed fails in DDP's constructor:
`RuntimeError: aten.cat.default got mixed torch.Tensor and DTensor, need to convert all
torch.Tensor to DTensor before calling distributed operators!`. So the merges are tested with
torch's own `fully_shard` on a CPU mesh, which is what accelerate's FSDP2 applies on GPUs.
"""

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imm_trl.merging import FullWeightMerger, LoraMerger

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests/scripts/fsdp2_imm.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_script():
    """The launched script as a module, for its model builders and merge settings."""
    spec = importlib.util.spec_from_file_location("fsdp2_imm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def stage(out: Path, scenario: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(out / f"{scenario}.{name}.safetensors")


@torch.no_grad()
def load_into(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert set(params) == set(tensors)
    for name, tensor in tensors.items():
        params[name].copy_(tensor)


def assert_params_equal(model, expected: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert set(params) == set(expected)
    differ = [n for n, p in params.items() if not torch.equal(p.detach(), expected[n])]
    assert not differ, f"differ from the unsharded merge: {differ[:5]}"


def test_parameters_stay_sharded(run):
    _, ranks = run
    for report in ranks:
        assert report["world_size"] == 2
        for scenario in ("full", "tied", "lora"):
            assert report[scenario]["sharded_after_capture"]
            assert report[scenario]["sharded_after_merge"]
    # Each process holds its own part of a dim-0 split (uneven for an odd row count), not a copy.
    shapes = [r["full"]["local_shapes"] for r in ranks]
    assert [s["model.layers.0.self_attn.q_proj.weight"] for s in shapes] == [[64, 128]] * 2
    assert [s["model.layers.0.mlp.up_proj.weight"] for s in shapes] == [[66, 128], [65, 128]]


@pytest.mark.parametrize("scenario", ["full", "tied"])
def test_full_weight_merges_equal_the_unsharded_merges(run, scenario):
    out, _ = run
    fsdp2 = load_script()
    model = fsdp2.build_model(scenario)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    mergers = [FullWeightMerger(model, fsdp2.merge_config(m)) for m in fsdp2.FULL_METHODS]
    theta0 = stage(out, scenario, "theta0")
    assert set(theta0) == set(initial)
    assert all(torch.equal(theta0[n], initial[n]) for n in initial), "theta0 captured under FSDP2"
    for iteration, merger in enumerate(mergers, start=1):
        tuned = stage(out, scenario, f"tuned{iteration}")
        load_into(model, tuned)
        merger.merge(model, iteration=iteration)
        merged = stage(out, scenario, f"merged{iteration}")
        assert_params_equal(model, merged)
        moved = [n for n in merged if not torch.equal(merged[n], tuned[n])]
        assert len(moved) == len(merged), "every weight was trained, so every merge moves it"
    assert_restored(out, scenario, stage(out, scenario, f"merged{len(mergers)}"), model)


def assert_restored(out: Path, scenario: str, merged: dict[str, torch.Tensor], model) -> None:
    """The checkpoint holds the merged weights the callback checkpoints (whole, not shards),
    and restoring it into a fresh sharded model gives them back."""
    from imm_trl.checkpoints import state_parameter_names

    (checkpoint,) = (out / f"{scenario}-checkpoints").iterdir()
    saved = load_file(checkpoint / "merged_weights.safetensors")
    assert set(saved) == set(state_parameter_names(model))
    assert all(torch.equal(saved[n], merged[n]) for n in saved)
    restored = stage(out, scenario, "restored")
    assert all(torch.equal(restored[n], merged[n]) for n in saved)


def test_lora_merge_equals_the_unsharded_merge(run):
    out, _ = run
    fsdp2 = load_script()
    model = fsdp2.build_model("lora")
    merger = LoraMerger(model, fsdp2.merge_config("dare_linear"), reset_seed=fsdp2.RESET_SEED)
    theta0 = stage(out, "lora", "theta0")
    expected = merger.anchor_tensors()  # theta0 of the LoRA targets and modules_to_save
    assert set(theta0) == set(expected) and "lm_head.weight" in theta0
    assert all(torch.equal(theta0[n], expected[n]) for n in expected)

    tuned = stage(out, "lora", "tuned1")
    load_into(model, tuned)
    merger.merge(model, iteration=1)
    merged = stage(out, "lora", "merged1")
    assert_params_equal(model, merged)  # base weights, lm_head copies and re-initialised A, B
    base = [n for n in merged if n.endswith("base_layer.weight")]
    assert base and all(not torch.equal(merged[n], tuned[n]) for n in base)
    assert all(not merged[n].any() for n in merged if "lora_B" in n)
    assert_restored(out, "lora", merged, model)
