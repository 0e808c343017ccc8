"""Sampling speed, side by side in one run on the default model (SmolLM2-135M-Instruct):
HF `generate` vs vLLM, each driving the full rejection-sampling path (sample k answers per GSM8K
question, verify, build the SFT dataset).

Measures: generated tokens/s per backend, verified examples/s, share of wall time outside
generation, gsm8k verifier checks/s, and the in-place weight update time vs an engine restart.
Writes benchmarks/results/sampling.json and sampling.md.

    VLLM_CPU_KVCACHE_SPACE=2 .venv/bin/python benchmarks/sampling.py    # ~5-10 min on 2 cores
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


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
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


def main():
    args = parse_args()
    questions = load_questions(args.data, args.questions)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_default_model(dtype=dtype)
    results = {
        "setup": {
            "model": "SmolLM2-135M-Instruct",
            "dtype": args.dtype,
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
            "vllm_cpu_kvcache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2 (sampler default)"),
        }
    }

    from imm_trl.sampling import VLLMSampler, VLLMSamplerConfig

    start = time.perf_counter()
    vllm_sampler = VLLMSampler(
        default_model_dir(),
        tokenizer,
        VLLMSamplerConfig(dtype=args.dtype, max_model_len=1024, show_progress=False),
    )
    engine_start_seconds = time.perf_counter() - start
    vllm_run = rejection_run(vllm_sampler, questions, args)
    print("vllm:", {k: v for k, v in vllm_run.items() if not k.startswith("_")}, flush=True)

    hf_run = None
    if not args.skip_hf:
        hf_sampler = HFSampler(model, tokenizer, HFSamplerConfig(show_progress=False))
        hf_run = rejection_run(hf_sampler, questions, args)
        print("hf:", {k: v for k, v in hf_run.items() if not k.startswith("_")}, flush=True)

    # Verifier throughput on the real completions of this run, against the real gold answers.
    result = vllm_run.pop("_completions")
    texts = [ex["completion"][0]["content"] for ex in result.dataset]
    sampled = vllm_sampler.generate(
        [[{"role": "user", "content": q["question"]}] for q in questions[:16]],
        4,
        SamplingParams(temperature=0.8, max_new_tokens=args.max_new_tokens),
    )
    completions = [t for samples in sampled for t in samples] + texts
    golds = [q["answer"] for q in questions[:16] for _ in range(4)] + [
        questions[r]["answer"] for r in result.example_rows
    ]
    results["verifier_gsm8k"] = verifier_rate(completions, golds)
    if hf_run:
        hf_run.pop("_completions")

    # In-place weight update vs engine restart.
    update_seconds = []
    for seed in range(3):
        update_seconds.append(vllm_sampler.update_weights(perturbed_state_dict(model, seed=seed)))
    vllm_sampler.update_weights(model.state_dict())
    restart_seconds = vllm_sampler.restart()
    vllm_sampler.close()
    results["weight_update"] = {
        "in_place_seconds_each": update_seconds,
        "in_place_seconds_median": statistics.median(update_seconds),
        "engine_start_seconds": engine_start_seconds,
        "engine_restart_seconds": restart_seconds,
        "note": "restart = shut down + start an engine from the model directory; a real fallback "
        "also has to save the merged model first, which is not included",
    }
    results["vllm"] = vllm_run
    results["hf"] = hf_run
    if hf_run:
        results["vllm_over_hf_tokens_per_second"] = (
            vllm_run["tokens_per_second"] / hf_run["tokens_per_second"]
        )
    results["setup"]["load_average_at_end"] = os.getloadavg()
    save(results, args.out)


def save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "sampling.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    setup, vllm, hf = results["setup"], results["vllm"], results["hf"]
    update, verifier = results["weight_update"], results["verifier_gsm8k"]
    lines = [
        "# Sampling benchmark (benchmarks/sampling.py)",
        "",
        f"{setup['model']} ({setup['dtype']}), {setup['questions']} GSM8K questions x k={setup['k']}, "
        f"max_new_tokens={setup['max_new_tokens']}, temperature {setup['temperature']}, top_p {setup['top_p']}; "
        f"{setup['cpu_count']} CPU cores, torch threads {setup['torch_threads']}, load average at start "
        f"{', '.join(f'{x:.1f}' for x in setup['load_average_at_start'])} / end "
        f"{', '.join(f'{x:.1f}' for x in setup['load_average_at_end'])}.",
        "",
        "| | vLLM | HF generate | target |",
        "|---|---|---|---|",
    ]

    def row(name, key, fmt, target=""):
        hf_value = fmt.format(hf[key]) if hf else "-"
        lines.append(f"| {name} | {fmt.format(vllm[key])} | {hf_value} | {target} |")

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
    if "vllm_over_hf_tokens_per_second" in results:
        lines += [
            "",
            f"vLLM / HF tokens/s: **{results['vllm_over_hf_tokens_per_second']:.2f}x** (target >= 3x).",
        ]
    lines += [
        "",
        f"gsm8k verifier: {verifier['checks_per_second']:,.0f} checks/s over {verifier['checks']:,} checks "
        "of real completions (target >= 2,000/s).",
        "",
        f"Weights: in-place update {update['in_place_seconds_median']:.2f} s (median of "
        f"{len(update['in_place_seconds_each'])}) vs engine restart {update['engine_restart_seconds']:.1f} s "
        f"(first engine start {update['engine_start_seconds']:.1f} s).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
