"""Programmatic dependent launch (kernels/pdl.py): a scheduling change only. It is off on the CPU
and in the interpreter, follows GPTOSS_PDL on CUDA, reaches every kernel of a decode step, and
(GPU, -m gpu) gives the same logits and the same tokens as without it, eagerly and in the decode
CUDA graphs.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import triton

import bench.moe_compile as mc
import kernels.dense_gemv as gemv
import kernels.moe_router as router
import kernels.pdl as pdl
from bench.kernels_compile import build, c
from bench.norm_compile import dense, router_args
from kernels.moe import choose_config
from kernels.moe_gemv_fence import PF_FENCE
from runtime.batch import build_batch
from runtime.config import preset
from runtime.kv_cache import CacheShape, KVCache
from runtime.model import Model
from runtime.ops_triton import TritonOps
from runtime.synthetic import random_weights
from runtime.types import SeqWork, StepPlan


@pytest.fixture(autouse=True)
def _environment_decides(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    monkeypatch.delenv(pdl.ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pdl.set_enabled(None)
    yield
    pdl.set_enabled(None)


def test_pdl_follows_the_environment_on_cuda_and_is_never_used_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pdl.DEFAULT is False  # measured slower on the H100 (run 47): opt-in
    assert pdl.launch_args(cuda) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setenv(pdl.ENV, "1")
    assert pdl.launch_args(cuda) == {"PDL": True, "launch_pdl": True}
    assert pdl.launch_args(cpu) == {"PDL": False, "launch_pdl": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.launch_args(cuda)["PDL"] is False  # the interpreter cannot run griddepcontrol
    monkeypatch.delenv("TRITON_INTERPRET")
    pdl.set_enabled(False)  # a bench or test overrides the environment
    assert pdl.launch_args(cuda)["PDL"] is False
    pdl.set_enabled(None)
    assert pdl.launch_args(cuda)["PDL"] is True


def test_a_pdl_switch_that_is_neither_yes_nor_no_is_an_error_not_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setenv(pdl.ENV, " Yes ")
    assert pdl.launch_args(cuda)["PDL"] is True
    monkeypatch.setenv(pdl.ENV, "enabled")
    with pytest.raises(ValueError, match="GPTOSS_PDL must be 1/0"):
        pdl.launch_args(cuda)
    monkeypatch.setenv(pdl.ENV, "on")
    monkeypatch.setenv(pdl.PREFETCH_ENV, "sometimes")
    with pytest.raises(ValueError, match="GPTOSS_PDL_PREFETCH must be 1/0"):
        pdl.launch_args(cuda, row_bytes=5760)


def test_prefetch_sectors_cover_a_row_and_cost_no_variant_when_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # qkv / out rows of gpt-oss (2880 and 4096 bf16), GEMM 2's split rows (720 code bytes)
    assert [pdl.sectors(b) for b in (5760, 8192, 720, 1, 32, 33)] == [256, 256, 32, 1, 1, 2]
    assert pdl.launch_args(torch.device("cuda"), row_bytes=5760)["SECTORS"] == 0
    monkeypatch.setenv(pdl.ENV, "on")
    assert pdl.launch_args(torch.device("cuda"), row_bytes=5760)["SECTORS"] == 256
    monkeypatch.setenv(pdl.PREFETCH_ENV, "0")  # PDL without the weight prefetch
    assert pdl.launch_args(torch.device("cuda"), row_bytes=5760) == {
        "PDL": True, "launch_pdl": True, "SECTORS": 0}


@pytest.mark.parametrize("fuse_rope", [True, False])
def test_every_kernel_of_a_decode_step_asks_whether_to_use_pdl(
    monkeypatch: pytest.MonkeyPatch, fuse_rope: bool,
) -> None:
    """One- and two-token decode steps of the tiny model with the Triton ops (interpreted): the
    dense GEMVs, the router, both MoE GEMVs, the combine, rope and the fused decode attention all
    take their launch flags from kernels.pdl (a launcher that dropped them would fail here; the
    attention asks in kernels.decode_variants.fused_launch, shared with rope-in-attention); rope
    either as the qkv GEMV's epilogue (the default) or as its own launch."""
    callers: set[tuple[str, bool]] = set()  # (launcher, with a weight-row prefetch)
    real = pdl.launch_args

    def spy(device, row_bytes=None):  # noqa: ANN001, ANN202
        callers.add((inspect.stack()[1].function, row_bytes is not None))
        return real(device, row_bytes)

    monkeypatch.setattr(pdl, "launch_args", spy)
    cfg = preset("tiny")
    weights = random_weights(cfg, seed=3, device="cpu", dtype=torch.float32)
    shape = CacheShape(max_slots=2, max_context=64, max_chunk_tokens=8)
    model = Model(weights, KVCache(cfg, shape, "cpu", torch.float32), 64,
                  ops=TritonOps(dense_gemv_rows=8, fuse_rope=fuse_rope))
    model.hidden(build_batch(StepPlan((SeqWork(0, (5, 9, 200), 0, sample=True),)), "cpu"))
    callers.clear()
    model.hidden(build_batch(StepPlan((SeqWork(0, (7,), 3, sample=True),)), "cpu"))
    # one token (GEMV_ONE): moe_gemv launches GEMM 2 with the combine folded in
    rope = ("norm_linear_rope_small", True) if fuse_rope else ("rope_cache_write", False)
    assert {("linear_small", True), ("route_fused", False), ("gemv1_swiglu", False),
            ("moe_gemv", False), rope, ("fused_launch", False)} <= callers, callers
    callers.clear()  # two tokens (GEMV_FAST): GEMM 2 (prefetching its code rows), the combine
    model.hidden(build_batch(StepPlan((SeqWork(0, (7,), 4, sample=True),
                                       SeqWork(1, (8,), 2, sample=True))), "cpu"))
    assert {("moe_gemv", True), ("moe_gemv", False)} <= callers, callers


def engine(monkeypatch: pytest.MonkeyPatch, on: bool, **kw):  # noqa: ANN201
    from runtime.engine import Engine, EngineConfig

    monkeypatch.setenv(pdl.ENV, "1" if on else "0")
    monkeypatch.setenv("GPTOSS_DENSE_GEMV_ROWS", "8")
    cfg = dict(device="cuda", dtype="bfloat16", max_slots=8, max_context=1024,
               max_chunk_tokens=256, kernels="triton", cuda_graphs=False)
    cfg.update(kw)
    e = Engine(EngineConfig(**cfg))
    e.warmup()
    return e


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pdl_gives_the_same_logits_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps of 1…8 rows, bf16: the same kernels in the same order, only launched early,
    so the logits are equal bit for bit."""
    e = engine(monkeypatch, False)
    for rows in (1, 2, 3, 8):
        works = tuple(SeqWork(s, ((7 * s + rows) % 250,), 20 + s, sample=True)
                      for s in range(rows))
        pdl.set_enabled(False)
        want = e.model.forward(build_batch(StepPlan(works), "cuda"))
        pdl.set_enabled(True)
        got = e.model.forward(build_batch(StepPlan(works), "cuda"))
        assert torch.equal(got, want), f"{rows} rows: PDL changed the logits"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pdl_decode_graphs_generate_the_tokens_of_plain_launches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every decode graph bucket captured with PDL replays to the tokens of graphs captured
    without it (greedy, 12 tokens a slot)."""
    from runtime.types import GREEDY

    outs = []
    for on in (False, True):
        e = engine(monkeypatch, on, cuda_graphs=True, step_graphs=False)
        assert e.graphs is not None and e.graphs.graphs
        outs.append([e.generate([3 + i for i in range(10 + s)], GREEDY, max_new_tokens=12,
                                slot=s).token_ids for s in range(3)])
    assert outs[0] == outs[1]


# The invariant of kernels/pdl.py, checked where it can be broken: in the compiled code (sm_90a,
# on the CPU), nothing before griddepcontrol.wait stores, and the only loads are those a kernel's
# pre-wait section means to make (L2 prefetches; GEMM 2's expert ids, written two kernels back).
MEMORY_OPS = ("ld.global", "st.global", "atom.", "red.", "cp.async")


def pre_wait_ops(ptx: str) -> list[str]:
    """The global memory instructions before the wait; raises unless the wait comes before the
    release and both are there."""
    lines = [line.strip() for line in ptx.splitlines()]
    wait = next(i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait"))
    release = next(i for i, line in enumerate(lines)
                   if line.startswith("griddepcontrol.launch_dependents"))
    assert wait < release
    return [line for line in lines[:wait] if any(op in line for op in MEMORY_OPS)]


def test_compiled_decode_kernels_touch_nothing_but_constants_before_the_wait() -> None:
    for m in (1, 2):  # the fused qkv GEMV as served (norm + residual, bf16 scale)
        a, t = dense(m, norm=True, res=True, scale="bf16")
        a.update(PDL=c(True), SECTORS=c(pdl.sectors(2880 * 2)))
        k = build(gemv, "_dense_gemv_kernel", a, t.num_warps, t.num_stages)
        assert pre_wait_ops(k.asm["ptx"]) == [], m
    a, warps = router_args(1, 32, norm=True, res=True)
    assert pre_wait_ops(mc._compile(router, "_router_kernel", dict(a, PDL=True),
                                    warps).asm["ptx"]) == []
    g2 = choose_config(2, 4, 32).gemv.gemm2  # (one token folds the combine into GEMM 2)
    pf = PF_FENCE.value if g2.loads_first else 3 if g2.async_copy else g2.prefetch
    a = dict(mc.gemv_args(2, g2.dequant), BLOCK_N=g2.block_n, BLOCK_K=g2.block_k,
             PREFETCH=pf, SPLIT_K=g2.split_k, PDL=True,
             SECTORS=pdl.sectors(triton.cdiv(mc.INTER // 32, g2.split_k) * 32 // 2))
    ops = pre_wait_ops(mc._compile(mc.gemv, "_gemv2_kernel", a, g2.num_warps,
                                   g2.num_stages).asm["ptx"])
    assert len(ops) == 1 and ops[0].startswith("ld.global.cg.b32"), ops  # the pair's expert
    one = choose_config(1, 4, 32).gemv  # one token: GEMM 2 with the combine folded in
    assert one.fuse_combine
    g2 = one.gemm2
    a = dict(mc.gemv_args(2, g2.dequant), BLOCK_N=g2.block_n, BLOCK_K=g2.block_k, PREFETCH=0,
             SPLIT_K=g2.split_k, PDL=True, WEIGHTS="*fp32", B="*fp32", stride_be=mc.HID,
             OUT="*bf16", stride_o=mc.HID, COUNTERS="*i32", TOPK=4)
    assert pre_wait_ops(mc._compile(mc.gemv, "_gemv2_fused_kernel", a, g2.num_warps,
                                    g2.num_stages).asm["ptx"]) == []
