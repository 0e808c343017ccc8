"""What every sampling backend shares: the parameters, the protocol, prompt rendering."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable

from imm_trl.validation import check_dataclass

if TYPE_CHECKING:
    import torch

ChatMessages = list[dict[str, str]]
Prompt = Union[str, ChatMessages]  # noqa: UP007 (a runtime alias; `|` on generics is fine too)


@dataclass
class SamplingParams:
    """How to sample. The same object drives every backend."""

    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature; 0 means greedy decoding."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0 = off)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Most tokens generated per sample."})
    stop: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Stop strings; the returned text ends before the first one found."},
    )
    seed: int | None = field(
        default=None,
        metadata={
            "help": "Random seed for this call. HF: seeds torch before generating. vLLM on GPU: "
            "per-request seed; vLLM on CPU rejects per-request seeds, so the engine's seed is used."
        },
    )

    def __post_init__(self) -> None:
        check_dataclass(self)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class GenerationStats:
    """What the last `generate` call did; benchmarks read it."""

    completions: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


@runtime_checkable
class Sampler(Protocol):
    """Anything that turns prompts into `n` completions each, and can be handed new weights
    and closed. `SamplerBase` gives the no-op parts to backends that need none; samplers are
    context managers that close themselves."""

    needs_weight_updates: bool
    """True when the sampler holds its own copy of the weights (a vLLM engine), so the caller
    must hand it every merged model through `update_weights`; False when it generates with the
    trained model itself (HF `generate`), and building the weights to hand over would be
    wasted work."""

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams
    ) -> list[list[str]]:
        """`n` completion texts per prompt, in prompt order."""
        ...

    def update_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> float:
        """Sample with these HF-format weights from now on; returns the seconds it took."""
        ...

    def close(self) -> None:
        """Free what the sampler holds (an engine, its memory); safe to call twice."""
        ...

    def __enter__(self) -> Sampler: ...

    def __exit__(self, *exc_info) -> None: ...


class SamplerBase:
    """The parts of `Sampler` a backend without its own weights or engine needs nothing for:
    no weight updates, nothing to close; and the context manager over `close`."""

    needs_weight_updates = False

    def update_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> float:
        return 0.0

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PartialSampler(SamplerBase):
    """A sampler written against part of the protocol (often `generate` alone, as custom
    samplers for earlier versions were), completed with `SamplerBase`'s no-ops; a method the
    object does have is used. Other attributes (`stats`, ...) are the object's own."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.needs_weight_updates = callable(getattr(sampler, "update_weights", None))

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams
    ) -> list[list[str]]:
        return self.sampler.generate(prompts, n, params)

    def update_weights(self, weights) -> float:
        return self.sampler.update_weights(weights) if self.needs_weight_updates else 0.0

    def close(self) -> None:
        close = getattr(self.sampler, "close", None)
        if callable(close):
            close()


def as_sampler(sampler) -> Sampler:
    """`sampler` itself when it implements the whole `Sampler` protocol, else a
    `PartialSampler` around it: the one place that asks what a caller's object can do."""
    return sampler if isinstance(sampler, Sampler) else PartialSampler(sampler)


def render_prompt(prompt: Prompt, tokenizer) -> str:
    """Chat messages through the chat template (with the assistant turn opened); text as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(prompt: Prompt, tokenizer) -> list[int]:
    """Token ids of a rendered prompt. The chat template already holds the special tokens, so
    none are added (adding a BOS here would make the two backends see different inputs)."""
    return tokenizer(render_prompt(prompt, tokenizer), add_special_tokens=False)["input_ids"]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first stop string in it."""
    positions = [text.find(s) for s in stop if s and s in text]
    return text[: min(positions)] if positions else text
