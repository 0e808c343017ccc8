"""`IMMConfig`: every knob of an Iterative Model Merging run, one documented dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from imm_trl.adaptive import (
    ANCHORS,
    AUTO,
    DEFAULT_AUTO_GRID,
    check_grid,
    split_validation,
    validation_count,
)
from imm_trl.merging import MergeConfig
from imm_trl.merging.config import check_density_applies, default_density, expand_depth_rules
from imm_trl.rejection import SHARED_DEFAULTS, RejectionSamplingConfig, check_questions
from imm_trl.sampling import SamplingParams
from imm_trl.validation import check_choice, check_dataclass, check_values, check_writable_dir
from imm_trl.verify import check_verifier

# The settings IMMConfig hands to RejectionSamplingConfig under the same name (the sampling
# ones go in its `sampling`).
REJECTION_FIELDS = (
    "samples_per_question",
    "max_correct_per_question",
    "real_data_ratio",
    "verifier",
    "question_column",
    "gold_column",
    "solution_column",
    "system_prompt",
)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's own settings (arXiv 2503.02103): DARE with drop 0.2, equal-weight average
    # with the original model, greedy generation repeated 3 times, T = 3.
    "paper": dict(
        iterations=3,
        merge_method="dare_linear",
        merge_ratio=0.5,
        density=0.8,
        samples_per_question=3,
        temperature=0.0,
    ),
    # Plain iterative self-improvement, through the same code path: no merging back.
    "self_improve": dict(merge_method="linear", merge_ratio=1.0, density=1.0),
}


def check_adaptive_settings(config: IMMConfig) -> None:
    """Auto ratio, retain guard and anchor settings: given together or not at all."""
    if isinstance(config.merge_ratio, str) and not config.auto_ratio:
        raise ValueError(
            f"merge_ratio must be a finite number >= 0 (the merge ratio alpha), a per-layer map, a "
            f"depth rule or 'auto', got {config.merge_ratio!r}"
        )
    if config.auto_ratio:
        check_grid(config.ratio_candidates)
        if config.questions is not None:
            validation_count(config.validation_questions, len(list(config.questions)))
        else:
            validation_count(config.validation_questions, 10**9)  # the share itself
    else:
        given = [n for n in ("auto_ratio_grid", "validation_questions", "retain_prompts") if getattr(config, n) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply only to merge_ratio='auto' (got merge_ratio={config.merge_ratio!r}); remove them or set merge_ratio='auto'")
    if (config.retain_prompts is None) != (config.max_retain_drift is None):
        raise ValueError(
            "retain_prompts and max_retain_drift go together: the prompts say where drift is "
            "measured, the bound says how much is allowed; give both or neither"
        )
    if config.retain_prompts is not None and not config.retain_prompts:
        raise ValueError("retain_prompts is empty; give some prompts or remove it")
    if config.max_retain_drift is not None and not 0 <= config.max_retain_drift <= 1:
        raise ValueError(f"max_retain_drift is a share of prompts, in [0, 1]; got {config.max_retain_drift!r}")
    check_choice("IMMConfig.anchor", config.anchor, ANCHORS)
    if (config.anchor == "ema") != (config.anchor_decay is not None):
        raise ValueError(
            f"anchor_decay goes with anchor='ema' only (got anchor={config.anchor!r}, "
            f"anchor_decay={config.anchor_decay!r}); e.g. anchor='ema', anchor_decay=0.5"
        )
    if config.anchor_decay is not None and not 0 <= config.anchor_decay < 1:
        raise ValueError(f"anchor_decay must be in [0, 1), got {config.anchor_decay!r}")


@dataclass
class IMMConfig:
    """Settings of an IMM run; the callback and `run_imm` read only this.

    `G_t = theta0 + merge_ratio * M(theta_t^SFT - theta0)` after every iteration `t`.
    """

    iterations: int = field(default=3, metadata={"help": "Number of IMM iterations T."})
    epochs_per_iteration: float | None = field(
        default=None,
        metadata={"help": "SFT epochs over D_t each iteration; None keeps the trainer's num_train_epochs."},
    )
    merge_method: str = field(
        default="dare_linear",
        metadata={"help": "Delta operator M: linear, dare_linear, ties or dare_ties."},
    )
    merge_ratio: Any = field(
        default=0.5,
        metadata={
            "help": "alpha: a number, a per-layer map like {'layers.0-7': 0.3, 'default': 0.5}, "
            "a depth rule {'depth': [first_layer, last_layer]} (linear over decoder layers, as "
            "in LiNeS), a list with one of those per iteration (a schedule), or 'auto': chosen "
            "each iteration from auto_ratio_grid on held-out training questions."
        },
    )
    density: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of the delta kept by dare_linear, ties and dare_ties, in (0, 1]; "
            "None = 0.8 for those (the paper's DARE drop rate 0.2). linear keeps everything."
        },
    )
    samples_per_question: int = field(
        default=SHARED_DEFAULTS.samples_per_question,
        metadata={"help": "k: completions sampled per training question."},
    )
    temperature: float = field(
        default=SHARED_DEFAULTS.temperature, metadata={"help": "Sampling temperature; 0 = greedy."}
    )
    top_p: float = field(default=SHARED_DEFAULTS.top_p, metadata={"help": "Nucleus sampling mass."})
    max_new_tokens: int = field(
        default=SHARED_DEFAULTS.max_new_tokens, metadata={"help": "Most tokens per sampled answer."}
    )
    stop: list[str] = field(default_factory=list, metadata={"help": "Stop strings for sampling."})
    verifier: Any = field(
        default=SHARED_DEFAULTS.verifier,
        metadata={"help": "gsm8k, math, choice or reasoning_gym:<task> (or a reward callable)."},
    )
    max_correct_per_question: int | None = field(
        default=SHARED_DEFAULTS.max_correct_per_question,
        metadata={"help": "Keep at most this many verified answers per question."},
    )
    real_data_ratio: float = field(
        default=SHARED_DEFAULTS.real_data_ratio,
        metadata={"help": "Share of D_t made of gold (real) solutions, in [0, 1)."},
    )
    sampler: str = field(default="hf", metadata={"help": "Sampling backend: hf or vllm."})
    sampler_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Fields of HFSamplerConfig or VLLMSamplerConfig for the chosen backend."},
    )
    questions: Any = field(
        default=None,
        metadata={"help": "In-domain training questions: a Dataset or list of rows."},
    )
    question_column: str = field(
        default=SHARED_DEFAULTS.question_column,
        metadata={"help": "Column with the question (text or chat messages)."},
    )
    gold_column: str = field(
        default=SHARED_DEFAULTS.gold_column, metadata={"help": "Column with the gold answer."}
    )
    solution_column: str | None = field(
        default=SHARED_DEFAULTS.solution_column,
        metadata={
            "help": "Column with gold worked solutions for real_data_ratio > 0 (task suites: "
            "'solution'); None uses gold_column, as in GSM8K where the gold is the solution."
        },
    )
    system_prompt: str | None = field(
        default=SHARED_DEFAULTS.system_prompt,
        metadata={"help": "System message put before text questions."},
    )
    eval_sets: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Named `imm_trl.tasks.QuestionSet`s (e.g. {'id': ..., 'ood': ...}) scored "
            "with the sampler after each merge."
        },
    )
    eval_samples: int = field(
        default=1,
        metadata={
            "help": "Samples per eval question: 1 scores greedy accuracy only; k > 1 also draws k "
            "samples at `temperature` for pass@k and the diversity metrics."
        },
    )
    eval_at_start: bool = field(
        default=True, metadata={"help": "Also score the eval sets on theta0, before iteration 1."}
    )
    reset_adapter: bool = field(
        default=True, metadata={"help": "Start each iteration with a freshly initialised LoRA adapter."}
    )
    reset_optimizer: bool = field(
        default=True,
        metadata={"help": "Restart optimizer state and the LR schedule every iteration."},
    )
    share_prompt_prefixes: bool = field(
        default=True,
        metadata={
            "help": "Iteration mode's SFT runs the prompt prefix that rows of a batch share (few-shot "
            "turns) once per batch: the same hidden states and gradients up to float rounding, 2-3x "
            "fewer tokens on the default suites (imm_trl/shared_prefix.py). False runs TRL's forward "
            "as is. Step mode trains with the user's own trainer and leaves its forward alone: wrap "
            "`trainer.train()` in `imm_trl.share_prompt_prefixes(trainer.model)` for the same saving."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling and of the DARE masks."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where iteration checkpoints and metrics go; default <trainer output_dir>/imm."},
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue the run in output_dir: from its newest intact iteration checkpoint, "
            "its saved D_t and the trainer's own checkpoints inside the iteration. Refused if the "
            "saved run's fingerprint (settings, base model, LoRA layout) differs from this one."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Delete another run's checkpoints in output_dir and start over."},
    )
    save_total_limit: int | None = field(
        default=2,
        metadata={
            "help": "Keep only the newest this-many iteration checkpoints (the newest plus a "
            "fallback, by default); None keeps all."
        },
    )
    keep_sampler_model: bool = field(
        default=False,
        metadata={"help": "Keep the vLLM engine's model copy (sampler-model-rank<k>) after the run."},
    )
    auto_ratio_grid: list | None = field(
        default=None,
        metadata={
            "help": "merge_ratio='auto': the candidates tried each iteration, ratios in (0, 2] or "
            "depth rules; None = [0.25, 0.5, 0.75, 1.0]."
        },
    )
    validation_questions: int | float | None = field(
        default=None,
        metadata={
            "help": "merge_ratio='auto': training questions held out to score the candidates, a "
            "count or a fraction in (0, 1); None = 0.2. Both parts keep at least 8."
        },
    )
    retain_prompts: list | None = field(
        default=None,
        metadata={
            "help": "merge_ratio='auto': prompts (any text, e.g. general instructions) on which a "
            "candidate's greedy answers are compared with theta0's; needs max_retain_drift."
        },
    )
    max_retain_drift: float | None = field(
        default=None,
        metadata={
            "help": "Largest share of retain_prompts whose greedy answer may differ from theta0's "
            "for a candidate to be eligible, in [0, 1]."
        },
    )
    anchor: str = field(
        default="theta0",
        metadata={
            "help": "What each merge pulls back to: 'theta0' (IMM) or 'ema', an exponential "
            "moving average of the merged models (G_t = A_t + alpha*M(theta_t - A_t), as in WARP)."
        },
    )
    anchor_decay: float | None = field(
        default=None,
        metadata={"help": "anchor='ema': A_{t+1} = decay*A_t + (1-decay)*G_t, decay in [0, 1)."},
    )
    merge_every_steps: int | None = field(
        default=None,
        metadata={
            "help": "Step mode: merge back into theta0 every this-many optimizer steps of "
            "the trainer's own run (SFT, GRPO, RLOO), and once more at the end; no sampling, no "
            "iterations. merge_ratio schedules are indexed by merge count. None = iteration mode."
        },
    )
    reset_optimizer_on_merge: bool = field(
        default=False,
        metadata={
            "help": "Step mode, full fine-tuning: clear the optimizer state after each merge (LoRA "
            "always clears its adapter's state: the adapter is re-initialised)."
        },
    )
    reference: str = field(
        default="theta0",
        metadata={
            "help": "Step mode, KL reference (beta > 0): theta0 keeps it at the original model "
            "(full fine-tuning only), merged moves it to G at each merge (as LoRA does by itself)."
        },
    )

    def __post_init__(self) -> None:
        check_dataclass(self)  # types and ranges first: later checks compare and index
        check_choice("IMMConfig.sampler", self.sampler, ("hf", "vllm"))
        check_density_applies(self.merge_method, self.density)
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: choose one")
        from imm_trl.step_mode_checks import check_step_mode_fields

        check_step_mode_fields(self)
        # Step mode has one schedule entry per merge, checked when the run's length is known.
        if (
            isinstance(self.merge_ratio, list)
            and len(self.merge_ratio) != self.iterations
            and self.merge_every_steps is None
        ):
            raise ValueError(
                f"merge_ratio schedule has {len(self.merge_ratio)} entries for {self.iterations} "
                "iterations; give exactly one per iteration"
            )
        check_adaptive_settings(self)
        _ = self.merge_config  # validates method, density and ratio now, not after training
        check_verifier(self.verifier)
        valid = {f.name for f in fields(self.sampler_config_class())}
        unknown = sorted(set(self.sampler_kwargs) - valid)
        if unknown:  # fail now, not after a model load and an engine start
            raise ValueError(
                f"sampler_kwargs {unknown} are not settings of the {self.sampler} sampler; valid: {sorted(valid)}"
            )
        check_values("IMMConfig.sampler_kwargs", self.sampler_kwargs, self.sampler_config_class())
        if self.output_dir is not None:
            check_writable_dir(self.output_dir, "IMMConfig.output_dir")
        if self.questions is not None:
            check_questions(
                self.questions,
                self.question_column,
                self.gold_column,
                needs_gold=not callable(self.verifier)
                and getattr(self.verifier, "reward_function", None) is None,
            )

    def sampler_config_class(self):
        """HFSamplerConfig or VLLMSamplerConfig, whichever `sampler` names."""
        from imm_trl.sampling import HFSamplerConfig, VLLMSamplerConfig

        return VLLMSamplerConfig if self.sampler == "vllm" else HFSamplerConfig

    @classmethod
    def preset(cls, name: str, **overrides) -> IMMConfig:
        """A named preset (`paper`, `self_improve`) with `overrides` applied on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> IMMConfig:
        """Build from a mapping (a YAML recipe's `imm:` section); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - {"preset"})
        if unknown:
            raise ValueError(f"unknown IMMConfig field(s) {unknown}; valid fields: {sorted(known)}")
        values = dict(values)
        preset = values.pop("preset", None)
        return cls.preset(preset, **values) if preset else cls(**values)

    def with_overrides(self, **overrides) -> IMMConfig:
        return replace(self, **overrides)

    @property
    def merge_config(self) -> MergeConfig:
        """The merge settings; with merge_ratio='auto' its ratio is the candidate grid (every
        merge then names the candidate it makes)."""
        density = self.density if self.density is not None else default_density(self.merge_method)
        return MergeConfig(
            method=self.merge_method, ratio=self.ratio_candidates if self.auto_ratio else self.merge_ratio,
            density=density, seed=self.seed,
        )

    def merge_config_for(self, model) -> MergeConfig:
        """`merge_config` with depth rules expanded over `model`'s decoder layers."""
        config = self.merge_config
        names = [name for name, _ in model.named_parameters()]
        return replace(config, ratio=expand_depth_rules(config.ratio, names))

    @property
    def auto_ratio(self) -> bool:
        return self.merge_ratio == AUTO

    @property
    def ratio_candidates(self) -> list:
        return list(DEFAULT_AUTO_GRID if self.auto_ratio_grid is None else self.auto_ratio_grid)

    def validation_split(self):
        """(training questions, validation questions) of an auto-ratio run (all training and
        none held out otherwise), split once with the run's seed."""
        rows = [dict(row) for row in self.questions]
        if not self.auto_ratio:
            return rows, []
        return split_validation(rows, self.validation_questions, self.seed)

    def rejection_config(self, iteration: int) -> RejectionSamplingConfig:
        """Rejection-sampling settings of iteration `iteration`; its own seed, so a resumed
        run samples what an uninterrupted one would have."""
        shared = {name: getattr(self, name) for name in REJECTION_FIELDS}
        return RejectionSamplingConfig(
            **shared,
            sampling=SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                max_new_tokens=self.max_new_tokens,
                stop=tuple(self.stop),
                seed=self.seed + iteration,
            ),
            seed=self.seed + iteration,
        )
