"""The Kubernetes objects fast-gshare renders, read back as the API server would hold them:
faas-netes' shape for every function, a Deployment per GPU with the gate sidecar for a
GPU-shared one, each validated against the official schemas of Kubernetes 1.36."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from faas_provider.backends.kubernetes.manifests import (
    DEFAULT_RUN_DIR,
    GPU_LABEL,
    RECORD_ANNOTATION,
    REPLICAS_ANNOTATION,
    deployment_name,
    function_deployment,
    function_service,
    node_agent_daemonset,
)
from faas_provider.gate.__main__ import parse_args as gate_args
from faas_provider.gate.registration import Registration
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.share import gpu_share
from faas_provider.models import FunctionDeployment

REPO = Path(__file__).resolve().parents[1]
KUBERNETES_VERSION = "1.36.0"
UUID = "GPU-8f2e1a3b-0000-4000-8000-000000000001"
SHARED_GPU = GpuDevice(
    index=0, uuid=UUID, name="H200", memory_bytes=141 * 1024**3, node="gpu-node-7", cpu_cores=64
)
SHARED = {
    "fastgshare/gpu_sm_partition": "25",
    "fastgshare/gpu_quota_request": "0.2",
    "fastgshare/gpu_quota_limit": "0.6",
    "fastgshare/gpu_mem": "2Gi",
}


def valid(document: dict[str, Any]) -> dict[str, Any]:
    """`document`, after checking it against the Kubernetes schema (unknown fields refused)."""
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    return document


def function(**fields: Any) -> FunctionDeployment:
    return FunctionDeployment.model_validate({"service": "resnet50", "image": "acme/r:1", **fields})


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"] + pod.get("initContainers", [])}


def test_a_plain_function_is_a_deployment_as_faas_netes_makes_it() -> None:
    spec = function(
        envProcess="python index.py",
        envVars={"b": "2", "a": "1"},
        labels={"team": "vision", "com.openfaas.scale.min": "2"},
        annotations={"topic": "images"},
        secrets=["api-key"],
        limits={"memory": "1Gi", "cpu": "2"},
        requests={"memory": "256Mi"},
        readOnlyRootFilesystem=True,
    )
    deployment = valid(function_deployment(spec, 2, None, None, "gate:1"))
    assert deployment["metadata"]["name"] == "resnet50"
    assert deployment["metadata"]["namespace"] == "openfaas-fn"
    assert deployment["metadata"]["labels"] == {
        "faas_function": "resnet50",
        "app.kubernetes.io/managed-by": "fast-gshare",
    }, "what the provider manages is marked: a Deployment of someone else's is left alone"
    assert deployment["spec"]["selector"]["matchLabels"] == {"faas_function": "resnet50"}
    assert deployment["spec"]["replicas"] == 2
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxUnavailable": 0, "maxSurge": 1}
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"] == {
        "team": "vision",
        "com.openfaas.scale.min": "2",
        "faas_function": "resnet50",
    }
    assert template["metadata"]["annotations"] == {
        "prometheus.io.scrape": "false",
        "topic": "images",
    }
    assert "initContainers" not in template["spec"], "no gate without a GPU share"
    (container,) = template["spec"]["containers"]
    assert container["image"] == "acme/r:1"
    assert container["env"] == [
        {"name": "a", "value": "1"},
        {"name": "b", "value": "2"},
        {"name": "fprocess", "value": "python index.py"},
    ], "sorted by name, as faas-netes' buildEnvVars"
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/_/health", "port": 8080}
    assert container["resources"] == {
        "limits": {"memory": "1Gi", "cpu": "2"},
        "requests": {"memory": "256Mi"},
    }
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["temp"]["mountPath"] == "/tmp"
    assert mounts["secrets"] == {
        "name": "secrets",
        "mountPath": "/var/openfaas/secrets",
        "readOnly": True,
    }
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["temp"] == {"name": "temp", "emptyDir": {}}
    assert volumes["secrets"]["projected"]["sources"] == [
        {"secret": {"name": "api-key", "items": [{"key": "api-key", "path": "api-key"}]}}
    ]


def test_a_gpu_shared_deployment_pins_its_gpu_and_puts_the_gate_in_front() -> None:
    spec = function(annotations=SHARED)
    share = gpu_share(spec)
    assert share is not None
    gpu = SHARED_GPU
    deployment = valid(function_deployment(spec, 3, share, gpu, "ghcr.io/x/fast-gshare:9"))
    assert (
        deployment["metadata"]["name"] == deployment_name("resnet50", UUID) == "resnet50-8f2e1a3b"
    )
    selector = {"faas_function": "resnet50", GPU_LABEL: UUID}
    assert deployment["spec"]["selector"]["matchLabels"] == selector
    assert deployment["spec"]["template"]["metadata"]["labels"] == selector
    pod = deployment["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-7"]}]}
    ]
    named = containers(deployment)
    replica, gate = named["resnet50"], named["fast-gshare-gate"]
    env = {e["name"]: e["value"] for e in replica["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == UUID
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M"
    assert env["FAST_GSHARE_FUNCTION"] == "resnet50.openfaas-fn", "its GPU processes are named"
    assert env["OMP_NUM_THREADS"] == "3", "25% SMs x quota 0.2 of the GPU's 64 cores"
    assert "nvidia.com/gpu" not in replica["resources"]["limits"], "shared outside the plugin"
    mounts = {m["mountPath"]: m["name"] for m in replica["volumeMounts"]}
    assert mounts[env["CUDA_MPS_PIPE_DIRECTORY"]] == "fast-gshare-mps"
    assert mounts["/dev/shm"] == "fast-gshare-shm", "MPS's shared memory without hostIPC"
    assert "hostIPC" not in pod
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert volumes["fast-gshare-mps"] == "/run/fast-gshare/mps/8f2e1a3b/pipe"
    assert replica["ports"][0]["name"] == "function", "the Service's port http is the gate's"
    assert gate["restartPolicy"] == "Always", "a native sidecar: up before, down after"
    assert gate["image"] == "ghcr.io/x/fast-gshare:9"
    assert gate["ports"] == [{"name": "http", "containerPort": 8099, "protocol": "TCP"}]
    assert gate["readinessProbe"]["httpGet"] == {"path": "/_/health", "port": "http"}
    parsed = gate_args(gate["args"])
    registration = Registration.from_args(parsed)
    assert registration == share.registration(UUID, "$(POD_NAME)", "resnet50.openfaas-fn")
    assert registration.memory_bytes == 2 * 1024**3, "the cap reaches the node's metrics"
    assert Registration.from_message(json.loads(registration.message())) == registration
    assert parsed.upstream == "http://127.0.0.1:8080"
    assert (parsed.host, parsed.port) == ("0.0.0.0", 8099)
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in (
        gate["env"]
    ), "the client name is the pod's, which Kubernetes puts in $(POD_NAME)"
    gate_mounts = {m["name"]: m["mountPath"] for m in gate["volumeMounts"]}
    assert Path(parsed.token_socket).parent == Path(gate_mounts["fast-gshare-tokens"])


def test_a_gpu_shared_function_that_sets_its_threads_keeps_them() -> None:
    spec = function(annotations=SHARED, envVars={"OMP_NUM_THREADS": "12"})
    share = gpu_share(spec)
    assert share is not None
    gpu = SHARED_GPU
    deployment = valid(function_deployment(spec, 1, share, gpu, "ghcr.io/x/fast-gshare:9"))
    env = {e["name"]: e["value"] for e in containers(deployment)["resnet50"]["env"]}
    assert env["OMP_NUM_THREADS"] == "12"


def test_a_whole_gpu_function_goes_to_the_stock_device_plugin() -> None:
    spec = function(limits={"nvidia.com/gpu": "1", "memory": "8Gi"})
    deployment = valid(function_deployment(spec, 1, gpu_share(spec), None, "gate:1"))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "1"}
    assert "initContainers" not in deployment["spec"]["template"]["spec"]
    assert not any(e["name"] == "NVIDIA_VISIBLE_DEVICES" for e in container["env"])


def test_the_service_targets_port_http_and_keeps_the_functions_record() -> None:
    spec = function(annotations={"fastgshare/gpu_sm_partition": "50"}, labels={"a": "b"})
    service = valid(function_service(spec, 4))
    assert service["metadata"]["name"] == "resnet50"
    assert service["spec"]["selector"] == {"faas_function": "resnet50"}
    assert service["spec"]["ports"] == [
        {"name": "http", "protocol": "TCP", "port": 8080, "targetPort": "http"}
    ]
    annotations = service["metadata"]["annotations"]
    assert annotations[REPLICAS_ANNOTATION] == "4"
    assert FunctionDeployment.model_validate(json.loads(annotations[RECORD_ANNOTATION])) == spec


def test_values_a_user_sends_stay_values_whatever_they_hold() -> None:
    hostile = "x\"\n  evil: true\n- {{ 7*7 }} \\ '#"
    spec = function(
        envVars={"A": hostile},
        annotations={"note": hostile, "prometheus.io.scrape": "true"},
        labels={"team": "a-b.c_d"},
        envProcess=hostile,
    )
    deployment = valid(function_deployment(spec, 1, None, None, "gate:1"))
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"] == {"prometheus.io.scrape": "true", "note": hostile}
    env = {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"]}
    assert env == {"A": hostile, "fprocess": hostile}


def render(*args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "faas_provider.cli", "render", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_render_prints_every_function_of_the_stack_and_each_validates() -> None:
    objects = render("-f", "stack.yml")
    for document in objects:
        valid(document)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert ("Service", "echo") in kinds and ("Deployment", "echo") in kinds
    gpu_deployments = [
        o for o in objects if GPU_LABEL in o["spec"].get("selector", {}).get("matchLabels", {})
    ]
    assert {o["spec"]["selector"]["matchLabels"]["faas_function"] for o in gpu_deployments} == {
        "resnet50-small",
        "resnet50-half",
        "resnet50-burst",
    }


def test_render_spreads_replicas_that_one_gpu_cannot_hold(tmp_path: Path) -> None:
    stack = tmp_path / "stack.yml"
    stack.write_text(
        yaml.safe_dump(
            {
                "version": 1.0,
                "provider": {"name": "openfaas"},
                "functions": {
                    "big": {
                        "image": "acme/big:1",
                        "labels": {"com.openfaas.scale.min": "3"},
                        "annotations": {"fastgshare/gpu_sm_partition": "50"},
                    }
                },
            }
        )
    )
    objects = render("-f", str(stack), "--gpu", "n1/GPU-aaaaaaaa-1", "--gpu", "n2/GPU-bbbbbbbb-2")
    replicas = {
        o["metadata"]["name"]: o["spec"]["replicas"] for o in objects if o["kind"] == "Deployment"
    }
    assert replicas == {"big-aaaaaaaa": 2, "big-bbbbbbbb": 1}, "packed: the first GPU fills up"
    failed = subprocess.run(
        [sys.executable, "-m", "faas_provider.cli", "render", "-f", str(stack), "--gpu", "n1/G"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert failed.returncode != 0
    assert "1 replica(s) of big fit no given GPU" in failed.stderr
    assert "--gpu" in failed.stderr


@pytest.mark.parametrize("text", ["nouuid", "/GPU-1", "n/GPU-1/lots"])
def test_render_refuses_a_gpu_it_cannot_read(text: str) -> None:
    failed = subprocess.run(
        [sys.executable, "-m", "faas_provider.cli", "render", "-f", "stack.yml", "--gpu", text],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert failed.returncode != 0
    assert "fast-gshare render:" in failed.stderr


def test_the_node_agent_holds_its_gpus_from_the_device_plugin_and_shares_their_paths() -> None:
    daemonset = valid(node_agent_daemonset("img:1", gpus_per_node=4))
    pod = daemonset["spec"]["template"]["spec"]
    named = {c["name"]: c for c in pod["containers"] + pod["initContainers"]}
    agent = named["node-agent"]
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert named["exclusive-process"]["command"] == [
        "nvidia-smi",
        "--compute-mode=EXCLUSIVE_PROCESS",
    ]
    assert named["exclusive-process"]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    paths = DEFAULT_RUN_DIR
    assert volumes["run"] == str(paths.root)
    assert volumes["shm"] == str(paths.shm_dir), "the same shared memory the function pods mount"
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert mounts == {"run": str(paths.root), "shm": "/dev/shm"}
    assert "hostIPC" not in pod
    assert pod["hostPID"] is True, "NVML names GPU processes by their host PIDs"
    assert agent["securityContext"]["capabilities"]["add"] == ["SYS_PTRACE"], (
        "to read the function name in those processes' environments"
    )


@pytest.mark.parametrize("path", sorted((REPO / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_in_k8s_validates(path: Path) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    for document in documents:
        valid(document)


def test_k8s_node_agent_is_what_render_prints_and_takes_more_gpus_per_node() -> None:
    shipped = [doc for doc in yaml.safe_load_all((REPO / "k8s/node-agent.yaml").read_text())]
    assert shipped == render("--node-agent"), "regenerate k8s/node-agent.yaml with render"
    (four,) = render("--node-agent", "--gpus-per-node", "4")
    pod = four["spec"]["template"]["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        limits = container.get("resources", {}).get("limits", {})
        assert limits.get("nvidia.com/gpu", "4") == "4", container["name"]
