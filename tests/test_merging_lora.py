"""The in-place LoRA / QLoRA merger and the full-weight merger, on real tiny models and PEFT."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from imm_trl.merging import (
    FullWeightMerger,
    LoraMerger,
    MergeConfig,
    merge_state_dicts,
    merge_tensors,
)
from imm_trl.merging.lora import dequantize
from imm_trl.models import tiny_model

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _randomize_lora_b(peft_model, seed, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _lora_deltas(peft_model, scaling):
    """dW = scaling * B @ A per targeted weight, computed here (not with PEFT's helper)."""
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            deltas[key] = (
                scaling * module.lora_B["default"].weight @ module.lora_A["default"].weight
            )
    return deltas


def _base_weights(peft_model):
    return {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): p.detach().clone()
        for name, p in peft_model.named_parameters()
        if "lora_" not in name
    }


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_merger_matches_dense_formula_over_two_iterations(use_rslora):
    model, _ = tiny_model(seed=0)
    r, lora_alpha, alpha = 4, 8, 0.5
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=TARGETS, use_rslora=use_rslora)
    )
    scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
    theta0 = _base_weights(peft_model)
    merger = LoraMerger(peft_model, MergeConfig(method="linear", ratio=[alpha, 0.8]))

    expected = dict(theta0)
    for iteration, ratio in ((1, alpha), (2, 0.8)):
        _randomize_lora_b(peft_model, seed=iteration)
        deltas = _lora_deltas(peft_model, scaling)
        for key, delta in deltas.items():
            expected[key] = theta0[key] + ratio * (expected[key] + delta - theta0[key])
        merger.merge(peft_model, iteration=iteration)
        got = _base_weights(peft_model)
        for key in theta0:
            assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-6), key
        untouched = [k for k in theta0 if k not in deltas]
        assert untouched and all(torch.equal(got[k], theta0[k]) for k in untouched)
        # The adapter is fresh: B = 0, so the PEFT model computes exactly the merged base.
        assert all(p.abs().sum() == 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
        assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_A" in n)


def test_alpha_one_generates_exactly_what_merge_and_unload_generates():
    model, tokenizer = tiny_model(seed=1)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    _randomize_lora_b(peft_model, seed=0, std=0.2)
    reference = copy.deepcopy(peft_model).merge_and_unload()
    LoraMerger(peft_model, MergeConfig(method="linear", ratio=1.0)).merge(peft_model)

    prompt = tokenizer(["What is 3 + 4?"], return_tensors="pt")
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        ours = peft_model.generate(**prompt, **kwargs)
        theirs = reference.generate(**prompt, **kwargs)
        untuned = tiny_model(seed=1)[0].generate(**prompt, **kwargs)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, untuned)  # the adapter did change the output
    for key, value in reference.state_dict().items():
        assert torch.equal(_base_weights(peft_model)[key], value), key


def test_fan_in_fan_out_conv1d():
    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=120, n_positions=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    theta0 = _base_weights(peft_model)
    _randomize_lora_b(peft_model, seed=2)
    deltas = {
        k: d.T for k, d in _lora_deltas(peft_model, scaling=1.0).items()
    }  # Conv1D stores (in, out)
    LoraMerger(peft_model, MergeConfig(ratio=0.5)).merge(peft_model)
    got = _base_weights(peft_model)
    for key, delta in deltas.items():
        assert torch.allclose(got[key], theta0[key] + 0.5 * delta, atol=1e-6)


def test_tied_embeddings_lora_on_embedding_updates_lm_head():
    model, _ = tiny_model(seed=0, tie_word_embeddings=True)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    )
    theta0 = peft_model.get_input_embeddings().base_layer.weight.detach().clone()
    _randomize_lora_b(peft_model, seed=3)
    emb = peft_model.get_input_embeddings()
    delta = (emb.lora_embedding_B["default"] @ emb.lora_embedding_A["default"]).T * emb.scaling[
        "default"
    ]
    LoraMerger(peft_model, MergeConfig(ratio=0.5)).merge(peft_model)
    merged = emb.base_layer.weight
    assert torch.allclose(merged, theta0 + 0.5 * delta, atol=1e-6)
    assert peft_model.get_output_embeddings().weight.data_ptr() == merged.data_ptr()  # still tied


def test_modules_to_save_merged_at_ratio():
    model, _ = tiny_model(seed=0)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    wrapper = peft_model.base_model.model.lm_head
    theta0 = wrapper.original_module.weight.detach().clone()
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    LoraMerger(peft_model, MergeConfig(ratio=0.25)).merge(peft_model)
    assert torch.allclose(wrapper.original_module.weight, theta0 + 0.25, atol=1e-6)
    assert torch.equal(wrapper.modules_to_save["default"].weight, wrapper.original_module.weight)


def test_dora_is_refused():
    model, _ = tiny_model(seed=0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="uses DoRA.*use_dora=False"):
        LoraMerger(peft_model, MergeConfig())


def test_theta0_read_from_safetensors_dir_equals_cpu_copy(tmp_path):
    model, _ = tiny_model(seed=0)
    model.save_pretrained(tmp_path)
    runs = []
    for theta0_dir in (None, tmp_path):
        torch.manual_seed(0)  # same lora_A init in both runs
        peft_model = get_peft_model(tiny_model(seed=0)[0], LoraConfig(r=4, target_modules=TARGETS))
        merger = LoraMerger(
            peft_model,
            MergeConfig(method="dare_linear", ratio=0.5, density=0.7),
            theta0_dir=theta0_dir,
        )
        _randomize_lora_b(peft_model, seed=4)
        merger.merge(peft_model)
        runs.append((_base_weights(peft_model), merger.theta0_bytes()))
    (cpu_weights, cpu_bytes), (dir_weights, dir_bytes) = runs
    assert cpu_bytes > 0 and dir_bytes == 0
    assert all(torch.equal(cpu_weights[k], dir_weights[k]) for k in cpu_weights)


def test_theta0_is_the_loaders_storage_and_the_model_gets_a_copy(tmp_path):
    tiny_model(seed=0)[0].save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # safetensors, mapped
    on_disk = load_file(tmp_path / "model.safetensors")
    peft_model = get_peft_model(loaded, LoraConfig(r=4, target_modules=TARGETS))
    before = {
        id(m.base_layer.weight): m.base_layer.weight.data_ptr() for m in _lora_layers(peft_model)
    }
    merger = LoraMerger(peft_model, MergeConfig(ratio=0.5))
    for target in merger.targets.values():
        weight = target.base_layer.weight
        # theta0 is the memory the loader filled (no second copy); the model computes with a
        # fresh copy of the same values, which the merges overwrite.
        assert target.theta0.data_ptr() == before[id(weight)] != weight.data_ptr()
        assert torch.equal(weight, target.theta0)
    _randomize_lora_b(peft_model, seed=5)
    for iteration in (1, 2):
        merger.merge(peft_model, iteration=iteration)
    for target in merger.targets.values():
        assert torch.equal(target.theta0, on_disk[target.name])  # never written
        assert not torch.equal(target.base_layer.weight, on_disk[target.name])


def test_weights_sharing_memory_are_merged_once_and_stay_shared():
    model, _ = tiny_model(seed=0)
    layers = model.model.layers
    layers[1].self_attn.q_proj.weight = torch.nn.Parameter(
        layers[0].self_attn.q_proj.weight.data
    )  # same memory
    theta0 = layers[0].self_attn.q_proj.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    merger = LoraMerger(peft_model, MergeConfig(ratio=0.5))
    assert len(merger.targets) == len(layers) - 1
    _randomize_lora_b(peft_model, seed=6)
    q0, q1 = (layer.self_attn.q_proj for layer in peft_model.base_model.model.model.layers[:2])
    expected = theta0 + 0.5 * (q0.get_delta_weight("default") + q1.get_delta_weight("default"))
    merger.merge(peft_model)
    assert q0.base_layer.weight.data_ptr() == q1.base_layer.weight.data_ptr()
    assert torch.allclose(q0.base_layer.weight, expected, rtol=0, atol=1e-6)


def _lora_layers(peft_model):
    return [m for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def _requantize_nf4(weight):
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.float(), quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state)


def test_qlora_error_does_not_accumulate_over_five_iterations(tmp_path):
    torch.manual_seed(0)
    original, _ = tiny_model(seed=0)
    original.save_pretrained(tmp_path)
    quantized = LlamaForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        dtype=torch.float32,
    )
    peft_model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    # theta0 = the unquantized original weights, read from its safetensors at each merge.
    merger = LoraMerger(peft_model, MergeConfig(ratio=0.5), theta0_dir=tmp_path, reset_seed=0)
    targets = list(merger.targets.values())
    theta0 = {t.name: original.state_dict()[t.name].to(torch.bfloat16) for t in targets}
    reference = dict(theta0)  # bf16 dense IMM run fed the same adapters
    naive = {
        t.name: dequantize(t.base_layer).float() for t in targets
    }  # merge into the 4-bit weights
    errors, naive_errors = [], []
    for iteration in range(1, 6):
        _randomize_lora_b(peft_model, seed=10 + iteration, std=0.02)
        for t in targets:
            delta = t.layers[0].get_delta_weight("default").float()
            base = theta0[t.name].float()
            reference[t.name] = (base + 0.5 * (reference[t.name].float() + delta - base)).to(
                torch.bfloat16
            )
            naive[t.name] = _requantize_nf4(base + 0.5 * (naive[t.name] + delta - base))
        merger.merge(peft_model, iteration=iteration)
        assert all(
            torch.equal(t.master, reference[t.name]) for t in targets
        )  # the master never drifts
        errors.append(
            _norm([dequantize(t.base_layer).float() - reference[t.name].float() for t in targets])
        )
        naive_errors.append(_norm([naive[t.name] - reference[t.name].float() for t in targets]))
    # Each merge is a fresh quantization of a different matrix, so its error wobbles by ~0.1%;
    # merging into the 4-bit weights instead (no master) carries rounding from one iteration
    # into the next: its error grows and ends above ours (alpha < 1 damps the growth).
    assert errors[-1] <= errors[0] * 1.005, errors
    assert naive_errors[-1] > naive_errors[0] and naive_errors[-1] > errors[-1], (
        errors,
        naive_errors,
    )


def _norm(tensors):
    return sum(t.norm() ** 2 for t in tensors).item() ** 0.5


def test_full_weight_merger_matches_state_dict_merge(tmp_path):
    model, _ = tiny_model(seed=0)
    model.save_pretrained(tmp_path)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    config = MergeConfig(method="dare_linear", ratio={"layers.0": 0.2, "default": 0.6}, density=0.9)
    merger_cpu = FullWeightMerger(model, config)
    merger_disk = FullWeightMerger(model, config, theta0_dir=tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    merger_cpu.merge(model, iteration=1)
    merger_disk.merge(twin, iteration=1)
    expected = merge_state_dicts(
        theta0, tuned, method="dare_linear", ratio=config.ratio, density=0.9, seed=1
    )
    got, got_disk = model.state_dict(), twin.state_dict()
    for key in expected:
        assert torch.equal(got[key], expected[key]) and torch.equal(got_disk[key], expected[key]), (
            key
        )


def test_full_weight_merger_merges_memory_shared_parameters_once():
    model, _ = tiny_model(seed=0)
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = torch.nn.Parameter(
        layers[0].mlp.up_proj.weight.data
    )  # same memory
    name = "model.layers.0.mlp.up_proj.weight"
    theta0 = layers[0].mlp.up_proj.weight.detach().clone()
    merger = FullWeightMerger(model, MergeConfig(method="dare_linear", ratio=0.5, density=0.5))
    with torch.no_grad():
        layers[0].mlp.up_proj.weight.add_(0.1)
    tuned = layers[0].mlp.up_proj.weight.detach().clone()
    merger.merge(model, iteration=1)
    expected = merge_tensors(
        theta0, tuned, method="dare_linear", ratio=0.5, density=0.5, seed=1, name=name
    )
    assert layers[1].mlp.up_proj.weight.data_ptr() == layers[0].mlp.up_proj.weight.data_ptr()
    assert torch.equal(layers[0].mlp.up_proj.weight, expected)


@pytest.mark.parametrize("base_dtype,adapter_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
])
@pytest.mark.parametrize("method,density", [("linear", 1.0), ("dare_linear", 0.6)])
def test_row_block_low_rank_merge_is_bit_identical_to_merging_peft_delta(
    monkeypatch, base_dtype, adapter_dtype, method, density
):
    """`merge_low_rank_into_` forms dW block by block; the result must be what merging PEFT's
    whole `get_delta_weight` gives, bit for bit, with several blocks per tensor."""
    from peft.tuners.lora import Linear

    import imm_trl.merging.functional as functional

    monkeypatch.setattr(functional, "LOW_RANK_BLOCK", 64 * 48)  # four blocks of 50 rows
    assert functional.low_rank_block_rows(200, 48) == 50 and functional.low_rank_block_rows(10, 48) == 10
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8)
    layer = Linear(torch.nn.Linear(48, 200, bias=False), "default", config=config, r=4, lora_alpha=8)
    layer.to(base_dtype)
    layer.lora_A["default"].to(adapter_dtype)
    layer.lora_B["default"].to(adapter_dtype)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.1)
        layer.base_layer.weight.normal_()
    theta0 = layer.base_layer.weight.detach().clone() + 0.01
    settings = dict(method=method, ratio=0.37, density=density, seed=5, name="w")
    expected = layer.base_layer.weight.detach().clone()
    functional.merge_into_(expected, theta0, layer.get_delta_weight("default"), **settings)
    fused = layer.base_layer.weight.detach().clone()
    functional.merge_low_rank_into_(
        fused, theta0, layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach(),
        layer.scaling["default"], **settings,
    )
    assert torch.equal(fused, expected)
    assert not torch.equal(fused, layer.base_layer.weight)
