"""The container image recipe. No Docker engine runs in CI, so the Dockerfile is linted by the real
hadolint and its structure is checked against what the Kubernetes manifests and the CLI expect."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from fnmatch import fnmatch

import tomllib
import yaml

from tests.test_deploy_common import DEPLOY, ROOT, tool

DOCKERFILE = DEPLOY / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec form (JSON array): {args}"
    return value


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_a_rubber_stamp() -> None:
    """The same linter flags a known-bad Dockerfile (root user, unpinned latest tag)."""
    bad = "FROM ubuntu:latest\nRUN apt-get install curl\nCMD curl example.com\n"
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


def test_image_builds_on_a_cuda_runtime_base() -> None:
    steps = instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for op, a in steps if op == "ARG" and "=" in a}
    base = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:[0-9.]+-runtime-ubuntu[0-9.]+", base), base
    # Every stage descends from the CUDA image (via the shared `base` stage).
    froms = [a.split()[0] for op, a in steps if op == "FROM"]
    assert froms[0] == "${CUDA_IMAGE}"
    assert set(froms[1:]) <= {"base"}


def test_final_stage_runs_the_service_as_a_non_root_user_matching_kubernetes() -> None:
    stage = final_stage()
    (user,) = [a for op, a in stage if op == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    deployment = yaml.safe_load((DEPLOY / "k8s/base/deployment.yaml").read_text())
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (pod_security["runAsUser"], pod_security["runAsGroup"]) == (int(uid), int(gid))
    # Nothing after USER switches back to root.
    after_user = stage[[op for op, _ in stage].index("USER"):]
    assert [op for op, _ in after_user].count("USER") == 1


def test_entrypoint_serves_the_mounted_model_on_the_exposed_ports() -> None:
    stage = final_stage()
    ops = dict(stage)
    assert exec_form(ops["ENTRYPOINT"]) == ["gptoss-serve"]
    cmd = exec_form(ops["CMD"])
    assert cmd[0] == "serve"
    exposed = {int(p.split("/")[0]) for p in ops["EXPOSE"].split()}

    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert {int(value("--port")), int(value("--metrics-port"))} == exposed
    assert value("--host") == "0.0.0.0"
    assert exec_form(ops["VOLUME"]) == [value("--model")] == ["/models"]
    assert "HEALTHCHECK" in ops and "healthcheck.py" in ops["HEALTHCHECK"]
    # A read-only root filesystem: every cache the runtime writes must point under /tmp.
    env = ops["ENV"]
    for var in ("HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        assert re.search(rf"\b{var}=/tmp\b", env), var


def test_build_copies_every_package_pyproject_installs_and_dockerignore_keeps_them() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {a.split()[0] for op, a in instructions() if op == "COPY" and "--from" not in a}
    assert packages <= copied, packages - copied
    ignore = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = [*packages, "pyproject.toml", "constraints.txt", "README.md", "deploy/healthcheck.py"]
    for path in needed:
        assert not any(fnmatch(path, pattern) for pattern in ignore), path
    for heavy in (".git", ".venv", "tests", "checkpoints"):
        assert heavy in ignore


def test_healthcheck_reports_an_unreachable_server_as_unhealthy() -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), "--port", "1", "--timeout", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "unhealthy: UNAVAILABLE" in result.stderr


def test_default_command_is_a_valid_serve_command() -> None:
    from service.cli import build_parser
    from service.cli_serve import config_from_args

    config = config_from_args(build_parser().parse_args(exec_form(dict(final_stage())["CMD"])))
    assert (config.model, config.device, config.host) == ("/models", "cuda", "0.0.0.0")
