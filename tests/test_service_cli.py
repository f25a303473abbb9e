"""`gptoss-serve generate --server` streams from a running server; `serve --help` is instant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_serve_help_lists_the_deploy_flags() -> None:
    out = cli("serve", "--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--host", "--port", "--metrics-port", "--max-slots", "--max-context",
                 "--device", "--dtype", "--max-queue", "--grace-period", "--tls-cert",
                 "--tls-key", "--auth-token-file", "--port-file"):
        assert flag in out.stdout, flag


def test_generate_with_server_streams_the_same_tokens_as_the_api(server, client) -> None:  # noqa: ANN001
    expected = client.generate([3, 4, 5], max_new_tokens=7, temperature=0.0, ignore_eos=True)
    out = cli("generate", "--server", server.target, "--prompt-ids", "3,4,5",
              "--max-new-tokens", "7", "--temperature", "0", "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"token_ids": list(expected.token_ids), "text": expected.text,
                   "finish_reason": "length"}


def test_generate_with_server_reports_errors_with_their_code(server) -> None:  # noqa: ANN001
    out = cli("generate", "--server", server.target, "--prompt", "hi", "--max-new-tokens", "0")
    assert out.returncode == 1
    assert "INVALID_ARGUMENT" in out.stderr and "max_new_tokens" in out.stderr


def test_serve_refuses_half_a_tls_configuration(tmp_path) -> None:  # noqa: ANN001
    out = cli("serve", "--tls-cert", str(tmp_path / "c.pem"), "--port", "0")
    assert out.returncode == 2 and "tls_cert and tls_key go together" in out.stderr
