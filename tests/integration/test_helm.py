"""The Helm chart (helm/detseg) checked as far as a machine without a cluster can: the real helm lints and renders
it, every rendered manifest is validated against Kubernetes' own JSON schemas (kubernetes-validate, strict), the
rendered settings are parsed by the service's own Settings, and the values schema refuses bad values by name.

helm and kubectl come from `make helm-tools` (.tools/bin); `make test` runs that first. kubectl's client-side
dry run is not used: it needs an API server for discovery even with --validate=false.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.config import CONSTRAINTS, Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "detseg"
PRODUCTION = CHART / "values-production.yaml"
TOOLS = ROOT / ".tools" / "bin"
# Kubernetes versions the manifests are validated against: the chart's minimum (kubeVersion >=1.27: grpc probes GA),
# 1.30, and the newest, kubectl's own (v1.35). kubernetes-validate 1.37.0 ships schemas for 1.25 to 1.37.
K8S_VERSIONS = ("1.27.0", "1.30.0", "1.35.0")
# Settings the chart sets itself rather than through values `config` (the schema must not accept them there).
CHART_OWNED = {
    "host",
    "port",
    "metrics_port",
    "health_port",  # healthPort: the plaintext health-only port (TLS + kubelet probes)
    "backend",
    "triton_url",
    "cache_dir",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "auth_tokens_file",
    "signing_key",
    "triton_repository",
    "triton_http_port",
    "triton_metrics_port",
    "redis_url",  # redis.url / redis.existingSecret: may hold a password, so it comes from a Secret
}
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIBfake\n-----END PRIVATE KEY-----\n"
# Every optional feature on at once (inline secrets, mutual TLS, HPA on two metrics, PVCs, extra env).
EVERYTHING: dict[str, Any] = {
    "healthPort": 50052,
    "tls": {"enabled": True, "cert": PEM_CERT, "key": PEM_KEY, "mutual": True, "clientCA": PEM_CERT},
    "auth": {"enabled": True, "tokens": ["0123456789abcdef0123", "fedcba9876543210fedc"]},
    "signing": {"enabled": True, "key": PEM_KEY},
    "autoscaling": {"enabled": True, "inFlight": {"enabled": True}},
    "pdb": {"minAvailable": "50%", "maxUnavailable": ""},
    "cache": {"existingClaim": "detseg-cache"},
    "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "2"}],
    "commonLabels": {"team": "vision"},
    "commonAnnotations": {"owner": "vision@example.com"},
    "imagePullSecrets": [{"name": "regcred"}],
    "redis": {"url": "rediss://:hunter2-redis@redis.cache:6380/0"},
    "config": {"traces_exporter": "otlp", "otlp_endpoint": "http://otel.monitoring:4317"},
    "networkPolicy": {
        "ingressFrom": [{"podSelector": {"matchLabels": {"role": "client"}}}],
        "egress": {
            "dnsTo": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "redisTo": [{"podSelector": {"matchLabels": {"app": "redis"}}}],
            "otlpTo": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "extraRules": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 5432, "protocol": "TCP"}]}],
        },
    },
    "triton": {"modelRepository": {"existingClaim": "detseg-models", "subPath": "repo"}, "extraArgs": ["--log-info=1"]},
}
IN_PROCESS: dict[str, Any] = {"backend": "torch", "triton": {"enabled": False}, "config": {"models": "demo-open"}}


def _tool(name: str) -> Path:
    path = TOOLS / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `make helm-tools` (make test does) to install helm and kubectl")
    return path


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """helm's config, cache and data folders in a temp dir: nothing read from or written to the user's."""
    home = tmp_path_factory.mktemp("helm-home")
    return {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": str(home / "no-kubeconfig"),
    }


@pytest.fixture(scope="module")
def helm(helm_env: dict[str, str]):
    binary = _tool("helm")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(binary), *args], env=helm_env, capture_output=True, text=True, timeout=60)

    return run


@pytest.fixture(scope="module")
def values_file(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("values")
    count = itertools.count()

    def write(values: dict[str, Any]) -> Path:
        path = folder / f"values-{next(count)}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    return write


@pytest.fixture(scope="module")
def render(helm, values_file):
    """Rendered manifests (name "r", namespace "detseg") for values files and/or a values dict."""

    def run(*files: Path, values: dict[str, Any] | None = None, kube_version: str = K8S_VERSIONS[-1]) -> list[dict]:
        args = ["template", "r", str(CHART), "--namespace", "detseg", "--kube-version", kube_version]
        for f in (*files, *([values_file(values)] if values else [])):
            args += ["-f", str(f)]
        done = helm(*args)
        assert done.returncode == 0, done.stderr
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc]

    return run


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    rendered = [f"{d['kind']}/{d['metadata']['name']}" for d in docs]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered; rendered: {rendered}"
    return found[0]


def _containers(deployment: dict) -> Iterator[dict]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def _volumes(deployment: dict) -> dict[str, dict]:
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}


# --- the tools --------------------------------------------------------------------------------------------------


def test_helm_and_kubectl_from_make_helm_tools_answer(helm, helm_env):
    version = helm("version", "--short")
    assert version.returncode == 0 and version.stdout.startswith("v4."), version.stdout + version.stderr
    kubectl = subprocess.run(
        [str(_tool("kubectl")), "version", "--client"], env=helm_env, capture_output=True, text=True, timeout=60
    )
    assert kubectl.returncode == 0 and "Client Version: v1." in kubectl.stdout, kubectl.stdout + kubectl.stderr


# --- lint and Kubernetes validity --------------------------------------------------------------------------------


@pytest.mark.parametrize("production", [False, True], ids=["defaults", "production"])
def test_chart_lints_clean_in_strict_mode(helm, production):
    args = ["lint", "--strict", str(CHART), *(["-f", str(PRODUCTION)] if production else [])]
    done = helm(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("case", ["defaults", "production", "everything", "in-process"])
def test_every_rendered_manifest_is_valid_kubernetes(render, case, k8s):
    files = [PRODUCTION] if case == "production" else []
    values = {"everything": EVERYTHING, "in-process": IN_PROCESS}.get(case)
    docs = render(*files, values=values, kube_version=k8s)
    assert {"ConfigMap", "Deployment", "Service", "ServiceAccount"} <= {d["kind"] for d in docs}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, k8s, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is not valid Kubernetes {k8s}: {path}: {e.message}")


def test_the_validator_rejects_what_kubernetes_would(render):
    """Strict validation is real: a misspelt field and a wrong type in a rendered Deployment are both refused."""
    deployment = _one(render(), "Deployment", "r-detseg")
    misspelt = json.loads(json.dumps(deployment))
    misspelt["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenessProbes"):
        kubernetes_validate.validate(misspelt, K8S_VERSIONS[-1], strict=True)
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="'two'"):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[-1], strict=True)


def test_kubernetes_older_than_native_grpc_probes_is_refused(helm):
    done = helm("template", "r", str(CHART), "--kube-version", "1.26.0")
    assert done.returncode != 0
    assert ">=1.27.0-0" in done.stderr


# --- what the pods run -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["defaults", "production", "everything"])
def test_every_container_runs_hardened(render, case):
    docs = render(*([PRODUCTION] if case == "production" else []), values=EVERYTHING if case == "everything" else None)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"r-detseg", "r-detseg-triton"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in _containers(deployment):
            sc = container["securityContext"]
            where = f"{deployment['metadata']['name']}/{container['name']}"
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["privileged"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "/tmp" in _mounts(container), f"{where}: no writable /tmp"
    front = _one(docs, "Deployment", "r-detseg")["spec"]["template"]["spec"]
    assert front["securityContext"]["runAsUser"] == 10001
    assert front["containers"][0]["securityContext"]["runAsUser"] == 10001
    assert _one(docs, "ServiceAccount", "r-detseg")["automountServiceAccountToken"] is False


def test_writable_folders_are_the_cache_dir_and_tmp(render):
    docs = render()
    deployment = _one(docs, "Deployment", "r-detseg")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    config = _one(docs, "ConfigMap", "r-detseg")["data"]
    mounts = _mounts(container)
    volumes = _volumes(deployment)
    assert set(mounts) == {config["DETSEG_CACHE_DIR"], "/tmp"}
    for mount in mounts.values():
        assert "emptyDir" in volumes[mount["name"]] and volumes[mount["name"]]["emptyDir"]["sizeLimit"]
    assert _env(container)["HOME"] == "/tmp"


def test_front_end_probes_are_native_grpc_with_a_stated_startup_budget(render):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    container = _one(render(), "Deployment", "r-detseg")["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 50051, "metrics": 9464}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe
    startup = container["startupProbe"]
    budget = startup["failureThreshold"] * startup["periodSeconds"]
    assert budget == values["startupProbe"]["failureThreshold"] * values["startupProbe"]["periodSeconds"] == 600
    assert "60 × 10 s = 600 s" in (CHART / "values.yaml").read_text()
    assert "60 × 10 s = 600 s" in (CHART / "README.md").read_text()
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]


def test_with_tls_the_probes_use_the_plaintext_health_port(render):
    docs = render(PRODUCTION)
    container = _one(docs, "Deployment", "r-detseg")["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": 50051,
        "health": 50052,
        "metrics": 9464,
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": 50052}, probe
    config = _one(docs, "ConfigMap", "r-detseg")["data"]
    assert config["DETSEG_HEALTH_PORT"] == "50052"
    assert config["DETSEG_TLS_CERT"] == "/etc/detseg/tls/tls.crt"
    assert config["DETSEG_TLS_KEY"] == "/etc/detseg/tls/tls.key"
    assert _mounts(container)["/etc/detseg/tls"]["readOnly"] is True
    # The pod terminates TLS itself: the Service does not announce plaintext gRPC (h2c) to meshes and balancers.
    assert "appProtocol" not in _one(docs, "Service", "r-detseg")["spec"]["ports"][0]


def test_triton_serves_the_exported_repository_on_a_gpu(render):
    docs = render()
    triton = _one(docs, "Deployment", "r-detseg-triton")
    pod = triton["spec"]["template"]["spec"]
    (export,) = pod["initContainers"]
    (server,) = pod["containers"]
    assert export["command"] == ["detseg", "export", "--out", "/models"]
    assert export["envFrom"] == [{"configMapRef": {"name": "r-detseg"}}]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", server["image"])
    assert server["command"] == ["tritonserver"]
    assert "--model-repository=/models" in server["args"]
    assert "--model-config-name=onnxruntime" in server["args"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"grpc": 8001, "http": 8000, "metrics": 8002}
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready")):
        assert server[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert server["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert _mounts(server)["/models"]["readOnly"] is True
    assert _mounts(export)["/models"].get("readOnly") is not True
    service = _one(docs, "Service", "r-detseg-triton")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 8001, "http": 8000, "metrics": 8002}
    assert service["spec"]["selector"] == triton["spec"]["selector"]["matchLabels"]
    assert _one(docs, "ConfigMap", "r-detseg")["data"]["DETSEG_TRITON_URL"] == "r-detseg-triton:8001"


def test_front_end_service_selects_the_front_end_pods_only(render):
    docs = render()
    service = _one(docs, "Service", "r-detseg")
    deployment = _one(docs, "Deployment", "r-detseg")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "frontend"
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"
    assert service["spec"]["ports"][0]["appProtocol"] == "grpc"
    for doc in docs:
        labels = doc["metadata"]["labels"]
        for key in ("name", "instance", "version", "component", "managed-by", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels, f"{doc['kind']}/{doc['metadata']['name']}: {key}"


def test_without_triton_no_gpu_objects_are_rendered(render):
    docs = render(values=IN_PROCESS)
    assert not [d for d in docs if "triton" in d["metadata"]["name"]]
    config = _one(docs, "ConfigMap", "r-detseg")["data"]
    assert config["DETSEG_BACKEND"] == "torch" and "DETSEG_TRITON_URL" not in config


# --- settings ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["defaults", "production", "everything"])
def test_the_service_parses_every_rendered_setting(render, case):
    """The ConfigMap is what `detseg serve` reads: each name is a Settings field and Settings accepts each value."""
    docs = render(*([PRODUCTION] if case == "production" else []), values=EVERYTHING if case == "everything" else None)
    data = _one(docs, "ConfigMap", "r-detseg")["data"]
    fields = {"DETSEG_" + f.name.upper() for f in dataclasses.fields(Settings)}
    unknown = set(data) - fields
    assert not unknown, f"not Settings fields: {sorted(unknown)}"
    settings = Settings.load(env=data)
    assert settings.host == "0.0.0.0"
    assert settings.port == 50051
    assert settings.log_format == "json" and settings.reflection is False
    assert str(settings.cache_dir) == "/var/cache/detseg"
    if case != "defaults":
        assert settings.tls_cert and settings.tls_key and settings.auth_tokens_file and settings.signing_key
    if case == "everything":
        assert settings.tls_client_ca == "/etc/detseg/tls/ca.crt"


def test_secrets_are_mounted_files_never_env_values(render):
    """TLS material, tokens and the signing key are files; the Redis URL alone is an env var, from the Secret."""
    docs = render(values=EVERYTHING)
    secret = _one(docs, "Secret", "r-detseg")
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt", "auth-tokens", "signing-key.pem", "redis-url"}
    deployment = _one(docs, "Deployment", "r-detseg")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    from_secrets = {e["name"]: e["valueFrom"] for e in container.get("env", []) if "valueFrom" in e}
    assert from_secrets == {"DETSEG_REDIS_URL": {"secretKeyRef": {"name": "r-detseg", "key": "redis-url"}}}
    volumes = _volumes(deployment)
    data = _one(docs, "ConfigMap", "r-detseg")["data"]
    for setting, volume in (
        ("DETSEG_TLS_CERT", "tls"),
        ("DETSEG_AUTH_TOKENS_FILE", "auth"),
        ("DETSEG_SIGNING_KEY", "signing"),
    ):
        folder, name = data[setting].rsplit("/", 1)
        assert _mounts(container)[folder]["name"] == volume and _mounts(container)[folder]["readOnly"] is True
        assert name in [item["path"] for item in volumes[volume]["secret"]["items"]]
        assert volumes[volume]["secret"]["secretName"] == "r-detseg"


def test_the_redis_url_comes_from_a_secret_never_the_configmap(render):
    """It may hold a password: the chart's Secret (redis.url) or the user's (redis.existingSecret) feeds
    DETSEG_REDIS_URL, and the service parses it with the ConfigMap's settings."""
    url = "redis://:hunter2-redis@redis.cache:6379/0"
    docs = render(values={"redis": {"url": url}})
    config = _one(docs, "ConfigMap", "r-detseg")["data"]
    assert "DETSEG_REDIS_URL" not in config and not [v for v in config.values() if "hunter2" in v]
    secret = _one(docs, "Secret", "r-detseg")
    stored = base64.b64decode(secret["data"]["redis-url"]).decode()
    assert stored == url
    pod = _one(docs, "Deployment", "r-detseg")["spec"]["template"]
    (env,) = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "DETSEG_REDIS_URL"]
    assert env == {"name": "DETSEG_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "r-detseg", "key": "redis-url"}}}
    assert Settings.load(env={**config, "DETSEG_REDIS_URL": stored}).redis_url == url
    other = _one(render(values={"redis": {"url": url.replace("hunter2", "other")}}), "Deployment", "r-detseg")
    assert (
        other["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
        != (pod["metadata"]["annotations"]["checksum/secret"])
    ), "a new Redis password must roll the pods"

    docs = render(values={"redis": {"existingSecret": "cache-credentials", "existingSecretKey": "url"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    container = _one(docs, "Deployment", "r-detseg")["spec"]["template"]["spec"]["containers"][0]
    (env,) = [e for e in container["env"] if e["name"] == "DETSEG_REDIS_URL"]
    assert env["valueFrom"] == {"secretKeyRef": {"name": "cache-credentials", "key": "url"}}

    container = _one(render(), "Deployment", "r-detseg")["spec"]["template"]["spec"]["containers"][0]
    assert "DETSEG_REDIS_URL" not in _env(container), "no Redis configured: no variable"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, 30),  # 5 s preStop + 20 s grace + 5 s margin
        ({"config": {"grace_seconds": 100.5}}, 111),
        ({"preStopSleepSeconds": 0, "config": {"grace_seconds": 7.2}, "shutdownMarginSeconds": 2}, 10),
    ],
    ids=["defaults", "long-drain", "no-prestop"],
)
def test_termination_grace_period_is_derived_from_the_drain_budget(render, values, expected):
    """The kubelet kills a pod terminationGracePeriodSeconds after it is marked for deletion: it must cover the
    preStop sleep and the whole drain (config.grace_seconds) with a margin, whatever grace_seconds is."""
    docs = render(values=values or None)
    pod = _one(docs, "Deployment", "r-detseg")["spec"]["template"]["spec"]
    settings = Settings.load(env=_one(docs, "ConfigMap", "r-detseg")["data"])
    lifecycle = pod["containers"][0].get("lifecycle")
    pre_stop = int(lifecycle["preStop"]["exec"]["command"][1]) if lifecycle else 0
    assert pod["terminationGracePeriodSeconds"] == expected
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + settings.grace_seconds + 2


def test_config_checksum_rolls_the_pods_when_a_setting_changes(render):
    def annotations(values: dict[str, Any] | None) -> tuple[dict[str, str], dict[str, str]]:
        docs = render(values=values)
        front = _one(docs, "Deployment", "r-detseg")["spec"]["template"]["metadata"]["annotations"]
        triton = _one(docs, "Deployment", "r-detseg-triton")["spec"]["template"]["metadata"]["annotations"]
        return front, triton

    front, triton = annotations(None)
    assert re.fullmatch(r"[0-9a-f]{64}", front["checksum/config"])
    debug_front, debug_triton = annotations({"config": {"log_level": "DEBUG"}})
    assert debug_front["checksum/config"] != front["checksum/config"]
    assert debug_triton["checksum/export"] == triton["checksum/export"], "a front-end setting re-exported on the GPUs"
    demo_front, demo_triton = annotations({"config": {"models": "demo"}})
    assert demo_front["checksum/config"] != front["checksum/config"]
    assert demo_triton["checksum/export"] != triton["checksum/export"]
    # What the export also reads: an adapted folder's models, and the ORT threads in the configs (both left the
    # Triton pods serving the old export).
    for changed in ({"adapted": "/var/cache/detseg/adapted/v2"}, {"threads": 2}):
        assert annotations({"config": changed})[1]["checksum/export"] != triton["checksum/export"], changed
    more_front, _ = annotations({"replicaCount": 5})
    assert more_front["checksum/config"] == front["checksum/config"]
    with_tokens = annotations({"auth": {"enabled": True, "tokens": ["0123456789abcdef0123"]}})[0]
    other_tokens = annotations({"auth": {"enabled": True, "tokens": ["abcdef0123456789abcd"]}})[0]
    assert with_tokens["checksum/secret"] != other_tokens["checksum/secret"]


# --- autoscaling, disruption budget, network policy ---------------------------------------------------------------


def test_hpa_and_pdb_are_rendered_when_enabled(render):
    docs = render()
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert _one(docs, "Deployment", "r-detseg")["spec"]["replicas"] == 2
    pdb = _one(docs, "PodDisruptionBudget", "r-detseg")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == _one(docs, "Deployment", "r-detseg")["spec"]["selector"]

    docs = render(values={"autoscaling": {"enabled": True, "inFlight": {"enabled": True}}, "pdb": {"enabled": False}})
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    hpa = _one(docs, "HorizontalPodAutoscaler", "r-detseg")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "r-detseg"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    cpu, in_flight = hpa["spec"]["metrics"]
    assert cpu["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    assert in_flight["type"] == "Pods"
    assert in_flight["pods"]["metric"]["name"] == "detseg_requests_in_flight"
    assert in_flight["pods"]["target"] == {"type": "AverageValue", "averageValue": "6"}
    assert "replicas" not in _one(docs, "Deployment", "r-detseg")["spec"], "the HPA owns the replica count"

    production = render(PRODUCTION)
    assert _one(production, "HorizontalPodAutoscaler", "r-detseg")["spec"]["minReplicas"] == 3
    assert _one(production, "PodDisruptionBudget", "r-detseg")["spec"] == {
        "selector": _one(production, "Deployment", "r-detseg")["spec"]["selector"],
        "minAvailable": 2,
    }


def test_prometheus_metrics_are_exposed_for_scraping_and_the_hpa(render):
    docs = render()
    data = _one(docs, "ConfigMap", "r-detseg")["data"]
    assert (data["DETSEG_METRICS_EXPORTER"], data["DETSEG_METRICS_PORT"]) == ("prometheus", "9464")
    pod = _one(docs, "Deployment", "r-detseg")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9464"
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in pod["spec"]["containers"][0]["ports"]
    ingress = _one(docs, "NetworkPolicy", "r-detseg")["spec"]["ingress"]
    assert [{"port": "metrics", "protocol": "TCP"}] in [rule["ports"] for rule in ingress]

    docs = render(values={"config": {"metrics_exporter": "none"}})
    pod = _one(docs, "Deployment", "r-detseg")["spec"]["template"]
    assert "prometheus.io/port" not in pod["metadata"]["annotations"]
    assert [p["name"] for p in pod["spec"]["containers"][0]["ports"]] == ["grpc"]


def test_only_the_front_end_may_call_triton(render):
    policy = _one(render(), "NetworkPolicy", "r-detseg-triton")
    api, metrics = policy["spec"]["ingress"]
    assert api["from"] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "detseg",
                    "app.kubernetes.io/instance": "r",
                    "app.kubernetes.io/component": "frontend",
                }
            }
        }
    ]
    assert {p["port"] for p in api["ports"]} == {"grpc", "http"}
    assert [p["port"] for p in metrics["ports"]] == ["metrics"]


def _egress(docs: list[dict]) -> list[dict]:
    policy = _one(docs, "NetworkPolicy", "r-detseg")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    return policy["egress"]


def _ports(rule: dict) -> set[tuple[Any, str]]:
    return {(p["port"], p["protocol"]) for p in rule["ports"]}


def test_the_front_end_may_only_connect_to_dns_triton_redis_and_otlp(render):
    """Egress is closed but for what the front end uses; each rule names only its port(s)."""
    triton_pods = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "detseg",
                "app.kubernetes.io/instance": "r",
                "app.kubernetes.io/component": "triton",
            }
        }
    }
    dns, triton = _egress(render())  # defaults: nothing else (no Redis, no OTLP, Triton needs no download)
    assert _ports(dns) == {(53, "UDP"), (53, "TCP")} and "to" not in dns
    assert triton == {"to": [triton_pods], "ports": [{"port": 8001, "protocol": "TCP"}]}

    dns, triton, redis, otlp, extra = _egress(render(values=EVERYTHING))
    egress = EVERYTHING["networkPolicy"]["egress"]
    assert dns["to"] == egress["dnsTo"]
    assert triton["to"] == [triton_pods]
    assert _ports(redis) == {(6380, "TCP")} and redis["to"] == egress["redisTo"]  # redis.url's port
    assert _ports(otlp) == {(4317, "TCP")} and otlp["to"] == egress["otlpTo"]
    assert extra == egress["extraRules"][0]

    external = {"triton": {"enabled": False}, "externalTriton": {"url": "triton.gpu:9001"}}
    _, triton = _egress(render(values=external))
    assert triton == {"ports": [{"port": 9001, "protocol": "TCP"}]}
    secret_redis = {"redis": {"existingSecret": "cache"}, "networkPolicy": {"egress": {"redisPort": 7000}}}
    assert _ports(_egress(render(values=secret_redis))[-1]) == {(7000, "TCP")}
    otlp_default = {"config": {"metrics_exporter": "otlp", "otlp_endpoint": "http://collector"}}
    assert _ports(_egress(render(values=otlp_default))[-1]) == {(4317, "TCP")}

    # An in-process backend downloads its weights unless offline: HTTPS, and only then.
    _, downloads = _egress(render(values=IN_PROCESS))
    assert _ports(downloads) == {(443, "TCP")}
    assert len(_egress(render(values={**IN_PROCESS, "config": {"models": "demo-open", "offline": True}}))) == 1

    policy = _one(render(values={"networkPolicy": {"egress": {"enabled": False}}}), "NetworkPolicy", "r-detseg")
    assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]


# --- the values schema and its documentation ----------------------------------------------------------------------


def test_schema_config_is_exactly_the_settings_the_chart_does_not_set():
    config = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    assert config["additionalProperties"] is False
    kinds = {"bool": "boolean", "int": "integer", "float": "number", "str": "string", "Path": "string",
             "float | None": ["number", "null"]}  # fmt: skip
    fields = [f for f in dataclasses.fields(Settings) if f.name not in CHART_OWNED]
    expected = {f.name: kinds[f.type if isinstance(f.type, str) else f.type.__name__] for f in fields}
    actual = {name: prop["type"] for name, prop in config["properties"].items()}
    message = "values.schema.json config.properties must list every Settings field the chart does not set, typed"
    assert actual == expected, message
    # Its bounds, enums and patterns are the ones Settings itself enforces (service/config.py CONSTRAINTS).
    bounds = {
        name: {k: v for k, v in prop.items() if k not in ("type", "description")}
        for name, prop in config["properties"].items()
    }
    assert bounds == {name: CONSTRAINTS.get(name, {}) for name in expected}
    # The service's own defaults pass the schema's bounds, enums and patterns.
    defaults = {f.name: getattr(Settings(), f.name) for f in fields}
    jsonschema.Draft7Validator(config).validate({k: str(v) if isinstance(v, Path) else v for k, v in defaults.items()})


def _param_lines() -> dict[str, str]:
    params = {}
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"\s*## @param (\S+)(?: \[[a-z,]+\])? (.+)", line)
        if match:
            params[match.group(1)] = match.group(2)
    return params


def _leaves(node: Any, prefix: str, documented: set[str]) -> Iterator[str]:
    if prefix in documented or not isinstance(node, dict) or not node:
        yield prefix
        return
    for key, value in node.items():
        yield from _leaves(value, f"{prefix}.{key}" if prefix else key, documented)


def test_every_value_is_documented_and_listed_in_the_readme():
    params = _param_lines()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    leaves = set(_leaves(values, "", set(params)))
    assert not leaves - set(params), f"values without ## @param: {sorted(leaves - set(params))}"
    assert not set(params) - leaves, f"## @param for no value: {sorted(set(params) - leaves)}"
    readme = (CHART / "README.md").read_text()
    missing = [name for name in params if f"| `{name}`" not in readme]
    assert not missing, f"not in helm/detseg/README.md's table: {missing}"


# Each: values, the JSON pointer (or value name) the error must name, and what it must say.
BAD_VALUES = [
    ({"replicaCount": -1}, "/replicaCount", "minimum"),
    ({"replicaCount": "two"}, "/replicaCount", "want integer"),
    ({"containerPort": 70000}, "/containerPort", "maximum"),
    ({"replicaCont": 3}, "replicaCont", "additional properties"),
    ({"config": {"no_such_setting": 1}}, "no_such_setting", "additional properties"),
    ({"config": {"port": 9000}}, "'port'", "additional properties"),
    ({"tls": {"enabled": False, "mutal": True}}, "mutal", "additional properties"),
    ({"backend": "tensorrt"}, "/backend", "must be one of"),
    ({"config": {"log_format": "xml"}}, "/config/log_format", "must be one of"),
    ({"config": {"metrics_exporter": "statsd"}}, "/config/metrics_exporter", "must be one of"),
    ({"config": {"metrics_port": 9000}}, "'metrics_port'", "additional properties"),
    ({"config": {"models": "huge"}}, "/config/models", "must be one of"),
    ({"config": {"default_score_threshold": 1.5}}, "/config/default_score_threshold", "maximum"),
    ({"config": {"max_image_bytes": "20MB"}}, "/config/max_image_bytes", "want integer"),
    ({"service": {"type": "Ingress"}}, "/service/type", "must be one of"),
    ({"startupProbe": {"failureThreshold": 0}}, "/startupProbe/failureThreshold", "minimum"),
    ({"triton": {"image": {"tag": "latest"}}}, "/triton/image/tag", "does not match pattern"),
    ({"triton": {"gpu": {"count": 0}}}, "/triton/gpu/count", "minimum"),
    ({"auth": {"tokens": ["short"]}}, "/auth/tokens/0", "minLength"),
    ({"tls": {"cert": "not a certificate"}}, "/tls/cert", "does not match pattern"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory", "does not match pattern"),
    # Derived from the drain budget (preStopSleepSeconds + config.grace_seconds + shutdownMarginSeconds).
    ({"terminationGracePeriodSeconds": 10}, "terminationGracePeriodSeconds", "additional properties"),
    # The Redis URL may hold a password: redis.url / redis.existingSecret (a Secret), never the ConfigMap.
    ({"config": {"redis_url": "redis://r:6379/0"}}, "'redis_url'", "additional properties"),
    ({"redis": {"url": "http://redis:6379"}}, "/redis/url", "does not match pattern"),
    ({"networkPolicy": {"egress": {"redisPort": 0}}}, "/networkPolicy/egress/redisPort", "minimum"),
]


@pytest.mark.parametrize(("values", "names", "says"), BAD_VALUES, ids=[c[1] + ":" + c[2] for c in BAD_VALUES])
def test_schema_rejects_bad_values_by_name(helm, values_file, values, names, says):
    path = str(values_file(values))
    rendered = helm("template", "r", str(CHART), "-f", path)
    assert rendered.returncode != 0, f"helm template accepted {values}"
    assert names in rendered.stderr and says in rendered.stderr, rendered.stderr
    linted = helm("lint", "--strict", str(CHART), "-f", path)
    assert linted.returncode != 0, f"helm lint accepted {values}"
    output = linted.stdout + linted.stderr
    assert names in output and says in output, output


# Combinations the schema cannot express: the render (template, install, upgrade) fails with a message that names
# the value to set. `helm lint` only logs template `fail` calls, by design (helm/helm#8973).
BAD_COMBINATIONS = [
    ({"tls": {"enabled": True, "existingSecret": "tls"}}, "healthPort: tls.enabled needs a plaintext health port"),
    ({"healthPort": 50052, "tls": {"enabled": True}}, "tls.cert and tls.key: tls.enabled needs both"),
    ({"healthPort": 50051}, "healthPort: must differ from containerPort"),
    ({"metricsPort": 50051}, "metricsPort: must differ from containerPort and healthPort"),
    ({"triton": {"enabled": False}}, "externalTriton.url: backend is triton and triton.enabled is false"),
    ({"backend": "torch"}, "triton.enabled: the Triton Deployment serves backend triton"),
    ({"auth": {"enabled": True}}, "auth.tokens: auth.enabled needs at least one token"),
    ({"signing": {"enabled": True}}, "signing.key: signing.enabled needs an Ed25519 private key"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "autoscaling.minReplicas: must not"),
    ({"pdb": {"minAvailable": 1}}, "pdb.minAvailable and pdb.maxUnavailable: set only one"),
    ({"pdb": {"maxUnavailable": ""}}, "pdb.minAvailable or pdb.maxUnavailable: pdb.enabled needs one of them"),
    ({"redis": {"url": "redis://r:6379/0", "existingSecret": "r"}}, "redis.url: give the URL inline or in redis."),
    ({"triton": {"modelRepository": {"export": {"enabled": False}}}}, "triton.modelRepository.existingClaim:"),
    ({"triton": {"replicaCount": 2, "modelRepository": {"existingClaim": "m"}}}, "triton.replicaCount: with triton."),
]


@pytest.mark.parametrize(("values", "message"), BAD_COMBINATIONS, ids=[m.split(":")[0] for _, m in BAD_COMBINATIONS])
def test_inconsistent_values_fail_the_render_by_name(helm, values_file, values, message):
    done = helm("template", "r", str(CHART), "-f", str(values_file(values)))
    assert done.returncode != 0, f"helm template accepted {values}"
    assert message in done.stderr, done.stderr
