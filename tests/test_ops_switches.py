"""The Triton backend's kernel switches: what an operator sets in the environment is what the
engine runs, arguments win over the environment, and a bad value stops start-up with its name."""

from __future__ import annotations

import pytest

from kernels.decode_latency import FULL, WINDOW
from kernels.decode_variants import SERVING
from runtime.ops_switches import ATTN_FULL, ATTN_WINDOW, OpsSwitches

VARS = ("GPTOSS_DENSE_GEMV_ROWS", "GPTOSS_FUSE_NORM", "GPTOSS_FUSE_NORM_ROWS", "GPTOSS_FUSE_ROPE",
        "GPTOSS_ROPE_ATTN", "GPTOSS_ATTN_WINDOW", "GPTOSS_ATTN_FULL")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARS:
        monkeypatch.delenv(name, raising=False)


def test_defaults_without_environment() -> None:
    assert OpsSwitches.from_env() == OpsSwitches()
    sw = OpsSwitches()
    # the measured best of each layer kind (H100, run 53), not the former SERVING
    assert sw.attn_window is WINDOW[ATTN_WINDOW] and sw.attn_full is FULL[ATTN_FULL]
    assert SERVING not in (sw.attn_window, sw.attn_full)
    assert sw.fuse_rope and not sw.rope_attn


def test_serving_names_the_former_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTOSS_ATTN_WINDOW", "serving")
    monkeypatch.setenv("GPTOSS_ATTN_FULL", "serving")
    sw = OpsSwitches.from_env()
    assert sw.attn_window is SERVING and sw.attn_full is SERVING


def test_rope_inside_attention_takes_the_rope_from_the_gemv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPTOSS_ROPE_ATTN", "1")
    sw = OpsSwitches.from_env()
    assert sw.rope_attn and not sw.fuse_rope


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    window, full = sorted(WINDOW)[0], sorted(FULL)[0]
    for name, value in (("GPTOSS_DENSE_GEMV_ROWS", "8"), ("GPTOSS_FUSE_NORM", "off"),
                        ("GPTOSS_FUSE_NORM_ROWS", "1"), ("GPTOSS_ROPE_ATTN", "yes"),
                        ("GPTOSS_ATTN_WINDOW", window), ("GPTOSS_ATTN_FULL", full)):
        monkeypatch.setenv(name, value)
    sw = OpsSwitches.from_env()
    assert (sw.dense_gemv_rows, sw.fuse_norm, sw.fuse_norm_rows, sw.rope_attn) == (8, False, 1,
                                                                                    True)
    assert sw.attn_window == WINDOW[window] and sw.attn_full == FULL[full]


def test_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTOSS_DENSE_GEMV_ROWS", "8")
    monkeypatch.setenv("GPTOSS_FUSE_ROPE", "1")
    sw = OpsSwitches.from_env(dense_gemv_rows=0, fuse_rope=False)
    assert sw.dense_gemv_rows == 0 and not sw.fuse_rope


@pytest.mark.parametrize(("name", "value", "words"), [
    ("GPTOSS_DENSE_GEMV_ROWS", "9", "dense_gemv_rows"),
    ("GPTOSS_DENSE_GEMV_ROWS", "two", "GPTOSS_DENSE_GEMV_ROWS"),
    ("GPTOSS_FUSE_NORM_ROWS", "-1", "fuse_norm_rows"),
    ("GPTOSS_FUSE_NORM", "maybe", "GPTOSS_FUSE_NORM"),
    ("GPTOSS_ATTN_WINDOW", "fastest", "GPTOSS_ATTN_WINDOW"),
    ("GPTOSS_ATTN_FULL", "fastest", "GPTOSS_ATTN_FULL"),
])
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                      words: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=words):
        OpsSwitches.from_env()


def test_the_two_rope_fusions_exclude_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTOSS_FUSE_ROPE", "1")
    monkeypatch.setenv("GPTOSS_ROPE_ATTN", "1")
    with pytest.raises(ValueError, match="at most one"):
        OpsSwitches.from_env()
    assert OpsSwitches.from_env(rope_attn=False).fuse_rope
