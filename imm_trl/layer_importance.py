"""Layer importance for a task, and the per-layer merge ratio map it suggests.

Importance of decoder layer l = how much a task score drops when l is skipped (made the
identity: `skip_layers`, one forward pass per layer), or a first-order gradient estimate of that
(`layer_importance_by_gradient`, one backward pass per batch). `ratio_map_from_importance`
turns it into a ratio map for layer-adaptive IMM: important layers get a lower merge ratio and
stay closer to theta0. `imm_trl.analysis` sets this against the update magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from imm_trl.merging.config import LAYER_PREFIX

ScoreFn = Callable[[nn.Module], float]


# --------------------------------------------------------------------------------------------
# Layer names
# --------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module, prefix: str = LAYER_PREFIX) -> nn.ModuleList:
    """The model's list of decoder layers: the first `nn.ModuleList` whose attribute name is
    `prefix` (`model.model.layers` for Llama/Qwen2/Mistral, also inside a PEFT wrapper)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == prefix:
            return module
    raise ValueError(
        f"{type(model).__name__} has no nn.ModuleList named {prefix!r}; pass the name of its "
        "decoder-layer list as `prefix` (e.g. 'h' for GPT-2)"
    )


# --------------------------------------------------------------------------------------------
# Skipping layers
# --------------------------------------------------------------------------------------------


def _identity_forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # transformers >= 5 decoder layers take the hidden states first and return them as a
    # plain tensor (not a tuple), so the identity is "return the input".
    return hidden_states


@contextmanager
def skip_layers(
    model: nn.Module, indices: Sequence[int], *, prefix: str = LAYER_PREFIX
) -> Iterator[nn.Module]:
    """Within the block, the chosen decoder layers return their input hidden states unchanged.

    Each layer's `forward` is shadowed by an instance attribute (so module hooks still run and
    parameters stay in place) and restored on exit, also when the block raises. A forward that
    was already an instance attribute (accelerate's device hooks) is put back as it was.
    """
    layers = decoder_layers(model, prefix)
    chosen = sorted(set(indices))
    for index in chosen:
        if not 0 <= index < len(layers):
            raise IndexError(
                f"layer {index} does not exist; the model has {len(layers)} decoder layers"
            )
    missing = object()
    saved = {index: layers[index].__dict__.get("forward", missing) for index in chosen}
    try:
        for index in chosen:
            layers[index].forward = _identity_forward
        yield model
    finally:
        for index, forward in saved.items():
            if forward is missing:
                del layers[index].forward
            else:
                layers[index].forward = forward


# --------------------------------------------------------------------------------------------
# Task scores (higher is better)
# --------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off inside the block; the model's training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def encode_gold_rows(
    tokenizer, rows: Sequence[Mapping[str, Any]]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per row. A string question becomes one user turn; questions and
    chat messages go through the chat template with the assistant turn opened, as the samplers
    render them; the answer follows as plain text."""
    from imm_trl.sampling.base import prompt_token_ids

    encoded = []
    for number, row in enumerate(rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"row {number} needs 'question' and 'answer' keys, has {sorted(row)}")
        question = row["question"]
        messages = (
            question if isinstance(question, list) else [{"role": "user", "content": str(question)}]
        )
        answer_ids = tokenizer(str(row["answer"]), add_special_tokens=False)["input_ids"]
        if not answer_ids:
            raise ValueError(f"row {number} has an empty answer")
        encoded.append((prompt_token_ids(messages, tokenizer), answer_ids))
    return encoded


def _gold_batches(
    encoded: list[tuple[list[int], list[int]]], batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, labels) batches, right-padded so every real token keeps the
    position it has alone; labels are the answer tokens, -100 elsewhere."""
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (prompt, answer) in enumerate(chunk):
            length = len(prompt) + len(answer)
            input_ids[row, :length] = torch.tensor(prompt + answer)
            attention_mask[row, :length] = 1
            labels[row, len(prompt) : length] = torch.tensor(answer)
        yield input_ids.to(device), attention_mask.to(device), labels.to(device)


def _gold_log_likelihood_sum(model: nn.Module, input_ids, attention_mask, labels) -> torch.Tensor:
    """Sum over the batch's answer tokens of log p(token | everything before it).

    Logits are computed only from the position before the batch's earliest answer token on
    (`logits_to_keep`): over a large vocabulary the output layer and softmax of the prompt
    positions would be a sizeable share of the work for nothing."""
    is_answer = (labels != -100).any(dim=0)
    first_predicting = max(int(is_answer.nonzero()[0]) - 1, 0)
    kept = labels.shape[1] - first_predicting
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=kept
    ).logits
    predictions = logits[:, :-1].float()
    targets = labels[:, first_predicting + 1 :]
    return -nn.functional.cross_entropy(
        predictions.reshape(-1, predictions.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def gold_log_likelihood_score(
    tokenizer, rows: Sequence[Mapping[str, Any]], *, batch_size: int = 8
) -> ScoreFn:
    """A score function: mean log-likelihood per gold-answer token given its prompt.

    Teacher forcing over `rows` (`{"question": str or chat messages, "answer": str}`), so it
    is deterministic and costs one forward pass per batch. Rows are tokenized once, here.
    """
    encoded = encode_gold_rows(tokenizer, rows)
    answer_tokens = sum(len(answer) for _, answer in encoded)

    def score(model: nn.Module) -> float:
        device = next(model.parameters()).device
        total = 0.0
        with _eval_mode(model), torch.no_grad():
            for batch in _gold_batches(encoded, batch_size, device):
                total += float(_gold_log_likelihood_sum(model, *batch))
        return total / answer_tokens

    return score


def accuracy_score(accuracy_fn: Callable[[nn.Module], float]) -> ScoreFn:
    """A score function from the caller's `accuracy_fn(model) -> float` (e.g. greedy accuracy
    on a task from the evaluation module), checked to return a finite number."""

    def score(model: nn.Module) -> float:
        value = accuracy_fn(model)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"accuracy_fn must return a finite number, returned {value!r}")
        return float(value)

    return score


# --------------------------------------------------------------------------------------------
# Layer importance
# --------------------------------------------------------------------------------------------


def layer_importance_by_skipping(
    model: nn.Module, score_fn: ScoreFn, *, prefix: str = LAYER_PREFIX
) -> list[float]:
    """importance_l = score(full model) - score(model with layer l skipped), per layer.

    `score_fn(model) -> float` is any task score, higher is better: `gold_log_likelihood_score`
    (cheap, deterministic) or `accuracy_score(accuracy_fn)`. Costs L + 1 calls of `score_fn`.
    A negative importance means the task does better without the layer.
    """
    full = score_fn(model)
    importance = []
    for index in range(len(decoder_layers(model, prefix))):
        with skip_layers(model, [index], prefix=prefix):
            importance.append(full - score_fn(model))
    return importance


@contextmanager
def _requiring_grad(parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Parameters require gradients inside the block (frozen ones too); flags restored after."""
    flags = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)


@contextmanager
def _recording_layer_io(layers: nn.ModuleList) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Inside the block, each decoder-layer call appends (input hidden states, output hidden
    states) to the yielded list, in layer order."""
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        records.append((hidden_in, output[0] if isinstance(output, tuple) else output))

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _skip_taylor_importance(model, layers, batches, answer_tokens: int) -> list[float]:
    """Per layer, sum over batches of dL/dh_out . (h_in - h_out): the first-order change of L
    when the layer's output is replaced by its input, i.e. when the layer is skipped."""
    importance = [0.0] * len(layers)
    for batch in batches:
        with _recording_layer_io(layers) as records:
            loss = -_gold_log_likelihood_sum(model, *batch) / answer_tokens
        outputs = [hidden_out for _, hidden_out in records]
        for index, ((hidden_in, hidden_out), grad) in enumerate(
            zip(records, torch.autograd.grad(loss, outputs), strict=True)
        ):
            importance[index] += float((grad * (hidden_in - hidden_out).detach()).sum())
    return importance


def _parameter_taylor_importance(model, layers, batches, answer_tokens: int) -> list[float]:
    """Per layer, sum over its parameters of |theta * dL/dtheta|, dL/dtheta over all batches."""
    per_layer = [list(layer.parameters()) for layer in layers]
    flat = [p for params in per_layer for p in params]
    gradients = [torch.zeros_like(p, dtype=torch.float32) for p in flat]
    for batch in batches:
        loss = -_gold_log_likelihood_sum(model, *batch) / answer_tokens
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
        for total, grad in zip(gradients, grads, strict=True):
            if grad is not None:
                total += grad.float()
    importance, position = [], 0
    for params in per_layer:
        terms = zip(params, gradients[position : position + len(params)], strict=True)
        importance.append(sum(float((p.detach().float() * g).abs().sum()) for p, g in terms))
        position += len(params)
    return importance


GRADIENT_ATTRIBUTIONS = {
    "skip": _skip_taylor_importance,
    "parameters": _parameter_taylor_importance,
}


def layer_importance_by_gradient(
    model: nn.Module,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    *,
    attribution: str = "skip",
    batch_size: int = 8,
    prefix: str = LAYER_PREFIX,
) -> list[float]:
    """Gradient attribution of each decoder layer: one forward and backward pass per batch of
    rows, instead of the L + 1 scoring passes of `layer_importance_by_skipping`.

    L is the mean negative log-likelihood per gold-answer token (the negative of
    `gold_log_likelihood_score`). `attribution` picks the estimate:

    - "skip" (default): sum over tokens of dL/dh_out . (h_in - h_out), with h_in and h_out the
      layer's input and output hidden states. Skipping the layer replaces h_out by h_in, so
      this is the first-order Taylor estimate of the skipping importance with the gold
      log-likelihood score, in its units and with its sign. On SmolLM2-135M (32 arithmetic
      rows) its Spearman rho with the exact skipping importance was 0.54.
    - "parameters": sum over the layer's parameters of |theta * dL/dtheta| (Molchanov et al.'s
      Taylor importance: each term estimates the loss change when that one parameter is set
      to zero; absolute values keep opposite signs from cancelling). Much larger than the
      skipping importance and not in its units; on the same rows its rho with skipping was 0.03.

    Frozen parameters count too; the model's `.grad` is left untouched.
    """
    if attribution not in GRADIENT_ATTRIBUTIONS:
        raise ValueError(
            f"attribution must be one of {sorted(GRADIENT_ATTRIBUTIONS)}, got {attribution!r}"
        )
    layers = decoder_layers(model, prefix)
    encoded = encode_gold_rows(tokenizer, rows)
    answer_tokens = sum(len(answer) for _, answer in encoded)
    batches = _gold_batches(encoded, batch_size, next(model.parameters()).device)
    # The layers' parameters must require gradients for their outputs to be in the graph.
    with _eval_mode(model), _requiring_grad(list(layers.parameters())):
        return GRADIENT_ATTRIBUTIONS[attribution](model, layers, batches, answer_tokens)


# --------------------------------------------------------------------------------------------
# From measurements to a merge ratio map
# --------------------------------------------------------------------------------------------


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho of `a` and `b` and its two-sided p-value (scipy; ties get average ranks).
    NaN for both when either sequence is constant (the correlation is undefined)."""
    from scipy.stats import spearmanr

    if len(a) != len(b):
        raise ValueError(f"rank correlation needs equal lengths, got {len(a)} and {len(b)}")
    if len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan, math.nan
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def ratio_map_from_importance(
    importance: Sequence[float],
    *,
    low: float = 0.3,
    high: float = 0.7,
    default: float = 0.5,
    prefix: str = LAYER_PREFIX,
) -> dict[str, float]:
    """A per-layer merge ratio map (`{"layers.0": 0.7, ..., "default": 0.5}`) for `MergeConfig`.

    More important layers get a LOWER ratio: the merge `theta0 + ratio * delta` keeps them
    closer to theta0, whose reasoning-critical layers the paper finds self-improvement should
    not move far. The ratio is linear in the importance rank: the least important layer gets
    `high`, the most important `low`, evenly spaced between (ties share their average rank, so
    equal importances get equal ratios; a single layer gets the midpoint). `default` covers
    everything outside the decoder layers (embeddings, final norm, lm_head). Ratios are rounded
    to 4 decimals so the map reads well in a recipe.
    """
    from scipy.stats import rankdata

    if not importance:
        return {"default": default}
    if any(not math.isfinite(v) for v in importance):
        raise ValueError(f"importance values must be finite, got {list(importance)}")
    ranks = rankdata(importance)  # 1 = least important
    span = len(importance) - 1
    ratio_map = {}
    for index, rank in enumerate(ranks):
        fraction = (rank - 1) / span if span else 0.5  # 0 least important .. 1 most
        ratio_map[f"{prefix}.{index}"] = round(high - (high - low) * float(fraction), 4)
    ratio_map["default"] = default
    return ratio_map
