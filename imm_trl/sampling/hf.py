"""Sampling with Hugging Face `generate`: batched, left-padded, sorted by prompt length."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from imm_trl.sampling.base import (
    GenerationStats,
    Prompt,
    SamplerBase,
    SamplingParams,
    cut_at_stop,
    prompt_token_ids,
)
from imm_trl.sampling.nucleus import nucleus_filter_


@dataclass
class HFSamplerConfig:
    """Knobs of the HF `generate` backend."""

    batch_size: int | None = field(
        default=None,
        metadata={"help": "Sequences per generate call; None picks the largest that fits memory."},
    )
    max_batch_size: int = field(
        default=64,
        metadata={
            "help": "Upper bound for the automatic batch size. Bigger is not faster end to end: "
            "a batch decodes until its longest sequence stops, so on 2 CPU cores 256 sequences "
            "gave 32 generated tokens/s in fp32 (62 in bf16) where 64 gave 90 (160) "
            "(benchmarks/sampling.py)."
        },
    )
    memory_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Share of free memory (GPU memory, or available RAM on CPU) the KV cache of "
            "one batch may take when the batch size is chosen automatically."
        },
    )
    fast_top_p: bool = field(
        default=True,
        metadata={
            "help": "Apply temperature and top-p with `nucleus_filter_` instead of transformers' "
            "TopPLogitsWarper, which sorts the whole vocabulary every step; same kept tokens."
        },
    )
    show_progress: bool = field(default=True, metadata={"help": "Show a tqdm bar over batches."})


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 1024**3


def kv_cache_bytes_per_token(model) -> int:
    """Bytes of key/value cache one token takes in `model` (all layers)."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype_bytes = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def auto_batch_size(model, longest_sequence: int, memory_bytes: int, max_batch_size: int) -> int:
    """The largest batch whose KV cache (plus the same again for activations and logits, a
    rough margin) fits in `memory_bytes`, between 1 and `max_batch_size`."""
    per_sequence = 2 * kv_cache_bytes_per_token(model) * longest_sequence
    per_sequence += 4 * model.config.get_text_config().vocab_size  # fp32 logits of one step
    return max(1, min(max_batch_size, memory_bytes // max(per_sequence, 1)))


class TemperatureNucleus(LogitsProcessor):
    """A transformers logits processor: divide by the temperature, then `nucleus_filter_`."""

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return nucleus_filter_(scores / self.temperature, self.top_p)


class HFSampler(SamplerBase):
    """`Sampler` over a transformers (or PEFT-wrapped) causal LM, on CPU or GPU. It generates
    with the model object it is given (during IMM, the trainer's own), so a merge reaches it
    without `update_weights`, and there is no engine to close."""

    def __init__(self, model, tokenizer, config: HFSamplerConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or HFSamplerConfig()
        self.stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams
    ) -> list[list[str]]:
        start = time.perf_counter()
        encoded = [prompt_token_ids(p, self.tokenizer) for p in prompts]
        # Each prompt n times, longest first: similar lengths share a batch (little padding),
        # and an out-of-memory error shows up in the first batch, not the last.
        jobs = sorted(
            ((i, ids) for i, ids in enumerate(encoded) for _ in range(n)),
            key=lambda job: -len(job[1]),
        )
        batch_size = self.config.batch_size or auto_batch_size(
            self.model,
            (len(jobs[0][1]) if jobs else 0) + params.max_new_tokens,
            int(available_memory_bytes(self.device) * self.config.memory_fraction),
            self.config.max_batch_size,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        results: list[list[str]] = [[] for _ in prompts]
        self.stats = GenerationStats()
        was_training = self.model.training
        self.model.eval()
        try:
            bar = tqdm(
                total=len(jobs),
                desc="HF generate",
                unit="seq",
                disable=not self.config.show_progress,
            )
            position = 0
            while position < len(jobs):
                batch = jobs[position : position + batch_size]
                try:
                    texts = self._generate_batch([ids for _, ids in batch], params)
                except torch.cuda.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    batch_size //= 2
                    torch.cuda.empty_cache()
                    continue
                for (prompt_index, _), text in zip(batch, texts, strict=True):
                    results[prompt_index].append(text)
                position += len(batch)
                bar.update(len(batch))
            bar.close()
        finally:
            self.model.train(was_training)
        self.stats.completions = len(jobs)
        self.stats.seconds = time.perf_counter() - start
        return results

    @torch.inference_mode()
    def _generate_batch(self, batch_ids: list[list[int]], params: SamplingParams) -> list[str]:
        pad_id = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch_ids)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch_ids])
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids]
        )
        sampling = {"do_sample": False}
        if not params.greedy:
            # top_k=0 switches off the model's default top-k, as vLLM does not apply one.
            sampling = {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": 0,
            }
            if self.config.fast_top_p and params.top_p < 1:
                # Custom processors run before transformers' warpers, so this one divides by
                # the temperature itself and the warpers are switched off.
                processor = TemperatureNucleus(params.temperature, params.top_p)
                sampling.update(
                    temperature=1.0, top_p=1.0, logits_processor=LogitsProcessorList([processor])
                )
        stop = (
            {"stop_strings": list(params.stop), "tokenizer": self.tokenizer} if params.stop else {}
        )
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_new_tokens=params.max_new_tokens,
            pad_token_id=pad_id,
            **sampling,
            **stop,
        )
        new_tokens = output[:, width:].cpu()
        texts = []
        for row in new_tokens:
            tokens = self._until_end(row.tolist())
            self.stats.generated_tokens += len(tokens)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            texts.append(cut_at_stop(text, params.stop))
        return texts

    def _until_end(self, tokens: list[int]) -> list[int]:
        """Generated tokens up to and including the first end-of-sequence token; padding after
        it does not count as generated."""
        eos = self.model.generation_config.eos_token_id
        end_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        end_ids.discard(None)
        for i, token in enumerate(tokens):
            if token in end_ids:
                return tokens[: i + 1]
        return tokens
