"""safetensors files of a checkpoint directory: find them, index their headers, write shards.

Reading only touches headers here (cheap: a JSON prefix per file), so the loader can check every
tensor's presence, shape and dtype before it reads a byte of data, and report the first problem
as one `CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory whose files or tensors are missing, corrupt or mis-shaped."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "BF16", "F32", "U8", …


def checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint and, when sharded, the index's weight_map."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                first = next(n for n, v in weight_map.items() if path / v == f)
                raise CheckpointError(f"{f}: shard listed in {INDEX_FILE} is missing "
                                      f"(it holds tensor {first})")
        return files, weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors found")
    return files, None


def _raw_header(file: Path) -> dict:
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def _diagnose(file: Path, exc: Exception) -> str:
    """Why a file does not open, naming the first tensor whose data it lacks when possible."""
    try:
        header = _raw_header(file)
        (n,) = struct.unpack("<Q", file.read_bytes()[:8])
        data_bytes = file.stat().st_size - 8 - n
    except Exception:
        return f"{file}: not a readable safetensors file (header corrupt: {exc})"
    for name, info in header.items():
        if name != "__metadata__" and info["data_offsets"][1] > data_bytes:
            return (f"{file}: tensor {name}: data ends at byte {info['data_offsets'][1]} but the "
                    f"file holds only {max(data_bytes, 0)} data bytes (truncated file?)")
    return f"{file}: not a readable safetensors file ({exc})"


def index_tensors(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint → where it is, its shape and dtype (headers only)."""
    files, weight_map = checkpoint_files(path)
    found: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                    sl = f.get_slice(name)
                    found.setdefault(name, TensorInfo(file, tuple(sl.get_shape()), sl.get_dtype()))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(_diagnose(file, exc)) from exc
    if weight_map is not None:
        for name, rel in weight_map.items():
            info = found.get(name)
            if info is None or info.file != path / rel:
                raise CheckpointError(
                    f"{path / rel}: tensor {name} is listed there by {INDEX_FILE} but missing"
                )
    return found


class ShardWriter:
    """Writes tensors into one model.safetensors, or shards of ≤ max_bytes plus an index."""

    def __init__(self, out_dir: Path, max_bytes: int | None, overwrite: bool = False):
        out_dir.mkdir(parents=True, exist_ok=True)
        old = [*out_dir.glob("*.safetensors"), *out_dir.glob(INDEX_FILE)]
        if old and not overwrite:
            raise FileExistsError(f"{out_dir} already holds a checkpoint ({old[0].name})")
        for f in old:
            f.unlink()
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.max_bytes and self.buffer and self.buffer_bytes + nbytes > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        tmp = self.out_dir / f".shard-{len(self.shards):05d}.tmp"
        save_file(self.buffer, str(tmp), metadata={"format": "pt"})
        self.shards.append((tmp, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> None:
        if not self.max_bytes:
            save_file(self.buffer, str(self.out_dir / SINGLE_FILE), metadata={"format": "pt"})
            return
        if self.buffer or not self.shards:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
