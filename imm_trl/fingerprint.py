"""A run's fingerprint: everything that decides its weights, so that a resume can refuse to
continue a different run.

    fingerprint = run_fingerprint(trainer, config)      # a JSON-able dict of sections
    differences(saved, fingerprint)                     # ["imm.merge_ratio: 0.5 -> 0.1", ...]

Sections: `imm` (the IMMConfig fields that change results, the questions and eval sets by
content hash), `sft` (the training arguments that change results), `model` (architecture,
config and a content hash of theta0's weights), `peft` (the LoRA layout), `processes` and the
package version. The number of iterations is left out: a finished run may be extended.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from enum import Enum
from typing import Any

import torch

import imm_trl

# IMMConfig fields that decide neither weights nor metrics.
IMM_FIELDS_NOT_IN_FINGERPRINT = {
    "iterations", "output_dir", "resume", "overwrite", "save_total_limit", "keep_sampler_model",
}
# TrainingArguments that decide the trained weights (the rest: paths, logging, saving).
SFT_FIELDS_IN_FINGERPRINT = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio",
    "warmup_steps", "weight_decay", "max_grad_norm", "optim", "optim_args", "adam_beta1",
    "adam_beta2", "adam_epsilon", "seed", "data_seed", "bf16", "fp16", "max_length", "packing",
    "completion_only_loss", "assistant_only_loss", "loss_type", "neftune_noise_alpha",
)
PEFT_FIELDS_IN_FINGERPRINT = (
    "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "bias", "use_rslora",
    "use_dora", "init_lora_weights", "layers_to_transform", "rank_pattern", "alpha_pattern",
)
SAMPLED_ELEMENTS = 4096


def content_hash(value: Any) -> str:
    """A short, stable hash of JSON-able content (non-JSON leaves by their repr)."""
    text = json.dumps(value, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def jsonable(value: Any) -> Any:
    """`value` as plain JSON: sets sorted, functions by qualified name, other objects by type."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(jsonable(v) for v in value)
    if hasattr(value, "__qualname__"):  # functions and classes
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, Enum):
        return jsonable(value.value)
    return f"{type(value).__module__}.{type(value).__qualname__}"  # a repr may hold an address


def rows_of(questions: Any) -> list:
    """Rows of a Dataset, a QuestionSet or a list, as plain JSON."""
    rows = getattr(questions, "rows", questions)
    return jsonable([dict(row) for row in rows]) if rows is not None else None


@torch.no_grad()
def weights_hash(model) -> str:
    """A content hash of theta0: each parameter's name, shape, dtype and up to
    `SAMPLED_ELEMENTS` evenly spaced elements (enough to tell checkpoints apart, cheap on
    billions of weights). Adapter weights are left out: the LoRA layout and the seed fix them."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if "lora_" in name:
            continue
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLED_ELEMENTS)
        sample = flat[::step][:SAMPLED_ELEMENTS].cpu().contiguous()
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def imm_section(config) -> dict[str, Any]:
    section = {}
    for f in fields(config):
        if f.name in IMM_FIELDS_NOT_IN_FINGERPRINT:
            continue
        value = getattr(config, f.name)
        if f.name == "questions":
            value = content_hash(rows_of(value))
        elif f.name == "eval_sets":
            value = {name: content_hash(rows_of(s)) for name, s in sorted(value.items())}
        section[f.name] = jsonable(value)
    section["density"] = config.merge_config.density  # None means the method's default
    return section


def model_section(model) -> dict[str, Any]:
    from imm_trl.checkpoints import is_peft_model

    base = model.get_base_model() if is_peft_model(model) else model
    config = base.config.to_dict()
    for transient in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(transient, None)
    return {
        "architecture": type(base).__name__,
        "config": content_hash(config),
        "weights": weights_hash(model),
        "dtype": str(next(base.parameters()).dtype),
    }


def peft_section(model) -> dict[str, Any] | None:
    from imm_trl.checkpoints import is_peft_model

    if not is_peft_model(model):
        return None
    peft_config = model.peft_config[getattr(model, "active_adapter", "default")]
    return {name: jsonable(getattr(peft_config, name, None)) for name in PEFT_FIELDS_IN_FINGERPRINT}


def run_fingerprint(trainer, config) -> dict[str, Any]:
    """The fingerprint of the run that `trainer` and `config` describe (call with theta0 in
    the model, and whole parameters: inside `whole_parameters`)."""
    args = trainer.args
    return {
        "imm": imm_section(config),
        "sft": {name: jsonable(getattr(args, name, None)) for name in SFT_FIELDS_IN_FINGERPRINT},
        "model": model_section(trainer.model),
        "peft": peft_section(trainer.model),
        "processes": trainer.accelerator.num_processes,
        "imm_trl_version": imm_trl.__version__,
    }


def differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Every field where two fingerprints differ, as 'section.field: saved -> current'."""
    found = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found
