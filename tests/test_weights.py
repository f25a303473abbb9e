"""Checkpoint round trips (both layouts, single file and sharded, MXFP4 and dense HF experts) and
loader errors that name the file and the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.checkpoint_layout import layer_to_canonical
from runtime.config import ModelConfig
from runtime.model_weights import ModelWeights
from runtime.synthetic import random_weights, write_checkpoint
from runtime.weights import CheckpointError, checkpoint_layout_of, load_checkpoint, load_tokenizer

CFG = ModelConfig(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
    experts_per_token=2, sliding_window=8, max_position_embeddings=4096, eos_token_ids=(257,),
)


def flat(w: ModelWeights) -> dict[str, torch.Tensor]:
    out = {"embedding": w.embedding, "norm": w.norm, "unembedding": w.unembedding}
    for i, layer in enumerate(w.layers):
        out.update(layer_to_canonical(i, layer))
    return out


def assert_identical(a: ModelWeights, b: ModelWeights) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name].dtype == fb[name].dtype, name
        assert fa[name].shape == fb[name].shape, name
        assert torch.equal(fa[name], fb[name]), name  # bitwise for u8; exact for floats


@pytest.fixture(scope="module")
def weights() -> ModelWeights:
    return random_weights(CFG, seed=5)


@pytest.mark.parametrize(
    ("layout", "quantized", "shard"),
    [("original", True, None), ("hf", True, None), ("hf", False, None),
     ("original", True, 40_000), ("hf", True, 40_000), ("hf", False, 100_000)],
)
def test_write_then_load_gives_identical_weights(tmp_path, weights, layout, quantized, shard):
    write_checkpoint(weights, tmp_path, layout=layout, quantized=quantized, max_shard_bytes=shard)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if shard:
        assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    else:
        assert files == ["model.safetensors"]
    assert checkpoint_layout_of(tmp_path) == (layout, quantized)
    loaded = load_checkpoint(tmp_path)
    assert_identical(weights, loaded)
    assert loaded.config == CFG.with_(quantized_experts=quantized)  # as stored on disk
    assert loaded.layers[0].mlp1_blocks.dtype == torch.uint8
    assert loaded.layers[0].sinks.dtype == torch.float32
    assert loaded.layers[0].mlp2_bias.dtype == torch.float32
    assert loaded.embedding.dtype == torch.bfloat16
    assert load_tokenizer(tmp_path).vocab_size == CFG.vocab_size


def test_hf_layout_names_and_shapes(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="hf", quantized=False)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        p = "model.layers.1."
        assert f.get_slice(p + "self_attn.q_proj.weight").get_shape() == [64, 64]
        assert f.get_slice(p + "self_attn.k_proj.weight").get_shape() == [32, 64]
        assert f.get_slice(p + "mlp.experts.gate_up_proj").get_shape() == [4, 64, 192]  # [E,H,2I]
        assert f.get_slice(p + "mlp.experts.down_proj").get_shape() == [4, 96, 64]  # [E,I,H]
        assert f.get_slice(p + "mlp.experts.down_proj_bias").get_dtype() == "F32"
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "gpt_oss" and "quantization_config" not in raw
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [257]


def test_original_and_hf_of_the_same_seed_load_identically(tmp_path):
    write_checkpoint(CFG, tmp_path / "o", layout="original", seed=9)
    write_checkpoint(CFG, tmp_path / "h", layout="hf", seed=9, max_shard_bytes=60_000)
    write_checkpoint(CFG, tmp_path / "u", layout="hf", seed=9, quantized=False)
    original = load_checkpoint(tmp_path / "o")
    assert_identical(original, load_checkpoint(tmp_path / "h"))
    assert_identical(original, load_checkpoint(tmp_path / "u"))
    assert_identical(original, random_weights(CFG, seed=9))


def test_load_float32(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="hf")
    loaded = load_checkpoint(tmp_path, dtype=torch.float32)
    assert loaded.layers[1].qkv_weight.dtype == torch.float32
    assert torch.equal(loaded.layers[1].qkv_weight, weights.layers[1].qkv_weight.float())


def test_unknown_extra_tensors_are_ignored(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="original")
    save_file({"block.0.attn.rotary_cache": torch.zeros(3)}, str(tmp_path / "extra.safetensors"))
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.safetensors")  # no index: glob
    assert_identical(weights, load_checkpoint(tmp_path))


# ---- errors ---------------------------------------------------------------------------------------
def _rewrite(file, change) -> None:
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(tensors)
    save_file(tensors, str(file))


def test_missing_tensor(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="original")
    _rewrite(tmp_path / "model.safetensors", lambda t: t.pop("block.1.mlp.mlp2_bias"))
    with pytest.raises(CheckpointError, match=r"block\.1\.mlp\.mlp2_bias.*missing.*model\.safetensors"):
        load_checkpoint(tmp_path)


def test_missing_tensor_in_a_shard_listed_by_the_index(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.sinks"
    shard = tmp_path / index["weight_map"][name]
    _rewrite(shard, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert shard.name in str(err.value) and name in str(err.value)


def test_truncated_file(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / index["weight_map"]["lm_head.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert shard.name in msg and "lm_head.weight" in msg and "truncated" in msg


def test_missing_shard_file(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="original", max_shard_bytes=40_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*missing.*tensor block\."):
        load_checkpoint(tmp_path)


def test_wrong_shape(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="hf")
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(tmp_path / "model.safetensors", lambda t: t.update({name: t[name][:16]}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert "model.safetensors" in msg and name in msg
    assert "expected shape [32, 64]" in msg and "found [16, 64]" in msg


def test_wrong_dtype(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="original")
    name = "block.0.mlp.mlp1_weight.blocks"
    _rewrite(tmp_path / "model.safetensors", lambda t: t.update({name: t[name].to(torch.int8)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name}: expected U8, found I8"):
        load_checkpoint(tmp_path)


def test_dense_weight_stored_as_integers_is_rejected(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="original")
    _rewrite(tmp_path / "model.safetensors",
             lambda t: t.update({"norm.scale": t["norm.scale"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"tensor norm\.scale: expected a float dtype"):
        load_checkpoint(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_original_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        load_checkpoint(tmp_path)
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="neither original"):
        load_checkpoint(tmp_path)
    assert load_tokenizer(tmp_path) is None


def test_config_errors_surface_as_checkpoint_errors(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="original")
    raw = CFG.to_original_dict()
    raw["num_key_value_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        load_checkpoint(tmp_path)


def test_writer_refuses_to_mix_with_an_existing_checkpoint(tmp_path, weights):
    write_checkpoint(weights, tmp_path, layout="original", max_shard_bytes=40_000)
    with pytest.raises(FileExistsError):
        write_checkpoint(weights, tmp_path, layout="hf")
    write_checkpoint(weights, tmp_path, layout="hf", overwrite=True)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert checkpoint_layout_of(tmp_path) == ("hf", True)


@pytest.mark.parametrize("quantized", [True, False], ids=["mxfp4", "dense"])
def test_transformers_reads_our_hf_checkpoint_as_the_same_weights(tmp_path, weights, quantized):
    from transformers import GptOssForCausalLM, Mxfp4Config

    from runtime.mxfp4 import dequantize

    write_checkpoint(weights, tmp_path, layout="hf", quantized=quantized, max_shard_bytes=60_000)
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if quantized else {}
    model = GptOssForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, **kw)
    q, kv = CFG.q_size, CFG.kv_size
    for i, ours in enumerate(weights.layers):
        theirs = model.model.layers[i]
        attn, experts = theirs.self_attn, theirs.mlp.experts
        pairs = {
            "q": (attn.q_proj.weight, ours.qkv_weight[:q]),
            "k_bias": (attn.k_proj.bias, ours.qkv_bias[q:q + kv]),
            "v": (attn.v_proj.weight, ours.qkv_weight[q + kv:]),
            "o": (attn.o_proj.weight, ours.out_weight),
            "sinks": (attn.sinks, ours.sinks),
            "norm": (theirs.input_layernorm.weight, ours.attn_norm),
            "router": (theirs.mlp.router.weight, ours.gate_weight),
            "gate_up": (experts.gate_up_proj,  # [E, H, 2I]
                        dequantize(ours.mlp1_blocks, ours.mlp1_scales).transpose(1, 2)),
            "down": (experts.down_proj,  # [E, I, H]
                     dequantize(ours.mlp2_blocks, ours.mlp2_scales).transpose(1, 2)),
            "down_bias": (experts.down_proj_bias, ours.mlp2_bias),
        }
        for name, (a, b) in pairs.items():
            assert torch.equal(a.detach(), b.float()), (i, name)
    assert torch.equal(model.lm_head.weight.detach(), weights.unembedding.float())
    assert torch.equal(model.model.embed_tokens.weight.detach(), weights.embedding.float())
