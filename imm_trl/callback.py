"""`IMMCallback`: Iterative Model Merging added to an unmodified TRL `SFTTrainer`.

    trainer.add_callback(IMMCallback(trainer, IMMConfig(...)))
    trainer.train()   # runs all T iterations

Each iteration t: sample k answers per question with the merged model G_{t-1}, keep the
verified ones (D_t), train on D_t (fresh adapter, optimizer and LR schedule, by default),
merge with theta0 at the ratio (G_t = theta0 + alpha * M(theta_t^SFT - theta0)), log, and
write a checkpoint from which `resume=True` continues.

Why the callback takes over `trainer.train`: HF's Trainer builds its dataloader and step
budget before the first callback event fires, so a callback alone cannot train on data that
only exists once sampling has run. The callback therefore binds its own `train` on the
trainer instance; each iteration is one ordinary `Trainer.train()` call on D_t, so every
trainer feature (report_to, accelerate, PEFT, quantization) works as usual inside it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from imm_trl.config import IMMConfig
from imm_trl.merging import FullWeightMerger, LoraMerger

STATE_FILE = "imm_state.json"
WEIGHTS_FILE = "merged_weights.safetensors"
METRICS_FILE = "imm_metrics.json"
MASTER_PREFIX = "imm_master::"


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


def write_checkpoint(directory: Path, iteration: int, weights: dict[str, torch.Tensor], state: dict) -> None:
    """Write `iteration-<t>/` atomically: a temporary directory renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"iteration-{iteration}"
    staging = Path(tempfile.mkdtemp(prefix=f".iteration-{iteration}.", dir=directory))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / WEIGHTS_FILE)
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def last_checkpoint(directory: Path) -> Path | None:
    """The completed iteration checkpoint with the highest iteration number, if any."""
    done = [p for p in directory.glob("iteration-*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class IMMCallback(TrainerCallback):
    """Drop-in IMM for a TRL `SFTTrainer` (LoRA via `peft_config`, QLoRA, or full fine-tuning).

    Args:
        trainer: The `SFTTrainer`, built as usual; its `train_dataset` is replaced by D_t.
        config: The `IMMConfig`.
        sampler: Any `Sampler`; default an HF `generate` sampler over the trainer's model.
    """

    def __init__(self, trainer, config: IMMConfig, sampler=None):
        if config.questions is None:
            raise ValueError("IMMConfig.questions is empty: give the in-domain training questions")
        self.trainer = trainer
        self.config = config
        self.output_dir = Path(config.output_dir or Path(trainer.args.output_dir) / "imm")
        self.history: list[dict[str, Any]] = []
        self._train_losses: list[float] = []
        model = trainer.model
        if is_peft_model(model):
            self.merger = LoraMerger(model, config.merge_config, reset_seed=config.seed)
        else:
            self.merger = FullWeightMerger(model, config.merge_config)
        self.sampler = sampler or self._default_sampler()
        self._train_one_iteration = trainer.train
        trainer.train = self.train

    def _default_sampler(self):
        from imm_trl.sampling import HFSampler

        return HFSampler(self.trainer.model, self.trainer.processing_class)

    # -- callback events -------------------------------------------------------------------

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._train_losses.append(float(logs["loss"]))

    # -- the loop --------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        """Run all remaining IMM iterations; returns the last iteration's `TrainOutput`."""
        output = None
        for iteration in range(self._first_iteration(), self.config.iterations + 1):
            output = self.run_iteration(iteration)
        return output

    def run_iteration(self, iteration: int):
        trainer, config = self.trainer, self.config
        dataset, sampling_stats = self.build_dataset(iteration)
        if len(dataset) == 0:
            raise RuntimeError(
                f"iteration {iteration}: no verified-correct completion among "
                f"{config.samples_per_question} samples per question; raise samples_per_question, "
                "use an easier task, or mix in gold solutions with real_data_ratio > 0"
            )
        trainer.train_dataset = trainer._prepare_dataset(
            dataset, trainer.processing_class, trainer.args, trainer.args.packing, None, "train"
        )
        if config.epochs_per_iteration is not None:
            trainer.args.num_train_epochs = config.epochs_per_iteration
        if config.reset_optimizer:
            trainer.optimizer, trainer.lr_scheduler = None, None
        self._train_losses = []
        output = self._train_one_iteration()
        if is_peft_model(trainer.model):
            self.merger.merge(trainer.model, iteration=iteration, reset=config.reset_adapter)
        else:
            self.merger.merge(trainer.model, iteration=iteration)
        metrics = {
            "iteration": iteration,
            "train_loss": sum(self._train_losses) / max(len(self._train_losses), 1),
            **{f"sampling/{k}": v for k, v in sampling_stats.items()},
        }
        self.history.append(metrics)
        trainer.log({f"imm/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        if trainer.is_world_process_zero():
            self._save(iteration)
        return output

    def build_dataset(self, iteration: int):
        """D_t: sample with the current merged model, keep verified-correct answers."""
        from imm_trl.rejection import RejectionSampler

        result = RejectionSampler(self.sampler, self.config.rejection_config(iteration)).run(
            self.config.questions
        )
        self.last_dataset = result.dataset
        return result.dataset, result.stats.as_dict()

    # -- checkpoints -------------------------------------------------------------------------

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        params = dict(self.trainer.model.named_parameters())
        tensors = {name: params[name] for name in state_parameter_names(self.trainer.model)}
        for target in getattr(self.merger, "targets", {}).values():
            if target.quantized:  # QLoRA: the bf16 master is the truth, the 4/8-bit copy its rounding
                tensors[MASTER_PREFIX + target.name] = target.master
        return tensors

    @torch.no_grad()
    def _restore(self, tensors: dict[str, torch.Tensor], source: Path) -> None:
        from imm_trl.merging.lora import requantize

        params = dict(self.trainer.model.named_parameters())
        masters = {t.name: t for t in getattr(self.merger, "targets", {}).values() if t.quantized}
        unknown = [n for n in tensors if n not in params and n.removeprefix(MASTER_PREFIX) not in masters]
        if unknown:
            raise ValueError(
                f"checkpoint {source} holds weights {unknown[:3]} that this model lacks; "
                "resume with the same model and LoRA configuration"
            )
        for name, tensor in tensors.items():
            if name.startswith(MASTER_PREFIX):
                target = masters[name.removeprefix(MASTER_PREFIX)]
                target.master.copy_(tensor)
                requantize(target.base_layer, target.master)
            else:
                params[name].copy_(tensor)

    def _save(self, iteration: int) -> None:
        weights = self._checkpoint_tensors()
        state = {"iteration": iteration, "history": self.history}
        write_checkpoint(self.output_dir, iteration, weights, state)
        write_json_atomically(self.output_dir / METRICS_FILE, self.history)

    def _first_iteration(self) -> int:
        if not self.config.resume:
            return 1
        checkpoint = last_checkpoint(self.output_dir)
        if checkpoint is None:
            return 1
        state = json.loads((checkpoint / STATE_FILE).read_text())
        self._restore(load_file(checkpoint / WEIGHTS_FILE), checkpoint)
        self.history = state["history"]
        return state["iteration"] + 1
