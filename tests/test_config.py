"""ModelConfig from both config.json layouts, presets, and clear errors on bad configs."""

from __future__ import annotations

import json

import pytest

from runtime.config import FULL, PRESETS, SLIDING, ConfigError, ModelConfig, preset

SMALL = ModelConfig(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_experts=5,
    experts_per_token=3, sliding_window=7, rope_theta=10000.0, rope_scaling_factor=8.0,
    initial_context_length=4096, max_position_embeddings=32768, eos_token_ids=(1, 2),
)


def test_both_layouts_parse_to_the_same_config():
    from_original = ModelConfig.from_dict(SMALL.to_original_dict())
    from_hf = ModelConfig.from_dict(SMALL.to_hf_dict(quantized=True))
    assert from_original == SMALL
    assert from_hf == SMALL
    assert from_original.yarn_bounds() == from_hf.yarn_bounds()


def test_real_looking_original_config():
    raw = {  # the keys openai/gpt-oss-20b's original/config.json carries
        "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
        "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
        "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
        "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
        "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0,
    }
    cfg = ModelConfig.from_dict(raw)
    assert cfg == PRESETS["20b"].with_(eos_token_ids=())
    assert cfg.max_position_embeddings == 4096 * 32
    assert cfg.layer_types[:3] == (SLIDING, FULL, SLIDING)


def test_hf_layer_types_are_honoured():
    raw = SMALL.to_hf_dict()
    raw["layer_types"] = [FULL, FULL, SLIDING]
    cfg = ModelConfig.from_dict(raw)
    assert [cfg.is_sliding(i) for i in range(3)] == [False, False, True]
    assert ModelConfig.from_dict(SMALL.to_hf_dict()).layer_types == (SLIDING, FULL, SLIDING)


def test_hf_rope_parameters_and_legacy_rope_scaling_agree():
    new = SMALL.to_hf_dict()
    del new["rope_scaling"]
    old = SMALL.to_hf_dict()
    del old["rope_parameters"]
    old["rope_scaling"] = {"type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                           "original_max_position_embeddings": 4096}
    assert ModelConfig.from_dict(new) == ModelConfig.from_dict(old) == SMALL
    none = SMALL.to_hf_dict()
    del none["rope_parameters"], none["rope_scaling"]
    assert ModelConfig.from_dict(none).rope_scaling_factor == 1.0  # plain RoPE


def test_quantization_config():
    assert ModelConfig.from_dict(SMALL.to_hf_dict(quantized=True)).quantized_experts
    assert not ModelConfig.from_dict(SMALL.to_hf_dict(quantized=False)).quantized_experts
    raw = SMALL.to_hf_dict()
    raw["quantization_config"] = {"quant_method": "gptq"}
    with pytest.raises(ConfigError, match="gptq"):
        ModelConfig.from_dict(raw)


def test_presets_have_the_design_numbers():
    for name, layers, experts in (("20b", 24, 32), ("120b", 36, 128)):
        cfg = preset(name)
        assert (cfg.num_hidden_layers, cfg.num_experts) == (layers, experts)
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (2880, 2880, 201088)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 8, 64)
        assert (cfg.experts_per_token, cfg.sliding_window) == (4, 128)
        assert (cfg.rope_theta, cfg.rope_scaling_factor, cfg.initial_context_length) == (
            150000.0, 32.0, 4096)
        assert (cfg.rope_ntk_beta, cfg.rope_ntk_alpha) == (32.0, 1.0)
        assert cfg.layer_types == tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers))
        assert 200002 in cfg.eos_token_ids
    tiny = preset("tiny")
    assert tiny.vocab_size == 259 and tiny.eos_token_ids == (257,)
    with pytest.raises(ConfigError, match="unknown shape"):
        preset("7b")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple of"),
        ({"experts_per_token": 9, "num_experts": 8}, "exceeds"),
        ({"hidden_size": 48}, "multiple of 32"),
        ({"head_dim": 4}, "YaRN"),  # ramp bounds leave the head_dim/2 - 1 range
        ({"initial_context_length": 64}, "YaRN"),  # low bound ≤ 0
        ({"head_dim": 15}, "even"),
        ({"num_hidden_layers": 0}, "positive"),
        ({"layer_types": (SLIDING,)}, "entries"),
        ({"layer_types": (SLIDING, "dense", FULL)}, "unknown layer_types"),
        ({"rope_scaling_factor": 0.5}, "≥ 1"),
    ],
)
def test_bad_configs_raise_a_clear_error(change, message):
    with pytest.raises(ConfigError, match=message):
        SMALL.with_(**change)


def test_from_dir_reads_generation_config_eos(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL.to_hf_dict()))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.eos_token_ids == (7, 9)
    assert cfg.name == tmp_path.name


def test_from_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="neither"):
        ModelConfig.from_dir(tmp_path)
    raw = SMALL.to_hf_dict()
    del raw["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dir(tmp_path)
