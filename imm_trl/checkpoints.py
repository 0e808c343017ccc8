"""What an IMM run keeps on disk, and how it is read back.

    <output_dir>/                    (IMMConfig.output_dir; default <trainer output_dir>/imm)
        run.json                     the run's fingerprint, written when a fresh run starts
        iteration-<t>/               a completed iteration: G_t (merged_weights.safetensors) and
                                     imm_state.json (iteration, history, fingerprint)
        work-<t>/                    iteration t in progress: dataset.json (D_t, written once
                                     sampling ends) and trainer/checkpoint-<step> (the trainer's
                                     own save_steps checkpoints); deleted when iteration-<t> exists
        imm_metrics.json             the history, one row per iteration
        sampler-model-rank<k>/       the vLLM engine's model copy, removed when the run ends

Every directory is written through `imm_trl.files.publish_directory`, so a kill leaves the old
version or the new one; only directories named exactly `iteration-<int>` are checkpoints, and
a resume takes the newest one that reads back whole.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from imm_trl.files import publish_directory, staging_directory, write_json_atomically

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FILE = "imm_state.json"
WEIGHTS_FILE = "merged_weights.safetensors"
METRICS_FILE = "imm_metrics.json"
DATASET_FILE = "dataset.json"
MASTER_PREFIX = "imm_master::"
ANCHOR_PREFIX = "imm_anchor::"
RETAIN_FILE = "retain_reference.json"
CHECKPOINT_NAME = re.compile(r"^iteration-(\d+)$")
WORK_NAME = re.compile(r"^work-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back whole."""


# -- the model's state ----------------------------------------------------------------------


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def state_parameter_names(model) -> list[str]:
    """Parameters that carry the run's state between iterations: for LoRA the merged base
    weights of the targeted layers, modules_to_save and the adapter; otherwise all of them.
    Quantized weights are left out: they are rebuilt from their master copies."""
    named = list(model.named_parameters())
    if not is_peft_model(model):
        return [name for name, _ in named]
    return [
        name
        for name, param in named
        if ("base_layer.weight" in name and param.is_floating_point())
        or "modules_to_save" in name
        or "lora_" in name
    ]


def checkpoint_tensors(model, merger, moving_anchor: bool = False) -> dict[str, torch.Tensor]:
    """What an iteration checkpoint holds: the parameters of `state_parameter_names`, for
    QLoRA each quantized weight's master copy (the truth; the 4/8-bit weight is its rounding),
    and with a moving anchor the anchor tensors. Whole tensors only where the model's
    parameters are whole (inside `whole_parameters`)."""
    params = dict(model.named_parameters())
    tensors = {name: params[name] for name in state_parameter_names(model)}
    tensors.update({MASTER_PREFIX + name: t for name, t in merger.master_tensors().items()})
    if moving_anchor:
        tensors.update({ANCHOR_PREFIX + name: t for name, t in merger.anchor_tensors().items()})
    return tensors


@torch.no_grad()
def restore_checkpoint_tensors(model, merger, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy a checkpoint's tensors (`checkpoint_tensors`) back into the model and the merger's
    master copies (and anchors), in place. `merger` may be None for a model without one (its
    checkpoint then holds no master copies)."""
    anchors = {n.removeprefix(ANCHOR_PREFIX): t for n, t in tensors.items() if n.startswith(ANCHOR_PREFIX)}
    if anchors:
        merger.load_anchor_tensors(anchors)
    tensors = {n: t for n, t in tensors.items() if not n.startswith(ANCHOR_PREFIX)}
    params = dict(model.named_parameters())
    master_names = set(merger.master_tensors()) if merger is not None else set()
    unknown = [n for n in tensors if n not in params and n.removeprefix(MASTER_PREFIX) not in master_names]
    if unknown:
        raise ValueError(
            f"checkpoint {source} holds weights {unknown[:3]} that this model lacks; "
            "resume with the same model and LoRA configuration"
        )
    masters = {}
    for name, tensor in tensors.items():
        if name.startswith(MASTER_PREFIX):
            masters[name.removeprefix(MASTER_PREFIX)] = tensor
        else:
            params[name].copy_(tensor)
    if merger is not None:
        merger.load_master_tensors(masters)


def merged_state_dict(model, masters: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights the model computes with, named as in a plain transformers checkpoint: what a
    sampler with its own copy of the model (vLLM) must load after a merge.

    For a PEFT model this is the base model (the adapter was reset after the merge, so B = 0
    and it adds nothing) without the LoRA factors, `modules_to_save` by their trained copy, and
    each bitsandbytes-quantized weight by its master copy from `masters` (else dequantized).
    """
    from imm_trl.merging.quantization import dequantize, is_quantized

    if not is_peft_model(model):
        return {name: param.detach() for name, param in model.named_parameters()}
    masters = masters or {}
    modules = dict(model.get_base_model().named_modules())
    weights = {}
    for name, param in model.get_base_model().named_parameters():
        if "lora_" in name or ".original_module." in name:
            continue
        hf_name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if hf_name in masters:
            weights[hf_name] = masters[hf_name]
        elif is_quantized(param):
            weights[hf_name] = dequantize(modules[name.rsplit(".", 1)[0]])
        else:
            weights[hf_name] = param.detach()
    return weights


def save_merged_model(directory: Path, model, tokenizer) -> Path:
    """A plain transformers model directory holding the model's current weights, from which
    a separate engine (vLLM) can start, or `from_pretrained` can load; published atomically."""
    config = model.get_base_model().config if is_peft_model(model) else model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)  # the engine gets dense (dequantized) weights
    with staging_directory(directory) as staging:
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2))
        weights = merged_state_dict(model)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / "model.safetensors")
        tokenizer.save_pretrained(staging)
        publish_directory(staging, directory)
    return directory


# -- iteration checkpoints ------------------------------------------------------------------


def write_checkpoint(directory: Path, iteration: int, weights: dict[str, torch.Tensor], state: dict) -> Path:
    """Publish `iteration-<t>/` (weights and state) atomically and durably."""
    final = directory / f"iteration-{iteration}"
    with staging_directory(final) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / WEIGHTS_FILE)
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
        publish_directory(staging, final)
    return final


def iteration_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """The `iteration-<int>` directories under `directory`, newest first; anything else
    (`iteration-2.bak`, `iteration-10-old`) is not a checkpoint."""
    if not directory.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if path.is_dir() and (match := CHECKPOINT_NAME.match(path.name))
    ]
    return sorted(found, reverse=True)


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's state and tensors; `CheckpointError` if either does not read back."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(path / WEIGHTS_FILE)
    except (OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or "iteration" not in state:
        raise CheckpointError(f"{path / STATE_FILE} has no iteration number")
    return state, tensors


def newest_intact_checkpoint(directory: Path):
    """(path, state, tensors) of the newest checkpoint that reads back whole, or None; each
    damaged newer one is named in a warning and skipped."""
    for _, path in iteration_checkpoints(directory):
        try:
            return (path, *read_checkpoint(path))
        except CheckpointError as error:
            logger.warning("skipping a damaged checkpoint, falling back to the previous one: %s", error)
    return None


def rotate_checkpoints(directory: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` iteration checkpoints (None keeps all)."""
    if keep is None:
        return []
    old = [path for _, path in iteration_checkpoints(directory)[keep:]]
    for path in old:
        shutil.rmtree(path)
    return old


def work_directory(directory: Path, iteration: int) -> Path:
    return directory / f"work-{iteration}"


def work_directories(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [path for path in directory.iterdir() if path.is_dir() and WORK_NAME.match(path.name)]


# -- D_t ------------------------------------------------------------------------------------


def write_dataset(path: Path, rows: list[dict], stats: dict, seed: int) -> None:
    """D_t as it left rejection sampling, published atomically once sampling has ended."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, {"seed": seed, "stats": stats, "rows": rows})


def read_dataset(path: Path) -> dict | None:
    """A saved D_t, or None if there is none or it does not read back."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("ignoring a damaged saved dataset %s (%s); sampling again", path, error)
        return None
    return saved if isinstance(saved, dict) and "rows" in saved else None


# -- the trainer's own checkpoints inside an iteration -----------------------------------------


def newest_trainer_checkpoint(directory: Path) -> Path | None:
    """The newest `checkpoint-<step>` the trainer finished writing (its trainer_state.json is
    written last and parses), or None; newer unfinished ones are deleted."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not directory.is_dir():
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = sorted(
        ((int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.match(p.name))), reverse=True
    )
    for _, path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path
        except (OSError, ValueError):
            logger.warning("deleting the unfinished trainer checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
    return None
