"""Step mode's checks and plan, run before anything is merged: which IMMConfig fields step
mode reads, which trainers and KL references it supports, how many merges a run makes, and
which merges are the identity or can overflow. Pure functions of the config and the trainer's
arguments; `imm_trl.step_mode` (the callback) calls them, and `IMMConfig` validation imports
them without the callback's tensor and checkpoint code.
"""

from __future__ import annotations

import math
from dataclasses import fields

from imm_trl.merging import MergeConfig
from imm_trl.merging.config import merge_method
from imm_trl.validation import check_choice, field_default

REFERENCES = ("theta0", "merged")
SUPPORTED_TRAINERS = ("SFTTrainer", "GRPOTrainer", "RLOOTrainer")
STEP_MODE_FIELDS = frozenset(
    {
        "merge_method",
        "merge_ratio",
        "density",
        "seed",
        "output_dir",
        "merge_every_steps",
        "reset_optimizer_on_merge",
        "reference",
    }
)
# What to do instead of an iteration-mode field, where it is not just "remove it".
ITERATION_FIELD_HINTS = {
    "questions": "the trainer trains on its own train_dataset",
    "iterations": "the merge count follows from max_steps and merge_every_steps",
    "resume": "resume with trainer.train(resume_from_checkpoint=...)",
    "reset_optimizer": "use reset_optimizer_on_merge",
}


# -- configuration checks -------------------------------------------------------------------


def differs_from_default(config, name: str) -> bool:
    """Whether `config.<name>` was set to something other than the field's default."""
    value, default = getattr(config, name), field_default(type(config), name)
    try:
        return value is not default and bool(value != default)
    except Exception:  # a value whose comparison is not a bool (a Dataset, an array)
        return True


def check_step_mode_fields(config) -> None:
    """Raise a ValueError if step-mode and iteration-mode fields of an `IMMConfig` are mixed."""
    check_choice("IMMConfig.reference", config.reference, REFERENCES)
    if config.merge_every_steps is None:
        given = [
            n for n in ("reset_optimizer_on_merge", "reference") if differs_from_default(config, n)
        ]
        if given:
            raise ValueError(
                f"IMMConfig.{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to "
                "step mode; set merge_every_steps=N "
                "to merge every N trainer steps, or remove them"
            )
        return
    if config.auto_ratio:
        raise ValueError(
            "merge_ratio='auto' scores candidates on held-out questions after each iteration; "
            "step mode has no questions: give a number, a per-layer map or a depth rule"
        )
    given = [
        f.name
        for f in fields(config)
        if f.name not in STEP_MODE_FIELDS and differs_from_default(config, f.name)
    ]
    if given:
        hints = "; ".join(
            f"{n}: {ITERATION_FIELD_HINTS[n]}" for n in given if n in ITERATION_FIELD_HINTS
        )
        raise ValueError(
            f"IMMConfig.{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to "
            "iteration mode (rejection sampling), not to "
            f"step mode (merge_every_steps={config.merge_every_steps}), which merges inside the "
            f"trainer's own run with its own data and generation: remove them"
            + (f" ({hints})" if hints else "")
        )


def check_supported_trainer(trainer) -> None:
    """Raise a TypeError unless `trainer` is a TRL `SFTTrainer`, `GRPOTrainer` or `RLOOTrainer`."""
    import trl

    if not isinstance(trainer, tuple(getattr(trl, name) for name in SUPPORTED_TRAINERS)):
        raise TypeError(
            f"step mode (merge_every_steps) supports {', '.join(SUPPORTED_TRAINERS)}; got "
            f"{type(trainer).__name__}. Use one of those trainers, or iteration mode "
            "(merge_every_steps=None) with an SFTTrainer"
        )


def kl_reference_kind(trainer) -> str:
    """How `trainer` computes its KL reference: 'none' (beta = 0, or SFT), 'ref_model' (a
    separate model copy) or 'adapter_disabled' (PEFT: the same model with the adapter off)."""
    if not getattr(trainer, "beta", 0.0):
        return "none"
    return "ref_model" if getattr(trainer, "ref_model", None) is not None else "adapter_disabled"


def check_reference(trainer, reference: str) -> str:
    """Refuse a KL reference this trainer cannot give without a second full model copy;
    returns `kl_reference_kind(trainer)`."""
    kind = kl_reference_kind(trainer)
    if kind == "adapter_disabled":
        if reference == "theta0":
            raise ValueError(
                f"reference='theta0' with LoRA and beta={trainer.beta}: TRL's KL reference is the model "
                "with its adapter disabled, which after a merge is the merged base G, and keeping "
                "theta0 instead would need a second full model copy. Use IMMConfig(reference='merged'), "
                "or beta=0.0 for no KL term"
            )
        if "ref" in getattr(trainer.model, "peft_config", {}):
            raise ValueError(
                "the model has a 'ref' adapter, which TRL uses as the KL reference on top of the base "
                "weights that step mode merges into; train a fresh adapter, or set beta=0.0"
            )
    if kind == "ref_model" and getattr(trainer.args, "sync_ref_model", False):
        raise ValueError(
            "sync_ref_model=True moves the KL reference on TRL's own schedule, while step mode "
            f"promises reference={reference!r}; set sync_ref_model=False (reference='merged' moves "
            "the reference to G at every merge)"
        )
    return kind


def planned_merges(max_steps: int, every: int) -> int:
    """Merges in a run of `max_steps` optimizer steps: one every `every` steps, plus a final one."""
    return math.ceil(max_steps / every)


def stale_generation_warning(trainer, every: int) -> str | None:
    """Why completions generated before a merge would be trained on after it, if they would:
    GRPO/RLOO reuse one generation for `steps_per_generation * num_iterations` micro-steps."""
    steps_per_generation = getattr(trainer.args, "steps_per_generation", None)
    if steps_per_generation is None:
        return None
    generate_every = steps_per_generation * getattr(trainer, "num_iterations", 1)
    merge_span = every * trainer.args.gradient_accumulation_steps
    if merge_span % generate_every == 0:
        return None
    return (
        f"merge_every_steps={every} x gradient_accumulation_steps="
        f"{trainer.args.gradient_accumulation_steps} micro-steps is not a multiple of the "
        f"{generate_every} micro-steps one generation is reused for (steps_per_generation x "
        "num_iterations): some completions generated before a merge are trained on after it"
    )


def is_identity_merge(config: MergeConfig, merge_index: int) -> bool:
    """Whether merge `merge_index` is the identity (linear, every ratio exactly 1): full
    fine-tuning then skips the arithmetic, which would round theta0 + (theta - theta0)."""
    ratio_map = config.ratio_map(merge_index)
    ratios = [ratio_map.default, *(rule.ratio for rule in ratio_map.rules)]
    return merge_method(config.method).keeps_every_element and all(r == 1.0 for r in ratios)


def merge_can_overflow(config: MergeConfig, merge_index: int) -> bool:
    """Whether merged elements can leave the range between theta0 and theta (a ratio above 1,
    or DARE's 1/density rescaling taking it there), so finite inputs could merge to Inf."""
    ratio_map = config.ratio_map(merge_index)
    largest = max([ratio_map.default, *(rule.ratio for rule in ratio_map.rules)])
    if merge_method(config.method).rescale:
        largest /= config.density
    return largest > 1.0
