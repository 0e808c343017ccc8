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

Over 400 lines because the loop and its checkpoint/resume bookkeeping share one state (the
iteration, its phase timings, D_t, the merger's tensors); the pieces without that state live
elsewhere: checkpoint I/O and export (`checkpoints.py`), merging (`merging/`), sampling
(`sampling/`), the SFT speed-ups (`shared_prefix.py`, `trl_compat.py`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, set_seed

from imm_trl.adaptive import (
    candidate_label,
    check_no_overlap,
    greedy_accuracy,
    pick_candidate,
    retain_answers,
    retain_drift,
)
from imm_trl.checkpoints import (
    DATASET_FILE,
    METRICS_FILE,
    RETAIN_FILE,
    RUN_FILE,
    STATE_FILE,
    checkpoint_tensors,
    iteration_checkpoints,
    merged_state_dict,
    newest_intact_checkpoint,
    newest_trainer_checkpoint,
    read_dataset,
    restore_checkpoint_tensors,
    rotate_checkpoints,
    save_merged_model,
    work_directories,
    work_directory,
    write_checkpoint,
    write_dataset,
)
from imm_trl.config import IMMConfig
from imm_trl.distributed import whole_parameters
from imm_trl.files import remove_stale_staging, write_json_atomically
from imm_trl.fingerprint import differences, run_fingerprint
from imm_trl.merging import merger_for
from imm_trl.merging.quantization import unpack_cpu_4bit_weights
from imm_trl.sampling.base import as_sampler
from imm_trl.shared_prefix import share_prompt_prefixes
from imm_trl.trl_compat import score_labelled_positions_only
from imm_trl.validation import check_writable_dir

logger = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "IMMCallback", "unpack_cpu_4bit_weights"]


class NoVerifiedDataError(ValueError):
    """Rejection sampling kept nothing to train on."""


def no_verified_data_message(iteration: int, stats: dict[str, Any]) -> str:
    """Why D_t came out empty, with the counts that explain it."""
    malformed = stats.get("malformed_rows") or []
    examples = ", ".join(f"row {row}: {why}" for row, why in malformed[:3])
    return (
        f"iteration {iteration}: no verified-correct completion. Of {stats.get('questions', 0)} "
        f"questions {stats.get('usable_questions', 0)} were usable ({len(malformed)} malformed"
        f"{': ' + examples if examples else ''}); {stats.get('samples', 0)} samples, "
        f"{stats.get('correct_samples', 0)} correct, {stats.get('empty_completions', 0)} empty, "
        f"{stats.get('verifier_errors', 0)} verifier errors, {stats.get('timeouts', 0)} verifier "
        f"timeouts. Fix the malformed rows or the verifier if those counts are high; otherwise raise "
        f"samples_per_question, use an easier task, or mix in gold solutions with real_data_ratio > 0"
    )


class IMMCallback(TrainerCallback):
    """Drop-in IMM for a TRL `SFTTrainer` (LoRA via `peft_config`, QLoRA, or full fine-tuning).

    Args:
        trainer: The `SFTTrainer`, built as usual; its `train_dataset` is replaced by D_t.
        config: The `IMMConfig`.
        sampler: Any `Sampler` (an object with only `generate` works too: `as_sampler`);
            default the backend `config.sampler` names, over the trainer's model (HF
            `generate`) or over a vLLM engine started from the model's weights. A sampler the
            callback starts is closed by `close()`; one given to it is the caller's to close.

    With `config.merge_every_steps` set (step mode), it merges inside the trainer's own SFT,
    GRPO or RLOO run instead, every N steps (`imm_trl.step_mode`); `sampler` is not used.

    The output directory is checked before any engine starts: a fresh run refuses a directory
    holding another run (unless `overwrite`), and a resume refuses checkpoints whose fingerprint
    differs from this run's, naming each differing field (`imm_trl.fingerprint`).
    """

    step_merging = None  # step mode's engine (`imm_trl.step_mode`), when merge_every_steps is set
    sampler = None  # iteration mode's `Sampler`
    _owns_sampler = False  # whether `close` closes it: the callback started it, it was not given

    def __init__(self, trainer, config: IMMConfig, sampler=None):
        if config.merge_every_steps is not None:  # step mode: merge inside the trainer's own run
            from imm_trl.step_mode import StepMerging

            self.trainer, self.config = trainer, config
            self.step_merging = StepMerging(trainer, config)
            return
        if config.questions is None:
            raise ValueError("IMMConfig.questions is not set (None); give the in-domain training questions")
        if config.epochs_per_iteration is not None and trainer.args.max_steps > 0:
            raise ValueError(
                f"IMMConfig.epochs_per_iteration={config.epochs_per_iteration} would be ignored: the "
                f"trainer's max_steps={trainer.args.max_steps} decides how long each iteration trains; "
                "set one of them (max_steps=-1 to train by epochs)"
            )
        self.trainer = trainer
        self.config = config
        self.output_dir = Path(config.output_dir or Path(trainer.args.output_dir) / "imm")
        self.history: list[dict[str, Any]] = []
        self._train_losses: list[float] = []
        self._timings: dict[str, float] = {}
        self._iteration = 0
        self.training_questions, self.validation_questions = config.validation_split()
        check_no_overlap(self.validation_questions, config.eval_sets, config.question_column)
        self.retain_reference: list[str] | None = None
        model = trainer.model
        unpack_cpu_4bit_weights(model)  # theta0 must be read from plain 4-bit weights
        merge_config = config.merge_config_for(model)
        self.ratio_candidates = merge_config.ratio if config.auto_ratio else None
        with whole_parameters(model):
            self.merger = merger_for(model, merge_config, reset_seed=config.seed)
            self.fingerprint = run_fingerprint(trainer, config)
            self.completed_iterations = self._open_output_dir()
        self._sampler_model_dir: Path | None = None
        with self.phase("engine start"):
            self._owns_sampler = sampler is None
            self.sampler = self._default_sampler() if sampler is None else as_sampler(sampler)
        if trainer.accelerator.num_processes > 1:
            from imm_trl.distributed import ShardedSampler

            self.sampler = ShardedSampler(self.sampler, trainer.accelerator)
        self._train_one_iteration = trainer.train
        trainer.train = self.train

    def _default_sampler(self):
        tokenizer = self.trainer.processing_class
        settings = self.config.sampler_config_class()(**self.config.sampler_kwargs)
        if self.config.sampler == "vllm":
            from imm_trl.sampling import VLLMSampler

            model_dir = self.output_dir / f"sampler-model-rank{self.trainer.accelerator.process_index}"
            with whole_parameters(self.trainer.model, modify=False):
                save_merged_model(model_dir, self.trainer.model, tokenizer)
            self._sampler_model_dir = model_dir
            return VLLMSampler(model_dir, tokenizer, settings)
        from imm_trl.sampling import HFSampler

        return HFSampler(self.trainer.model, tokenizer, settings)

    # -- callback events -------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if self.step_merging is not None:
            self.step_merging.on_train_begin(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.step_merging is not None:
            self.step_merging.on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.step_merging is not None:
            return self.step_merging.on_log(args, state, control, logs=logs, **kwargs)
        if logs and "loss" in logs:
            self._train_losses.append(float(logs["loss"]))

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_merging is not None:
            return self.step_merging.on_step_end(args, state, control, **kwargs)
        # A trainer checkpoint at the last step of each iteration's SFT (when the user saves at
        # all), so that a crash in the merge, checkpoint write or eval does not redo training.
        if args.save_strategy != "no" and state.global_step >= state.max_steps:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if self.step_merging is not None:
            return self.step_merging.on_save(args, state, control, **kwargs)
        logger.info(
            "iteration %d/%d: trainer checkpoint (step %d)", self._iteration, self.config.iterations, state.global_step
        )

    # -- the loop --------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str):
        """Time one phase of the current iteration and announce it (log level INFO)."""
        logger.info("iteration %d/%d: %s", self._iteration, self.config.iterations, name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._timings[name] = self._timings.get(name, 0.0) + time.perf_counter() - start

    def train(self, *args, **kwargs):
        """Run all remaining IMM iterations; returns the last iteration's `TrainOutput`."""
        output = None
        if self.config.retain_prompts is not None:
            self.retain_reference = self._retain_reference()
        if self.completed_iterations > 0:
            self.refresh_sampler()  # a sampler given by the caller may hold theta0's weights
            if self.history[-1].get("pending"):
                self.finish_iteration(self.history.pop())
        elif self.config.eval_sets and self.config.eval_at_start and not self.history:
            with self.phase("eval"):
                self.record({"iteration": 0, **self.evaluate()})
        for iteration in range(self.completed_iterations + 1, self.config.iterations + 1):
            output = self.run_iteration(iteration)
        self._remove_sampler_model()
        return output

    def run_iteration(self, iteration: int):
        trainer, config = self.trainer, self.config
        self._iteration, self._timings = iteration, {}
        work = work_directory(self.output_dir, iteration)
        with self.phase("sampling"):
            dataset, sampling_stats = self.build_dataset(iteration, work)
        if len(dataset) == 0:
            raise NoVerifiedDataError(no_verified_data_message(iteration, sampling_stats))
        with self.phase("train"):
            output = self.train_on(dataset, work / "trainer")
        metrics = {
            "iteration": iteration,
            "train_loss": sum(self._train_losses) / max(len(self._train_losses), 1),
            **{f"sampling/{k}": v for k, v in sampling_stats.items() if k != "malformed_rows"},
            "sampling/malformed_row_count": len(sampling_stats.get("malformed_rows") or []),
        }
        ratio = None
        if config.auto_ratio:
            with self.phase("auto ratio"):
                ratio, choice = self.choose_ratio(iteration)
            metrics.update(choice)
        with self.phase("merge"), whole_parameters(trainer.model):
            self.merger.merge(trainer.model, iteration=iteration, reset=config.reset_adapter, ratio=ratio)
            if config.anchor == "ema":
                self.merger.move_anchor_(trainer.model, config.anchor_decay)
        with self.phase("checkpoint"):
            self.save_checkpoint(iteration, [*self.history, {**metrics, "pending": True}])
        self.completed_iterations = iteration
        with self.phase("sampler refresh"):
            self.refresh_sampler()
        self.finish_iteration(metrics)
        return output

    def choose_ratio(self, iteration: int):
        """Try every candidate ratio on the trained model, score it on the validation
        questions (and its drift on the retain prompts), undo it; returns the winner and what
        was measured (metrics `auto/...`). Every process measures the same and picks alike."""
        config, model = self.config, self.trainer.model
        rejection_config = config.rejection_config(iteration)
        with whole_parameters(model, modify=False):
            before = self.merger.state_tensors(model)
        scores, drifts = [], []
        for candidate in self.ratio_candidates:
            with whole_parameters(model):
                self.merger.merge(model, iteration=iteration, reset=True, ratio=candidate)
            self.refresh_sampler()
            scores.append(greedy_accuracy(self.sampler, self.validation_questions, rejection_config))
            if self.retain_reference is not None:
                answers = retain_answers(self.sampler, config.retain_prompts, config.max_new_tokens)
                drifts.append(retain_drift(self.retain_reference, answers))
            with whole_parameters(model):
                self.merger.load_state_tensors(model, before)
        best = pick_candidate(config.ratio_candidates, scores, drifts or None, config.max_retain_drift)
        labels = [candidate_label(c) for c in config.ratio_candidates]
        choice = {f"auto/score/{label}": score for label, score in zip(labels, scores, strict=True)}
        choice.update({f"auto/retain_drift/{label}": d for label, d in zip(labels, drifts, strict=False)})
        choice.update({"auto/pick": labels[best], "auto/pick_index": best, "auto/pick_score": scores[best]})
        logger.info("iteration %d: merge ratio %s chosen (validation accuracy %s)", iteration, labels[best], scores)
        return self.ratio_candidates[best], choice

    def finish_iteration(self, metrics: dict[str, Any]) -> None:
        """Score the eval sets on G_t (its checkpoint is already written, so a crash here
        redoes only this), record iteration t, and mark its checkpoint finished."""
        metrics = {k: v for k, v in metrics.items() if k != "pending"}
        self._iteration = metrics["iteration"]
        if self.config.eval_sets:
            with self.phase("eval"):
                metrics.update(self.evaluate())
        metrics.update({f"seconds/{k.replace(' ', '_')}": v for k, v in self._timings.items()})
        metrics["seconds/iteration"] = sum(self._timings.values())
        self.record(metrics)
        if self.trainer.is_world_process_zero():
            path = self.output_dir / f"iteration-{metrics['iteration']}" / STATE_FILE
            write_json_atomically(path, {**json.loads(path.read_text()), "history": self.history})
        self.trainer.accelerator.wait_for_everyone()

    def train_on(self, dataset, checkpoint_dir: Path):
        """One ordinary `Trainer.train()` on D_t, with the trainer's own checkpoints under
        `checkpoint_dir`, continuing from the newest of them if a crash left one."""
        trainer, config = self.trainer, self.config
        trainer.train_dataset = trainer._prepare_dataset(
            dataset, trainer.processing_class, trainer.args, trainer.args.packing, None, "train"
        )
        if config.epochs_per_iteration is not None:
            trainer.args.num_train_epochs = config.epochs_per_iteration
        if config.reset_optimizer:
            trainer.optimizer, trainer.lr_scheduler = None, None
        self._train_losses = []
        unpack_cpu_4bit_weights(trainer.model)
        # Each iteration's SFT depends only on (G_{t-1}, D_t, seed), not on what ran before it
        # in this process: a resumed run skips sampling, which draws from the global RNG.
        set_seed(trainer.args.seed + self._iteration)
        resume_from = newest_trainer_checkpoint(checkpoint_dir)
        if resume_from is not None:
            logger.info("continuing SFT from the trainer checkpoint %s", resume_from)
        user_output_dir = trainer.args.output_dir
        trainer.args.output_dir = str(checkpoint_dir)
        try:
            with score_labelled_positions_only(), share_prompt_prefixes(
                trainer.model, enabled=config.share_prompt_prefixes
            ):
                return self._train_one_iteration(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            trainer.args.output_dir = user_output_dir

    def record(self, metrics: dict[str, Any]) -> None:
        """Keep one iteration's metrics: in `history`, in the JSON metrics file, and through the
        trainer's loggers (`report_to`) as imm/*."""
        self.history.append(metrics)
        if self.trainer.is_world_process_zero():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomically(self.output_dir / METRICS_FILE, self.history)
        self.trainer.log({f"imm/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})

    def build_dataset(self, iteration: int, work: Path):
        """D_t: sampled with the current merged model, verified-correct answers kept, and
        saved under `work` once sampling ends; a resumed iteration reads it back instead."""
        from datasets import Dataset

        from imm_trl.rejection import RejectionSampler

        rejection_config = self.config.rejection_config(iteration)
        saved = read_dataset(work / DATASET_FILE)
        if saved is not None and saved.get("seed") == rejection_config.seed:
            logger.info("iteration %d: reusing the D_t saved in %s", iteration, work)
            rows, stats = saved["rows"], saved["stats"]
        else:
            result = RejectionSampler(self.sampler, rejection_config).run(self.training_questions)
            rows, stats = result.dataset.to_list(), result.stats.as_dict()
            if self.trainer.is_world_process_zero():
                write_dataset(work / DATASET_FILE, rows, stats, rejection_config.seed)
            self.trainer.accelerator.wait_for_everyone()
        dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({"prompt": [], "completion": []})
        self.last_dataset = dataset
        return dataset, stats

    def refresh_sampler(self) -> None:
        """Give a sampler with its own copy of the weights (vLLM) the merged model G_t; an HF
        sampler generates with the trainer's model itself and needs nothing."""
        if self.sampler.needs_weight_updates:
            with whole_parameters(self.trainer.model, modify=False):
                weights = merged_state_dict(self.trainer.model, self.merger.master_tensors())
                self.sampler.update_weights(weights)

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

    def _retain_reference(self) -> list[str]:
        """theta0's greedy answers to the retain prompts: computed before iteration 1 and kept
        in the output directory, since a resumed model is no longer theta0."""
        path = self.output_dir / RETAIN_FILE
        if path.is_file():
            return json.loads(path.read_text())
        if self.completed_iterations > 0:
            raise FileNotFoundError(f"{path} is missing, so theta0's answers to retain_prompts are lost; start the run over")
        answers = retain_answers(self.sampler, self.config.retain_prompts, self.config.max_new_tokens)
        if self.trainer.is_world_process_zero():
            write_json_atomically(path, answers)
        self.trainer.accelerator.wait_for_everyone()
        return answers

    # -- the output directory ----------------------------------------------------------------

    def save_checkpoint(self, iteration: int, history: list[dict[str, Any]]) -> None:
        """Publish iteration-<t>, rotate old checkpoints, drop iteration t's work directory.
        Collective (whole parameters); rank 0 writes."""
        with whole_parameters(self.trainer.model, modify=False):
            if self.trainer.is_world_process_zero():
                state = {"iteration": iteration, "history": history, "fingerprint": self.fingerprint}
                tensors = checkpoint_tensors(self.trainer.model, self.merger, self.config.anchor == "ema")
                write_checkpoint(self.output_dir, iteration, tensors, state)
                rotate_checkpoints(self.output_dir, self.config.save_total_limit)
                shutil.rmtree(work_directory(self.output_dir, iteration), ignore_errors=True)
        self.trainer.accelerator.wait_for_everyone()

    def _open_output_dir(self) -> int:
        """Check the output directory against this run and restore what a resume continues
        from; returns the number of completed iterations. Every process reads the directory
        before the main process changes it."""
        config, out = self.config, self.output_dir
        check_writable_dir(out, "IMM output directory")  # now, not after the first iteration
        out.mkdir(parents=True, exist_ok=True)
        run_file = out / RUN_FILE
        saved_run = json.loads(run_file.read_text()) if run_file.is_file() else None
        found = [p.name for _, p in iteration_checkpoints(out)] + [p.name for p in work_directories(out)]
        completed = 0
        if not config.resume and (saved_run is not None or found) and not config.overwrite:
            raise FileExistsError(
                f"{out} holds another run ({', '.join(sorted(found)) or RUN_FILE}); pass "
                "resume=True to continue it, overwrite=True to delete it and start over, "
                "or choose another output_dir"
            )
        if config.resume:
            completed = self._restore(saved_run)
        self.trainer.accelerator.wait_for_everyone()
        if self.trainer.is_world_process_zero():
            remove_stale_staging(out)
            if not config.resume:
                self._delete_run_files()
            for stale in work_directories(out):  # a crash after iteration-<t> was published
                if int(stale.name.split("-")[1]) != completed + 1:
                    shutil.rmtree(stale)
            if saved_run is None or not config.resume:
                write_json_atomically(run_file, {"fingerprint": self.fingerprint})
        self.trainer.accelerator.wait_for_everyone()
        return completed

    def _restore(self, saved_run: dict | None) -> int:
        """Load the newest intact iteration checkpoint of the same run into the model; returns
        its iteration (0 if there is none)."""
        out = self.output_dir
        if saved_run is not None:
            self._check_fingerprint(saved_run.get("fingerprint"), out / RUN_FILE)
        newest = newest_intact_checkpoint(out)
        if newest is None:
            if saved_run is not None and (out / METRICS_FILE).is_file():
                self.history = json.loads((out / METRICS_FILE).read_text())  # theta0's eval
            return 0
        path, state, tensors = newest
        self._check_fingerprint(state.get("fingerprint"), path)
        completed = state["iteration"]
        if completed > self.config.iterations:
            raise ValueError(
                f"{path} holds {completed} completed iterations but iterations="
                f"{self.config.iterations}; ask for at least {completed} (or load that "
                "checkpoint's model instead of resuming)"
            )
        restore_checkpoint_tensors(self.trainer.model, self.merger, tensors, path)
        self.history = state["history"]
        logger.info("resuming after iteration %d from %s", completed, path)
        return completed

    def _check_fingerprint(self, saved: dict | None, source: Path) -> None:
        if saved is None:
            raise ValueError(
                f"{source} has no run fingerprint (written by an older imm-trl); it cannot be "
                "checked against this run: start a new output_dir or pass overwrite=True"
            )
        changed = differences(saved, self.fingerprint)
        if changed:
            raise ValueError(
                f"resume: this run differs from the one in {source.parent if source.is_file() else source}: "
                + "; ".join(changed)
                + ". Resume with the same settings, or start a new output_dir (or overwrite=True)"
            )

    def _delete_run_files(self) -> None:
        out = self.output_dir
        for _, path in iteration_checkpoints(out):
            shutil.rmtree(path)
        for path in work_directories(out):
            shutil.rmtree(path)
        for name in (RUN_FILE, METRICS_FILE, RETAIN_FILE):
            (out / name).unlink(missing_ok=True)

    def close(self) -> None:
        """Close the sampler the callback started (a vLLM engine); one given to it is the
        caller's to close. Safe to call twice; `imm_trl.loop.run_imm` calls it."""
        if self._owns_sampler:
            self.sampler.close()

    def _remove_sampler_model(self) -> None:
        if self._sampler_model_dir is not None and not self.config.keep_sampler_model:
            shutil.rmtree(self._sampler_model_dir, ignore_errors=True)
