"""IMMConfig: presets, validation, typo detection."""

import pytest

from imm_trl.config import IMMConfig


def test_paper_preset_is_the_papers_settings():
    config = IMMConfig.preset("paper")
    assert (config.iterations, config.merge_method, config.merge_ratio, config.density) == (3, "dare_linear", 0.5, 0.8)
    assert config.samples_per_question == 3 and config.rejection_config(1).sampling.greedy


def test_self_improve_preset_merges_nothing_back():
    merge = IMMConfig.preset("self_improve").merge_config
    assert (merge.method, merge.ratio, merge.density) == ("linear", 1.0, 1.0)


def test_preset_overrides_apply_on_top():
    assert IMMConfig.preset("paper", iterations=5).iterations == 5


@pytest.mark.parametrize(
    "values, message",
    [
        ({"iteratons": 3}, "unknown IMMConfig field"),
        ({"merge_method": "dare"}, "unknown merge method"),
        ({"density": 1.5}, "density"),
        ({"sampler": "vlm"}, "sampler must be"),
        ({"iterations": 2, "merge_ratio": [0.5]}, "one per iteration"),
        ({"preset": "papr"}, "unknown preset"),
        ({"merge_ratio": {"layers.x-": 0.3}}, "layers"),
    ],
)
def test_config_mistakes_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        IMMConfig.from_dict(values)


def test_per_layer_ratio_map_and_schedule_are_accepted():
    config = IMMConfig(iterations=2, merge_ratio=[{"layers.0-0": 0.3, "default": 0.5}, 0.7])
    assert config.merge_config.ratio_map(1).ratio_for("model.layers.0.mlp.up_proj.weight") == 0.3
    assert config.merge_config.ratio_map(1).ratio_for("model.layers.1.mlp.up_proj.weight") == 0.5
    assert config.merge_config.ratio_map(2).ratio_for("model.layers.0.mlp.up_proj.weight") == 0.7


def test_imm_config_and_rejection_sampling_config_share_their_defaults():
    from dataclasses import fields as dataclass_fields
    from dataclasses import replace

    from imm_trl.config import REJECTION_FIELDS
    from imm_trl.rejection import SHARED_DEFAULTS, RejectionSamplingConfig, SharedDefaults

    imm, rejection = IMMConfig(), RejectionSamplingConfig()
    for name in REJECTION_FIELDS:
        assert getattr(imm, name) == getattr(rejection, name) == getattr(SHARED_DEFAULTS, name), name
    for name in ("temperature", "top_p", "max_new_tokens"):
        assert getattr(imm, name) == getattr(rejection.sampling, name) == getattr(SHARED_DEFAULTS, name)
    assert {f.name for f in dataclass_fields(SharedDefaults)} == {
        *REJECTION_FIELDS, "temperature", "top_p", "max_new_tokens"
    }
    # What the callback builds from a default IMMConfig is a default RejectionSamplingConfig
    # (with the iteration's seed).
    assert imm.rejection_config(0) == replace(rejection, sampling=replace(rejection.sampling, seed=0))
    assert (imm.temperature, imm.top_p, imm.max_new_tokens) == (0.7, 1.0, 256)  # what users get
    assert rejection.solution_source == "answer"  # None: the gold column


def test_the_merge_method_table_describes_every_merge_kernel():
    from imm_trl.merging import MERGE_METHODS
    from imm_trl.merging.config import DENSITY_METHODS, METHOD_TABLE, merge_method

    assert tuple(METHOD_TABLE) == MERGE_METHODS
    assert DENSITY_METHODS == ("dare_linear", "ties", "dare_ties")
    assert [m for m in MERGE_METHODS if merge_method(m).rescale] == ["dare_linear", "dare_ties"]
    assert [m for m in MERGE_METHODS if not merge_method(m).elementwise] == ["ties"]
    assert [m for m in MERGE_METHODS if merge_method(m).in_place] == ["linear", "dare_linear"]
    assert [m for m in MERGE_METHODS if merge_method(m).keeps_every_element] == ["linear"]
    with pytest.raises(ValueError, match="unknown merge method 'dare'"):
        merge_method("dare")
