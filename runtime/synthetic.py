"""Seeded random gpt-oss weights of any shape, random checkpoints on disk, the built-in tiny model.

No real weights can be downloaded here, so tests, benchmarks and the demo run on random ones.
They are scaled so activations keep a unit-ish scale through every layer:
- dense matrices ~ N(0, 1/fan_in), embedding ~ N(0, 1), norm scales ≈ 1, small biases and sinks;
- MXFP4 experts are random bytes (no float quantization: fast on the GPU for 120b shapes). Each
  32-value group gets one ±6 code so its maximum is on the grid top: then dequantize → quantize
  gives back the very same bytes (the HF unquantized layout relies on it). Scales are a per-matrix
  base exponent chosen so W·x keeps x's rms, jittered by −1/0/+1 per group so kernels that mix up
  groups' scales are caught by tests.
Each layer draws from its own generator stream (seed, layer), so a checkpoint can be generated
and written layer by layer and still equal `random_weights(config, seed)` on the same device.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from runtime.checkpoint_layout import (
    DENSE_EXPERTS,
    DISK_DTYPE,
    HF,
    LAYOUTS,
    ORIGINAL,
    Entry,
    head_entries,
    layer_entries,
    layer_to_canonical,
    tail_entries,
)
from runtime.config import ModelConfig, preset
from runtime.model_weights import LayerWeights, ModelWeights
from runtime.mxfp4 import FP4_VALUES, GROUP, SCALE_BIAS, dequantize
from runtime.safetensors_io import ShardWriter
from runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BUILTIN_SEED = 20250805
# Checkpoints bigger than this are written in shards of this size by make_checkpoint.
DEFAULT_SHARD_BYTES = 4 << 30

_TAIL_STREAM = 1 << 20
# rms of a random FP4 group with one ±6 code forced in, and of the 2^{−1,0,+1} scale jitter.
_MEAN_SQ = sum(v * v for v in FP4_VALUES) / len(FP4_VALUES)
_FP4_RMS = math.sqrt(((GROUP - 1) * _MEAN_SQ + 36.0) / GROUP)
_JITTER_RMS = math.sqrt((0.25 + 1.0 + 4.0) / 3)


def _generator(seed: int, stream: int, device: torch.device | str) -> torch.Generator:
    mixed = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)
    return torch.Generator(device=device).manual_seed(mixed)


class _Draw:
    """Random tensors from one generator stream on one device."""

    def __init__(self, g: torch.Generator, device: torch.device | str, dtype: torch.dtype):
        self.g, self.device, self.dtype = g, device, dtype

    def normal(self, shape: tuple[int, ...], std: float, mean: float = 0.0,
               fp32: bool = False) -> torch.Tensor:
        x = torch.randn(shape, generator=self.g, device=self.device) * std + mean
        # Always on the bf16 grid, so a bf16 checkpoint holds these values exactly.
        x = x.to(torch.bfloat16)
        return x.to(torch.float32 if fp32 else self.dtype)

    def mxfp4(self, experts: int, rows: int, k_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        groups = k_in // GROUP
        kw = {"generator": self.g, "device": self.device}
        blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, **kw)
        pos = torch.randint(0, 16, (experts, rows, groups, 1), **kw)
        top = 7 | (torch.randint(0, 2, (experts, rows, groups, 1), dtype=torch.uint8, **kw) << 3)
        blocks.scatter_(-1, pos, (blocks.gather(-1, pos) & 0xF0) | top)  # low nibble: ±6
        base = round(math.log2(1.0 / (_FP4_RMS * _JITTER_RMS * math.sqrt(k_in))))
        jitter = torch.randint(-1, 2, (experts, rows, groups), dtype=torch.int16, **kw)
        scales = (jitter + (base + SCALE_BIAS)).clamp(0, 254).to(torch.uint8)
        return blocks, scales


def random_layer(config: ModelConfig, layer: int, seed: int = 0, device="cpu",
                 dtype: torch.dtype = torch.bfloat16) -> LayerWeights:
    d = _Draw(_generator(seed, layer + 1, device), device, dtype)
    h, e, inter = config.hidden_size, config.num_experts, config.intermediate_size
    mlp1_blocks, mlp1_scales = d.mxfp4(e, 2 * inter, h)
    mlp2_blocks, mlp2_scales = d.mxfp4(e, h, inter)
    return LayerWeights(
        attn_norm=d.normal((h,), 0.05, 1.0, fp32=True),
        qkv_weight=d.normal((config.qkv_size, h), h**-0.5),
        qkv_bias=d.normal((config.qkv_size,), 0.02),
        sinks=d.normal((config.num_attention_heads,), 0.5, fp32=True),
        out_weight=d.normal((h, config.q_size), config.q_size**-0.5),
        out_bias=d.normal((h,), 0.02),
        mlp_norm=d.normal((h,), 0.05, 1.0, fp32=True),
        # Router logits of std ~1.5 over unit-rms inputs: routing varies from token to token.
        gate_weight=d.normal((e, h), 1.5 * h**-0.5),
        gate_bias=d.normal((e,), 0.1),
        mlp1_blocks=mlp1_blocks,
        mlp1_scales=mlp1_scales,
        mlp1_bias=d.normal((e, 2 * inter), 0.02, fp32=True),
        mlp2_blocks=mlp2_blocks,
        mlp2_scales=mlp2_scales,
        mlp2_bias=d.normal((e, h), 0.02, fp32=True),
    )


def random_embedding(config: ModelConfig, seed: int = 0, device="cpu",
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    d = _Draw(_generator(seed, 0, device), device, dtype)
    return d.normal((config.vocab_size, config.hidden_size), 1.0)


def random_tail(config: ModelConfig, seed: int = 0, device="cpu",
                dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """(final norm scale [H] fp32, unembedding [V, H])."""
    d = _Draw(_generator(seed, _TAIL_STREAM, device), device, dtype)
    h = config.hidden_size
    return d.normal((h,), 0.05, 1.0, fp32=True), d.normal((config.vocab_size, h), h**-0.5)


def random_weights(config: ModelConfig, seed: int = 0, device="cpu",
                   dtype: torch.dtype = torch.bfloat16) -> ModelWeights:
    """Seeded random weights, generated directly on `device` (identical for a given seed and
    device type; CPU and CUDA streams differ)."""
    norm, unembedding = random_tail(config, seed, device, dtype)
    return ModelWeights(
        config=config,
        embedding=random_embedding(config, seed, device, dtype),
        layers=[random_layer(config, i, seed, device, dtype)
                for i in range(config.num_hidden_layers)],
        norm=norm,
        unembedding=unembedding,
    )


def builtin_tiny(device="cpu", dtype: torch.dtype = torch.bfloat16
                 ) -> tuple[ModelConfig, ModelWeights, Tokenizer]:
    """The demo model used when no --model is given: the tiny preset with fixed random weights."""
    config = preset("tiny")
    log.warning(
        "USING THE BUILT-IN TINY MODEL WITH RANDOM WEIGHTS (seed %d): its output is gibberish. "
        "Pass --model DIR to serve a real checkpoint.", BUILTIN_SEED,
    )
    weights = random_weights(config, BUILTIN_SEED, device, dtype)
    return config, weights, Tokenizer.byte_level(config.vocab_size)


# ---- writing checkpoints --------------------------------------------------------------------------
def _units(source: ModelWeights | ModelConfig, seed: int) -> Iterator[tuple[str, dict]]:
    """(unit, canonical tensors) for the head, each layer, the tail: generated lazily from a
    config so a 120b checkpoint never sits in memory whole."""
    if isinstance(source, ModelWeights):
        yield "head", {"embedding.weight": source.embedding}
        for i, layer in enumerate(source.layers):
            yield f"layer{i}", layer_to_canonical(i, layer)
        yield "tail", {"norm.scale": source.norm, "unembedding.weight": source.unembedding}
        return
    yield "head", {"embedding.weight": random_embedding(source, seed)}
    for i in range(source.num_hidden_layers):
        yield f"layer{i}", layer_to_canonical(i, random_layer(source, i, seed))
    norm, unembedding = random_tail(source, seed)
    yield "tail", {"norm.scale": norm, "unembedding.weight": unembedding}


def _entries_for(config: ModelConfig, unit: str, layout: str, quantized: bool) -> list[Entry]:
    if unit == "head":
        return head_entries(config, layout)
    if unit == "tail":
        return tail_entries(config, layout)
    return layer_entries(config, int(unit[5:]), layout, quantized)


def _disk_tensor(entry: Entry, canon: dict[str, torch.Tensor]) -> torch.Tensor:
    if entry.kind == DENSE_EXPERTS:
        blocks, scales = canon[entry.canonical + ".blocks"], canon[entry.canonical + ".scales"]
        # Expert by expert: dequantizing a whole 120b layer at once needs tens of GB.
        t = torch.stack([
            dequantize(blocks[x], scales[x], torch.bfloat16).cpu().transpose(0, 1)
            for x in range(blocks.shape[0])
        ])  # [E, K, N]
    else:
        t = canon[entry.canonical]
        if entry.rows is not None:
            t = t[entry.rows[0]:entry.rows[1]]
    t = t.to("cpu", DISK_DTYPE[entry.kind]).contiguous()
    if tuple(t.shape) != entry.shape:
        raise ValueError(f"{entry.name}: shape {tuple(t.shape)} does not match {entry.shape}")
    return t


def write_checkpoint(source: ModelWeights | ModelConfig, out_dir: str | Path, *,
                     layout: str = ORIGINAL, seed: int = 0, quantized: bool = True,
                     max_shard_bytes: int | None = None, tokenizer: Tokenizer | None = None,
                     overwrite: bool = False) -> Path:
    """Write `source` (weights, or a config to fill with `random_weights(config, seed)`) as a
    checkpoint directory: config.json, tokenizer.json, generation_config.json (HF), and one
    model.safetensors or shards of at most `max_shard_bytes` with model.safetensors.index.json.
    `quantized=False` (HF only) stores dense experts holding the exact dequantized values."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == ORIGINAL and not quantized:
        raise ValueError("the original layout always stores MXFP4 experts; use layout='hf'")
    config = source.config if isinstance(source, ModelWeights) else source
    out = Path(out_dir)
    writer = ShardWriter(out, max_shard_bytes, overwrite=overwrite)
    raw = config.to_original_dict() if layout == ORIGINAL else config.to_hf_dict(quantized)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if layout == HF:
        gen = {"eos_token_id": list(config.eos_token_ids), "pad_token_id": config.pad_token_id}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (tokenizer or Tokenizer.byte_level(config.vocab_size)).to_file(out / "tokenizer.json")
    for unit, canon in _units(source, seed):
        for entry in _entries_for(config, unit, layout, quantized):
            writer.add(entry.name, _disk_tensor(entry, canon))
    writer.finish()
    return out


def checkpoint_bytes(config: ModelConfig, layout: str = ORIGINAL, quantized: bool = True) -> int:
    total = 0
    for unit in ["head", *(f"layer{i}" for i in range(config.num_hidden_layers)), "tail"]:
        for entry in _entries_for(config, unit, layout, quantized):
            itemsize = torch.empty((), dtype=DISK_DTYPE[entry.kind]).element_size()
            total += math.prod(entry.shape) * itemsize
    return total


def make_checkpoint(shape: str, layout: str, seed: int, out_dir: str | Path,
                    quantized: bool = True, max_shard_bytes: int | None = None,
                    overwrite: bool = False) -> Path:
    """A random checkpoint of a preset shape ("tiny", "20b", "120b"); big ones are sharded."""
    config = preset(shape)
    if max_shard_bytes is None and checkpoint_bytes(config, layout, quantized) > DEFAULT_SHARD_BYTES:
        max_shard_bytes = DEFAULT_SHARD_BYTES
    return write_checkpoint(config, out_dir, layout=layout, seed=seed, quantized=quantized,
                            max_shard_bytes=max_shard_bytes, overwrite=overwrite)
