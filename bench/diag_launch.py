"""Host cost of launching each op of an eager step (GPU diagnostic).

    python -m bench.diag_launch

Each op is called many times without synchronizing; the host time per call is what an eager
(non-graph) step pays per layer whenever the GPU finishes its work faster than Python enqueues it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bench.common import require_cuda
from kernels.moe import moe_forward, prepare_moe, router_logits
from kernels.moe_routing import route
from kernels.rmsnorm import rmsnorm
from runtime.config import ModelConfig
from runtime.synthetic import random_layer


def host_us(fn: Callable[[], object], n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    require_cuda()
    cfg = ModelConfig(num_hidden_layers=1)
    layer = random_layer(cfg, 0, seed=1, device="cuda", dtype=torch.bfloat16)
    prepared = prepare_moe(layer)
    rows = []
    for t in (1, 73, 330):
        x = torch.randn(t, cfg.hidden_size, device="cuda").to(torch.bfloat16)
        w = torch.ones(cfg.hidden_size, device="cuda")
        logits = router_logits(x, layer)
        rows += [
            (f"rmsnorm T={t}", host_us(lambda x=x, w=w: rmsnorm(x, w, 1e-5, x))),
            (f"torch linear (router) T={t}", host_us(lambda x=x: router_logits(x, layer))),
            (f"route T={t}", host_us(lambda lg=logits: route(lg, 4, 16))),
            (f"moe_forward T={t}", host_us(lambda x=x: moe_forward(x, layer, cfg, prepared))),
            (f"torch.empty x8 T={t}", host_us(lambda t=t: [torch.empty(t, 8, device="cuda")
                                                       for _ in range(8)])),
        ]
    print(f"{'op':<32} {'host µs/call':>12}")
    for name, us in rows:
        print(f"{name:<32} {us:12.1f}")


if __name__ == "__main__":
    main()
