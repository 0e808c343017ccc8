"""Sampling speed, side by side in one run on the default model (SmolLM2-135M-Instruct):
HF `generate` vs vLLM, each driving the full rejection-sampling path (sample k answers per GSM8K
question, verify, build the SFT dataset), at each dtype in turn (bf16, then fp32).

Each backend runs its tuned configuration: vLLM with the VLLMSamplerConfig defaults (compiled,
fast top-p, KV cache sized for the whole batch at this dtype), HF with the same fast top-p and
batch size 64, its default (256 was measured 2.6-2.8x slower end to end: 32 vs 90 tokens/s in
fp32, 62 vs 160 in bf16, results/sampling_hf_batch256.md; one sequence still decoding keeps the
whole batch going). The ratio is quoted per dtype (same dtype on both sides) and best against
best.

Measures: generated tokens/s per backend, verified examples/s, share of wall time outside
generation, gsm8k verifier checks/s, and the in-place weight update time vs an engine restart.
Writes benchmarks/results/sampling.json and sampling.md.

    .venv/bin/python benchmarks/sampling.py    # ~15 min on 2 quiet cores, far longer when shared
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from imm_trl.models import default_model_dir, load_default_model  # noqa: E402
from imm_trl.rejection import RejectionSampler, RejectionSamplingConfig  # noqa: E402
from imm_trl.sampling import HFSampler, HFSamplerConfig, SamplingParams  # noqa: E402
from imm_trl.verify import get_verifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
FIXTURE_GSM8K = REPO / "tests" / "fixtures" / "gsm8k" / "test_sample.jsonl"
SYSTEM_PROMPT = "Solve the problem step by step. End with 'The answer is N.'"
HF_BATCH_SIZE = 64
# KV cache per dtype: room for all 256 sequences at once (fp32 keys/values take twice the bytes).
KV_CACHE_GIB = {"bfloat16": 2.0, "float32": 4.0}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--dtypes",
        default="bfloat16,float32",
        help="Comma-separated, measured in this order; the first one also gets the verifier "
        "and weight-update measurements.",
    )
    parser.add_argument(
        "--hf-batch-size",
        type=int,
        default=HF_BATCH_SIZE,
        help="Sequences per HF generate call (HFSamplerConfig.max_batch_size's default).",
    )
    parser.add_argument("--note", default="", help="Context for the report (e.g. machine load).")
    parser.add_argument(
        "--data", type=Path, default=SHARED_GSM8K if SHARED_GSM8K.exists() else FIXTURE_GSM8K
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--skip-hf", action="store_true", help="Only measure vLLM.")
    return parser.parse_args()


def load_questions(path: Path, count: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:count]


def cpu_pressure_seconds() -> float | None:
    """Total seconds runnable tasks waited for a CPU (Linux PSI), to show contention."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return int(line.rsplit("total=", 1)[1]) / 1e6


def rejection_run(sampler, questions, args) -> dict:
    config = RejectionSamplingConfig(
        samples_per_question=args.k,
        verifier="gsm8k",
        system_prompt=SYSTEM_PROMPT,
        sampling=SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens),
    )
    pressure_before = cpu_pressure_seconds()
    result = RejectionSampler(sampler, config).run(questions)
    stats = result.stats
    pressure = cpu_pressure_seconds()
    stalled = None if pressure is None else (pressure - pressure_before) / stats.total_seconds
    generation = sampler.stats
    return {
        "generated_tokens": generation.generated_tokens,
        "generation_seconds": stats.generation_seconds,
        "sampler_seconds": generation.seconds,
        "total_seconds": stats.total_seconds,
        "tokens_per_second": generation.generated_tokens / stats.generation_seconds,
        "verified_examples": stats.generated_examples,
        "verified_examples_per_second": stats.generated_examples / stats.total_seconds,
        "share_outside_generation": 1 - stats.generation_seconds / stats.total_seconds,
        "pass_at_1": stats.pass_at_1,
        "pass_at_k": stats.pass_at_k,
        "yield_rate": stats.yield_rate,
        "mean_completion_tokens": stats.mean_completion_tokens,
        "distinct_completions_per_question": stats.distinct_completions_per_question,
        "timeouts": stats.timeouts,
        "verifier_errors": stats.verifier_errors,
        "cpu_stall_share": stalled,
        "_completions": result,  # dropped before saving
    }


def verifier_rate(completions: list[str], golds: list[str], min_checks: int = 20000) -> dict:
    repeat = max(1, min_checks // max(len(completions), 1))
    completions, golds = completions * repeat, golds * repeat
    verifier = get_verifier("gsm8k")
    start = time.perf_counter()
    verifier.verify_batch(completions, golds)
    seconds = time.perf_counter() - start
    return {
        "checks": len(completions),
        "seconds": seconds,
        "checks_per_second": len(completions) / seconds,
    }


def perturbed_state_dict(model, scale: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's weights plus a little noise: stands in for a merged model of the same shape."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: tensor
        + torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        * scale
        * tensor.float().std().to(tensor.dtype)
        if tensor.is_floating_point() and tensor.dim() == 2
        else tensor
        for name, tensor in model.state_dict().items()
    }


def setup_info(args, questions) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct",
        "dtypes": args.dtypes.split(","),
        "questions": len(questions),
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "temperature": 0.8,
        "top_p": 0.95,
        "data": str(args.data.name),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "hf_batch_size": args.hf_batch_size,
        "note": args.note,
    }


def start_vllm(dtype: str, tokenizer):
    from imm_trl.sampling import VLLMSampler, VLLMSamplerConfig

    config = VLLMSamplerConfig(
        dtype=dtype,
        max_model_len=1024,
        cpu_kv_cache_gib=float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or KV_CACHE_GIB[dtype]),
        show_progress=False,
    )
    start = time.perf_counter()
    sampler = VLLMSampler(default_model_dir(), tokenizer, config)
    return sampler, time.perf_counter() - start


def measure_dtype(dtype: str, questions, args, extras: bool) -> dict:
    """Both backends at one dtype; with `extras`, also the verifier rate and weight updates."""
    model, tokenizer = load_default_model(dtype=getattr(torch, dtype))
    vllm_sampler, engine_start_seconds = start_vllm(dtype, tokenizer)
    out = {
        "vllm_config": _public(vllm_sampler.config),
        "engine_start_seconds": engine_start_seconds,
    }
    out["vllm"] = rejection_run(vllm_sampler, questions, args)
    print(dtype, "vllm:", _printable(out["vllm"]), flush=True)
    hf_sampler = HFSampler(
        model, tokenizer, HFSamplerConfig(batch_size=args.hf_batch_size, show_progress=False)
    )
    out["hf_config"] = _public(hf_sampler.config)
    out["hf"] = rejection_run(hf_sampler, questions, args)
    print(dtype, "hf:", _printable(out["hf"]), flush=True)
    out["vllm_over_hf"] = out["vllm"]["tokens_per_second"] / out["hf"]["tokens_per_second"]
    result = out["vllm"].pop("_completions")
    out["hf"].pop("_completions")
    if extras:
        out["verifier_gsm8k"] = verifier_on_real_completions(vllm_sampler, questions, result, args)
        out["weight_update"] = weight_update_vs_restart(vllm_sampler, model, engine_start_seconds)
    vllm_sampler.close()
    return out


def verifier_on_real_completions(sampler, questions, result, args) -> dict:
    """Verifier throughput on real completions of this run, against the real gold answers."""
    texts = [ex["completion"][0]["content"] for ex in result.dataset]
    sampled = sampler.generate(
        [[{"role": "user", "content": q["question"]}] for q in questions[:16]],
        4,
        SamplingParams(temperature=0.8, max_new_tokens=args.max_new_tokens),
    )
    completions = [t for samples in sampled for t in samples] + texts
    golds = [q["answer"] for q in questions[:16] for _ in range(4)] + [
        questions[r]["answer"] for r in result.example_rows
    ]
    return verifier_rate(completions, golds)


def weight_update_vs_restart(sampler, model, engine_start_seconds: float) -> dict:
    update_seconds = [
        sampler.update_weights(perturbed_state_dict(model, seed=seed)) for seed in range(3)
    ]
    sampler.update_weights(model.state_dict())
    restart_seconds = sampler.restart()
    return {
        "in_place_seconds_each": update_seconds,
        "in_place_seconds_median": statistics.median(update_seconds),
        "engine_start_seconds": engine_start_seconds,
        "engine_restart_seconds": restart_seconds,
        "note": "restart = shut down + start an engine from the model directory (its compiled "
        "graph then comes from vLLM's cache); a real fallback also has to save the merged model "
        "first, which is not included",
    }


def _public(config) -> dict:
    return {k: v for k, v in vars(config).items() if k != "show_progress"}


def _printable(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.startswith("_")}


def main():
    args = parse_args()
    questions = load_questions(args.data, args.questions)
    results = {"setup": setup_info(args, questions), "by_dtype": {}}
    for i, dtype in enumerate(results["setup"]["dtypes"]):
        results["by_dtype"][dtype] = measure_dtype(dtype, questions, args, extras=i == 0)
    by_dtype = results["by_dtype"]
    best_vllm = max(by_dtype, key=lambda d: by_dtype[d]["vllm"]["tokens_per_second"])
    best_hf = max(by_dtype, key=lambda d: by_dtype[d]["hf"]["tokens_per_second"])
    results["best"] = {
        "vllm_dtype": best_vllm,
        "hf_dtype": best_hf,
        "vllm_over_hf": by_dtype[best_vllm]["vllm"]["tokens_per_second"]
        / by_dtype[best_hf]["hf"]["tokens_per_second"],
    }
    results["setup"]["load_average_at_end"] = os.getloadavg()
    save(results, args.out)


def save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "sampling.md").write_text(markdown(results))
    print(markdown(results))


def _loads(values) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


def markdown(results: dict) -> str:
    setup, by_dtype, best = results["setup"], results["by_dtype"], results["best"]
    first = by_dtype[setup["dtypes"][0]]
    lines = [
        "# Sampling benchmark (benchmarks/sampling.py)",
        "",
        f"{setup['model']}, {setup['questions']} GSM8K questions x k={setup['k']}, "
        f"max_new_tokens={setup['max_new_tokens']}, temperature {setup['temperature']}, "
        f"top_p {setup['top_p']}; {setup['cpu_count']} CPU cores, torch threads "
        f"{setup['torch_threads']}, load average at start {_loads(setup['load_average_at_start'])}"
        f" / end {_loads(setup['load_average_at_end'])}.",
        "",
        "vLLM: VLLMSamplerConfig defaults (torch.compile, fast top-p, prefix caching, chunked "
        "prefill), KV cache "
        + ", ".join(f"{d} {by_dtype[d]['vllm_config']['cpu_kv_cache_gib']:g} GiB" for d in by_dtype)
        + f". HF generate: batch size {setup['hf_batch_size']}, the same fast top-p.",
    ]
    if setup.get("note"):
        lines += ["", setup["note"]]
    header = " | ".join(f"vLLM {d} | HF {d}" for d in by_dtype)
    lines += ["", f"| | {header} | target |", "|---|" + "---|" * (2 * len(by_dtype) + 1)]

    def row(name, key, fmt, target=""):
        cells = " | ".join(
            f"{fmt.format(by_dtype[d]['vllm'][key])} | {fmt.format(by_dtype[d]['hf'][key])}"
            for d in by_dtype
        )
        lines.append(f"| {name} | {cells} | {target} |")

    row("generated tokens/s", "tokens_per_second", "{:.0f}", "vLLM >= 3x HF")
    row("generated tokens", "generated_tokens", "{}")
    row("generation seconds", "generation_seconds", "{:.1f}")
    row("verified examples/s (whole rejection pass)", "verified_examples_per_second", "{:.2f}")
    row("verified examples", "verified_examples", "{}")
    row("share of wall time outside generation", "share_outside_generation", "{:.2%}", "<= 5%")
    row("pass@1", "pass_at_1", "{:.3f}")
    row("pass@k", "pass_at_k", "{:.3f}")
    row("timeouts", "timeouts", "{}")
    row("verifier errors", "verifier_errors", "{}")
    row(
        "CPU contention (share of time some task waited for a CPU, PSI)",
        "cpu_stall_share",
        "{:.0%}",
    )
    lines += ["", "vLLM / HF generated tokens/s:", ""]
    for d in by_dtype:
        lines.append(f"- same dtype, {d} on both sides: **{by_dtype[d]['vllm_over_hf']:.2f}x**")
    lines += [
        f"- best against best (vLLM {best['vllm_dtype']} vs HF {best['hf_dtype']}): "
        f"**{best['vllm_over_hf']:.2f}x**",
        "",
        "The >= 3x target is judged on the same-dtype bf16 comparison, which is also each "
        "backend's fastest dtype when the best-against-best line names bf16 twice.",
    ]
    verifier, update = first.get("verifier_gsm8k"), first.get("weight_update")
    if verifier:
        lines += [
            "",
            f"gsm8k verifier: {verifier['checks_per_second']:,.0f} checks/s over "
            f"{verifier['checks']:,} checks of real completions (target >= 2,000/s).",
        ]
    if update:
        lines += [
            "",
            f"Weights ({setup['dtypes'][0]} engine): in-place update "
            f"{update['in_place_seconds_median']:.2f} s (median of "
            f"{len(update['in_place_seconds_each'])}) vs engine restart "
            f"{update['engine_restart_seconds']:.1f} s (first engine start "
            f"{update['engine_start_seconds']:.1f} s, including torch.compile unless cached).",
        ]
    return "\n".join(lines + [""])


if __name__ == "__main__":
    main()
