"""Bad input gets a clear error that names the problem and the fix, as early as it can be known.

One table, `CASES`: each case is an input, where it must fail, the exception and a regex for
the message. Where:
- config time: building IMMConfig / parsing a recipe / checking CLI arguments, with model
  loading patched to fail (so the case proves no model was loaded);
- model time: when the model is loaded or the merger built, before any sampling;
- verify time: the first verification of sampled completions (a broken reward function);
- skipped and counted: a row-level problem; the run goes on and the row id and reason are in
  `RejectionStats` (`malformed_rows`, `verifier_errors`).

`benchmarks/bad_input_table.py` renders this table as `benchmarks/results/bad_input.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from imm_trl.config import IMMConfig
from imm_trl.loop import load_recipe, parse_recipe
from imm_trl.rejection import RejectionSampler, RejectionSamplingConfig
from imm_trl.sampling import SamplingParams
from imm_trl.validation import positive_int

REPO = Path(__file__).resolve().parents[1]
WHERE = {
    "config": "config time",
    "model": "model time",
    "verify": "verify time",
    "row": "skipped and counted",
}


@dataclass(frozen=True)
class Case:
    """One bad input: `run(tmp_path)` feeds it in; it must raise `error` with a message
    matching `message` (row cases: `run` returns the counted problems, matched instead)."""

    input: str
    where: str
    run: Callable[[Path], Any]
    error: type[BaseException] | None
    message: str

    @property
    def id(self) -> str:
        return f"{self.input} -> {WHERE[self.where]}"


# -- how each kind of input is fed in ---------------------------------------------------------


def imm(**values) -> Callable[[Path], Any]:
    return lambda tmp: IMMConfig(**values)


def recipe(raw: Any) -> Callable[[Path], Any]:
    return lambda tmp: parse_recipe(raw)


def recipe_file(text: str, *flags: str) -> Callable[[Path], Any]:
    """A recipe YAML written to disk, with command-line overrides, as `imm-trl run` reads it."""

    def run(tmp: Path):
        path = tmp / "recipe.yaml"
        path.write_text(text)
        return load_recipe(path, list(flags))

    return run


MINIMAL_RECIPE = "imm: {iterations: 1}\n"


def under_a_file(tmp: Path) -> str:
    (tmp / "a_file").write_text("not a directory")
    return str(tmp / "a_file" / "out")


def tiny_checkpoints(tmp: Path) -> tuple[Path, Path]:
    """A tiny base and tuned checkpoint, as tests/test_merging_checkpoint.py builds them."""
    import torch

    from imm_trl.models import tiny_model

    paths = []
    for seed, name in [(0, "base"), (1, "tuned")]:
        model, tokenizer = tiny_model(seed=seed)
        model.to(torch.bfloat16).save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
        paths.append(tmp / name)
    return paths[0], paths[1]


def merge_into(out: Callable[[Path, Path, Path], Path], **settings) -> Callable[[Path], Any]:
    """`merge_checkpoints(base, tuned, out(tmp, base, tuned), overwrite=True)`."""

    def run(tmp: Path):
        from imm_trl.merging import merge_checkpoints

        base, tuned = tiny_checkpoints(tmp)
        return merge_checkpoints(base, tuned, out(tmp, base, tuned), overwrite=True, **settings)

    return run


def lora_merger(ratio, target_modules=("q_proj", "v_proj")) -> Callable[[Path], Any]:
    def run(tmp: Path):
        from peft import LoraConfig, get_peft_model

        from imm_trl.merging import LoraMerger, MergeConfig
        from imm_trl.models import tiny_model

        model = get_peft_model(
            tiny_model()[0], LoraConfig(r=4, target_modules=list(target_modules))
        )
        return LoraMerger(model, MergeConfig(ratio=ratio))

    return run


def full_weight_merger(ratio) -> Callable[[Path], Any]:
    def run(tmp: Path):
        from imm_trl.merging import FullWeightMerger, MergeConfig
        from imm_trl.models import tiny_model

        return FullWeightMerger(tiny_model()[0], MergeConfig(ratio=ratio))

    return run


def nan_weights_eval(tmp: Path):
    """`imm-trl eval` of a model directory whose weights hold a NaN."""
    import torch

    from imm_trl.eval import load_sampler
    from imm_trl.models import tiny_model

    model, tokenizer = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp / "nan")
    tokenizer.save_pretrained(tmp / "nan")
    return load_sampler(tmp / "nan")


class FixedSampler:
    """Answers every prompt with the same completion."""

    def __init__(self, completion: str = "The answer is 5"):
        self.completion = completion

    def generate(self, prompts, n, params):
        return [[self.completion] * n for _ in prompts]


def rows_run(rows, verifier: Any = "gsm8k", completion: str = "The answer is 5"):
    """Rejection sampling over `rows`; returns what was counted, one line per problem."""

    def run(tmp: Path) -> list[str]:
        config = RejectionSamplingConfig(
            samples_per_question=2, verifier=verifier, reward_completions_as_messages=False
        )
        stats = RejectionSampler(FixedSampler(completion), config).run(rows).stats
        counted = [f"row {row_id}: {reason}" for row_id, reason in stats.malformed_rows]
        return [*counted, f"verifier_errors: {stats.verifier_errors}"]

    return run


GOOD = {"question": "What is 2+3?", "answer": "5"}


def too_few_scores(completions, **_):
    return [1.0]


def no_list(completions, **_):
    return None


def word_scores(completions, **_):
    return ["yes"] * len(completions)


def always_raises(completions, **_):
    raise RuntimeError("cannot score")


def nan_scores(completions, **_):
    return [float("nan")] * len(completions)


# fmt: off
CASES = [
    # IMMConfig: one generic annotation + range checker
    Case("imm.iterations=2.5", "config", imm(iterations=2.5), TypeError,
         r"IMMConfig\.iterations must be an integer \(got 2\.5.*e\.g\. iterations=3"),
    Case("imm.iterations='three'", "config", imm(iterations="three"), TypeError,
         r"iterations must be an integer \(got 'three'"),
    Case("imm.samples_per_question=0", "config", imm(samples_per_question=0), ValueError,
         r"samples_per_question must be >= 1 \(got 0\); e\.g\. samples_per_question=4"),
    Case("imm.samples_per_question='4'", "config", imm(samples_per_question="4"), TypeError,
         r"samples_per_question must be an integer \(got '4'"),
    Case("imm.max_new_tokens=0", "config", imm(max_new_tokens=0), ValueError,
         r"max_new_tokens must be >= 1 \(got 0\)"),
    Case("imm.temperature=-1", "config", imm(temperature=-1), ValueError,
         r"temperature must be >= 0 \(got -1\); e\.g\. temperature=0\.7"),
    Case("imm.top_p=1.5", "config", imm(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    Case("imm.top_p=0", "config", imm(top_p=0), ValueError, r"top_p must be in \(0, 1\] \(got 0\)"),
    Case("imm.eval_samples=2.0", "config", imm(eval_samples=2.0), TypeError,
         r"eval_samples must be an integer \(got 2\.0"),
    Case("imm.density=0", "config", imm(density=0), ValueError,
         r"density must be in \(0, 1\] \(got 0\)"),
    Case("imm.density=1.5", "config", imm(density=1.5), ValueError, r"density must be in \(0, 1\]"),
    Case("imm.seed='0'", "config", imm(seed="0"), TypeError,
         r"seed must be an integer \(got '0'.*e\.g\. seed=0"),
    # merging that adapts (issue 14)
    Case("imm.auto_ratio_grid=[]", "config", imm(merge_ratio="auto", auto_ratio_grid=[]), ValueError,
         r"auto_ratio_grid must hold at least two different candidates \(got \[\]\)"),
    Case("imm.auto_ratio_grid=[0.5]", "config", imm(merge_ratio="auto", auto_ratio_grid=[0.5, 0.5]), ValueError,
         r"at least two different candidates.*merge_ratio=<number>"),
    Case("imm.auto_ratio_grid has 2.5", "config", imm(merge_ratio="auto", auto_ratio_grid=[0.5, 2.5]), ValueError,
         r"auto_ratio_grid entry 2\.5 is outside \(0, 2\]"),
    Case("imm.auto_ratio_grid has 0", "config", imm(merge_ratio="auto", auto_ratio_grid=[0, 0.5]), ValueError,
         r"auto_ratio_grid entry 0 is outside \(0, 2\]"),
    Case("imm.validation_questions leaves 4", "config",
         imm(merge_ratio="auto", validation_questions=0.8, questions=[{"question": f"q{i}", "answer": "1"} for i in range(20)]),
         ValueError, r"splits 20 training questions into 4 for training and 16 for validation; both need at least 8"),
    Case("imm.validation_questions without auto", "config", imm(validation_questions=0.2), ValueError,
         r"validation_questions apply only to merge_ratio='auto'"),
    Case("imm.retain_prompts without max_retain_drift", "config", imm(merge_ratio="auto", retain_prompts=["hi"]),
         ValueError, r"retain_prompts and max_retain_drift go together"),
    Case("imm.max_retain_drift without retain_prompts", "config", imm(merge_ratio="auto", max_retain_drift=0.2),
         ValueError, r"retain_prompts and max_retain_drift go together"),
    Case("imm.anchor='emma'", "config", imm(anchor="emma"), ValueError, r"anchor must be one of theta0, ema \(got 'emma'\)"),
    Case("imm.anchor='ema' without decay", "config", imm(anchor="ema"), ValueError,
         r"anchor_decay goes with anchor='ema' only.*anchor_decay=0\.5"),
    Case("imm.merge_ratio='autp'", "config", imm(merge_ratio="autp"), ValueError, r"merge_ratio must be .* or 'auto', got 'autp'"),
    Case("imm.merge_ratio={'depth': [0.2]}", "config", imm(merge_ratio={"depth": [0.2]}), ValueError,
         r"bad depth rule.*\{'depth': \[first_layer_ratio, last_layer_ratio\]\}"),
    Case("imm.merge_ratio='auto' in step mode", "config", imm(merge_every_steps=2, merge_ratio="auto"), ValueError,
         r"step mode has no questions: give a number, a per-layer map or a depth rule"),
    Case("imm.epochs_per_iteration=0", "config", imm(epochs_per_iteration=0), ValueError,
         r"epochs_per_iteration must be > 0 \(got 0\)"),
    Case("imm.max_correct_per_question=0", "config", imm(max_correct_per_question=0), ValueError,
         r"max_correct_per_question must be >= 1 \(got 0\)"),
    Case("imm.real_data_ratio=1.0", "config", imm(real_data_ratio=1.0), ValueError,
         r"real_data_ratio must be in \[0, 1\) \(got 1\.0\)"),
    Case("imm.merge_method='dare_linaer'", "config", imm(merge_method="dare_linaer"), ValueError,
         r"unknown merge method 'dare_linaer'; choose one of: linear, dare_linear, ties"),
    Case("imm.merge_ratio=-0.5", "config", imm(merge_ratio=-0.5), ValueError,
         r"ratio must be a finite number >= 0.*got -0\.5; e\.g\. 0\.5"),
    Case("imm.merge_ratio='half'", "config", imm(merge_ratio="half"), ValueError,
         r"ratio must be a finite number >= 0.*got 'half'"),
    Case("imm.merge_ratio=[0.5, 0.5] with iterations=3", "config",
         imm(iterations=3, merge_ratio=[0.5, 0.5]), ValueError,
         r"2 entries for 3 iterations; give exactly one per iteration"),
    Case("imm.density=0.5 with merge_method=linear", "config",
         imm(merge_method="linear", density=0.5), ValueError,
         r"density applies only to dare_linear, ties, dare_ties \(got density=0\.5.*"
         r"remove density"),
    Case("imm.sampler='vlm'", "config", imm(sampler="vlm"), ValueError,
         r"sampler must be one of hf, vllm \(got 'vlm'\)"),
    Case("imm.sampler_kwargs={'batchsize': 4}", "config", imm(sampler_kwargs={"batchsize": 4}),
         ValueError, r"sampler_kwargs \['batchsize'\] are not settings of the hf sampler; valid"),
    Case("imm.sampler_kwargs={'max_batch_size': 'big'}", "config",
         imm(sampler_kwargs={"max_batch_size": "big"}), TypeError,
         r"sampler_kwargs\.max_batch_size must be an integer \(got 'big'"),
    Case("imm.question_column=''", "config", imm(question_column=""), ValueError,
         r"question_column is empty.*e\.g\. question_column='question'"),
    Case("imm.gold_column=''", "config", imm(gold_column=""), ValueError,
         r"gold_column is empty.*e\.g\. gold_column='answer'"),
    Case("imm.stop='###'", "config", imm(stop="###"), TypeError,
         r"stop must be a list of strings \(got '###'"),
    Case("imm.stop=['###', 3]", "config", imm(stop=["###", 3]), TypeError,
         r"stop must be a list of strings"),
    Case("imm.resume='yes'", "config", imm(resume="yes"), TypeError,
         r"resume must be true or false \(got 'yes'.*without quotes"),
    Case("imm.verifier='gsm9k'", "config", imm(verifier="gsm9k"), ValueError,
         r"unknown verifier 'gsm9k'; valid verifiers: gsm8k, math, choice, reasoning_gym:<task>"),
    Case("imm.verifier='reasoning_gym:gcdd'", "config", imm(verifier="reasoning_gym:gcdd"),
         ValueError, r"unknown reasoning-gym task \['gcdd'\].*such as .*gcd"),
    Case("imm.verifier=3", "config", imm(verifier=3), TypeError,
         r"verifier must be a name or a reward function \(got 3"),
    Case("imm.output_dir under a file", "config",
         lambda tmp: IMMConfig(output_dir=under_a_file(tmp)), NotADirectoryError,
         r"IMMConfig\.output_dir .* is under the file .*a_file; choose a directory"),
    Case("imm.output_dir='/proc/imm'", "config", imm(output_dir="/proc/imm"), PermissionError,
         r"IMMConfig\.output_dir '/proc/imm' is not writable.*choose a directory you can write"),
    # questions, checked when IMMConfig is built
    Case("imm.questions=[]", "config", imm(questions=[]), ValueError, r"questions is empty"),
    Case("imm.questions='What is 2+3?'", "config", imm(questions="What is 2+3?"), TypeError,
         r"questions must be a Dataset or a list of rows \(got a str\)"),
    Case("imm.questions=['What is 2+3?']", "config", imm(questions=["What is 2+3?"]), TypeError,
         r"question row 0 is a str, not a mapping"),
    Case("imm.question_column='question' in rows with 'q'", "config",
         imm(questions=[{"q": "What is 2+3?", "answer": "5"}]), ValueError,
         r"question_column 'question' is in none of the 1 question rows; the rows have columns "
         r"\['answer', 'q'\]"),
    Case("imm.gold_column='answr' (misspelled)", "config",
         imm(questions=[GOOD], gold_column="answr"), ValueError,
         r"gold_column 'answr' is in none .*columns \['answer', 'question'\]"),
    Case("imm.questions: every row malformed", "config",
         imm(questions=[{"question": {"text": "a"}, "answer": "1"},
                        {"question": "", "answer": "2"}]),
         ValueError,
         r"all 2 question rows are malformed, e\.g\. \[\(0, 'question is a dict.*\(1, 'missing "
         r"question'\)"),
    # the other configs that share the same rules
    Case("SamplingParams(temperature=-0.5)", "config", lambda tmp: SamplingParams(temperature=-0.5),
         ValueError, r"SamplingParams\.temperature must be >= 0"),
    Case("SamplingParams(top_p=0)", "config", lambda tmp: SamplingParams(top_p=0), ValueError,
         r"SamplingParams\.top_p must be in \(0, 1\]"),
    Case("SamplingParams(max_new_tokens=0)", "config", lambda tmp: SamplingParams(max_new_tokens=0),
         ValueError, r"SamplingParams\.max_new_tokens must be >= 1"),
    Case("RejectionSamplingConfig(samples_per_question=0)", "config",
         lambda tmp: RejectionSamplingConfig(samples_per_question=0), ValueError,
         r"RejectionSamplingConfig\.samples_per_question must be >= 1"),
    Case("RejectionSamplingConfig(verifier_time_limit_s=0)", "config",
         lambda tmp: RejectionSamplingConfig(verifier_time_limit_s=0), ValueError,
         r"verifier_time_limit_s must be > 0"),
    # recipes
    Case("recipe YAML is a list", "config", recipe_file("- model\n- imm\n"), ValueError,
         r"recipe must be a mapping with sections model, data, peft, sft, imm \(got a list"),
    Case("recipe YAML is a scalar", "config", recipe_file("hello\n"), ValueError,
         r"recipe must be a mapping with sections .*\(got a str"),
    Case("recipe section imm is a list", "config", recipe({"imm": [1, 2]}), ValueError,
         r"recipe section 'imm' must be a mapping of key: value"),
    Case("--peft.r sixteen", "config", recipe_file(MINIMAL_RECIPE, "--peft.r", "sixteen"),
         TypeError, r"peft\.r must be an integer \(got 'sixteen'.*e\.g\. r=8"),
    Case("--peft.lora_dropout high", "config",
         recipe_file(MINIMAL_RECIPE, "--peft.lora_dropout", "high"), TypeError,
         r"peft\.lora_dropout must be a number \(got 'high'"),
    Case("--sft.learning_rate fast", "config",
         recipe_file(MINIMAL_RECIPE, "--sft.learning_rate", "fast"), TypeError,
         r"sft\.learning_rate must be a number \(got 'fast'"),
    Case("--sft.lr_scheduler_type cosinus", "config",
         recipe_file(MINIMAL_RECIPE, "--sft.lr_scheduler_type", "cosinus"), ValueError,
         r"recipe section 'sft': .*cosinus"),
    Case("--data.n_train 0", "config", recipe_file(MINIMAL_RECIPE, "--data.n_train", "0"),
         ValueError, r"DataArguments\.n_train must be >= 1 \(got 0\)"),
    Case("--data.n_eval 0", "config", recipe_file(MINIMAL_RECIPE, "--data.n_eval", "0"),
         ValueError, r"DataArguments\.n_eval must be >= 1 \(got 0\)"),
    Case("--model.dtype float33", "config", recipe_file(MINIMAL_RECIPE, "--model.dtype", "float33"),
         ValueError, r"model\.dtype must be one of float32, bfloat16, float16, auto \(got 'float33'\)"),
    Case("--model.load_in_4bit 'yes' (quoted)", "config",
         recipe({"model": {"load_in_4bit": "yes"}, "peft": {}}), TypeError,
         r"load_in_4bit must be true or false \(got 'yes'"),
    Case("--imm.iterations three", "config",
         recipe_file(MINIMAL_RECIPE, "--imm.iterations", "three"), TypeError,
         r"IMMConfig\.iterations must be an integer \(got 'three'"),
    Case("recipe section 'modle'", "config", recipe({"modle": {}}), ValueError,
         r"recipe section 'recipe' has unknown key\(s\) \['modle'\]; valid keys"),
    Case("recipe key imm.iteratons", "config", recipe({"imm": {"iteratons": 2}}), ValueError,
         r"unknown key\(s\) \['iteratons'\]; valid keys"),
    Case("--config missing.yaml", "config", lambda tmp: load_recipe(tmp / "missing.yaml"),
         FileNotFoundError, r"recipe file '.*missing\.yaml' does not exist; check the --config"),
    Case("model.load_in_4bit and load_in_8bit", "config",
         recipe({"model": {"load_in_4bit": True, "load_in_8bit": True}, "peft": {}}), ValueError,
         r"load_in_4bit and load_in_8bit are both true; choose one"),
    Case("model.load_in_4bit without peft", "config", recipe({"model": {"load_in_4bit": True}}),
         ValueError, r"quantized base .* add a `peft` section"),
    Case("--sft.output_dir /proc/x", "config",
         recipe_file(MINIMAL_RECIPE, "--sft.output_dir", "/proc/x"), PermissionError,
         r"sft\.output_dir '/proc/x' is not writable"),
    Case("sft.output_dir under a file", "config",
         lambda tmp: parse_recipe({"sft": {"output_dir": under_a_file(tmp)}}), NotADirectoryError,
         r"sft\.output_dir .* is under the file"),
    # CLI arguments
    Case("eval --limit 0", "config", lambda tmp: positive_int("0"), argparse.ArgumentTypeError,
         r"must be an integer >= 1 \(got '0'\)"),
    Case("eval --limit -3", "config", lambda tmp: positive_int("-3"), argparse.ArgumentTypeError,
         r"must be an integer >= 1 \(got '-3'\)"),
    # merge: never into, over or above its inputs; refused before any tensor is read
    Case("merge --out <parent of inputs> --overwrite", "config",
         merge_into(lambda tmp, base, tuned: tmp), ValueError,
         r"output directory .* contains the input .*base.*; a merge never writes into, over or "
         r"above its inputs, even with overwrite"),
    Case("merge --out <base> --overwrite", "config", merge_into(lambda tmp, base, tuned: base),
         ValueError, r"output directory (.*)/base is the input \1/base; a merge never"),
    Case("merge --out <tuned>/sub --overwrite", "config",
         merge_into(lambda tmp, base, tuned: tuned / "sub"), ValueError,
         r"output directory .*tuned/sub is inside the input .*tuned"),
    Case("merge --method linear --density 0.5", "config",
         merge_into(lambda tmp, base, tuned: tmp / "out", density=0.5), ValueError,
         r"density applies only to dare_linear, ties, dare_ties"),
    Case("merge --ratio {'layres.0-1': 0, 'default': 0.5}", "config",
         merge_into(lambda tmp, base, tuned: tmp / "out", ratio={"layres.0-1": 0, "default": 0.5}),
         ValueError,
         r"pattern\(s\) \['layres\.0-1'\] match none of the 21 parameters merged \(checkpoint "),
    # model time: before any sampling
    Case("LoRA merger ratio {'layres.0-1': 0, 'default': 0.5}", "model",
         lora_merger({"layres.0-1": 0, "default": 0.5}), ValueError,
         r"merge ratio pattern\(s\) \['layres\.0-1'\] match none of the 4 parameters merged \(the "
         r"LoRA-targeted weights, e\.g\. model\.layers\.0\.self_attn\.q_proj\.weight.*fix the "
         r"pattern"),
    Case("LoRA on q/v, ratio {'mlp': 0.3, 'default': 0.5}", "model",
         lora_merger({"mlp": 0.3, "default": 0.5}), ValueError,
         r"pattern\(s\) \['mlp'\] match none of the 4 parameters merged \(the LoRA-targeted"),
    Case("full-weight merger ratio [{'mlpp': 0.3, 'default': 0.5}, 0.5]", "model",
         full_weight_merger([{"mlpp": 0.3, "default": 0.5}, 0.5]), ValueError,
         r"pattern\(s\) \['mlpp'\] match none of the 21 parameters merged \(all of the model's"),
    Case("eval of weights with NaN", "model", nan_weights_eval, ValueError,
         r"weights loaded from .*nan contain NaN or Inf \(first: "
         r"model\.layers\.1\.mlp\.up_proj\.weight\); re-create or re-merge"),
    # verify time: a reward function that is wrong for every row is a programming error
    Case("reward function returns 1 score for 2 completions", "verify",
         rows_run([GOOD], verifier=too_few_scores), ValueError,
         r"reward function too_few_scores returned 1 scores for 2 completions; it must return one "
         r"score"),
    Case("reward function returns None", "verify", rows_run([GOOD], verifier=no_list), TypeError,
         r"reward function no_list returned None \(a NoneType\); it must return a list"),
    Case("reward function returns words", "verify", rows_run([GOOD], verifier=word_scores),
         TypeError, r"reward function word_scores returned the score 'yes' \(a str\); scores must "
         r"be numbers or None"),
    # row problems: skipped, counted with the row id; the run goes on
    Case("question row 1 is a dict", "row",
         rows_run([GOOD, {"question": {"text": "What is 2+3?"}, "answer": "5"}]), None,
         r"row 1: question is a dict, expected text or a list of chat messages"),
    Case("chat question row 1 without content", "row",
         rows_run([GOOD, {"question": [{"role": "user"}], "answer": "5"}]), None,
         r"row 1: chat message 0 has no 'content'"),
    Case("chat question row 0 without role", "row",
         rows_run([{"question": [{"content": "What is 2+3?"}], "answer": "5"}, GOOD]), None,
         r"row 0: chat message 0 has no 'role'"),
    Case("chat question row 1 holding a string", "row",
         rows_run([GOOD, {"question": ["What is 2+3?"], "answer": "5"}]), None,
         r"row 1: chat message 0 is a str, expected a mapping"),
    Case("question row 2 is a number", "row",
         rows_run([GOOD, GOOD, {"question": 7, "answer": "5"}]), None,
         r"row 2: question is an int, expected text"),
    Case("question row 1 is empty", "row", rows_run([GOOD, {"question": "", "answer": "5"}]),
         None, r"row 1: missing question"),
    Case("gold missing in row 1", "row", rows_run([GOOD, {"question": "What is 1+1?"}]), None,
         r"row 1: missing gold answer"),
    Case("gsm8k gold without a number in row 0", "row",
         rows_run([{"question": "What is 2+3?", "answer": "five"}, GOOD]), None,
         r"row 0: no number in gsm8k gold answer 'five'"),
    Case("reward function raises", "row", rows_run([GOOD], verifier=always_raises), None,
         r"verifier_errors: 2"),
    Case("reward function returns NaN", "row", rows_run([GOOD], verifier=nan_scores), None,
         r"verifier_errors: 2"),
]
# fmt: on


@pytest.fixture
def no_model_loads(monkeypatch):
    """Make any model load fail: a config-time case must not reach one."""
    from transformers import AutoModelForCausalLM

    import imm_trl.loop

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(imm_trl.loop, "load_model", refuse)


def test_the_table_is_large_and_ids_are_unique():
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_clearly_and_early(case, tmp_path, request):
    if case.where == "config":
        request.getfixturevalue("no_model_loads")
    if case.error is None:
        counted = case.run(tmp_path)
        assert any(re.search(case.message, line) for line in counted), counted
        return
    with pytest.raises(case.error) as caught:
        case.run(tmp_path)
    assert type(caught.value) is case.error, repr(caught.value)
    assert re.search(case.message, str(caught.value)), str(caught.value)


def test_self_improve_preset_keeps_density_one_with_linear():
    """density=1.0 with linear is harmless (nothing dropped) and stays accepted."""
    assert IMMConfig.preset("self_improve").merge_config.density == 1.0
    assert IMMConfig(merge_method="linear").merge_config.density == 1.0
    assert IMMConfig(merge_method="ties").merge_config.density == 0.8


def test_rows_with_problems_are_skipped_while_the_others_are_used():
    rows = [GOOD, {"question": {"text": "x"}, "answer": "5"}, {"question": "What is 1+4?"}]
    result = RejectionSampler(FixedSampler(), RejectionSamplingConfig(samples_per_question=2)).run(
        rows
    )
    assert [row_id for row_id, _ in result.stats.malformed_rows] == [1, 2]
    assert result.stats.usable_questions == 1 and set(result.example_rows) == {0}


def file_hashes(*directories: Path) -> dict[str, str]:
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for directory in directories
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("out", ["parent", "base", "tuned", "inside base", "symlink to base"])
def test_refused_merge_leaves_its_inputs_untouched(tmp_path, capsys, out):
    from imm_trl.cli import main

    base, tuned = tiny_checkpoints(tmp_path)
    (tmp_path / "link").symlink_to(base)
    out_dir = {
        "parent": tmp_path,
        "base": base,
        "tuned": tuned,
        "inside base": base / "merged",
        "symlink to base": tmp_path / "link",
    }[out]
    before = file_hashes(base, tuned)
    capsys.readouterr()  # the progress bars of saving the checkpoints
    assert main(["merge", str(base), str(tuned), "--out", str(out_dir), "--overwrite"]) == 2
    assert file_hashes(base, tuned) == before
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("imm-trl: error: output directory")


# bitsandbytes logs this when imported on a CPU with avx512_bf16 (peft imports it): not ours.
IMPORT_NOISE = "Failed to load CPU gemm_4bit_forward"


def run_cli(*args: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines (less third-party import noise) of `imm-trl *args`."""
    run = subprocess.run(
        [sys.executable, "-m", "imm_trl.cli", *args], capture_output=True, text=True, cwd=REPO
    )
    return run.returncode, [line for line in run.stderr.splitlines() if IMPORT_NOISE not in line]


def test_cli_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"imm": {"iterations": "three"}}))
    code, lines = run_cli("run", "--config", str(path))
    assert code == 2
    assert lines == [
        "imm-trl: error: IMMConfig.iterations must be an integer (got 'three', a str); "
        "e.g. iterations=3 (the default) (--debug shows the traceback)"
    ]
    code, lines = run_cli("run", "--config", str(path), "--debug")
    assert code == 1
    assert lines[0] == "Traceback (most recent call last):" and lines[-1].startswith("TypeError")


def test_eval_limit_zero_is_an_argparse_error(capsys):
    from imm_trl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "default", "--suite", "default", "--limit", "0"])
    assert exit_info.value.code == 2
    assert "argument --limit: must be an integer >= 1 (got '0')" in capsys.readouterr().err
