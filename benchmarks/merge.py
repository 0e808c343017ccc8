"""Merge speed and memory, side by side, in one run.

(a) LoRA merge into SmolLM2-135M (fp32) and into a 1.1B Llama built from a config (bf16):
    imm-trl's `LoraMerger.merge` (alpha = 0.5, adapter re-initialised) vs PEFT's
    `merge_and_unload` (with torch's default threads and with one thread) vs the floor (the
    same tensors' memory traffic plus the B @ A products), first on the quiet machine, then
    with one competing busy process per core. Each measurement runs in its own process;
    "peak extra RSS" is the peak resident memory sampled during the merge minus the resident
    memory just before it.
(b) Checkpoint merge of two 1.7B-parameter bf16 checkpoints on disk (sharded safetensors):
    `imm-trl merge` (linear and dare_linear) vs a plain read-and-write of the same bytes (read
    both checkpoints, write one checkpoint's worth, fsync) vs mergekit `task_arithmetic` and
    `dare_linear` with its low-memory flags, run from a separate virtual environment
    (`make mergekit` builds `.venv-mergekit`). Wall time and peak RSS (`/usr/bin/time` of each
    child process), every contender with one intra-op thread. Page cache is warm for all.

The load before each part (benchmarks/machine_load.py) is recorded beside its rows; the quiet
part waits for the machine to settle first and is labelled BUSY if it did not.

Usage:  python benchmarks/merge.py [--skip-lora] [--skip-checkpoints] [--workdir /tmp/imm_merge_bench]
Writes benchmarks/results/merge.json and benchmarks/results/merge.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine_load import describe, machine_load, settle  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MERGEKIT_YAML = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"

LLAMA_1B = dict(  # TinyLlama-1.1B shape
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    tie_word_embeddings=False,
)
LLAMA_1P7B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=24,
    num_attention_heads=32,
    num_key_value_heads=16,
    vocab_size=49152,
    tie_word_embeddings=False,
)
LORA_REPEATS = 2
# mergekit's flags for the least memory and time on a CPU (its README's advice)
MERGEKIT_BEST_FLAGS = ("--lazy-unpickle", "--low-cpu-memory", "--out-shard-size", "1B")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------
# memory sampling
# ------------------------------------------------------------------------------------------


class PeakRSS:
    """Samples this process's RSS every few milliseconds between start and stop."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


# ------------------------------------------------------------------------------------------
# (a) LoRA merge, one measurement per process
# ------------------------------------------------------------------------------------------


def lora_case(model_name: str, impl: str) -> dict:
    """Build the model and a LoRA adapter with non-zero B, then time one merge."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if model_name == "smollm2":
        from imm_trl.models import load_default_model

        model, _ = load_default_model(dtype=torch.float32)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**LLAMA_1B)
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    result = dict(
        model=model_name, impl=impl, params=n_params, dtype=str(next(model.parameters()).dtype)
    )
    if impl == "imm":
        from imm_trl.merging import LoraMerger, MergeConfig

        with PeakRSS() as capture:
            start, cpu = time.perf_counter(), time.process_time()
            merger = LoraMerger(peft_model, MergeConfig(method="linear", ratio=0.5))
            result["capture_seconds"] = time.perf_counter() - start
            result["capture_cpu_seconds"] = time.process_time() - cpu
        result["theta0_bytes"] = merger.theta0_bytes()
        result["capture_extra_rss_mb"] = (capture.peak - capture.start) / 2**20
        with PeakRSS() as rss:
            start, cpu = time.perf_counter(), time.process_time()
            merger.merge(peft_model, iteration=1)
            result["seconds"] = time.perf_counter() - start
            result["cpu_seconds"] = time.process_time() - cpu
    elif impl == "floor":
        result.update(lora_floor(peft_model))
        return result
    else:
        with PeakRSS() as rss:
            start, cpu = time.perf_counter(), time.process_time()
            peft_model.merge_and_unload()
            result["seconds"] = time.perf_counter() - start
            result["cpu_seconds"] = time.process_time() - cpu
    result["merge_extra_rss_mb"] = (rss.peak - rss.start) / 2**20
    return result


def lora_floor(peft_model) -> dict:
    """What any LoRA merge must do, timed on the same tensors with the same threads as imm-trl's
    merge: one pass reading theta0 and W and writing W (`W += theta0`, native dtype), plus the
    B @ A products formed block by block in a cache-resident buffer (no memory traffic). The
    floor is their sum."""
    import torch

    from imm_trl.merging import LoraMerger, MergeConfig
    from imm_trl.merging.functional import low_rank_block_rows
    from imm_trl.merging.parallel import for_each_tensor

    merger = LoraMerger(peft_model, MergeConfig(method="linear", ratio=0.5))
    targets = list(merger.targets.values())

    def traffic(target) -> None:
        target.base_layer.weight.data.add_(target.theta0)

    def products(target) -> None:
        layer = target.layers[0]
        b = layer.lora_B[merger.adapter].weight.detach().float()
        a = layer.lora_A[merger.adapter].weight.detach().float()
        block_rows = low_rank_block_rows(b.shape[0], a.shape[1])
        work = torch.empty(block_rows, a.shape[1])
        for begin in range(0, b.shape[0], block_rows):
            rows = b[begin : begin + block_rows]
            torch.mm(rows, a, out=work[: rows.shape[0]])

    seconds = {}
    with torch.no_grad():
        for name, function in (("traffic", traffic), ("products", products)):
            start = time.perf_counter()
            for_each_tensor(function, targets)
            seconds[name] = time.perf_counter() - start
    return dict(
        seconds=seconds["traffic"] + seconds["products"],
        traffic_seconds=seconds["traffic"],
        products_seconds=seconds["products"],
        cpu_seconds=float("nan"),
        merge_extra_rss_mb=0.0,
    )


# (contender name, impl, extra environment): PEFT also with one intra-op thread, its best
# setting on this machine (its two-thread merge is slower even on a quiet machine).
LORA_CONTENDERS = [
    ("imm-trl", "imm", {}),
    ("peft", "peft", {}),
    ("peft 1 thread", "peft", {"OMP_NUM_THREADS": "1"}),
    ("floor", "floor", {}),
]


@contextmanager
def competing_load(processes: int):
    """`processes` busy-looping processes (one per core: the load a shared machine puts on a
    merge), stopped on exit."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        time.sleep(2 if busy else 0)
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def run_lora_benchmarks(repeats: int = LORA_REPEATS) -> list[dict]:
    """Every contender on both models, on the quiet machine and then under one competing busy
    process per core; repeats alternate between contenders (a fresh process each; the fastest
    is reported, every run is kept)."""
    rows = []
    for condition, busy in (("quiet", 0), ("loaded", os.cpu_count() or 1)):
        before = settle()
        with competing_load(busy):
            for model_name in ("smollm2", "llama-1.1b"):
                runs = {name: [] for name, _, _ in LORA_CONTENDERS}
                for _ in range(repeats):
                    for name, impl, extra_env in LORA_CONTENDERS:
                        out = subprocess.run(
                            [sys.executable, __file__, "--lora-case", model_name, impl],
                            check=True, capture_output=True, text=True, env={**_env(), **extra_env},
                        )
                        runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                for name, _, _ in LORA_CONTENDERS:
                    row = min(runs[name], key=lambda r: r["seconds"])
                    row.update(
                        contender=name, condition=condition, load_before=before, load_after=machine_load(),
                        all_seconds=[r["seconds"] for r in runs[name]],
                        merge_extra_rss_mb=max(r["merge_extra_rss_mb"] for r in runs[name]),
                    )
                    print("lora", json.dumps(row), flush=True)
                    rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------
# (b) checkpoint merge
# ------------------------------------------------------------------------------------------


def build_checkpoints(workdir: Path) -> tuple[Path, Path, dict]:
    """Two bf16 checkpoints of the 1.7B config, sharded safetensors; tuned = base + noise."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from imm_trl.models import default_model_dir

    config = LlamaConfig(**LLAMA_1P7B)
    config.dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        layout = {
            name: (tuple(p.shape)) for name, p in LlamaForCausalLM(config).state_dict().items()
        }
    base_dir, tuned_dir = workdir / "base", workdir / "tuned"
    generator = torch.Generator().manual_seed(0)
    for directory, noise in ((base_dir, 0.0), (tuned_dir, 0.002)):
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(directory)
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        ):
            if (default_model_dir() / name).is_file():
                shutil.copy(default_model_dir() / name, directory / name)
        shards, shard, size, weight_map = [], {}, 0, {}
        names = list(layout)
        for name in names:
            generator.manual_seed(_stable_seed(name))
            tensor = torch.randn(layout[name], generator=generator, dtype=torch.float32).mul_(0.02)
            if noise:
                tensor.add_(torch.randn(layout[name], generator=generator).mul_(noise))
            shard[name] = tensor.to(torch.bfloat16)
            size += shard[name].numel() * 2
            if size >= 2 * 1024**3:
                shards.append(shard)
                shard, size = {}, 0
        if shard:
            shards.append(shard)
        total = 0
        for index, tensors in enumerate(shards):
            file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, directory / file_name, metadata={"format": "pt"})
            for name, tensor in tensors.items():
                weight_map[name] = file_name
                total += tensor.numel() * 2
        shards.clear()
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    params = sum(_numel(shape) for shape in layout.values())
    largest = max(_numel(shape) for shape in layout.values()) * 2
    return base_dir, tuned_dir, dict(params=params, bytes=params * 2, largest_tensor_bytes=largest)


def _stable_seed(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def read_and_write(base_dir: str, tuned_dir: str, out_dir: str) -> None:
    """Baseline: read every byte of both checkpoints, write the base's bytes out, fsync."""
    out = Path(out_dir)
    out.mkdir(parents=True)
    chunk = 64 * 1024**2
    buffer = bytearray(chunk)
    for base_file in sorted(Path(base_dir).glob("*.safetensors")):
        tuned_file = Path(tuned_dir) / base_file.name
        with (
            open(base_file, "rb", buffering=0) as base,
            open(tuned_file, "rb", buffering=0) as tuned,
            open(out / base_file.name, "wb", buffering=0) as sink,
        ):
            other = bytearray(chunk)
            while True:
                got = base.readinto(buffer)
                tuned.readinto(other)
                if not got:
                    break
                sink.write(memoryview(buffer)[:got])
            os.fsync(sink.fileno())


def timed_child(command: list[str], env: dict | None = None) -> dict:
    """Run a command under /usr/bin/time: wall seconds, the command's CPU seconds (user +
    system, all its threads) and its own peak RSS.

    (/usr/bin/time, not our own wait4: a child forked from this large process would report
    this process's resident memory as its own peak until it execs.)
    """
    stats = Path(f"/tmp/merge_bench_time_{os.getpid()}.txt")
    start = time.perf_counter()
    process = subprocess.run(
        ["/usr/bin/time", "-f", "%U %S %M", "-o", str(stats), *command],
        env=env or _env(threads="1"),  # one intra-op thread for every checkpoint contender
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seconds = time.perf_counter() - start
    lines = stats.read_text().strip().splitlines() if stats.is_file() else []
    fields = lines[-1].split() if lines else []
    user, system, peak_kb = (
        (float(fields[0]), float(fields[1]), int(fields[2])) if len(fields) == 3 else (-1, 0, -1)
    )
    stats.unlink(missing_ok=True)
    return dict(
        seconds=seconds,
        cpu_seconds=user + system,
        peak_rss_mb=peak_kb / 1024,
        returncode=process.returncode,
        tail=process.stdout.decode(errors="replace")[-1500:] if process.returncode else "",
    )


def mergekit_config(
    method: str, base_dir: Path, tuned_dir: Path, ratio: float, density: float
) -> str:
    parameters = {"weight": ratio}
    if method == "dare_linear":
        parameters["density"] = density
    return json.dumps(  # JSON is valid YAML
        {
            "merge_method": method,
            "base_model": str(base_dir),
            "models": [{"model": str(tuned_dir), "parameters": parameters}],
            "parameters": {"normalize": False},
            "dtype": "bfloat16",
        }
    )


def run_checkpoint_benchmarks(workdir: Path) -> dict:
    base_dir, tuned_dir, info = build_checkpoints(workdir)
    print("checkpoints", info, flush=True)
    # Warm the page cache so every contender reads from memory.
    read_and_write(str(base_dir), str(tuned_dir), str(workdir / "warmup"))
    shutil.rmtree(workdir / "warmup")
    rows = []
    python = sys.executable
    contenders = [
        (
            "read+write (baseline)",
            [python, __file__, "--read-write", str(base_dir), str(tuned_dir), str(workdir / "out")],
        ),
        (
            "imm-trl linear",
            [
                python,
                "-m",
                "imm_trl.cli",
                "merge",
                str(base_dir),
                str(tuned_dir),
                "--out",
                str(workdir / "out"),
                "--method",
                "linear",
                "--ratio",
                "0.5",
            ],
        ),
        (
            "imm-trl dare_linear",
            [
                python,
                "-m",
                "imm_trl.cli",
                "merge",
                str(base_dir),
                str(tuned_dir),
                "--out",
                str(workdir / "out"),
                "--method",
                "dare_linear",
                "--ratio",
                "0.5",
                "--density",
                "0.8",
            ],
        ),
    ]
    if MERGEKIT_YAML.is_file():
        for method in ("task_arithmetic", "dare_linear"):
            config_path = workdir / f"mergekit_{method}.yml"
            config_path.write_text(mergekit_config(method, base_dir, tuned_dir, 0.5, 0.8))
            contenders.append(
                (
                    f"mergekit {method} ({' '.join(MERGEKIT_BEST_FLAGS)})",
                    [
                        str(MERGEKIT_YAML),
                        str(config_path),
                        str(workdir / "out"),
                        "--quiet",
                        "--random-seed",
                        "0",
                        *MERGEKIT_BEST_FLAGS,
                    ],
                )
            )
    else:
        rows.append(
            dict(name="mergekit", error=f"{MERGEKIT_YAML} not found; mergekit not installed")
        )
    for name, command in contenders:
        shutil.rmtree(workdir / "out", ignore_errors=True)
        row = dict(name=name, **timed_child(command), load_average=os.getloadavg()[0])
        print("checkpoint", row, flush=True)
        rows.append(row)
    shutil.rmtree(workdir / "out", ignore_errors=True)
    return dict(checkpoint=info, rows=rows)


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def _env(threads: str | None = None) -> dict:
    """The children's environment: this checkout first on the path, torch's default threads
    (what users get) unless `threads` is given."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def lora_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "## (a) LoRA merge (r=16, all linear projections; imm-trl at alpha=0.5 incl. adapter reset)",
        "",
        "Each run is a fresh process with torch's default threads (2 here) unless the contender says "
        "otherwise; the fastest of the alternating repeats is reported, all are listed. `loaded`: one "
        "busy-looping process per core ran beside the merge. `floor`: one pass reading theta0 and W and "
        "writing W plus the B @ A products (`lora_floor`), same tensors and threads as imm-trl.",
        "",
        "| model | dtype | condition | contender | merge s (best) | all runs s | CPU s | peak extra RSS MiB "
        "| theta0 held MiB | load before (the loaded part starts its busy processes after) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        theta0 = f"{row['theta0_bytes'] / 2**20:.0f}" if "theta0_bytes" in row else "-"
        lines.append(
            f"| {row['model']} | {row['dtype'].removeprefix('torch.')} | {row['condition']} | {row['contender']} | "
            f"{row['seconds']:.3f} | {', '.join(f'{x:.2f}' for x in row['all_seconds'])} | "
            f"{row.get('cpu_seconds', float('nan')):.2f} | {row['merge_extra_rss_mb']:.0f} | {theta0} | "
            f"{describe(row['load_before'])} |"
        )
    lines.append("")
    best = {(r["model"], r["condition"], r["contender"]): r["seconds"] for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for condition in ("quiet", "loaded"):
            imm = best.get((model, condition, "imm-trl"))
            peft = min(v for (m, c, n), v in best.items() if m == model and c == condition and n.startswith("peft"))
            floor = best.get((model, condition, "floor"))
            lines.append(
                f"- {model}, {condition}: imm-trl {imm:.2f} s = {peft / imm:.2f}x the speed of PEFT's faster "
                f"setting ({peft:.2f} s), {imm / floor:.2f}x the floor ({floor:.2f} s)."
            )
        imm_q, imm_l = best[(model, "quiet", "imm-trl")], best[(model, "loaded", "imm-trl")]
        peft_q, peft_l = best[(model, "quiet", "peft")], best[(model, "loaded", "peft")]
        lines.append(
            f"- {model}, loaded over quiet: imm-trl {imm_l / imm_q:.2f}x, PEFT (default threads) {peft_l / peft_q:.2f}x."
        )
    return lines + [""]


def markdown(results: dict) -> str:
    lines = [
        f"# Merge benchmark ({results['machine']})",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    if results.get("note"):
        lines += [results["note"], ""]
    if results.get("lora"):
        lines += lora_markdown(results["lora"])
    if results.get("checkpoints"):
        info = results["checkpoints"]["checkpoint"]
        lines += [
            f"## (b) Checkpoint merge: two {info['params'] / 1e9:.2f}B-param bf16 checkpoints "
            f"({info['bytes'] / 2**30:.2f} GiB each; largest tensor {info['largest_tensor_bytes'] / 2**20:.0f} MiB)",
            "",
            "| contender | seconds | x baseline | CPU s | CPU x baseline | peak RSS MiB | load avg |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = results["checkpoints"]["rows"]
        baseline_row = next((r for r in rows if r.get("name", "").startswith("read+write")), {})
        baseline, baseline_cpu = baseline_row.get("seconds"), baseline_row.get("cpu_seconds")
        for row in rows:
            if "error" in row or row.get("returncode"):
                lines.append(
                    f"| {row.get('name')} | failed: {row.get('error') or row.get('tail', '')[-300:]!r} | | | | | |"
                )
                continue
            factor = f"{row['seconds'] / baseline:.2f}" if baseline else "-"
            cpu = row.get("cpu_seconds", float("nan"))
            cpu_factor = f"{cpu / baseline_cpu:.2f}" if baseline_cpu else "-"
            lines.append(
                f"| {row['name']} | {row['seconds']:.1f} | {factor} | {cpu:.1f} | {cpu_factor} | "
                f"{row['peak_rss_mb']:.0f} | {row.get('load_average', float('nan')):.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--skip-checkpoints", action="store_true")
    parser.add_argument("--workdir", default="/tmp/imm_merge_bench")
    parser.add_argument(
        "--update", action="store_true", help="keep the parts not re-run from results/merge.json"
    )
    parser.add_argument(
        "--note", default="", help="a sentence about the conditions, printed under the command"
    )
    parser.add_argument("--lora-case", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--read-write", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lora_case:
        print(json.dumps(lora_case(*args.lora_case)))
        return
    if args.read_write:
        read_and_write(*args.read_write)
        return
    results = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        command="python " + shlex.join(sys.argv),
        note=args.note,
    )
    if args.update and (RESULTS / "merge.json").is_file():
        # Re-run only some parts, keeping the others from the previous run's file.
        previous = json.loads((RESULTS / "merge.json").read_text())
        results = {
            **previous,
            "command": f"{previous.get('command')}; then python " + shlex.join(sys.argv),
            "note": " Then: ".join(filter(None, [previous.get("note"), args.note])),
        }
    if not args.skip_lora:
        results["lora"] = run_lora_benchmarks()
    if not args.skip_checkpoints:
        workdir = Path(args.workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        try:
            results["checkpoints"] = run_checkpoint_benchmarks(workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "merge.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
