"""Per-kernel micro-benchmarks at gpt-oss-20b shapes against each kernel's own roofline.

    python -m bench.kernels [--quick]
    python -m bench.kernels --decode-variants [--variants a,b]   (bench/kernels_decode.py)

Decode attention: bytes = the K and V rows each row reads (B × keys × nkv × d × 2 × 2 B) ÷ copy
bandwidth; timed inside a CUDA graph (as in the decode step) with a cache allocated for 128k
positions, to show that the time follows the slots' lengths, not the allocation. Prefill
attention: FLOPs = 4 · nq · d · Σ keys per query ÷ the bf16 GEMM rate. rmsnorm, rope+KV write and
sampling: bytes ÷ bandwidth. Results go to bench/results/kernels.jsonl.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import DEVICE, Peaks, cuda_time, graph_time, measure_peaks, record, require_cuda
from bench.kernels_decode import bench_decode_variants
from kernels.decode_attention import decode_attention
from kernels.prefill_attention import prefill_attention
from kernels.rmsnorm import rmsnorm
from kernels.rope import rope_cache_write
from kernels.sampling import sample
from runtime.config import preset
from runtime.rope import rope_table

CFG = preset("20b")
NQ, NKV, D = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
BF16 = torch.bfloat16
# (batch, context) of decode attention, prompts of prefill attention, tokens of the small kernels,
# batches of sampling, allocated full-layer context
SIZES = {
    "full": dict(decode=[(1, 1024), (1, 4096), (1, 32768), (8, 4096), (32, 4096), (64, 1024),
                         (64, 4096)], prefill=[1024, 4096, 16384], tokens=[1, 64, 4096],
                 sample=[1, 8, 64], alloc=131072, slots=64),
    "quick": dict(decode=[(1, 4096), (1, 32768), (32, 4096)], prefill=[1024, 4096],
                  tokens=[1, 4096], sample=[1, 64], alloc=32768, slots=32),
    # BENCH_DEVICE=cpu: exercise the script in the interpreter (fp16: its bf16 dot is wrong)
    "smoke": dict(decode=[(1, 40), (2, 100)], prefill=[33], tokens=[3], sample=[2],
                  alloc=128, slots=2),
}


def show(kind: str, shape: str, t: float, roof: float, extra: str = "") -> None:
    print(f"{kind:<18} {shape:<34} {t * 1e6:9.1f} us  roofline {roof * 1e6:8.1f} us  "
          f"{t / roof if roof else float('nan'):5.2f}x  {extra}")


def bench_decode(peaks: Peaks, sizes: dict) -> None:
    cap, slots = sizes["alloc"], sizes["slots"]
    sinks = torch.randn(NQ, device=DEVICE)
    for window, capacity in ((0, cap), (CFG.sliding_window, CFG.sliding_window + 511)):
        kc = torch.randn(slots + 1, capacity, NKV, D, device=DEVICE, dtype=BF16)
        vc = torch.randn_like(kc)
        for batch, ctx in sizes["decode"]:
            if window and (batch, ctx) != sizes["decode"][-1]:
                continue
            q = torch.randn(batch, NQ, D, device=DEVICE, dtype=BF16)
            slot_ids = torch.arange(batch, device=DEVICE)
            pos = torch.full((batch,), ctx - 1, device=DEVICE)
            keys = min(ctx, window) if window else ctx
            nbytes = batch * keys * NKV * D * 2 * 2

            def fn(q=q, slot_ids=slot_ids, pos=pos, kc=kc, vc=vc, window=window) -> None:
                decode_attention(q, kc, vc, slot_ids, pos, sinks, window, D**-0.5)

            t = graph_time(fn)
            roof = nbytes / peaks.bandwidth
            name = "decode_attn_swa" if window else "decode_attn"
            show(name, f"B={batch} ctx={ctx} alloc={capacity}", t, roof,
                 f"{nbytes / t / 1e9:7.0f} GB/s")
            record("kernels", {"kernel": name, "batch": batch, "context": ctx,
                               "capacity": capacity, "us": t * 1e6, "roofline_us": roof * 1e6})
        del kc, vc


def bench_prefill(peaks: Peaks, sizes: dict) -> None:
    sinks = torch.randn(NQ, device=DEVICE)
    for window in (0, CFG.sliding_window):
        for prompt in sizes["prefill"]:
            cap = prompt if not window else window + prompt - 1
            kc = torch.randn(2, cap, NKV, D, device=DEVICE, dtype=BF16)
            vc = torch.randn_like(kc)
            q = torch.randn(prompt, NQ, D, device=DEVICE, dtype=BF16)
            keys = sum(min(i + 1, window) if window else i + 1 for i in range(prompt))
            flops = 4 * NQ * D * keys

            def fn(q=q, kc=kc, vc=vc, prompt=prompt, window=window) -> None:
                prefill_attention(q, kc, vc, [0, prompt], [0], [0], sinks, window, D**-0.5)

            t = cuda_time(fn, iters=10)
            roof = flops / peaks.gemm
            name = "prefill_attn_swa" if window else "prefill_attn"
            show(name, f"T={prompt}", t, roof, f"{flops / t / 1e12:6.0f} TFLOP/s")
            record("kernels", {"kernel": name, "prompt": prompt, "us": t * 1e6,
                               "roofline_us": roof * 1e6})


def bench_small(peaks: Peaks, sizes: dict) -> None:
    h = CFG.hidden_size
    scale = torch.ones(h, device=DEVICE)
    cos, sin = rope_table(CFG, 8192, DEVICE)
    kc = torch.zeros(9, 8192, NKV, D, device=DEVICE, dtype=BF16)
    vc = torch.zeros_like(kc)
    for t_ in sizes["tokens"]:
        x, r = (torch.randn(t_, h, device=DEVICE, dtype=BF16) for _ in range(2))
        t = graph_time(lambda x=x, r=r: rmsnorm(x, scale, 1e-5, r))
        roof = 4 * t_ * h * 2 / peaks.bandwidth
        show("rmsnorm+residual", f"T={t_}", t, roof)
        record("kernels", {"kernel": "rmsnorm", "tokens": t_, "us": t * 1e6,
                           "roofline_us": roof * 1e6})
        qkv = torch.randn(t_, (NQ + 2 * NKV) * D, device=DEVICE, dtype=BF16)
        q = qkv[:, : NQ * D].view(t_, NQ, D)
        k = qkv[:, NQ * D : (NQ + NKV) * D].view(t_, NKV, D)
        v = qkv[:, (NQ + NKV) * D :].view(t_, NKV, D)
        pos = torch.arange(t_, device=DEVICE)
        slots = torch.zeros(t_, dtype=torch.long, device=DEVICE)

        def rope_fn(q=q, k=k, v=v, pos=pos, slots=slots) -> None:
            rope_cache_write(q, k, v, cos, sin, pos, slots, kc, vc)

        t = graph_time(rope_fn)
        roof = 2 * qkv.numel() * 2 / peaks.bandwidth
        show("rope+kv_write", f"T={t_}", t, roof)
        record("kernels", {"kernel": "rope_cache_write", "tokens": t_, "us": t * 1e6,
                           "roofline_us": roof * 1e6})
    vocab = CFG.vocab_size
    for batch in sizes["sample"]:
        logits = torch.randn(batch, vocab, device=DEVICE) * 3
        ones = torch.ones(batch, device=DEVICE)
        for label, tk, tp, mp in (("greedy", 1, 1.0, 0.0), ("temperature", 0, 1.0, 0.0),
                                  ("top_k=50", 50, 1.0, 0.0), ("top_p=0.9", 0, 0.9, 0.0),
                                  ("all", 50, 0.9, 0.05)):
            kw = dict(temperature=ones if label != "greedy" else ones * 0,
                      top_k=torch.full((batch,), tk, device=DEVICE),
                      top_p=ones * tp, min_p=ones * mp,
                      seeds=torch.arange(batch, device=DEVICE),
                      positions=torch.arange(batch, device=DEVICE))
            t = graph_time(lambda kw=kw, logits=logits: sample(logits, **kw))
            roof = batch * vocab * 4 / peaks.bandwidth  # one read of the logits
            show("sample", f"B={batch} {label}", t, roof)
            record("kernels", {"kernel": "sample", "batch": batch, "mode": label,
                               "us": t * 1e6, "roofline_us": roof * 1e6})


def tune(peaks: Peaks) -> None:
    """Launch parameters around the defaults at the shapes that matter most (pick the defaults)."""
    sinks = torch.randn(NQ, device=DEVICE)
    kc = torch.randn(2, 32768, NKV, D, device=DEVICE, dtype=BF16)
    vc = torch.randn_like(kc)
    q1 = torch.randn(1, NQ, D, device=DEVICE, dtype=BF16)
    one = torch.zeros(1, dtype=torch.long, device=DEVICE)
    for ctx in (4096, 32768):
        pos = torch.full((1,), ctx - 1, device=DEVICE)
        roof = ctx * NKV * D * 4 / peaks.bandwidth
        for block_n, warps, stages in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2),
                                       (128, 4, 2), (128, 8, 3)):
            for splits in (None, 16, 32, 64):
                t = graph_time(lambda pos=pos, b=block_n, s=splits, w=warps, st=stages:
                               decode_attention(q1, kc, vc, one, pos, sinks, 0, D**-0.5,
                                                block_n=b, num_splits=s, num_warps=w,
                                                num_stages=st))
                show("tune decode", f"ctx={ctx} bn={block_n} w={warps} s={stages} "
                     f"splits={splits}", t, roof)
    prompt = 4096
    q = torch.randn(prompt, NQ, D, device=DEVICE, dtype=BF16)
    flops = 4 * NQ * D * prompt * (prompt + 1) / 2
    for block_t, block_n, warps, stages in ((16, 64, 4, 2), (16, 64, 8, 2), (16, 64, 8, 3),
                                            (16, 128, 8, 2), (16, 128, 8, 3), (8, 64, 4, 3),
                                            (32, 64, 8, 3)):
        t = cuda_time(lambda bt=block_t, b=block_n, w=warps, s=stages: prefill_attention(
            q, kc, vc, [0, prompt], [0], [0], sinks, 0, D**-0.5, block_t=bt, block_n=b,
            num_warps=w, num_stages=s), iters=5)
        show("tune prefill", f"T={prompt} bt={block_t} bn={block_n} w={warps} s={stages}", t,
             flops / peaks.gemm, f"{flops / t / 1e12:6.0f} TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    parser.add_argument("--only", choices=["decode", "prefill", "small", "tune"], default=None)
    parser.add_argument("--tune", action="store_true", help="also sweep launch parameters")
    parser.add_argument("--decode-variants", action="store_true",
                        help="only: check and time the decode attention candidates")
    parser.add_argument("--variants", default="", help="with --decode-variants: names, a,b,…")
    args = parser.parse_args()
    require_cuda()
    global CFG, NQ, NKV, D, BF16
    sizes = SIZES["quick" if args.quick else "full"]
    if DEVICE != "cuda":
        sizes, BF16 = SIZES["smoke"], torch.float16
        CFG = preset("tiny").with_(vocab_size=300)
        NQ, NKV, D = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    peaks = measure_peaks()
    print(f"peaks: copy {peaks.bandwidth / 1e12:.2f} TB/s, bf16 GEMM {peaks.gemm / 1e12:.0f} "
          f"TFLOP/s")
    if args.decode_variants:
        names = [n for n in args.variants.split(",") if n] or None
        raise SystemExit(0 if bench_decode_variants(peaks, NQ, NKV, D, BF16, names) else 1)
    if args.only in (None, "decode"):
        bench_decode(peaks, sizes)
    if args.only in (None, "prefill"):
        bench_prefill(peaks, sizes)
    if args.only in (None, "small"):
        bench_small(peaks, sizes)
    if args.only == "tune" or (args.tune and args.only is None):
        tune(peaks)


if __name__ == "__main__":
    main()
