"""The attention's qkv projection with its norm, rope and K/V cache write: the fused launch
(kernels/dense_gemv_rope.py) and its code-shape candidates against the two launches the runtime
takes without it.

    python -m bench.rope_gemv [--rows 1,2] [--opts base,late1,tile,tile_late1,tile_late2]
                              [--copies 8] [--calls 128]

gpt-oss-20b: W [5120, 2880] bf16 (64 q heads, 8 KV heads, d 64), x and the residual [M, 2880],
the norm scale bf16-exact (as TritonOps passes it), a 4096-row K/V ring per slot. First every
variant is checked against the unfused path (new residual exact; q and the written cache rows
within bf16 rounding; exits non-zero untimed otherwise). Then, in CUDA graphs of `--calls` calls
rotating over `--copies` weight copies (W streams from HBM), µs per call of:
"unfused" = norm_linear_small + rope_cache_write (kernels/rope.py), and "fused <name>" for each
candidate of kernels/dense_gemv_rope_opts.CANDIDATES ("fused base" is the launch as it is today).
One JSON line per M goes to bench/results/kernels.jsonl with bench "rope_gemv".
BENCH_DEVICE=cpu: a toy shape interpreted, one eager call each, nothing recorded (a smoke test).
"""

from __future__ import annotations

import argparse

import torch

import bench.common as common
from bench.dense_gemv import per_call_us, rel_err
from kernels.dense_gemv_norm import norm_linear_small
from kernels.dense_gemv_rope import norm_linear_rope_small
from kernels.dense_gemv_rope_opts import CANDIDATES
from kernels.rope import rope_cache_write, split_qkv

EPS = 1e-5
OPTS = "base,late1,tile,tile_late1,tile_late2"


class Layer:
    """One layer's decode inputs: `copies` weight/bias copies, x, residual, scale, tables,
    caches, positions (the first wraps the ring on the GPU) and slots."""

    def __init__(self, m: int, nq: int, nkv: int, d: int, k: int, cap: int, copies: int,
                 dev: str, dtype: torch.dtype) -> None:
        n = (nq + 2 * nkv) * d
        self.nq = nq
        self.ws = [(torch.randn(n, k, device=dev) / k**0.5).to(dtype) for _ in range(copies)]
        self.bs = [torch.randn(n, device=dev, dtype=dtype) for _ in range(copies)]
        self.x = torch.randn(m, k, device=dev, dtype=dtype)  # [M, K]
        self.r = (10 * torch.randn(m, k, device=dev)).to(dtype)  # [M, K] the residual stream
        self.scale = (0.5 + torch.rand(k, device=dev)).to(dtype)  # [K] bf16-exact
        angles = torch.rand(2 * cap + 32, d // 2, device=dev) * 6.3  # [P, d/2] P > every pos
        self.cos, self.sin = 1.2 * angles.cos(), 1.2 * angles.sin()
        self.kc = torch.randn(m + 1, cap, nkv, d, device=dev).to(dtype)  # [S+1, C, nkv, d]
        self.vc = torch.randn_like(self.kc)
        self.pos = torch.tensor([cap + 3 * i + 5 for i in range(m)], device=dev)  # [M]
        self.slots = torch.arange(1, m + 1, device=dev)  # [M]

    def unfused(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = i % len(self.ws)
        y, s = norm_linear_small(self.x, self.r, self.scale, EPS, self.ws[c], self.bs[c])
        q, k, v = split_qkv(y, self.nq, *self.kc.shape[2:])
        return rope_cache_write(q, k, v, self.cos, self.sin, self.pos, self.slots, self.kc,
                                self.vc), s

    def fused(self, name: str):  # noqa: ANN201 - fn(i) → (q, s)
        opts = CANDIDATES[name]

        def call(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            c = i % len(self.ws)
            return norm_linear_rope_small(self.x, self.r, self.scale, EPS, self.ws[c],
                                          self.bs[c], self.cos, self.sin, self.pos, self.slots,
                                          self.kc, self.vc, self.nq, None, opts)
        return call

    def written(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.pos % self.kc.shape[1]
        return self.kc[self.slots, idx].clone(), self.vc[self.slots, idx].clone()


def check(layer: Layer, names: list[str]) -> str | None:
    """The first disagreement of a fused variant with the unfused path, if any."""
    q_want, s_want = layer.unfused(0)
    rows_want = layer.written()
    for name in names:
        layer.kc.normal_()  # garbage where the variant must write
        layer.vc.normal_()
        q, s = layer.fused(name)(0)
        errs = [rel_err(got, want) for got, want in
                zip((q, *layer.written()), (q_want, *rows_want), strict=True)]
        if not torch.equal(s, s_want) or not max(errs) < 1e-2:
            return (f"fused {name} M={layer.x.shape[0]}: residual equal "
                    f"{torch.equal(s, s_want)}, rel err q/k/v {errs}")
    return None


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2", help="decode rows M (≤ 8)")
    ap.add_argument("--opts", default=OPTS, help="candidates of dense_gemv_rope_opts to time")
    ap.add_argument("--copies", type=int, default=8, help="weight copies (≥ 6 on the GPU)")
    ap.add_argument("--calls", type=int, default=128, help="calls per graph (≥ 100 on the GPU)")
    args = ap.parse_args(argv)
    common.require_cuda()
    gpu = common.DEVICE == "cuda"
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    copies, calls = (max(6, args.copies), max(100, args.calls)) if gpu else (2, 1)
    nq, nkv, d, k, cap = (64, 8, 64, 2880, 4096) if gpu else (4, 2, 16, 200, 8)
    rows, names = [int(r) for r in args.rows.split(",")], args.opts.split(",")
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown:
        raise SystemExit(f"bench.rope_gemv: unknown candidates {unknown}")
    torch.manual_seed(0)
    layers = {m: Layer(m, nq, nkv, d, k, cap, copies, dev, dtype) for m in rows}
    for layer in layers.values():
        bad = check(layer, names)
        if bad:
            raise SystemExit(f"bench.rope_gemv: a fused variant disagrees: {bad}")
    results = []
    for m, layer in layers.items():
        us = {"unfused": per_call_us(layer.unfused, calls)}
        us.update({f"fused {name}": per_call_us(layer.fused(name), calls) for name in names})
        row = {"bench": "rope_gemv", "shape": "qkv", "n": (nq + 2 * nkv) * d, "k": k, "m": m,
               "residual": True, "us": us, "copies": copies, "calls_per_graph": calls}
        results.append(common.record("kernels", row) if gpu else row)
        print(f"qkv+rope M={m} (µs per call)")
        for name, v in us.items():
            print(f"  {name:<20} {v:8.2f}")
    return results


if __name__ == "__main__":
    main()
