"""`IMMCallback`: Iterative Model Merging added to an unmodified TRL `SFTTrainer`.

    trainer.add_callback(IMMCallback(trainer, IMMConfig(...)))
    trainer.train()   # runs all T iterations

Each iteration t: sample k answers per question with the merged model G_{t-1}, keep the
verified ones (D_t), train on D_t (fresh adapter, optimizer and LR schedule, by default),
merge with theta0 at the ratio (G_t = theta0 + alpha * M(theta_t^SFT - theta0)), hand G_t to
the sampler (a vLLM engine reloads its weights in place), score the eval sets, log, and write
a checkpoint from which `resume=True` continues.

Under `accelerate launch` every process runs the same loop: each samples its share of the
questions (`imm_trl.distributed.ShardedSampler`), all build the same D_t, the trainer splits it
for training as usual, the merge gives the same weights everywhere, and only the main process
writes files.

Why the callback takes over `trainer.train`: HF's Trainer builds its dataloader and step
budget before the first callback event fires, so a callback alone cannot train on data that
only exists once sampling has run. The callback therefore binds its own `train` on the
trainer instance; each iteration is one ordinary `Trainer.train()` call on D_t, so every
trainer feature (report_to, accelerate, PEFT, quantization) works as usual inside it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from imm_trl.config import IMMConfig
from imm_trl.distributed import whole_parameters
from imm_trl.files import write_json_atomically
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


def unpack_cpu_4bit_weights(model) -> int:
    """Undo bitsandbytes' CPU inference packing of 4-bit weights; returns how many it unpacked.

    On a CPU with avx512_bf16, a `Linear4bit` run in eval mode without grad (as generation
    does) repacks its weight for a faster CPU kernel and keeps it packed. That kernel has no
    backward, so training afterwards silently gets zero gradients (bitsandbytes 0.50, measured:
    grad_norm 0 after one `generate`). Sampling then training is exactly IMM's loop, so the
    weights are unpacked before every training run and every merge.
    """
    try:
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    unpacked = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            unpacked += 1
    return unpacked


def merged_state_dict(model, masters: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights the model computes with, named as in a plain transformers checkpoint: what a
    sampler with its own copy of the model (vLLM) must load after a merge.

    For a PEFT model this is the base model (the adapter was reset after the merge, so B = 0
    and it adds nothing) without the LoRA factors, `modules_to_save` by their trained copy, and
    each bitsandbytes-quantized weight by its master copy from `masters` (else dequantized).
    """
    from imm_trl.merging.lora import dequantize, is_quantized

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
    a separate engine (vLLM) can start; written atomically."""
    config = model.get_base_model().config if is_peft_model(model) else model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)  # the engine gets dense (dequantized) weights
    staging = Path(tempfile.mkdtemp(prefix=".sampler-model.", dir=directory.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2))
        weights = merged_state_dict(model)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / "model.safetensors")
        tokenizer.save_pretrained(staging)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


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


def checkpoint_tensors(model, merger) -> dict[str, torch.Tensor]:
    """What an iteration checkpoint holds: the parameters of `state_parameter_names` and, for
    QLoRA, each quantized weight's master copy (the truth; the 4/8-bit weight is its rounding).
    Whole tensors only where the model's parameters are whole (inside `whole_parameters`)."""
    params = dict(model.named_parameters())
    tensors = {name: params[name] for name in state_parameter_names(model)}
    for target in getattr(merger, "targets", {}).values():
        if target.quantized:
            tensors[MASTER_PREFIX + target.name] = target.master
    return tensors


@torch.no_grad()
def restore_checkpoint_tensors(model, merger, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy a checkpoint's tensors (`checkpoint_tensors`) back into the model and the merger's
    master copies, in place."""
    from imm_trl.merging.lora import requantize

    params = dict(model.named_parameters())
    masters = {t.name: t for t in getattr(merger, "targets", {}).values() if t.quantized}
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


def last_checkpoint(directory: Path) -> Path | None:
    """The completed iteration checkpoint with the highest iteration number, if any."""
    done = [p for p in directory.glob("iteration-*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


@contextmanager
def timed(timings: dict[str, float], key: str):
    start = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


class IMMCallback(TrainerCallback):
    """Drop-in IMM for a TRL `SFTTrainer` (LoRA via `peft_config`, QLoRA, or full fine-tuning).

    Args:
        trainer: The `SFTTrainer`, built as usual; its `train_dataset` is replaced by D_t.
        config: The `IMMConfig`.
        sampler: Any `Sampler`; default the backend `config.sampler` names, over the trainer's
            model (HF `generate`) or over a vLLM engine started from the model's weights.
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
        unpack_cpu_4bit_weights(model)  # theta0 must be read from plain 4-bit weights
        with whole_parameters(model):
            if is_peft_model(model):
                self.merger = LoraMerger(model, config.merge_config, reset_seed=config.seed)
            else:
                self.merger = FullWeightMerger(model, config.merge_config)
        self.sampler = sampler or self._default_sampler()
        if trainer.accelerator.num_processes > 1:
            from imm_trl.distributed import ShardedSampler

            self.sampler = ShardedSampler(self.sampler, trainer.accelerator)
        self._train_one_iteration = trainer.train
        trainer.train = self.train

    def _default_sampler(self):
        tokenizer = self.trainer.processing_class
        if self.config.sampler == "vllm":
            from imm_trl.sampling import VLLMSampler

            model_dir = self.output_dir / f"sampler-model-rank{self.trainer.accelerator.process_index}"
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with whole_parameters(self.trainer.model, modify=False):
                save_merged_model(model_dir, self.trainer.model, tokenizer)
            return VLLMSampler(model_dir, tokenizer, self.config.sampler_config_class()(**self.config.sampler_kwargs))
        from imm_trl.sampling import HFSampler

        return HFSampler(self.trainer.model, tokenizer, self.config.sampler_config_class()(**self.config.sampler_kwargs))

    # -- callback events -------------------------------------------------------------------

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._train_losses.append(float(logs["loss"]))

    # -- the loop --------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        """Run all remaining IMM iterations; returns the last iteration's `TrainOutput`."""
        output = None
        first = self._first_iteration()
        if first > 1:
            self.refresh_sampler()  # a separate engine must see the restored weights
        if first == 1 and self.config.eval_sets and self.config.eval_at_start:
            self.record({"iteration": 0, **self.evaluate()})
        for iteration in range(first, self.config.iterations + 1):
            output = self.run_iteration(iteration)
        return output

    def run_iteration(self, iteration: int):
        trainer, config = self.trainer, self.config
        timings: dict[str, float] = {}
        with timed(timings, "sampling"):
            dataset, sampling_stats = self.build_dataset(iteration)
        if len(dataset) == 0:
            raise RuntimeError(
                f"iteration {iteration}: no verified-correct completion among "
                f"{config.samples_per_question} samples per question; raise samples_per_question, "
                "use an easier task, or mix in gold solutions with real_data_ratio > 0"
            )
        with timed(timings, "train"):
            trainer.train_dataset = trainer._prepare_dataset(
                dataset, trainer.processing_class, trainer.args, trainer.args.packing, None, "train"
            )
            if config.epochs_per_iteration is not None:
                trainer.args.num_train_epochs = config.epochs_per_iteration
            if config.reset_optimizer:
                trainer.optimizer, trainer.lr_scheduler = None, None
            self._train_losses = []
            unpack_cpu_4bit_weights(trainer.model)
            output = self._train_one_iteration()
        with timed(timings, "merge"), whole_parameters(trainer.model):
            if is_peft_model(trainer.model):
                self.merger.merge(trainer.model, iteration=iteration, reset=config.reset_adapter)
            else:
                self.merger.merge(trainer.model, iteration=iteration)
        with timed(timings, "sampler_refresh"):
            self.refresh_sampler()
        with timed(timings, "eval"):
            eval_metrics = self.evaluate() if config.eval_sets else {}
        metrics = {
            "iteration": iteration,
            "train_loss": sum(self._train_losses) / max(len(self._train_losses), 1),
            **{f"sampling/{k}": v for k, v in sampling_stats.items()},
            **eval_metrics,
        }
        with timed(timings, "checkpoint"):
            with whole_parameters(trainer.model, modify=False):  # collective; rank 0 writes
                if trainer.is_world_process_zero():
                    self._save(iteration, [*self.history, metrics])
            trainer.accelerator.wait_for_everyone()
        metrics.update({f"seconds/{k}": v for k, v in timings.items()})
        metrics["seconds/iteration"] = sum(timings.values())
        self.record(metrics)
        return output

    def record(self, metrics: dict[str, Any]) -> None:
        """Keep one iteration's metrics: in `history`, in the JSON metrics file, and through the
        trainer's loggers (`report_to`) as imm/*."""
        self.history.append(metrics)
        if self.trainer.is_world_process_zero():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomically(self.output_dir / METRICS_FILE, self.history)
        self.trainer.log({f"imm/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})

    def build_dataset(self, iteration: int):
        """D_t: sample with the current merged model, keep verified-correct answers."""
        from imm_trl.rejection import RejectionSampler

        result = RejectionSampler(self.sampler, self.config.rejection_config(iteration)).run(
            self.config.questions
        )
        self.last_dataset = result.dataset
        return result.dataset, result.stats.as_dict()

    def refresh_sampler(self) -> None:
        """Give a sampler with its own copy of the weights (vLLM) the merged model G_t; an HF
        sampler generates with the trainer's model itself and needs nothing."""
        if hasattr(self.sampler, "update_weights"):
            masters = {t.name: t.master for t in getattr(self.merger, "targets", {}).values() if t.quantized}
            with whole_parameters(self.trainer.model, modify=False):
                self.sampler.update_weights(merged_state_dict(self.trainer.model, masters))

    def evaluate(self) -> dict[str, float]:
        """Score every eval set with the current (merged) model: eval/<set>/<metric>."""
        from imm_trl.eval import evaluate_question_set

        config, metrics = self.config, {}
        for name, question_set in config.eval_sets.items():
            scores = evaluate_question_set(
                self.sampler, question_set, samples=config.eval_samples,
                temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=config.seed,
            )
            metrics.update({f"eval/{name}/{k}": v for k, v in scores.items()})
        return metrics

    # -- checkpoints -------------------------------------------------------------------------

    def _save(self, iteration: int, history: list[dict[str, Any]]) -> None:
        state = {"iteration": iteration, "history": history}
        write_checkpoint(self.output_dir, iteration, checkpoint_tensors(self.trainer.model, self.merger), state)

    def _first_iteration(self) -> int:
        if not self.config.resume:
            return 1
        checkpoint = last_checkpoint(self.output_dir)
        if checkpoint is None:
            return 1
        state = json.loads((checkpoint / STATE_FILE).read_text())
        with whole_parameters(self.trainer.model):  # every process loads; shards rewritten
            restore_checkpoint_tensors(
                self.trainer.model, self.merger, load_file(checkpoint / WEIGHTS_FILE), checkpoint
            )
        self.history = state["history"]
        return state["iteration"] + 1
