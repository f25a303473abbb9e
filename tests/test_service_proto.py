"""The public API: stubs match the proto, names are the ones the issue promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto.gptoss.v1 import generate_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_proto(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("grpc_tools", reason="regenerating stubs needs grpcio-tools")
    from proto.codegen import generate

    for fresh in generate(tmp_path):
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale: run `python -m proto.codegen`"
        )


def test_service_and_message_names() -> None:
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "gptoss.v1.Generation"
    assert {m.name for m in service.methods} == {
        "Generate", "StreamGenerate", "Abort", "Tokenize", "GetModelInfo"}
    assert service.methods_by_name["StreamGenerate"].server_streaming
    assert [v.name for v in pb.FinishReason.DESCRIPTOR.values] == [
        "FINISH_REASON_UNSPECIFIED", "LENGTH", "STOP", "STOP_SEQUENCE", "ABORTED"]


def test_optional_fields_tell_unset_from_zero() -> None:
    req = pb.GenerateRequest()
    assert not req.sampling.HasField("temperature")
    req.sampling.temperature = 0.0
    assert req.sampling.HasField("temperature")
    for name in ("top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        assert pb.SamplingParams.DESCRIPTOR.fields_by_name[name].has_presence, name
    for name in ("max_new_tokens", "min_new_tokens"):
        assert pb.StoppingCriteria.DESCRIPTOR.fields_by_name[name].has_presence, name


def test_prompt_is_text_or_token_ids() -> None:
    req = pb.GenerateRequest(text="hi")
    assert req.WhichOneof("prompt") == "text"
    req.token_ids.token_ids.extend([1, 2])
    assert req.WhichOneof("prompt") == "token_ids" and not req.text
