"""Helpers shared by the default-model vLLM test modules (one engine per module)."""

import json
from pathlib import Path

GSM8K_SAMPLE = Path(__file__).parent / "fixtures" / "gsm8k" / "test_sample.jsonl"


def gsm8k_prompts(count):
    rows = [json.loads(line) for line in GSM8K_SAMPLE.read_text().splitlines()[:count]]
    return [[{"role": "user", "content": row["question"]}] for row in rows]


def common_prefix_tokens(a, b, tokenizer):
    ids_a, ids_b = tokenizer(a)["input_ids"], tokenizer(b)["input_ids"]
    count = 0
    for x, y in zip(ids_a, ids_b, strict=False):
        if x != y:
            break
        count += 1
    return count


def greedy_agreement(texts_a, texts_b, tokenizer, prefix_tokens=24) -> list[bool]:
    """Per prompt: equal completions, or ones sharing their first `prefix_tokens` tokens (a
    near-tie flipped late by rounding changes the rest of a greedy completion)."""
    return [
        a == b or common_prefix_tokens(a, b, tokenizer) >= prefix_tokens
        for a, b in zip(texts_a, texts_b, strict=True)
    ]
