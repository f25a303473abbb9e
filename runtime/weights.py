"""Load a gpt-oss checkpoint directory (original or Hugging Face layout) into `ModelWeights`.

All headers are checked first (every expected tensor present, with its shape and an accepted
dtype), so a bad checkpoint fails in milliseconds with one `CheckpointError` naming the file and
the tensor. Then the files are read one at a time, memory-mapped, each tensor moved to the
target device/dtype as it is read: the host never holds more than one tensor's copy beyond the
result. MXFP4 experts stay u8; unquantized HF experts are quantized expert by expert on `device`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.checkpoint_layout import (
    DENSE,
    DENSE_EXPERTS,
    FP32,
    ORIGINAL,
    U8,
    Entry,
    all_entries,
    detect_layout,
    hf_quantized,
    layer_from_canonical,
)
from runtime.config import ConfigError, ModelConfig
from runtime.model_weights import ModelWeights
from runtime.mxfp4 import quantize
from runtime.safetensors_io import CheckpointError, TensorInfo, checkpoint_files, index_tensors
from runtime.tokenizer import Tokenizer

__all__ = ["CheckpointError", "load_checkpoint", "load_tokenizer", "checkpoint_layout_of"]

log = logging.getLogger(__name__)


def checkpoint_layout_of(path: str | Path) -> tuple[str, bool]:
    """(layout, quantized experts) of a checkpoint directory, judged by its tensor names."""
    return _layout(Path(path), set(index_tensors(Path(path))))


def _layout(path: Path, names: set[str]) -> tuple[str, bool]:
    layout = detect_layout(names)
    if layout is None:
        files, _ = checkpoint_files(path)
        raise CheckpointError(
            f"{files[0]}: neither original (embedding.weight, block.N.…) nor Hugging Face "
            "(model.embed_tokens.weight, model.layers.N.…) tensor names"
        )
    return layout, layout == ORIGINAL or hf_quantized(names)


def _check(path: Path, entries: list[Entry], found: dict[str, TensorInfo]) -> None:
    files = sorted({info.file.name for info in found.values()})
    for e in entries:
        info = found.get(e.name)
        if info is None:
            raise CheckpointError(
                f"{path}: tensor {e.name} (shape {list(e.shape)}) is missing "
                f"(looked in {', '.join(files)})"
            )
        if info.shape != e.shape:
            raise CheckpointError(
                f"{info.file}: tensor {e.name}: expected shape {list(e.shape)}, "
                f"found {list(info.shape)}"
            )
        if not e.accepts(info.dtype):
            want = "U8" if e.kind == U8 else "a float dtype (F32/BF16/F16)"
            raise CheckpointError(
                f"{info.file}: tensor {e.name}: expected {want}, found {info.dtype}"
            )


def _convert(e: Entry, t: torch.Tensor, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """On-disk tensor → canonical tensor(s) on the target device."""
    if e.kind == DENSE:
        return {e.canonical: t.to(device=device, dtype=dtype)}
    if e.kind == FP32:
        return {e.canonical: t.to(device=device, dtype=torch.float32)}
    if e.kind == U8:
        return {e.canonical: t.to(device=device)}
    assert e.kind == DENSE_EXPERTS
    blocks, scales = [], []
    for x in range(t.shape[0]):  # [K, N] → [N, K] rows of K, grouped along K
        b, s = quantize(t[x].to(device=device, dtype=torch.float32).T.contiguous())
        blocks.append(b)
        scales.append(s)
    return {e.canonical + ".blocks": torch.stack(blocks), e.canonical + ".scales": torch.stack(scales)}


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.bfloat16) -> ModelWeights:
    """Load `path` (a directory with config.json and safetensors) onto `device`.

    Dense weights take `dtype`; norm scales, sinks and expert biases are fp32; MXFP4 stays u8.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    try:
        config = ModelConfig.from_dir(path)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    found = index_tensors(path)
    layout, quantized = _layout(path, set(found))
    entries = all_entries(config, layout, quantized)
    _check(path, entries, found)

    by_file: dict[Path, list[Entry]] = defaultdict(list)
    for e in entries:
        by_file[found[e.name].file].append(e)
    canon: dict[str, torch.Tensor] = {}
    row_parts: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for file in sorted(by_file):
        with safe_open(str(file), framework="pt") as f:
            for e in by_file[file]:
                try:
                    t = f.get_tensor(e.name)
                except Exception as exc:  # I/O errors on a damaged file
                    raise CheckpointError(f"{file}: tensor {e.name}: cannot read ({exc})") from exc
                for name, value in _convert(e, t, device, dtype).items():
                    if e.rows is None:
                        canon[name] = value
                    else:
                        row_parts[name].append((e.rows[0], value))
                del t
    for name, parts in row_parts.items():  # HF q/k/v → our qkv, rows in q, k, v order
        canon[name] = torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])])
    row_parts.clear()

    log.info("loaded %s checkpoint %s (%s experts) onto %s", layout, path,
             "MXFP4" if quantized else "dense→MXFP4", device)
    return ModelWeights(
        config=config,
        embedding=canon["embedding.weight"],
        layers=[layer_from_canonical(i, canon) for i in range(config.num_hidden_layers)],
        norm=canon["norm.scale"],
        unembedding=canon["unembedding.weight"],
    )


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer.json, or None when it has none."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        return Tokenizer.from_file(file)
    except Exception as exc:
        raise CheckpointError(f"{file}: not a valid tokenizer ({exc})") from exc
