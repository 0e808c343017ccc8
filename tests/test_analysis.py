"""Layer analysis: update magnitudes, layer skipping, importance, rank correlation, ratio maps,
and the `analyze` report, on tiny Llamas built in code."""

import argparse
import copy
import json
import math

import matplotlib.image
import pytest
import torch

from imm_trl.analysis import (
    accuracy_score,
    add_analyze_parser,
    analyze,
    gold_log_likelihood_score,
    layer_importance_by_gradient,
    layer_importance_by_skipping,
    layer_index,
    layer_update_magnitudes,
    rank_correlation,
    ratio_map_from_importance,
    skip_layers,
    update_magnitudes,
)
from imm_trl.merging.config import MergeConfig, parse_ratio
from imm_trl.models import tiny_model

ROWS = [
    {"question": "What is 3 + 4?", "answer": "3 + 4 = 7. Answer: 7"},
    {
        "question": "Tom has 5 apples and buys 12 more. How many apples does he have now?",
        "answer": "He has 5 + 12 = 17 apples. #### 17",
    },
    {
        "question": [
            {"role": "system", "content": "Solve the problem."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "answer": "The capital of France is Paris.",
    },
]
IDENTITY_LAYER = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def four_layer_model(seed=0):
    return tiny_model(seed, num_hidden_layers=4)


def make_identity(model, index):
    """Zero the two weights that write into the residual stream: the layer then adds nothing."""
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return model


@pytest.fixture(scope="module")
def model_with_identity_layer():
    model, tokenizer = four_layer_model()
    return make_identity(model, IDENTITY_LAYER), tokenizer


def logits(model, tokenizer, text="Tom has 5 apples and buys 12 more."):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def squared_norm(tensors):
    return sum(float(t.detach().double().pow(2).sum()) for t in tensors)


# ---- names and magnitudes ------------------------------------------------------------------


def test_layer_index_reads_the_segment_after_layers():
    assert layer_index("model.layers.3.self_attn.q_proj.weight") == 3
    assert layer_index("base_model.model.model.layers.12.mlp.down_proj.weight") == 12
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("model.norm.weight") is None
    assert layer_index("lm_head.weight") is None
    assert layer_index("transformer.h.5.attn.c_attn.weight", prefix="h") == 5


def perturbed_copy(base):
    """Layer 1: +0.5 on every q_proj element; layer 3: down_proj scaled by 1.1; embeddings
    +0.25 everywhere; layers 0 and 2 untouched."""
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight.add_(0.5)
        tuned.model.layers[3].mlp.down_proj.weight.mul_(1.1)
        tuned.model.embed_tokens.weight.add_(0.25)
    return tuned


def hand_magnitudes(base):
    layers = base.model.layers
    q_proj = layers[1].self_attn.q_proj.weight
    layer1 = math.sqrt(0.25 * q_proj.numel() / squared_norm(layers[1].parameters()))
    layer3 = 0.1 * math.sqrt(
        squared_norm([layers[3].mlp.down_proj.weight]) / squared_norm(layers[3].parameters())
    )
    embed = base.model.embed_tokens.weight
    embedding = 0.25 * math.sqrt(embed.numel() / squared_norm([embed]))
    return [0.0, layer1, 0.0, layer3], embedding


def test_magnitudes_equal_a_hand_computation_for_models_and_directories(tmp_path):
    base, _ = four_layer_model()
    tuned = perturbed_copy(base)
    expected_layers, expected_embedding = hand_magnitudes(base)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")

    for base_source, tuned_source in [
        (base, tuned),
        (base.state_dict(), tuned.state_dict()),
        (tmp_path / "base", tmp_path / "tuned"),
        (str(tmp_path / "base"), tuned),
    ]:
        magnitudes = update_magnitudes(base_source, tuned_source)
        assert magnitudes.layers == pytest.approx(expected_layers, rel=1e-5, abs=0)
        assert magnitudes.other["model.embed_tokens.weight"] == pytest.approx(
            expected_embedding, rel=1e-5
        )
        assert magnitudes.other["model.norm.weight"] == 0.0
        assert magnitudes.other["lm_head.weight"] == 0.0
    assert layer_update_magnitudes(base, tuned) == pytest.approx(expected_layers, rel=1e-5, abs=0)


def test_magnitudes_refuse_different_architectures():
    two_layers, _ = tiny_model(0)
    four_layers, _ = four_layer_model()
    with pytest.raises(ValueError, match="only one of the two models"):
        layer_update_magnitudes(two_layers, four_layers)
    wider, _ = tiny_model(0, intermediate_size=128)
    with pytest.raises(ValueError, match="shape"):
        layer_update_magnitudes(two_layers, wider)


# ---- skipping --------------------------------------------------------------------------------


def test_skipping_a_layer_changes_logits_and_exit_restores_them_exactly():
    model, tokenizer = four_layer_model()
    full = logits(model, tokenizer)
    with skip_layers(model, [1]):
        skipped = logits(model, tokenizer)
    assert (skipped - full).abs().max() > 1e-2
    assert torch.equal(logits(model, tokenizer), full)

    with pytest.raises(RuntimeError, match="boom"):
        with skip_layers(model, [0, 3]):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, tokenizer), full)
    assert "forward" not in vars(model.model.layers[0])


def test_a_skipped_layer_acts_as_the_identity():
    """Skipping layer l gives the same outputs as zeroing its residual-writing weights."""
    model, tokenizer = four_layer_model()
    with skip_layers(model, [1, 2]):
        skipped = logits(model, tokenizer)
    zeroed = make_identity(make_identity(copy.deepcopy(model), 1), 2)
    torch.testing.assert_close(skipped, logits(zeroed, tokenizer), rtol=1e-5, atol=1e-5)


def test_skip_layers_refuses_a_layer_that_does_not_exist():
    model, _ = four_layer_model()
    with pytest.raises(IndexError, match="4 decoder layers"):
        with skip_layers(model, [4]):
            pass


# ---- importance ------------------------------------------------------------------------------


def test_identity_layer_has_zero_importance_by_skipping(model_with_identity_layer):
    model, tokenizer = model_with_identity_layer
    score = gold_log_likelihood_score(tokenizer, ROWS, batch_size=2)
    importance = layer_importance_by_skipping(model, score)
    assert len(importance) == 4
    assert abs(importance[IDENTITY_LAYER]) < 1e-6
    others = [v for i, v in enumerate(importance) if i != IDENTITY_LAYER]
    assert min(abs(v) for v in others) > 1e-3


def test_gold_log_likelihood_equals_a_hand_computation(model_with_identity_layer):
    """Mean over answer tokens of log softmax(full-sequence logits), row by row."""
    model, tokenizer = model_with_identity_layer
    total, count = 0.0, 0
    for row in ROWS:
        question = row["question"]
        messages = (
            question if isinstance(question, list) else [{"role": "user", "content": question}]
        )
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_probs = model(torch.tensor([prompt_ids + answer_ids])).logits[0].log_softmax(-1)
        for offset, token in enumerate(answer_ids):
            total += float(log_probs[len(prompt_ids) + offset - 1, token])
        count += len(answer_ids)
    score = gold_log_likelihood_score(tokenizer, ROWS, batch_size=3)(model)
    assert score == pytest.approx(total / count, abs=1e-5)


def test_gold_log_likelihood_is_deterministic_and_batch_size_free(model_with_identity_layer):
    model, tokenizer = model_with_identity_layer
    one_by_one = gold_log_likelihood_score(tokenizer, ROWS, batch_size=1)(model)
    batched = gold_log_likelihood_score(tokenizer, ROWS, batch_size=8)(model)
    assert one_by_one < 0
    assert batched == pytest.approx(one_by_one, abs=1e-5)


@pytest.mark.parametrize("attribution", ["skip", "parameters"])
def test_identity_layer_has_zero_importance_by_gradient(model_with_identity_layer, attribution):
    model, tokenizer = model_with_identity_layer
    model.zero_grad(set_to_none=True)
    importance = layer_importance_by_gradient(
        model, tokenizer, ROWS, attribution=attribution, batch_size=2
    )
    assert len(importance) == 4
    assert abs(importance[IDENTITY_LAYER]) < 1e-6
    others = [v for i, v in enumerate(importance) if i != IDENTITY_LAYER]
    assert min(abs(v) for v in others) > 1e-3
    assert all(p.grad is None for p in model.parameters())


def test_skip_attribution_is_the_first_order_skipping_importance():
    """For a layer that adds little (residual writers scaled by 0.01), skipping changes the
    loss by nearly its first-order estimate, so the two agree closely."""
    model, tokenizer = four_layer_model()
    layer = model.model.layers[IDENTITY_LAYER]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(0.01)
        layer.mlp.down_proj.weight.mul_(0.01)
    exact = layer_importance_by_skipping(model, gold_log_likelihood_score(tokenizer, ROWS))
    estimate = layer_importance_by_gradient(model, tokenizer, ROWS, attribution="skip")
    assert abs(exact[IDENTITY_LAYER]) > 1e-4
    assert estimate[IDENTITY_LAYER] == pytest.approx(exact[IDENTITY_LAYER], rel=0.05)


@pytest.mark.parametrize("attribution", ["skip", "parameters"])
def test_gradient_importance_also_covers_frozen_parameters(model_with_identity_layer, attribution):
    model, tokenizer = model_with_identity_layer
    expected = layer_importance_by_gradient(model, tokenizer, ROWS, attribution=attribution)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        frozen = layer_importance_by_gradient(model, tokenizer, ROWS, attribution=attribution)
        assert frozen == pytest.approx(expected, rel=1e-6)
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_skipping_with_a_caller_accuracy(model_with_identity_layer):
    """Accuracy = fraction of positions whose argmax token matches the full model's."""
    model, tokenizer = model_with_identity_layer
    text = "The capital of France is Paris. Let's think step by step. 3 + 4 = 7."
    reference = logits(model, tokenizer, text).argmax(-1)

    def agreement(candidate):
        return float((logits(candidate, tokenizer, text).argmax(-1) == reference).float().mean())

    importance = layer_importance_by_skipping(model, accuracy_score(agreement))
    assert importance[IDENTITY_LAYER] == 0.0
    assert max(importance) > 0.0
    assert all(0.0 <= v <= 1.0 for v in importance)
    with pytest.raises(ValueError, match="finite number"):
        accuracy_score(lambda m: float("nan"))(model)


# ---- rank correlation and ratio maps ---------------------------------------------------------


def test_rank_correlation_hand_cases():
    rho, p = rank_correlation([1, 2, 3, 4, 5, 6], [10, 20, 30, 40, 50, 60])
    assert rho == pytest.approx(1.0) and p < 0.01
    rho, _ = rank_correlation([1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1])
    assert rho == pytest.approx(-1.0)
    # ranks [1, 2, 3, 4, 5] against [1, 2, 3.5, 5, 3.5]: rho = 8 / sqrt(10 * 9.5)
    rho, _ = rank_correlation([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert rho == pytest.approx(8 / math.sqrt(95))
    rho, p = rank_correlation([1, 2, 3], [7, 7, 7])
    assert math.isnan(rho) and math.isnan(p)
    with pytest.raises(ValueError, match="equal lengths"):
        rank_correlation([1, 2], [1, 2, 3])


def test_ratio_map_gives_important_layers_lower_ratios_and_merge_config_parses_it():
    importance = [0.1, 0.5, -0.2, 0.3]
    ratio_map = ratio_map_from_importance(importance, low=0.3, high=0.7, default=0.5)
    assert ratio_map == {
        "layers.0": pytest.approx(0.5667),
        "layers.1": 0.3,
        "layers.2": 0.7,
        "layers.3": pytest.approx(0.4333),
        "default": 0.5,
    }
    parsed = MergeConfig(ratio=ratio_map).ratio_map()
    ratios = [parsed.ratio_for(f"model.layers.{i}.mlp.down_proj.weight") for i in range(4)]
    by_importance = sorted(range(4), key=lambda i: importance[i])
    assert [ratios[i] for i in by_importance] == sorted(ratios, reverse=True)
    assert parsed.ratio_for("model.layers.12.mlp.down_proj.weight") == 0.5
    assert parsed.ratio_for("model.embed_tokens.weight") == 0.5


def test_ratio_map_ties_and_edge_cases():
    tied = ratio_map_from_importance([1.0, 1.0, 2.0], low=0.2, high=0.6)
    assert tied["layers.0"] == tied["layers.1"] == pytest.approx(0.5)
    assert tied["layers.2"] == 0.2
    assert ratio_map_from_importance([3.0], low=0.2, high=0.6, default=0.4) == {
        "layers.0": 0.4,
        "default": 0.4,
    }
    assert ratio_map_from_importance([]) == {"default": 0.5}
    with pytest.raises(ValueError, match="finite"):
        ratio_map_from_importance([1.0, math.nan])


# ---- the report and the CLI ------------------------------------------------------------------


def check_report_files(out_dir, report):
    png = (out_dir / "layer_analysis.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    height, width, _ = matplotlib.image.imread(out_dir / "layer_analysis.png").shape
    assert height > 100 and width > 100
    written = json.loads((out_dir / "layer_analysis.json").read_text())
    assert written == json.loads(json.dumps(report))
    parse_ratio(written["suggested_ratio_map"])
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "layer_analysis.json",
        "layer_analysis.png",
    ]
    return written


def test_analyze_writes_json_and_png_with_gradient_importance(tmp_path, model_with_identity_layer):
    base, tokenizer = model_with_identity_layer
    tuned = perturbed_copy(base)
    report = analyze(
        base,
        tuned,
        tokenizer=tokenizer,
        rows=ROWS,
        out_dir=tmp_path / "out",
        score="gradient",
        attribution="parameters",
    )
    written = check_report_files(tmp_path / "out", report)
    assert written["importance_method"] == "gradient-parameters"
    assert written["update_magnitude"] == pytest.approx(hand_magnitudes(base)[0], rel=1e-5, abs=0)
    assert written["importance"][IDENTITY_LAYER] == pytest.approx(0.0, abs=1e-6)
    assert written["suggested_ratio_map"][f"layers.{IDENTITY_LAYER}"] == 0.7
    assert -1.0 <= written["spearman_rho"] <= 1.0


def test_cli_analyze_on_saved_directories(tmp_path, model_with_identity_layer):
    base, tokenizer = model_with_identity_layer
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    perturbed_copy(base).save_pretrained(tmp_path / "tuned")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS + ROWS))

    parser = argparse.ArgumentParser(prog="imm-trl")
    add_analyze_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "report"
    args = parser.parse_args(
        [
            "analyze",
            str(tmp_path / "base"),
            str(tmp_path / "tuned"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-rows",
            "3",
        ]
    )
    assert args.func(args) == 0

    written = json.loads((out / "layer_analysis.json").read_text())
    check_report_files(out, written)
    assert written["importance_method"] == "skip-loglik"
    assert written["rows"] == 3
    assert written["num_layers"] == 4
    assert abs(written["importance"][IDENTITY_LAYER]) < 1e-6
    expected = layer_importance_by_skipping(base, gold_log_likelihood_score(tokenizer, ROWS))
    assert written["importance"] == pytest.approx(expected, abs=1e-5)
    assert written["update_magnitude"] == pytest.approx(hand_magnitudes(base)[0], rel=1e-5, abs=0)
