"""IMM merges of an FSDP2-sharded model, run by tests/test_fsdp2.py under
`python -m torch.distributed.run --nproc_per_node 2` (2 CPU processes, gloo).

A tiny Llama is sharded with `fully_shard` (each decoder layer, then the root) over a
2-process CPU mesh, the mergers are built inside `whole_parameters` (theta0 capture), the
sharded model is trained for a few AdamW steps, merged, trained again, merged again. Rank 0
writes the gathered full weights at every stage (safetensors), from which the test redoes
every merge in one process on unsharded tensors and compares bit for bit. After the last
merge, an IMM iteration checkpoint is written as `IMMCallback` writes it (gathered on every
process, written by rank 0) and restored into a freshly sharded model, as `resume` does.

Scenarios, all in one launch (each launch costs seconds of imports):
- `full`: `FullWeightMerger`s with linear, dare_linear and ties, one per iteration.
- `tied`: the same with tied input and output embeddings (one `Parameter` in two modules).
- `lora`: a PEFT LoRA model with `modules_to_save`, `LoraMerger` with dare_linear.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from imm_trl.checkpoints import (
    checkpoint_tensors,
    newest_intact_checkpoint,
    restore_checkpoint_tensors,
    write_checkpoint,
)
from imm_trl.distributed import is_dtensor, whole_parameters
from imm_trl.merging import FullWeightMerger, LoraMerger, MergeConfig
from imm_trl.merging.config import default_density
from imm_trl.models import tiny_model

FULL_METHODS = ("linear", "dare_linear", "ties")  # iteration t merges with FULL_METHODS[t - 1]
LORA_CONFIG = dict(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
    modules_to_save=["lm_head"],
)
LORA_SEED, RESET_SEED = 11, 5


def merge_config(method: str) -> MergeConfig:
    return MergeConfig(method=method, ratio=0.5, density=default_density(method), seed=3)


def build_model(scenario: str):
    """The unsharded model of a scenario; the test builds the same one as its reference."""
    # An odd MLP width: gate/up_proj split unevenly (66 + 65 rows), which FSDP2 pads.
    model, _ = tiny_model(seed=0, tie_word_embeddings=scenario == "tied", intermediate_size=131)
    if scenario == "lora":
        torch.manual_seed(LORA_SEED)
        model = get_peft_model(model, LoraConfig(**LORA_CONFIG))
    return model


def shard(model, mesh) -> None:
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def train_steps(model, steps: int = 3) -> None:
    """A few AdamW steps on fixed random tokens: moves every trainable weight."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    generator = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def gathered(model) -> dict[str, torch.Tensor]:
    """Every parameter's full tensor (collective; call on every rank)."""
    with whole_parameters(model, modify=False):
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def write(out_dir: Path, stem: str, tensors: dict[str, torch.Tensor]) -> None:
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / f"{stem}.safetensors")


def checkpoint_and_restore(scenario: str, model, merger, mesh, out_dir: Path) -> None:
    """Write an iteration checkpoint of `model` and restore it into a fresh sharded model,
    whose gathered weights are written as `<scenario>.restored`."""
    directory = out_dir / f"{scenario}-checkpoints"
    with whole_parameters(model, modify=False):
        if dist.get_rank() == 0:
            write_checkpoint(directory, 1, checkpoint_tensors(model, merger), {"iteration": 1})
    dist.barrier()
    fresh = build_model(scenario)
    shard(fresh, mesh)
    with whole_parameters(fresh):
        source, _, tensors = newest_intact_checkpoint(directory)
        restore_checkpoint_tensors(fresh, None, tensors, source)
    write(out_dir, f"{scenario}.restored", gathered(fresh))


def all_dtensors(model) -> bool:
    return all(is_dtensor(p) for p in model.parameters())


def run_full(scenario: str, mesh, out_dir: Path) -> dict:
    model = build_model(scenario)
    shard(model, mesh)
    with whole_parameters(model):
        mergers = [FullWeightMerger(model, merge_config(m)) for m in FULL_METHODS]
    write(out_dir, f"{scenario}.theta0", mergers[0]._theta0)
    report = {"sharded_after_capture": all_dtensors(model)}
    for iteration, merger in enumerate(mergers, start=1):
        train_steps(model)
        write(out_dir, f"{scenario}.tuned{iteration}", gathered(model))
        with whole_parameters(model):
            merger.merge(model, iteration=iteration)
        write(out_dir, f"{scenario}.merged{iteration}", gathered(model))
    report["sharded_after_merge"] = all_dtensors(model)
    checkpoint_and_restore(scenario, model, mergers[-1], mesh, out_dir)
    report["local_shapes"] = {n: list(p.to_local().shape) for n, p in model.named_parameters()}
    return report


def run_lora(mesh, out_dir: Path) -> dict:
    model = build_model("lora")
    shard(model, mesh)
    with whole_parameters(model):
        merger = LoraMerger(model, merge_config("dare_linear"), reset_seed=RESET_SEED)
    write(out_dir, "lora.theta0", merger.anchor_tensors())
    report = {"sharded_after_capture": all_dtensors(model)}
    train_steps(model)
    write(out_dir, "lora.tuned1", gathered(model))
    with whole_parameters(model):
        merger.merge(model, iteration=1)
    write(out_dir, "lora.merged1", gathered(model))
    checkpoint_and_restore("lora", model, merger, mesh, out_dir)
    train_steps(model)  # the merged, re-initialised adapter trains on
    report["sharded_after_merge"] = all_dtensors(model)
    return report


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    report = {"world_size": dist.get_world_size()}
    for scenario in ("full", "tied"):
        report[scenario] = run_full(scenario, mesh, out_dir)
    report["lora"] = run_lora(mesh, out_dir)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
