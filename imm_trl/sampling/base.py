"""What every sampling backend shares: the parameters, the protocol, prompt rendering."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union, runtime_checkable

from imm_trl.validation import check_dataclass

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
    """Anything that turns prompts into `n` completions each."""

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams
    ) -> list[list[str]]:
        """`n` completion texts per prompt, in prompt order."""
        ...


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
