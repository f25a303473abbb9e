"""Our model against Hugging Face transformers' GptOssForCausalLM on random tiny checkpoints.

The checkpoints are written by our own code in the HF MXFP4 layout and loaded by transformers with
`Mxfp4Config(dequantize=True)`, all in float32. Our logits must agree to ~1e-4 relative and greedy
tokens must be identical for decode steps well past the sliding window, through chunked prefill and
batched decode alike.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from runtime.batch import build_batch
from runtime.config import ModelConfig
from runtime.engine import Engine, EngineConfig
from runtime.synthetic import write_checkpoint
from runtime.types import SeqWork, StepPlan
from service.cli import main as cli_main

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # GQA 3, odd head count, top-2 of 5, window 4, YaRN 32
    "gqa3-k2": ModelConfig(
        vocab_size=300, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_experts=5,
        experts_per_token=2, sliding_window=4, max_position_embeddings=512, eos_token_ids=(1,),
    ),
    # MHA (ratio 1), 3 heads, top-1, window 7, YaRN 8
    "mha-k1": ModelConfig(
        vocab_size=300, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=3, head_dim=32, num_experts=4,
        experts_per_token=1, sliding_window=7, rope_scaling_factor=8.0,
        max_position_embeddings=512, eos_token_ids=(1,),
    ),
    # GQA 4, top-4 of 8, window 5, no YaRN, explicit layer types (full first)
    "gqa4-k4": ModelConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_experts=8,
        experts_per_token=4, sliding_window=5, rope_scaling_factor=1.0,
        layer_types=("full_attention", "sliding_attention", "sliding_attention", "full_attention"),
        max_position_embeddings=512, eos_token_ids=(1,),
    ),
}

PROMPT_LEN, NEW_TOKENS = 13, 24  # decode runs ≥ 3 windows past the prompt


def hf_model(path: Path) -> torch.nn.Module:
    model = transformers.GptOssForCausalLM.from_pretrained(
        str(path), quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32,
    )
    # transformers dequantizes experts to bf16 (exact for MXFP4 values); compute in fp32 throughout.
    return model.float().eval()


@torch.inference_mode()
def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: a full forward without any cache, the plainest oracle."""
    return model(torch.tensor([ids])).logits[0].float()


def our_greedy(engine: Engine, prompt: list[int], n: int, slot: int = 0) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits that chose them ([n, V]), via chunked prefill then decode."""
    logits, tokens, pos = [], [], 0
    feed = list(prompt)
    while len(tokens) < n:
        chunk = tuple(feed[: engine.max_chunk_tokens])
        feed = feed[len(chunk):]
        plan = StepPlan((SeqWork(slot=slot, token_ids=chunk, start_pos=pos, sample=True),))
        row = engine.model.forward(build_batch(plan, "cpu"))[0]
        pos += len(chunk)
        if feed:
            continue
        logits.append(row)
        tokens.append(int(row.argmax()))
        feed = [tokens[-1]]
    return tokens, torch.stack(logits)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory) -> tuple[str, Path, Path]:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf = write_checkpoint(CONFIGS[name], root / "hf", layout="hf", seed=11)
    original = write_checkpoint(CONFIGS[name], root / "original", layout="original", seed=11)
    return name, hf, original


def engine_for(path: Path, max_chunk: int = 5) -> Engine:
    return Engine(EngineConfig(
        model=str(path), dtype="float32", max_slots=3, max_context=128, max_chunk_tokens=max_chunk,
    ))


def test_logits_and_greedy_tokens_match_transformers(checkpoint) -> None:
    name, hf_dir, _ = checkpoint
    cfg = CONFIGS[name]
    prompt = torch.randint(2, cfg.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(3)).tolist()
    engine = engine_for(hf_dir)
    tokens, ours = our_greedy(engine, prompt, NEW_TOKENS)
    ref = hf_logits(hf_model(hf_dir), prompt + tokens[:-1])[PROMPT_LEN - 1 :]  # [n, V]
    rel = ((ours - ref).abs().amax(dim=-1) / ref.abs().amax(dim=-1)).max().item()
    assert rel < 1e-4, f"{name}: max relative logit error {rel:.2e}"
    assert tokens == ref.argmax(dim=-1).tolist(), f"{name}: greedy tokens differ from transformers"
    assert len(set(tokens)) > 1, "a random model should not emit a constant token"


def test_original_layout_gives_the_same_tokens(checkpoint) -> None:
    name, hf_dir, original_dir = checkpoint
    prompt = list(range(2, 2 + PROMPT_LEN))
    hf_tokens, _ = our_greedy(engine_for(hf_dir), prompt, NEW_TOKENS)
    orig_tokens, _ = our_greedy(engine_for(original_dir, max_chunk=3), prompt, NEW_TOKENS)
    assert hf_tokens == orig_tokens


def test_cli_generate_reproduces_transformers_greedy(checkpoint) -> None:
    name, hf_dir, _ = checkpoint
    prompt = [5, 9, 200, 17, 3, 44, 101]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main([
            "generate", "--model", str(hf_dir), "--prompt-ids", ",".join(map(str, prompt)),
            "--max-new-tokens", "12", "--temperature", "0", "--dtype", "float32",
            "--ignore-eos", "--json",
        ])
    assert rc == 0
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    assert result["finish_reason"] == "length"
    model = hf_model(hf_dir)
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    assert result["token_ids"] == ids[len(prompt):]
    assert isinstance(result["text"], str)
