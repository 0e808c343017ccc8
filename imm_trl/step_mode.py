"""Step mode: IMM inside an ordinary TRL run (SFT, GRPO, RLOO), merging back every N steps.

    trainer.add_callback(IMMCallback(trainer, IMMConfig(merge_every_steps=N, merge_ratio=0.5)))
    trainer.train()

Every `merge_every_steps` optimizer steps, and once more at the end of training if steps were
taken since the last merge, the model becomes `G = theta0 + alpha * M(theta - theta0)` (merge k
uses entry k of a `merge_ratio` schedule). The trainer keeps its own data, generation, optimizer
and LR schedule; there is no rejection sampling and no takeover of `trainer.train`.

- LoRA: the adapter is merged into the base and re-initialised (`LoraMerger`), and its optimizer
  state is cleared (moments of an adapter that was just re-initialised mean nothing). QLoRA keeps
  a master copy of G, as in iteration mode.
- Full fine-tuning: merged in place (`FullWeightMerger`); the optimizer state is kept unless
  `reset_optimizer_on_merge`.
- Generation: HF generation uses the model itself. TRL's vLLM backends reload weights when
  `trainer._last_loaded_step != state.global_step`; a merge resets that marker so the next
  generation reloads even if the step counter has not moved (the final merge, then `evaluate`).
- KL reference (beta > 0): with LoRA, TRL disables the adapter on the same model, so after a
  merge the reference is G (`reference="merged"`; keeping theta0 would need a second full copy,
  refused). With full fine-tuning TRL keeps a separate `ref_model` loaded from the model's path:
  `reference="theta0"` leaves it there, `reference="merged"` copies G into it after each merge.
- Resume: beside each trainer checkpoint, `checkpoint-<step>/imm_step/` holds theta0, the merge
  state and, for LoRA, the merged base weights (the trainer saves only the adapter), and the
  moved reference; `trainer.train(resume_from_checkpoint=...)` restores them.

The checks and the merge plan live in `imm_trl.step_mode_checks`. What stays here (over 400
lines) is one callback: its merge, metrics and checkpoint save/restore read and write the same
state (merger, merge count, theta0 file, reference), and splitting them would hand that state
between modules instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from imm_trl.checkpoints import is_peft_model
from imm_trl.distributed import whole_parameters
from imm_trl.files import (
    publish_directory,
    staging_directory,
    write_atomically,
    write_json_atomically,
)
from imm_trl.merging import merger_for
from imm_trl.merging.quantization import unpack_cpu_4bit_weights
from imm_trl.step_mode_checks import (
    check_reference,
    check_supported_trainer,
    is_identity_merge,
    merge_can_overflow,
    planned_merges,
    stale_generation_warning,
)

logger = logging.getLogger(__name__)

STEP_DIR = "imm_step"  # inside each trainer checkpoint
STEP_STATE_FILE = "state.json"
THETA0_FILE = "theta0.safetensors"
MERGED_BASE_FILE = "merged_base.safetensors"
REFERENCE_FILE = "reference.safetensors"
STEP_METRICS_FILE = "step_metrics.json"
# -- the weights a merge reads and writes ----------------------------------------------------


def theta0_tensors(merger) -> dict[str, torch.Tensor]:
    """theta0 of every weight the merger writes, by name (step mode never moves the anchor)."""
    return merger.anchor_tensors()


def effective_weights(model, merger) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, theta0, weight the model computes with) for every weight the merger writes; for
    LoRA the base (or QLoRA master) plus the adapter's delta."""
    return merger.anchored_weights(model)


@torch.no_grad()
def distance_to_theta0(weights) -> tuple[float, list[str]]:
    """L2 distance of the weights to theta0 over all of them, and the names of non-finite ones."""
    total, nonfinite = 0.0, []
    for name, theta0, current in weights:
        if not torch.isfinite(current).all():
            nonfinite.append(name)
            continue
        difference = current.float() - theta0.to(current.device).float()
        total += torch.linalg.vector_norm(difference, dtype=torch.float64).item() ** 2
    return math.sqrt(total), nonfinite


def clear_optimizer_state(optimizer, params) -> int:
    """Drop the optimizer's state (e.g. AdamW moments and step) of `params`; returns how many had
    some. The optimizer starts them afresh at its next step."""
    cleared = 0
    for param in params:
        cleared += optimizer.state.pop(param, None) is not None
    return cleared


@torch.no_grad()
def copy_weights_(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy each parameter of `source` into the same-named parameter of `target`."""
    target_params = dict(target.named_parameters())
    missing = [name for name, _ in source.named_parameters() if name not in target_params]
    if missing:
        raise ValueError(
            f"the reference model lacks parameters {missing[:3]}; it cannot be moved to G"
        )
    for name, param in source.named_parameters():
        target_params[name].copy_(param)


def savable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory with each other (as safetensors requires)."""
    result, storages = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if pointer in storages else tensor
        storages.add(pointer)
    return result


def link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link `source` to `destination` (no extra disk), else copy it."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def setting_changes(saved: dict, current: dict) -> list[str]:
    """'name: old -> new' for each setting that differs."""
    return [
        f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    ]


# -- the engine ----------------------------------------------------------------------------


class StepMerging:
    """Merge a trainer's model back into theta0 every N optimizer steps (driven by `IMMCallback`).

    Args:
        trainer: A TRL `SFTTrainer`, `GRPOTrainer` or `RLOOTrainer`, built as usual.
        config: The `IMMConfig`, with `merge_every_steps` set.

    Attributes:
        merge_count: Merges done so far (merge k used schedule entry k).
        last_merge_step: The trainer's `global_step` at the last merge (0 before the first).
        history: One row of metrics per merge, as written to `<output_dir>/step_metrics.json`.
    """

    def __init__(self, trainer, config):

        check_supported_trainer(trainer)
        self.trainer, self.config = trainer, config
        self.every = config.merge_every_steps
        self.output_dir = Path(config.output_dir or Path(trainer.args.output_dir) / "imm")
        self.reference_kind = check_reference(trainer, config.reference)
        self.merge_count, self.last_merge_step = 0, 0
        self.history: list[dict[str, Any]] = []
        self._theta0_file_written = False
        model = trainer.model
        self.is_lora = is_peft_model(model)
        unpack_cpu_4bit_weights(model)  # theta0 must be read from plain 4-bit weights
        with whole_parameters(model):
            self.merger = merger_for(model, config.merge_config_for(model), reset_seed=config.seed)
            bad = [
                name
                for name, t in theta0_tensors(self.merger).items()
                if not torch.isfinite(t).all()
            ]
        if bad:
            raise ValueError(
                f"theta0 already holds NaN/Inf in {bad[:3]}: every merge would spread them. Load a "
                "clean checkpoint of the model"
            )

    @property
    def settings(self) -> dict[str, Any]:
        """What must match for a resume to continue this run."""
        config = self.config
        values = {
            "merge_every_steps": self.every,
            "merge_method": config.merge_method,
            "merge_ratio": config.merge_ratio,
            "density": config.merge_config.density,
            "seed": config.seed,
            "reference": config.reference,
            "reset_optimizer_on_merge": config.reset_optimizer_on_merge,
            "lora": self.is_lora,
        }
        return json.loads(json.dumps(values))

    # -- trainer events --------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self.restore(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STEP_DIR)
        else:
            self.merge_count, self.last_merge_step, self.history = 0, 0, []
        self.check_run_length(state.max_steps)
        warning = stale_generation_warning(self.trainer, self.every)
        if warning:
            logger.warning(warning)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step - self.last_merge_step >= self.every:
            self.merge(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step > self.last_merge_step:
            self.merge(state.global_step, final=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and logs.get("reward") is not None and self.history:
            self.attach_rewards(state.log_history)

    def on_save(self, args, state, control, **kwargs):
        self.save(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STEP_DIR)

    # -- merging ---------------------------------------------------------------------------

    def check_run_length(self, max_steps: int) -> None:
        """Refuse a schedule too short for the run's merges; warn about a step count that
        leaves only the final merge."""
        merges = planned_merges(max_steps, self.every)
        schedule = self.config.merge_ratio
        if isinstance(schedule, (list, tuple)) and len(schedule) < merges:
            raise ValueError(
                f"merge_ratio schedule has {len(schedule)} entries but this run merges {merges} times "
                f"(max_steps={max_steps}, merge_every_steps={self.every}, plus a final merge when "
                "steps remain); give one entry per merge"
            )
        if self.every > max_steps:
            logger.warning(
                "merge_every_steps=%d exceeds the run's %d steps: the only merge is the final one",
                self.every,
                max_steps,
            )

    def merge(self, step: int, final: bool = False) -> dict[str, Any]:
        """Merge the model back into theta0 (merge `merge_count + 1`), then reset the optimizer
        state it invalidates, move a 'merged' KL reference, force the next generation to load
        the weights, and record the metrics. Raises (weights left as they were) if theta or
        the merged weights are not finite."""

        trainer, model, index = self.trainer, self.trainer.model, self.merge_count + 1
        start = time.perf_counter()
        with whole_parameters(model):
            unpack_cpu_4bit_weights(model)
            before, nonfinite = distance_to_theta0(effective_weights(model, self.merger))
            if nonfinite:
                raise FloatingPointError(
                    f"merge {index} at step {step}: the trained weights hold NaN/Inf ({nonfinite[:3]}); "
                    "nothing was merged. Lower the learning rate, keep max_grad_norm > 0, or train in "
                    "fp32 (bf16=False)"
                )
            after = self._merge_in_place(index, before)
        optimizer = trainer.optimizer
        if optimizer is not None and (self.is_lora or self.config.reset_optimizer_on_merge):
            clear_optimizer_state(optimizer, [p for p in model.parameters() if p.requires_grad])
        if self.config.reference == "merged" and self.reference_kind == "ref_model":
            reference = trainer.accelerator.unwrap_model(trainer.ref_model)
            with whole_parameters(model, modify=False), whole_parameters(reference):
                copy_weights_(model, reference)
        if hasattr(trainer, "_last_loaded_step"):
            trainer._last_loaded_step = -1  # TRL's vLLM sync marker: reload even at the same step
        self.merge_count, self.last_merge_step = index, step
        row = {
            "merge": index,
            "step": step,
            "final": final,
            "l2_to_theta0_before": before,
            "l2_to_theta0_after": after,
            "reward_before": None,
            "reward_after": None,
            "seconds": time.perf_counter() - start,
        }
        self.history.append(row)
        self.write_metrics()
        self.attach_rewards(trainer.state.log_history)
        self.log({k: v for k, v in row.items() if k not in ("reward_before", "reward_after")})
        return row

    def _merge_in_place(self, index: int, before: float) -> float:
        """Run merge `index` (identity merges of full weights skipped) and return the merged
        weights' distance to theta0; on a non-finite result put the previous weights back and
        raise."""
        model = self.trainer.model
        if not self.is_lora and is_identity_merge(self.merger.config, index):
            return before
        snapshot = None
        if merge_can_overflow(self.merger.config, index):
            snapshot = self.merger.state_tensors(model)
        self.merger.merge(model, iteration=index, reset=True)
        after, nonfinite = distance_to_theta0(effective_weights(model, self.merger))
        if nonfinite:
            if snapshot is not None:
                self.merger.load_state_tensors(model, snapshot)
            raise FloatingPointError(
                f"merge {index} overflowed to NaN/Inf in {nonfinite[:3]} (a ratio above 1, or DARE's "
                f"1/density rescaling); the weights were "
                f"{'restored to theta' if snapshot is not None else 'left merged'}. Lower merge_ratio "
                "or raise density"
            )
        return after

    # -- metrics ---------------------------------------------------------------------------

    def attach_rewards(self, log_history: list[dict[str, Any]]) -> None:
        """Fill each merge's reward_before (the last training reward logged at or before its
        step, after the previous merge) and reward_after (the first logged after it) from the
        trainer's log history; write what changed, and log each reward_after once known."""
        rewards = [(e["step"], e["reward"]) for e in log_history if e.get("reward") is not None]
        changed, newly_complete = False, []
        for position, row in enumerate(self.history):
            previous_step = self.history[position - 1]["step"] if position else 0
            before = [r for s, r in rewards if previous_step < s <= row["step"]]
            after = [(s, r) for s, r in rewards if s > row["step"]]
            if before and row["reward_before"] != before[-1]:
                row["reward_before"], changed = before[-1], True
            if row["reward_after"] is None and after:
                row["reward_after"], row["reward_after_step"] = after[0][1], after[0][0]
                newly_complete.append(row)
        if changed or newly_complete:
            self.write_metrics()
        for row in newly_complete:
            self.log(
                {
                    "merge": row["merge"],
                    "reward_before_merge": row["reward_before"],
                    "reward_after_merge": row["reward_after"],
                }
            )

    def log(self, metrics: dict[str, Any]) -> None:
        """Send imm/* metrics to the trainer's loggers (report_to) and log history. The base
        `Trainer.log` is called, since TRL's own `log` would flush and clear its averaged metrics;
        and `should_log` is kept, since every log event clears it and this one may come from
        inside a step that is due to log."""
        from transformers import Trainer

        values = {f"imm/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        control = self.trainer.control
        should_log = control.should_log
        Trainer.log(self.trainer, values)
        control.should_log = should_log

    def write_metrics(self) -> None:
        """Rewrite `<output_dir>/step_metrics.json` (main process)."""
        if self.trainer.is_world_process_zero():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomically(self.output_dir / STEP_METRICS_FILE, self.history)

    # -- checkpoints -----------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Publish this run's step-mode state beside the trainer checkpoint that holds
        `directory`: theta0 (hard-linked to one file per run), the merge state, LoRA's merged
        base weights and a moved reference. Collective; the main process writes."""
        trainer = self.trainer
        with whole_parameters(trainer.model, modify=False):
            if trainer.is_world_process_zero():
                theta0_file = self._theta0_file()
                with staging_directory(directory) as staging:
                    link_or_copy(theta0_file, staging / THETA0_FILE)
                    if self.is_lora:
                        save_file(savable(self.merger.merged_tensors(trainer.model)), staging / MERGED_BASE_FILE)
                    if (
                        self.merge_count
                        and self.config.reference == "merged"
                        and self.reference_kind == "ref_model"
                    ):
                        reference = trainer.accelerator.unwrap_model(trainer.ref_model)
                        with whole_parameters(reference, modify=False):
                            save_file(
                                savable(dict(reference.named_parameters())),
                                staging / REFERENCE_FILE,
                            )
                    state = {
                        "merge_count": self.merge_count,
                        "last_merge_step": self.last_merge_step,
                        "settings": self.settings,
                        "history": self.history,
                    }
                    (staging / STEP_STATE_FILE).write_text(json.dumps(state, indent=2))
                    publish_directory(staging, directory)
        trainer.accelerator.wait_for_everyone()

    def _theta0_file(self) -> Path:
        """`<output_dir>/theta0.safetensors`, written (atomically) once per process: checkpoints
        hard-link it, so each holds theta0 without another copy on disk."""
        path = self.output_dir / THETA0_FILE
        if not self._theta0_file_written:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tensors = savable(theta0_tensors(self.merger))
            write_atomically(path, lambda temporary: save_file(tensors, str(temporary)))
            self._theta0_file_written = True
        return path

    @torch.no_grad()
    def restore(self, directory: Path) -> None:
        """Continue the run saved in `directory` (at `on_train_begin` of a resumed run, after the
        trainer restored theta): its theta0, merge count, merged base weights and reference."""
        state_file = directory / STEP_STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(
                f"the trainer resumed at step {directory.parent.name.split('-')[-1]} but {directory} holds "
                "no step-mode IMM state; resume from a checkpoint this run saved in args.output_dir "
                "(resume_from_checkpoint=True takes the newest), or start a fresh run"
            )
        saved = json.loads(state_file.read_text())
        changes = setting_changes(saved["settings"], self.settings)
        if changes:
            raise ValueError(
                f"resume: this run's step-mode settings differ from the checkpoint's ({directory}): "
                + "; ".join(changes)
                + ". Resume with the same IMMConfig and model setup, or start a new output_dir"
            )
        model, trainer = self.trainer.model, self.trainer
        with whole_parameters(model):
            self._restore_theta0(load_file(directory / THETA0_FILE), directory)
            if self.is_lora:  # the trainer's adapter-only checkpoint lacks the merged base
                merged = load_file(directory / MERGED_BASE_FILE)
                self.merger.load_merged_tensors(model, merged)
        if (directory / REFERENCE_FILE).is_file() and self.reference_kind == "ref_model":
            reference = trainer.accelerator.unwrap_model(trainer.ref_model)
            tensors = load_file(directory / REFERENCE_FILE)
            with whole_parameters(reference):
                for name, param in reference.named_parameters():
                    param.copy_(tensors[name])
        self.merge_count, self.last_merge_step = saved["merge_count"], saved["last_merge_step"]
        self.history = saved["history"]
        self.write_metrics()
        logger.info(
            "step mode: resumed after merge %d (step %d) from %s",
            self.merge_count,
            self.last_merge_step,
            directory,
        )

    def _restore_theta0(self, saved: dict[str, torch.Tensor], directory: Path) -> None:
        """Use the checkpoint's theta0 wherever the model this process started from differs."""
        current = theta0_tensors(self.merger)
        if set(saved) != set(current):
            raise ValueError(
                f"{directory / THETA0_FILE} holds theta0 of other weights ({sorted(set(saved) ^ set(current))[:3]}); "
                "resume with the same model and LoRA configuration"
            )
        differing = [
            name for name, tensor in current.items() if not torch.equal(tensor.cpu(), saved[name])
        ]
        if not differing:
            return
        logger.warning(
            "step mode: the model this run started from differs from the checkpoint's theta0 in %d "
            "weights (e.g. %s); continuing with the checkpoint's theta0",
            len(differing),
            differing[0],
        )
        self.merger.load_anchor_tensors({**current, **{name: saved[name] for name in differing}})
