"""Programmatic dependent launch (kernels/pdl.py): a scheduling change only. It is off on the CPU
and in the interpreter, follows GPTOSS_PDL on CUDA, reaches every kernel of a decode step, and
(GPU, -m gpu) gives the same logits and the same tokens as without it, eagerly and in the decode
CUDA graphs.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import kernels.pdl as pdl
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
    assert pdl.DEFAULT is False  # off until timed on the H100
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


def test_prefetch_sectors_cover_a_row_and_cost_no_variant_when_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # qkv / out rows of gpt-oss (2880 and 4096 bf16), GEMM 2's split rows (720 code bytes)
    assert [pdl.sectors(b) for b in (5760, 8192, 720, 1, 32, 33)] == [256, 256, 32, 1, 1, 2]
    assert pdl.launch_args(torch.device("cuda"), row_bytes=5760)["SECTORS"] == 1
    monkeypatch.setenv(pdl.ENV, "on")
    assert pdl.launch_args(torch.device("cuda"), row_bytes=5760)["SECTORS"] == 256


def test_every_kernel_of_a_decode_step_asks_whether_to_use_pdl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A one-token decode step of the tiny model with the Triton ops (interpreted): the dense
    GEMVs, the router, both MoE GEMVs, the combine, rope and the fused decode attention all
    take their launch flags from kernels.pdl (a launcher that dropped them would fail here)."""
    callers: set[str] = set()
    real = pdl.launch_args

    def spy(device, row_bytes=None):  # noqa: ANN001, ANN202
        callers.add(inspect.stack()[1].function)
        return real(device, row_bytes)

    monkeypatch.setattr(pdl, "launch_args", spy)
    cfg = preset("tiny")
    weights = random_weights(cfg, seed=3, device="cpu", dtype=torch.float32)
    shape = CacheShape(max_slots=2, max_context=64, max_chunk_tokens=8)
    model = Model(weights, KVCache(cfg, shape, "cpu", torch.float32), 64,
                  ops=TritonOps(dense_gemv_rows=8))
    model.hidden(build_batch(StepPlan((SeqWork(0, (5, 9, 200), 0, sample=True),)), "cpu"))
    callers.clear()
    model.hidden(build_batch(StepPlan((SeqWork(0, (7,), 3, sample=True),)), "cpu"))
    assert {"linear_small", "route_fused", "moe_gemv", "gemv1_swiglu", "rope_cache_write",
            "launch_fused"} <= callers, callers


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
