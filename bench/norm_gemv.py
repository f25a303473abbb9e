"""The qkv projection with its norm fused (kernels/dense_gemv_norm.py) against the standalone
kernels.rmsnorm.rmsnorm followed by linear_small: what one decode layer's attention norm costs.

    python -m bench.norm_gemv [--rows 1,2,4,8] [--copies 8] [--calls 128]

gpt-oss qkv: W [5120, 2880] bf16, x and the residual [M, 2880], the norm scale bf16-exact (as a
checkpoint's: TritonOps passes it in bf16). First the fused kernel is checked against the two
launches (new residual exact, y within bf16 rounding; exits non-zero untimed otherwise). Then, in
CUDA graphs of `--calls` calls rotating over `--copies` weight copies (W streams from HBM):
"unfused" = rmsnorm + linear_small at choose_tiles, "fused" = norm_linear_small at
choose_norm_tiles, and "fused <candidate>" for every FMA tile candidate. One JSON line per M goes
to bench/results/kernels.jsonl with bench "norm_gemv". BENCH_DEVICE=cpu: a toy shape
interpreted, one eager call each, nothing recorded (a smoke test of this script).
"""

from __future__ import annotations

import torch

import bench.common as common
from bench.dense_gemv import per_call_us, rel_err, setup
from kernels.dense_gemv import CANDIDATES, choose_tiles, linear_small
from kernels.dense_gemv_norm import norm_linear_small
from kernels.rmsnorm import rmsnorm

EPS = 1e-5


def inputs(m: int, n: int, k: int, copies: int, dev: str, dtype: torch.dtype):  # noqa: ANN201
    ws = [(torch.randn(n, k, device=dev) / k**0.5).to(dtype) for _ in range(copies)]  # [N, K]
    bs = [torch.randn(n, device=dev, dtype=dtype) for _ in range(copies)]  # [N]
    x = torch.randn(m, k, device=dev, dtype=dtype)  # [M, K] the attention block's output
    r = (10 * torch.randn(m, k, device=dev)).to(dtype)  # [M, K] the residual stream
    scale = (0.5 + torch.rand(k, device=dev)).to(dtype)  # on the activation dtype's grid
    return ws, bs, x, r, scale


def check(m: int, n: int, k: int, dev: str, dtype: torch.dtype) -> str | None:
    """A description of the first disagreement of the fused kernel with the two launches."""
    ws, bs, x, r, scale = inputs(m, n, k, 1, dev, dtype)
    h, s_want = rmsnorm(x, scale.float(), EPS, r)
    want = linear_small(h, ws[0], bs[0])
    for name, tiles in {"default": None, **CANDIDATES}.items():
        y, s = norm_linear_small(x, r, scale, EPS, ws[0], bs[0], tiles)
        err = rel_err(y, want)
        if not torch.equal(s, s_want) or not err < 1e-2:
            return f"{name} M={m}: residual equal {torch.equal(s, s_want)}, rel err {err:.3g}"
    return None


def time_rows(m: int, n: int, k: int, copies: int, calls: int, dev: str, dtype: torch.dtype
              ) -> dict[str, float]:
    ws, bs, x, r, scale = inputs(m, n, k, copies, dev, dtype)
    scale32 = scale.float()
    tiles = choose_tiles(m, n, k)

    def unfused(i: int) -> object:
        h, _ = rmsnorm(x, scale32, EPS, r)
        return linear_small(h, ws[i % copies], bs[i % copies], tiles)

    def fused(t):  # noqa: ANN001, ANN202
        return lambda i: norm_linear_small(x, r, scale, EPS, ws[i % copies], bs[i % copies], t)

    out = {"unfused": per_call_us(unfused, calls), "fused": per_call_us(fused(None), calls)}
    for name, t in CANDIDATES.items():
        if not t.dot:
            out[f"fused {name}"] = per_call_us(fused(t), calls)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    st = setup(argv, __doc__.splitlines()[0])
    gpu, dev, dtype, rows, copies, calls = st.gpu, st.dev, st.dtype, st.rows, st.copies, st.calls
    n, k = (5120, 2880) if gpu else (37, 200)
    torch.manual_seed(0)
    for m in rows:
        bad = check(m, n, k, dev, dtype)
        if bad:
            raise SystemExit(f"bench.norm_gemv: the fused kernel disagrees: {bad}")
    results = []
    for m in rows:
        us = time_rows(m, n, k, copies, calls, dev, dtype)
        row = {"bench": "norm_gemv", "shape": "qkv", "n": n, "k": k, "m": m, "us": us,
               "copies": copies, "calls_per_graph": calls}
        results.append(common.record("kernels", row) if gpu else row)
        print(f"qkv M={m}: " + "  ".join(f"{name} {v:.2f} µs" for name, v in us.items()))
    return results


if __name__ == "__main__":
    main()
