"""Shared-prefix training forward: the prompt prefix that several rows of a batch share is
computed once.

IMM's default suites prompt with few-shot turns of the question's own family, so the rows of a
training batch share their first 95-160 tokens and differ only in the last 15-25 (question and
completion); GRPO and RLOO batches hold `num_generations` completions of each prompt. A causal
model's hidden states at the shared positions depend on those tokens alone, so the backbone runs
the prefix once per group of rows, with a KV cache, and each row's suffix attends to that cache.
The hidden states are those of the ordinary padded forward (up to float summation order); autograd
sums each row's gradient through the repeated cache, so the gradients are those of the ordinary
forward too. With batches of 8 mixing two families this runs about a third of the tokens
(`tests/test_shared_prefix.py` checks the equality, `benchmarks/imm_overhead.py` the time).

Rows share a prefix only where both their tokens and their attention masks agree, so right-padded
SFT batches and left-padded GRPO prompts are both exact. Position ids are those the ordinary
forward gives when none are passed (column index), as TRL's trainers pass none.

Only the backbone is wrapped (TRL's fused LM head and loss see the usual `(batch, length, hidden)`
tensor, zero after each group's last attended column), and only training-style calls: no
`position_ids` or `inputs_embeds` given (padding-free and sequence-parallel batches pass
them), no cache asked for or given (generation runs unchanged), no gradient checkpointing (it
turns the KV cache off), and a backbone that takes `past_key_values`. Every other call runs the
original forward unchanged.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPast

MIN_SHARED_TOKENS = 16  # below this a group's extra backbone call costs more than it saves


def common_prefix_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor, row: int) -> torch.Tensor:
    """For every row, how many leading positions it shares with row `row` (same token, same mask)."""
    same = (input_ids == input_ids[row]) & (attention_mask == attention_mask[row])
    return same.to(torch.int32).cumprod(dim=1).sum(dim=1)


def attended_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """For every row, one past its last attended column (its length without right padding)."""
    columns = torch.arange(1, attention_mask.size(1) + 1, device=attention_mask.device)
    return (attention_mask.bool() * columns).amax(dim=1)


def prefix_groups(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    min_shared: int = MIN_SHARED_TOKENS,
    lengths: torch.Tensor | None = None,
) -> list[tuple[list[int], int]]:
    """Rows grouped by a shared prefix: `(rows, prefix_length)` for each group of two or more rows
    sharing at least `min_shared` tokens (every row keeps one token of its own), then the other
    rows as one group with prefix length 0.

    Each group starts from the first row left and takes the prefix length that saves the most
    tokens, (members - 1) * length: rows that share a long few-shot prefix form a group of their
    own rather than joining every row that shares only a short system prompt. `lengths` (each
    row's `attended_lengths`) is computed from the mask unless the caller has it already.
    """
    lengths = attended_lengths(attention_mask) if lengths is None else lengths
    remaining, groups, alone = list(range(input_ids.size(0))), [], []
    while remaining:
        first = remaining[0]
        shared = common_prefix_lengths(input_ids[remaining], attention_mask[remaining], 0)
        shared = torch.minimum(shared, lengths[remaining] - 1).tolist()
        best_saving, best_prefix = 0, 0
        for prefix in sorted(set(shared)):
            members = sum(n >= prefix for n in shared)
            if prefix >= min_shared and members >= 2 and (members - 1) * prefix > best_saving:
                best_saving, best_prefix = (members - 1) * prefix, prefix
        if best_prefix:
            members = [row for row, n in zip(remaining, shared, strict=True) if n >= best_prefix]
            groups.append((members, best_prefix))
            remaining = [row for row in remaining if row not in members]
        else:
            alone.append(first)
            remaining = remaining[1:]
    return groups + ([(alone, 0)] if alone else [])


def can_share(input_ids, attention_mask, kwargs) -> bool:
    """Whether a backbone call may run shared prefixes once: several rows of token ids with a
    mask, no cache asked for (generation), and none of the inputs that place tokens themselves
    (padding-free or sequence-parallel position ids, embeddings, a cache)."""
    return (
        input_ids is not None and attention_mask is not None and input_ids.size(0) > 1
        and kwargs.get("use_cache") is not True
        and all(kwargs.get(name) is None for name in ("position_ids", "inputs_embeds", "past_key_values"))
    )


def group_hidden_states(forward, input_ids, attention_mask, rows, prefix, length, kwargs):
    """The backbone's last hidden states of `rows`, up to `length`, running `prefix` tokens once."""
    ids, mask = input_ids[rows, :length], attention_mask[rows, :length]
    if prefix == 0:
        return forward(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).last_hidden_state
    shared = forward(input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix], use_cache=True, **kwargs)
    cache = shared.past_key_values
    cache.batch_repeat_interleave(len(rows))
    positions = torch.arange(prefix, length, device=ids.device).expand(len(rows), -1)
    own = forward(
        input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions,
        past_key_values=cache, use_cache=True, **kwargs,
    ).last_hidden_state
    return torch.cat([shared.last_hidden_state.expand(len(rows), -1, -1), own], dim=1)


def shared_prefix_forward(forward, min_shared: int = MIN_SHARED_TOKENS):
    """`forward` (a backbone's) computing each group's shared prefix once; see the module doc."""

    def wrapped(input_ids=None, attention_mask=None, **kwargs):
        if not can_share(input_ids, attention_mask, kwargs):
            return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        lengths = attended_lengths(attention_mask)
        groups = prefix_groups(input_ids, attention_mask, min_shared, lengths) if lengths.all() else []
        if not any(prefix for _, prefix in groups):
            return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("use_cache", None)
        pieces, order = [], []
        for rows, prefix in groups:
            length = int(lengths[rows].max())
            hidden = group_hidden_states(forward, input_ids, attention_mask, rows, prefix, length, kwargs)
            pieces.append(F.pad(hidden, (0, 0, 0, input_ids.size(1) - length)))
            order += rows
        hidden = torch.cat(pieces)[torch.tensor(order).argsort()]
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    return wrapped


def backbone_of(model):
    """The decoder stack a causal LM's forward runs (PEFT and DDP wrappers looked through)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "base_model", None)


@contextlib.contextmanager
def share_prompt_prefixes(model, enabled: bool = True):
    """Inside the block, `model`'s backbone computes shared prefixes once (where exact)."""
    backbone = backbone_of(model)
    usable = (
        enabled and backbone is not None and backbone is not model
        and "past_key_values" in inspect.signature(backbone.forward).parameters
        and not getattr(backbone, "is_gradient_checkpointing", False)
    )
    if not usable:
        yield
        return
    own_forward = backbone.__dict__.get("forward")  # e.g. an accelerate hook's
    backbone.forward = shared_prefix_forward(backbone.forward)
    try:
        yield
    finally:
        if own_forward is None:
            del backbone.forward
        else:
            backbone.forward = own_forward
