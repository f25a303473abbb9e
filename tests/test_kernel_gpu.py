"""The Triton kernels at gpt-oss-20b shapes in bf16 on the GPU against their torch references.

`pytest -m gpu tests/test_kernel_gpu.py` on an H100. Also: the decode kernels and the sampler
replay inside a CUDA graph to the same results as eagerly.
"""

from __future__ import annotations

import pytest
import torch

from kernels.decode_attention import decode_attention, decode_attention_ref
from kernels.prefill_attention import prefill_attention, prefill_attention_ref
from kernels.rmsnorm import rmsnorm, rmsnorm_ref
from kernels.rope import rope_cache_write, rope_cache_write_ref
from kernels.sampling import sample, sample_ref
from runtime.config import preset
from runtime.rope import rope_table

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CFG = preset("20b")
NQ, NKV, D, W = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim, CFG.sliding_window
BF16 = torch.bfloat16
DEV = "cuda"


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-2) -> None:
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("tokens", [1, 7, 4096])
def test_rmsnorm_20b(tokens) -> None:
    x = torch.randn(tokens, CFG.hidden_size, device=DEV, dtype=BF16) * 4
    r = torch.randn_like(x)
    scale = torch.rand(CFG.hidden_size, device=DEV) + 0.5
    y, s = rmsnorm(x, scale, 1e-5, r)
    y_ref, s_ref = rmsnorm_ref(x, scale, 1e-5, r)
    assert torch.equal(s, s_ref)
    close(y, y_ref)


def test_rope_cache_write_20b() -> None:
    cos, sin = rope_table(CFG, 8192, DEV)
    t = 300
    qkv = torch.randn(t, CFG.qkv_size, device=DEV, dtype=BF16)
    q = qkv[:, : CFG.q_size].view(t, NQ, D)
    k = qkv[:, CFG.q_size : CFG.q_size + CFG.kv_size].view(t, NKV, D)
    v = qkv[:, CFG.q_size + CFG.kv_size :].view(t, NKV, D)
    pos = torch.cat([torch.arange(1000, 1299), torch.tensor([7000])]).to(DEV)
    slots = torch.tensor([2] * 299 + [5], device=DEV)
    for cap in (8192, W + 511):  # full layer, sliding ring
        kc = torch.zeros(9, cap, NKV, D, device=DEV, dtype=BF16)
        vc = torch.zeros_like(kc)
        kr, vr = kc.clone(), vc.clone()
        got = rope_cache_write(q, k, v, cos, sin, pos, slots, kc, vc)
        want = rope_cache_write_ref(q, k, v, cos, sin, pos, slots, kr, vr)
        close(got, want, 1e-2)
        close(kc, kr, 1e-2)
        assert torch.equal(vc, vr)


@pytest.mark.parametrize("window", [0, W])
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_decode_attention_20b(window, batch) -> None:
    cap = 8192 if window == 0 else W + 511
    kc = torch.randn(65, cap, NKV, D, device=DEV, dtype=BF16)
    vc = torch.randn_like(kc)
    g = torch.Generator(device=DEV).manual_seed(batch)
    q = torch.randn(batch, NQ, D, device=DEV, dtype=BF16, generator=g)
    slots = torch.randperm(65, device=DEV, generator=g)[:batch]
    top = 8191 if window == 0 else 20000
    pos = torch.randint(0, top, (batch,), device=DEV, generator=g)
    pos[0] = 0 if batch > 1 else top - 1
    sinks = torch.randn(NQ, device=DEV)
    got = decode_attention(q, kc, vc, slots, pos, sinks, window, D**-0.5)
    want = decode_attention_ref(q, kc, vc, slots, pos, sinks, window, D**-0.5)
    close(got, want)


@pytest.mark.parametrize("window", [0, W])
def test_prefill_attention_20b(window) -> None:
    cap = 8192 if window == 0 else W + 2047
    kc = torch.randn(9, cap, NKV, D, device=DEV, dtype=BF16)
    vc = torch.randn_like(kc)
    seqs = [(0, 0, 2048), (3, 1000, 333), (8, 5000, 1), (5, 77, 129)]  # (slot, start, length)
    cu = [0]
    for _, _, n in seqs:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], NQ, D, device=DEV, dtype=BF16)
    sinks = torch.randn(NQ, device=DEV)
    args = (cu, [s for s, _, _ in seqs], [p for _, p, _ in seqs], sinks, window, D**-0.5)
    close(prefill_attention(q, kc, vc, *args), prefill_attention_ref(q, kc, vc, *args))


def sampling_params(batch: int) -> dict[str, torch.Tensor]:
    rows = [(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.8, 50, 1.0, 0.0), (1.0, 0, 0.9, 0.0),
            (1.2, 0, 1.0, 0.05), (0.7, 100, 0.8, 0.02), (1.0, 1, 1.0, 0.0), (1.5, 0, 0.3, 0.0)]
    rows = (rows * (batch // len(rows) + 1))[:batch]
    t, k, p, m = zip(*rows, strict=True)
    return dict(
        temperature=torch.tensor(t, device=DEV), top_k=torch.tensor(k, device=DEV),
        top_p=torch.tensor(p, device=DEV), min_p=torch.tensor(m, device=DEV),
        seeds=torch.arange(batch, device=DEV) * 7919 - 3, positions=torch.arange(batch, device=DEV),
    )


@pytest.mark.parametrize(("batch", "scale"), [(1, 2.0), (8, 2.0), (64, 2.0), (64, 8.0), (3, 0.01)])
def test_sampling_20b_vocab(batch, scale) -> None:
    # scale: 2 → nuclei of thousands of tokens, 8 → peaked rows, 0.01 → nearly flat rows
    logits = torch.randn(batch, CFG.vocab_size, device=DEV) * scale
    kw = sampling_params(batch)
    got = sample(logits, **kw, num_top_logprobs=5)
    want = sample_ref(logits, **kw, num_top_logprobs=5)
    assert got.tokens.tolist() == want.tokens.tolist()
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-4)
    assert torch.equal(got.top_ids, want.top_ids)


def test_decode_kernels_and_sampler_replay_in_a_cuda_graph() -> None:
    batch, cap = 16, 4096
    kc = torch.randn(17, cap, NKV, D, device=DEV, dtype=BF16)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, NQ, D, device=DEV, dtype=BF16)
    slots = torch.arange(batch, device=DEV)
    pos = torch.randint(0, cap, (batch,), device=DEV)
    sinks = torch.randn(NQ, device=DEV)
    logits = torch.randn(batch, CFG.vocab_size, device=DEV)
    kw = sampling_params(batch)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        o = decode_attention(q, kc, vc, slots, pos, sinks, 0, D**-0.5)
        return o, sample(logits, **kw).tokens

    eager_o, eager_t = step()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        graph_o, graph_t = step()
    torch.cuda.current_stream().wait_stream(stream)
    pos.copy_(torch.randint(0, cap, (batch,), device=DEV))  # new lengths, same graph
    graph.replay()
    torch.cuda.synchronize()
    want = decode_attention_ref(q, kc, vc, slots, pos, sinks, 0, D**-0.5)
    close(graph_o, want)
    assert torch.equal(graph_t, eager_t)
    del eager_o
