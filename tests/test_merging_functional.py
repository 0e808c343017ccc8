"""Merge kernels against independent reference computations, PEFT, and the config checks."""

import copy
import math

import pytest
import torch
from peft.utils import merge_utils

from imm_trl.merging import (
    MergeConfig,
    merge_state_dicts,
    merge_tensors,
    parse_ratio,
    ratio_for_iteration,
)
from imm_trl.merging.config import check_schedule
from imm_trl.merging.functional import (
    DARE_BLOCK,
    combine_deltas,
    dare_keep_mask,
    dare_prune,
    dare_threshold,
    magnitude_prune,
    merge_flat,
)
from imm_trl.models import tiny_model


def _pair(shape=(37, 53), seed=0, dtype=torch.float64, models=1):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=dtype)
    tuned = [base + 0.1 * torch.randn(shape, generator=gen, dtype=dtype) for _ in range(models)]
    return base, tuned


def _reference_ties(base, tuned, weights, density, ratio):
    """Elementwise TIES in plain Python floats (float64), written from the paper's steps."""
    flat_base = base.reshape(-1).tolist()
    deltas = [
        [t - b for t, b in zip(other.reshape(-1).tolist(), flat_base, strict=True)]
        for other in tuned
    ]
    k = int(density * len(flat_base))
    trimmed = []
    for delta in deltas:
        keep = set(sorted(range(len(delta)), key=lambda i: -abs(delta[i]))[:k])
        trimmed.append([d if i in keep else 0.0 for i, d in enumerate(delta)])
    out = []
    for i, b in enumerate(flat_base):
        values = [trimmed[m][i] for m in range(len(tuned))]
        elected = 1.0 if sum(values) >= 0 else -1.0
        agreeing = [
            w * v
            for w, v in zip(weights, values, strict=True)
            if v != 0 and math.copysign(1.0, v) == elected
        ]
        merged = sum(agreeing) / max(len(agreeing), 1)
        out.append(b + ratio * merged)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def test_linear_equals_reference_exactly():
    base, tuned = _pair(models=2)
    weights, ratio = [0.7, 0.4], 0.5
    got = merge_tensors(
        base, tuned, method="linear", ratio=ratio, weights=weights, compute_dtype=torch.float64
    )
    expected = base + ratio * ((tuned[0] - base) * weights[0] + (tuned[1] - base) * weights[1])
    assert torch.equal(got, expected)


def test_linear_single_model_bf16_is_fp32_arithmetic_cast_once():
    base, (tuned,) = _pair(shape=(3000, 700), dtype=torch.bfloat16)  # > one chunk
    got = merge_tensors(base, tuned, method="linear", ratio=0.3)
    expected = (base.float() + 0.3 * (tuned.float() - base.float())).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_ties_equals_reference_exactly():
    base, tuned = _pair(shape=(9, 11), models=2)
    got = merge_tensors(
        base,
        tuned,
        method="ties",
        ratio=0.5,
        density=0.4,
        weights=[1.0, 0.5],
        compute_dtype=torch.float64,
    )
    assert torch.equal(got, _reference_ties(base, tuned, [1.0, 0.5], 0.4, 0.5))


def test_dare_linear_exact_given_mask():
    base, (tuned,) = _pair(shape=(300, 200))
    mask = dare_keep_mask(base.shape, 0.8, seed=3, name="w")
    got = merge_tensors(
        base,
        tuned,
        method="dare_linear",
        ratio=0.5,
        density=0.8,
        seed=3,
        name="w",
        compute_dtype=torch.float64,
    )
    delta = tuned - base
    expected = base + 0.5 * torch.where(mask, delta / 0.8, torch.zeros_like(delta))
    assert torch.equal(got, expected)


def test_dare_kept_fraction_and_delta_mean_on_large_tensor():
    delta = 0.5 + torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    for density in (0.2, 0.8):
        mask = dare_keep_mask(delta.shape, density, seed=0, name="big")
        assert abs(mask.float().mean().item() - density) < 0.01 * density
        pruned = dare_prune(delta, mask, density)
        assert abs(pruned.mean().item() - delta.mean().item()) < 0.01 * abs(delta.mean().item())


def test_dare_mask_is_deterministic_and_shard_independent():
    shape = (3 * DARE_BLOCK // 1024 + 7, 1024)
    full = dare_keep_mask(shape, 0.7, seed=5, name="model.layers.0.mlp.up_proj.weight").reshape(-1)
    again = dare_keep_mask(shape, 0.7, seed=5, name="model.layers.0.mlp.up_proj.weight").reshape(-1)
    assert torch.equal(full, again)
    for start, count in [
        (0, 10),
        (DARE_BLOCK - 5, 11),
        (12345, 2 * DARE_BLOCK + 3),
        (full.numel() - 9, 9),
    ]:
        part = dare_keep_mask(
            (count,), 0.7, seed=5, name="model.layers.0.mlp.up_proj.weight", start=start
        )
        assert torch.equal(part, full[start : start + count])
    other_name = dare_keep_mask(
        shape, 0.7, seed=5, name="model.layers.1.mlp.up_proj.weight"
    ).reshape(-1)
    other_seed = dare_keep_mask(
        shape, 0.7, seed=6, name="model.layers.0.mlp.up_proj.weight"
    ).reshape(-1)
    assert (full != other_name).float().mean() > 0.3 and (full != other_seed).float().mean() > 0.3


def test_dare_keep_probability_is_density_in_steps_of_2_to_the_minus_16():
    for density in (1e-4, 0.01, 0.2, 0.5, 0.8, 0.9, 0.99999, 0.999999):
        assert abs(dare_threshold(density) / 2**16 - density) <= 2**-16
    mask = dare_keep_mask((4 * DARE_BLOCK,), 0.01, seed=0, name="sparse")
    assert abs(mask.float().mean().item() - 0.01) < 0.02 * 0.01


def test_dare_mask_into_a_reused_buffer_equals_a_fresh_one():
    buffer = torch.ones(DARE_BLOCK + 100, dtype=torch.bool)
    for start, count in [(0, DARE_BLOCK + 100), (DARE_BLOCK - 50, 77), (3, 5)]:
        fresh = dare_keep_mask((count,), 0.6, seed=1, name="w", start=start)
        reused = dare_keep_mask((count,), 0.6, seed=1, name="w", start=start, out=buffer)
        assert torch.equal(fresh, reused) and reused.data_ptr() == buffer.data_ptr()


def test_dare_propagates_non_finite_dropped_elements():
    # Like PEFT's tensor * mask: a NaN/Inf in the delta is never silently dropped (the
    # checkpoint merger then refuses the tensor).
    delta = torch.tensor([float("nan"), float("inf"), 1.0])
    pruned = dare_prune(delta, torch.tensor([False, False, True]), 0.5)
    assert pruned[:2].isnan().all() and pruned[2] == 2.0


def test_sharded_merge_equals_whole_merge():
    base, tuned = _pair(shape=(DARE_BLOCK // 512 + 3, 1024), dtype=torch.float32, models=2)
    settings = dict(
        method="dare_ties",
        ratio=0.5,
        density=0.6,
        seed=1,
        weights=[1.0, 1.0],
        name="t",
        compute_dtype=torch.float32,
    )
    whole = merge_tensors(base, tuned, **settings).reshape(-1)
    flat_base, flat_tuned = base.reshape(-1), [t.reshape(-1) for t in tuned]
    cut = 777_777
    pieces = [
        merge_flat(flat_base[a:b], [t[a:b] for t in flat_tuned], start=a, **settings)
        for a, b in [(0, cut), (cut, flat_base.numel())]
    ]
    assert torch.equal(torch.cat(pieces), whole)


def test_matches_peft_merge_utils_where_definitions_agree():
    base, tuned = _pair(shape=(64, 48), dtype=torch.float32, models=3)
    deltas = [t - base for t in tuned]
    weights = [0.5, 1.0, 0.25]
    peft_weights = torch.tensor(weights)
    assert torch.equal(
        combine_deltas(deltas, method="linear", weights=weights),
        merge_utils.task_arithmetic(deltas, peft_weights),
    ) or torch.allclose(
        combine_deltas(deltas, method="linear", weights=weights),
        merge_utils.task_arithmetic(deltas, peft_weights),
        rtol=0,
        atol=1e-7,
    )
    assert torch.equal(
        combine_deltas(deltas, method="ties", weights=weights, density=0.3),
        merge_utils.ties(deltas, peft_weights, density=0.3),
    )
    assert torch.equal(
        magnitude_prune(deltas[0], 0.3), merge_utils.magnitude_based_pruning(deltas[0], 0.3)
    )
    # DARE: PEFT draws its mask from the global RNG; given the same mask, the results agree.
    torch.manual_seed(0)
    peft_pruned = merge_utils.random_pruning(deltas[0], 0.8, rescale=True)
    torch.manual_seed(0)
    mask = torch.bernoulli(torch.full_like(deltas[0], 0.8)).bool()
    assert torch.equal(dare_prune(deltas[0], mask, 0.8), peft_pruned)


def test_merge_state_dicts_with_layer_ratio_map():
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(4) for i in range(12)}
    base["lm_head.weight"] = torch.zeros(4)
    tuned = {name: torch.ones(4) for name in base}
    ratio = {"layers.0-7": 0.3, "layers.8-": 0.6, "default": 0.5}
    merged = merge_state_dicts(base, tuned, ratio=ratio)
    assert merged["model.layers.7.mlp.up_proj.weight"][0].item() == pytest.approx(0.3)
    assert merged["model.layers.8.mlp.up_proj.weight"][0].item() == pytest.approx(0.6)
    assert merged["model.layers.11.mlp.up_proj.weight"][0].item() == pytest.approx(0.6)
    assert merged["lm_head.weight"][0].item() == pytest.approx(0.5)


def test_merge_state_dicts_merges_tied_entries_once():
    base_model, _ = tiny_model(seed=0, tie_word_embeddings=True)
    tuned_model = copy.deepcopy(base_model)  # keeps the tie
    with torch.no_grad():
        for param in tuned_model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    base, tuned = base_model.state_dict(), tuned_model.state_dict()
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    assert (
        base[head].data_ptr() == base[emb].data_ptr()
        and tuned[head].data_ptr() == tuned[emb].data_ptr()
    )
    merged = merge_state_dicts(base, tuned, method="dare_linear", ratio=0.5, density=0.5, seed=2)
    assert merged[head] is merged[emb]  # still one tensor, merged once with the first name's mask
    expected = merge_tensors(
        base[emb], tuned[emb], method="dare_linear", ratio=0.5, density=0.5, seed=2, name=emb
    )
    assert torch.equal(merged[emb], expected)
    # Equal untied copies in the tuned dict are fine; different ones are refused.
    assert torch.equal(
        merge_state_dicts(base, {**tuned, head: tuned[head].clone()}, ratio=0.5)[head],
        merge_state_dicts(base, tuned, ratio=0.5)[emb],
    )
    with pytest.raises(ValueError, match="tied in the base state dict"):
        merge_state_dicts(base, {**tuned, head: tuned[head] + 1.0}, ratio=0.5)


def test_ratio_map_patterns_first_match_wins():
    ratio_map = parse_ratio(
        {"layers.3": 0.9, "layers.0-7": 0.3, "*.q_proj.*": 0.2, "lm_head": 0.7, "default": 0.5}
    )
    assert ratio_map.ratio_for("model.layers.3.mlp.up_proj.weight") == 0.9
    assert ratio_map.ratio_for("model.layers.13.mlp.up_proj.weight") == 0.5  # 13 is not in 0-7
    assert ratio_map.ratio_for("model.layers.4.self_attn.q_proj.weight") == 0.3
    assert ratio_map.ratio_for("model.layers.40.self_attn.q_proj.weight") == 0.2
    assert ratio_map.ratio_for("lm_head.weight") == 0.7
    assert ratio_map.ratio_for("model.lm_head_extra.weight") == 0.5  # whole segments only


def test_per_iteration_schedule():
    schedule = [0.5, {"layers.0-1": 0.2, "default": 0.4}, 0.3]
    assert ratio_for_iteration(schedule, 1).ratio_for("model.layers.0.x.weight") == 0.5
    assert ratio_for_iteration(schedule, 2).ratio_for("model.layers.0.x.weight") == 0.2
    assert ratio_for_iteration(schedule, 3).ratio_for("anything") == 0.3
    assert ratio_for_iteration(0.7, 9).ratio_for("anything") == 0.7
    assert MergeConfig(ratio=schedule).ratio_map(2).default == 0.4
    with pytest.raises(ValueError, match="3 entries but iteration 4"):
        ratio_for_iteration(schedule, 4)
    with pytest.raises(ValueError, match="exactly one per iteration"):
        check_schedule(schedule, iterations=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(method="dare"),
            "unknown merge method 'dare'; choose one of: linear, dare_linear, ties, dare_ties",
        ),
        (dict(method="ties", density=0.0), r"density must be in \(0, 1\]"),
        (dict(method="ties", density=1.5), r"density must be in \(0, 1\]"),
        (dict(ratio={"layers.7-3": 0.3, "default": 0.5}), "end 3 is below the start 7"),
        (dict(ratio={"layers.a-b": 0.3, "default": 0.5}), "bad layer range 'layers.a-b'"),
        (dict(ratio={"layers.-4": 0.3, "default": 0.5}), "bad layer range"),
        (dict(ratio={"layers.0-7": 0.3}), "has no 'default' entry"),
        (dict(ratio=-0.5), "finite number >= 0"),
        (dict(ratio=float("nan")), "finite number >= 0"),
        (dict(compute_dtype="float33"), "not a torch dtype"),
    ],
)
def test_config_typos_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MergeConfig(**kwargs)


def test_merge_tensors_refuses_bad_arguments():
    base, (tuned,) = _pair()
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_tensors(base, tuned, method="slerp")
    with pytest.raises(ValueError, match="density"):
        merge_tensors(base, tuned, method="dare_linear", density=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        merge_tensors(base, tuned[:3], method="linear")
