"""The Kubernetes manifests: rendered by the real kustomize (kubectl kustomize), validated against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict), and checked for what running the service
needs: gRPC probes, GPU scheduling, a drain that fits the grace period, a locked-down container."""

from __future__ import annotations

import subprocess
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.test_deploy_common import DEPLOY, GAUGES, tool

K8S = DEPLOY / "k8s"
OVERLAYS = ("gpu-20b", "cpu-demo")
# Oldest Kubernetes the manifests target (native preStop sleep is beta/on from 1.30) and the newest
# schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


@cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / path)],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str = "gptoss-serve") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, got {len(found)}"
    return found[0]


def container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["server"]
    return containers[0]


def flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in a container's args."""
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def ports(c: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


# prometheus-operator's CRDs are not Kubernetes core: the fields the project uses, typed as in the
# monitoring.coreos.com/v1 API reference, and nothing else.
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
    "additionalProperties": False,
}
_META = {"type": "object", "required": ["name"]}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": _LABEL_SELECTOR,
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "interval": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "record": {"type": "string"},
                                            "alert": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": {"type": "string"},
                                            "labels": {"type": "object"},
                                            "annotations": {"type": "object"},
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def validate(doc: dict[str, Any], version: str) -> None:
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
    else:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_resource_validates(overlay: str, version: str) -> None:
    docs = render(f"overlays/{overlay}")
    assert {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= {
        d["kind"] for d in docs
    }
    for doc in docs:
        validate(doc, version)


def test_the_validators_reject_a_misspelled_field() -> None:
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    monitor = yaml.safe_load((K8S / "components/monitoring/servicemonitor.yaml").read_text())
    monitor["spec"]["endpoints"][0]["intreval"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, K8S_VERSIONS[-1])


def test_gpu_overlay_has_autoscaling_and_operator_objects_and_the_demo_does_not() -> None:
    gpu = {d["kind"] for d in render("overlays/gpu-20b")}
    demo = {d["kind"] for d in render("overlays/cpu-demo")}
    extras = {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "PersistentVolumeClaim"}
    assert extras <= gpu
    assert not extras & demo


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_native_grpc_health_checks(overlay: str) -> None:
    c = container(render(f"overlays/{overlay}"))
    grpc_port = ports(c)["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = c[probe]
        assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert spec["grpc"]["port"] == grpc_port
    # Ready means the Generation service itself can take work.
    assert c["readinessProbe"]["grpc"]["service"] == "gptoss.v1.Generation"
    assert c["startupProbe"]["grpc"]["service"] == "gptoss.v1.Generation"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay: str) -> None:
    pod = one(render(f"overlays/{overlay}"), "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    drain = float(flag(c["args"], "grace-period"))
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The kubelet sends SIGTERM after preStop; the process must finish draining and exit in time.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    # Liveness may see NOT_SERVING during the drain: it must not restart the pod before it ends.
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > pre_stop + drain


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_is_locked_down(overlay: str) -> None:
    pod = one(render(f"overlays/{overlay}"), "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    sc = c["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # A read-only root still needs a writable /tmp for the Triton and torch caches.
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume
    assert "memory" in c["resources"]["limits"] and "cpu" in c["resources"]["requests"]


def test_gpu_overlay_schedules_one_gpu_and_mounts_the_model_read_only() -> None:
    docs = render("overlays/gpu-20b")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert flag(c["args"], "device") == "cuda"
    model = flag(c["args"], "model")
    mount = next(m for m in c["volumeMounts"] if model.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert one(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadOnlyMany"]
    # Loading 13 GB of weights and capturing graphs: at least 10 minutes before liveness counts.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    image = c["image"]
    assert image.startswith("registry.example.com/gptoss-serve:"), image


def test_cpu_demo_needs_no_gpu_and_no_checkpoint() -> None:
    pod = one(render("overlays/cpu-demo"), "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert flag(c["args"], "model") is None and flag(c["args"], "device") == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_flags_service_and_scrape_annotations_agree(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    deployment = one(docs, "Deployment")
    c = container(docs)
    p = ports(c)
    assert flag(c["args"], "port") == str(p["grpc"])
    assert flag(c["args"], "metrics-port") == str(p["metrics"])
    assert flag(c["args"], "host") == "0.0.0.0"  # reachable from the kubelet and the Service
    template = deployment["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(p["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"
    pod_labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    by_name = {sp["name"]: sp for sp in service["spec"]["ports"]}
    assert by_name["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert by_name["metrics"]["appProtocol"] == "http"
    assert {sp["targetPort"] for sp in by_name.values()} <= set(p)
    headless = one(docs, "Service", "gptoss-serve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    allowed = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert allowed == {"grpc", "metrics"}


def test_service_monitor_scrapes_the_metrics_port_of_the_main_service_only() -> None:
    docs = render("overlays/gpu-20b")
    monitor = one(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        d for d in docs
        if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["gptoss-serve"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The rules select job="gptoss-serve": the job label comes from the Service's name label.
    assert selected[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "gptoss-serve"


def test_hpa_scales_the_deployment_on_the_metric_prometheus_adapter_serves() -> None:
    docs = render("overlays/gpu-20b")
    hpa = one(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", one(docs, "Deployment")["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == name
    series = rule["seriesQuery"].split("{")[0].strip("'\"")
    assert series in GAUGES
    # Per-pod values need the pod and namespace labels mapped to their resources.
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_args_are_a_valid_serve_command(overlay: str) -> None:
    """The real CLI parses the args and builds a valid ServerConfig from them."""
    from service.cli import build_parser
    from service.cli_serve import config_from_args

    c = container(render(f"overlays/{overlay}"))
    args = build_parser().parse_args(c["args"])
    assert args.command == "serve"
    config = config_from_args(args)
    assert config.port == ports(c)["grpc"] and config.metrics_port == ports(c)["metrics"]
    assert config.grace_period_s == float(flag(c["args"], "grace-period"))
