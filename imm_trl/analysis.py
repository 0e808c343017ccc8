"""Layer analysis: which decoder layers did self-improvement change, and do they matter?

The paper's diagnosis (docs/design.md, "The method") is that self-improvement updates concentrate in
layers that are less critical for reasoning. This module measures both sides, per decoder layer:

- update magnitude: `||theta_l - theta0_l|| / ||theta0_l||` over all of layer l's parameters;
- importance for a task: how much a task score drops when the layer is skipped (made the
  identity), or a cheaper gradient attribution (one backward pass per batch of rows);

then their Spearman rank correlation, a JSON report with a PNG plot, and a suggested per-layer
ratio map for the merger (layer-adaptive IMM: important layers get a lower merge ratio, so they
stay closer to theta0).

    magnitudes = layer_update_magnitudes("base_dir", "tuned_dir")     # streamed, tensor by tensor
    importance = layer_importance_by_skipping(model, gold_log_likelihood_score(tok, rows))
    ratio_map = ratio_map_from_importance(importance, low=0.3, high=0.7, default=0.5)
    report = analyze("base_dir", "tuned_dir", tokenizer=tok, rows=rows, out_dir="analysis/")

Decoder layers are found by name: a parameter whose name has the segments `layers.{i}.`
(Llama, Qwen2, Mistral, Gemma: `model.layers.3.mlp.down_proj.weight`) belongs to layer i.
Every other parameter (embeddings, final norm, lm_head) is reported separately, per name.

Importance and the ratio map live in `imm_trl.layer_importance` (re-exported here), the
command line in `imm_trl.analysis_cli`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imm_trl.files import write_atomically
from imm_trl.layer_importance import (  # noqa: F401 (decoder_layers, skip_layers, ...: re-exported)
    GRADIENT_ATTRIBUTIONS,
    ScoreFn,
    accuracy_score,
    decoder_layers,
    encode_gold_rows,
    gold_log_likelihood_score,
    layer_importance_by_gradient,
    layer_importance_by_skipping,
    rank_correlation,
    ratio_map_from_importance,
    skip_layers,
)
from imm_trl.merging.config import LAYER_PREFIX, layer_index
from imm_trl.plots import new_figure, save_png

JSON_NAME = "layer_analysis.json"
PNG_NAME = "layer_analysis.png"

TensorSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike


# --------------------------------------------------------------------------------------------
# Update magnitudes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateMagnitudes:
    """Relative update `||theta - theta0|| / ||theta0||`, per decoder layer and per other tensor."""

    layers: list[float]  # index l: over all of layer l's parameters, concatenated
    other: dict[str, float]  # parameters outside the decoder layers, by name


@contextmanager
def _tensor_reader(
    source: TensorSource,
) -> Iterator[tuple[list[str], Callable[[str], torch.Tensor]]]:
    """Names and a read-one-tensor function for a model, a state dict or a model directory.

    Directories are read with `CheckpointReader`, one tensor at a time."""
    if isinstance(source, (str, os.PathLike)):
        from imm_trl.merging.io import CheckpointReader

        with CheckpointReader(source) as reader:
            yield reader.names(), reader.read
        return
    state = source.state_dict() if isinstance(source, nn.Module) else source
    yield list(state), lambda name: state[name]


def _squared_norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64) ** 2)


def update_magnitudes(
    base: TensorSource, tuned: TensorSource, *, prefix: str = LAYER_PREFIX
) -> UpdateMagnitudes:
    """Relative update magnitudes of `tuned` against `base` (theta0).

    Both may be models, state dicts or model directories (safetensors; read one tensor at a
    time, so two whole models are never in memory). Only floating-point tensors present in
    both count: `save_pretrained` drops the `lm_head.weight` of tied-embedding models, so a
    model and its directory still compare. A decoder-layer tensor present in only one of them,
    or tensors of different shapes, mean different architectures and raise a ValueError.
    """
    squared: dict[int | str, list[float]] = {}  # group -> [||delta||^2, ||theta0||^2]
    with (
        _tensor_reader(base) as (base_names, read_base),
        _tensor_reader(tuned) as (tuned_names, read_tuned),
    ):
        tuned_set = set(tuned_names)
        lonely = [n for n in set(base_names) ^ tuned_set if layer_index(n, prefix) is not None]
        if lonely:
            raise ValueError(
                f"decoder-layer tensors in only one of the two models: {sorted(lonely)[:5]}"
            )
        for name in base_names:
            if name not in tuned_set:
                continue
            theta0, theta = read_base(name), read_tuned(name)
            if theta0.shape != theta.shape:
                raise ValueError(
                    f"{name}: shape {tuple(theta0.shape)} in base, {tuple(theta.shape)} in tuned"
                )
            if not theta0.is_floating_point():
                continue
            group = layer_index(name, prefix)
            sums = squared.setdefault(name if group is None else group, [0.0, 0.0])
            sums[0] += _squared_norm(theta.float() - theta0.float())
            sums[1] += _squared_norm(theta0)
    layer_ids = sorted(g for g in squared if isinstance(g, int))
    if layer_ids != list(range(len(layer_ids))):
        raise ValueError(f"decoder-layer indices are not 0..n-1: {layer_ids}")
    return UpdateMagnitudes(
        layers=[_relative(*squared[i]) for i in layer_ids],
        other={g: _relative(*sums) for g, sums in squared.items() if isinstance(g, str)},
    )


def _relative(delta_squared: float, base_squared: float) -> float:
    if base_squared == 0.0:
        return 0.0 if delta_squared == 0.0 else math.inf
    return math.sqrt(delta_squared / base_squared)


def layer_update_magnitudes(
    base: TensorSource, tuned: TensorSource, *, prefix: str = LAYER_PREFIX
) -> list[float]:
    """Per decoder layer l, `||theta_l - theta0_l|| / ||theta0_l||` (Frobenius norm over all of
    layer l's parameters concatenated). See `update_magnitudes` for inputs and other tensors."""
    return update_magnitudes(base, tuned, prefix=prefix).layers


# --------------------------------------------------------------------------------------------
# The report: JSON and PNG
# --------------------------------------------------------------------------------------------


def _load_model(source: TensorSource) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity; write null instead."""
    return value if math.isfinite(value) else None


def plot_layer_analysis(report: Mapping[str, Any], path: Path) -> None:
    """Two panels over the decoder layers: update magnitude (top) and importance (bottom)."""
    layers = range(len(report["update_magnitude"]))
    figure, (top, bottom) = new_figure(
        2, 1, sharex=True, figsize=(max(6.0, 0.3 * len(layers)), 6)
    )
    top.bar(layers, report["update_magnitude"], color="tab:blue")
    top.set_ylabel("||θ_l − θ0_l|| / ||θ0_l||")
    top.set_title(
        f"update magnitude vs importance ({report['importance_method']}): "
        f"Spearman ρ = {_format(report['spearman_rho'])}, p = {_format(report['spearman_p'])}"
    )
    bottom.bar(layers, report["importance"], color="tab:orange")
    bottom.axhline(0.0, color="black", linewidth=0.5)
    bottom.set_ylabel("importance")
    bottom.set_xlabel("decoder layer")
    save_png(figure, path)


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def analyze(
    base: TensorSource,
    tuned: TensorSource,
    *,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    score: str | Callable[[nn.Module], float] = "loglik",
    attribution: str = "skip",
    importance_of: str = "base",
    low: float = 0.3,
    high: float = 0.7,
    default: float = 0.5,
    batch_size: int = 8,
    prefix: str = LAYER_PREFIX,
) -> dict[str, Any]:
    """Measure, correlate and suggest: writes `layer_analysis.json` and `layer_analysis.png`.

    Args:
        base, tuned: theta0 and the tuned model: models, state dicts (magnitudes only) or
            model directories (magnitudes are streamed; the model whose importance is
            measured is loaded in float32).
        tokenizer: The models' tokenizer (for the log-likelihood and gradient scores).
        rows: `{"question": str or chat messages, "answer": str}` task rows.
        out_dir: Where the two files go (created if missing; each written atomically).
        score: How importance is measured: "loglik" (skipping, mean gold log-likelihood),
            "gradient" (gradient attribution), or a callable `accuracy_fn(model) -> float`
            (skipping, that score).
        attribution: With score="gradient": "skip" or "parameters", as in
            `layer_importance_by_gradient`.
        importance_of: "base" (default: theta0's layers, the ones the merge pulls back
            towards) or "tuned".
        low, high, default: The suggested ratio map's range and default, as in
            `ratio_map_from_importance`.
        batch_size: Rows per forward pass.
        prefix: The name segment before decoder-layer indices.

    Returns:
        The report written to JSON.
    """
    if importance_of not in ("base", "tuned"):
        raise ValueError(f"importance_of must be 'base' or 'tuned', got {importance_of!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    magnitudes = update_magnitudes(base, tuned, prefix=prefix)
    model = _load_model(base if importance_of == "base" else tuned)
    started = time.perf_counter()
    if score == "gradient":
        method = f"gradient-{attribution}"
        importance = layer_importance_by_gradient(
            model, tokenizer, rows, attribution=attribution, batch_size=batch_size, prefix=prefix
        )
    elif score == "loglik":
        method = "skip-loglik"
        score_fn = gold_log_likelihood_score(tokenizer, rows, batch_size=batch_size)
        importance = layer_importance_by_skipping(model, score_fn, prefix=prefix)
    elif callable(score):
        method = "skip-accuracy"
        importance = layer_importance_by_skipping(model, accuracy_score(score), prefix=prefix)
    else:
        raise ValueError(f"score must be 'loglik', 'gradient' or a callable, got {score!r}")
    seconds = time.perf_counter() - started
    if len(importance) != len(magnitudes.layers):
        raise ValueError(
            f"the importance model has {len(importance)} decoder layers, the checkpoints {len(magnitudes.layers)}"
        )
    rho, p_value = rank_correlation(magnitudes.layers, importance)
    report = {
        "num_layers": len(importance),
        "update_magnitude": magnitudes.layers,
        "other_update_magnitude": {k: _finite_or_none(v) for k, v in magnitudes.other.items()},
        "importance": importance,
        "importance_method": method,
        "importance_of": importance_of,
        "importance_seconds": seconds,
        "rows": len(rows),
        "spearman_rho": _finite_or_none(rho),
        "spearman_p": _finite_or_none(p_value),
        "suggested_ratio_map": ratio_map_from_importance(
            importance, low=low, high=high, default=default, prefix=prefix
        ),
    }
    write_atomically(
        out / JSON_NAME, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n")
    )
    write_atomically(out / PNG_NAME, lambda tmp: plot_layer_analysis(report, tmp))
    return report


def __getattr__(name):  # the `imm-trl analyze` command's names, from before the split
    if name in ("add_analyze_parser", "read_rows"):
        from imm_trl import analysis_cli

        return getattr(analysis_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
