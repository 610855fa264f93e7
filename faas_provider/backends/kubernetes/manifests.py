"""The Kubernetes objects of a function, rendered from the jinja2 templates in `templates/`.

As faas-netes makes them (pkg/handlers/deploy.go): a Deployment whose Deployment, pod template
and selector carry `faas_function=<name>`, the user's labels and annotations kept, a
`prometheus.io.scrape` annotation, probes on `/_/health`, rolling updates with maxUnavailable 0
and maxSurge 1, an emptyDir at /tmp for a read-only root filesystem, limits and requests passed
on, secrets projected read-only at /var/openfaas/secrets; and a Service on port 8080.

A GPU-shared function has one Deployment per GPU that holds replicas of it, `<name>-<gpu>`,
whose selector adds `fastgshare/gpu=<uuid>`: each pod is pinned to its GPU's node, made an MPS
client of that GPU (`NVIDIA_VISIBLE_DEVICES`, the pipe directory and shared memory of the node
agent, its SM percentage and memory cap) and fronted by the time-quota gate as a native sidecar,
registered with the node agent's token service. The Service selects them all.

The Service also keeps the function's record (the deployment as sent, the desired replica
count) in its annotations: the cluster holds all the provider's state.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

import jinja2
import yaml

from faas_provider import __version__
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.mps import client_share_env, short_id
from faas_provider.gpu.readings import function_env
from faas_provider.gpu.share import GpuShare
from faas_provider.models import FUNCTION_LABEL, FunctionDeployment
from faas_provider.node.agent import RunDir

SECRETS_PATH = "/var/openfaas/secrets"
GATE_IMAGE = f"ghcr.io/fast-gshare/fast-gshare:{__version__}"  # k8s/Dockerfile builds it
FUNCTION_PORT = 8080  # of-watchdog's, where the function image listens
GATE_PORT = 8099  # the gate's in a GPU-shared pod: clear of of-watchdog's 8080/8081 and 5000
DEFAULT_RUN_DIR = RunDir(PurePosixPath("/run/fast-gshare"))  # the node agent's, on the host
GPU_LABEL = "fastgshare/gpu"
MANAGED_BY = {"app.kubernetes.io/managed-by": "fast-gshare"}
RECORD_ANNOTATION = "fastgshare/function"  # on the Service: the FunctionDeployment as sent
REPLICAS_ANNOTATION = "fastgshare/replicas"  # on the Service: the desired replica count
NODE_ANNOTATION = "fastgshare/node"  # on a GPU Deployment: the node its GPU is on


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _template_source(name: str) -> str:
    return resources.files("faas_provider.templates").joinpath(name).read_text()


def render(template: str, **context: Any) -> dict[str, Any]:
    """One object: `templates/<template>` rendered with `context` and parsed."""
    text = _environment().get_template(template).render(**context)
    document = yaml.safe_load(text)
    assert isinstance(document, dict), f"{template} renders to no object"
    return document


def deployment_name(function: str, gpu_uuid: str | None) -> str:
    """`<function>`, or `<function>-<first 8 hex digits of the GPU UUID>` for a GPU's share."""
    return function if gpu_uuid is None else f"{function}-{short_id(gpu_uuid)}"


def _annotations(deployment: FunctionDeployment) -> dict[str, str]:
    """The user's annotations, with faas-netes' `prometheus.io.scrape: "false"` default."""
    return {"prometheus.io.scrape": "false", **deployment.annotations}


def _resources(deployment: FunctionDeployment, whole_gpu: bool) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {"limits": {}, "requests": {}}
    for kind, given in (("limits", deployment.limits), ("requests", deployment.requests)):
        if given is None:
            continue
        for resource in ("memory", "cpu"):
            if (value := getattr(given, resource)) is not None:
                out[kind][resource] = value
    if whole_gpu:
        out["limits"]["nvidia.com/gpu"] = "1"
    return out


def function_deployment(
    deployment: FunctionDeployment,
    replicas: int,
    share: GpuShare | None,
    gpu: GpuDevice | None,
    gate_image: str,
    paths: RunDir = DEFAULT_RUN_DIR,
) -> dict[str, Any]:
    """The Deployment of `deployment`; for a GPU-shared one, of its replicas on `gpu` (which
    names its node)."""
    name = deployment.service
    shared = share is not None and not share.exclusive
    assert shared == (gpu is not None), "a GPU-shared function's Deployment names its GPU"
    selector = {FUNCTION_LABEL: name}
    env = {**deployment.env_vars}
    if deployment.env_process:
        env["fprocess"] = deployment.env_process
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if deployment.read_only_root_filesystem:
        volumes.append({"name": "temp", "emptyDir": {}})
        mounts.append({"name": "temp", "mountPath": "/tmp"})
    if deployment.secrets:
        sources = [
            {"secret": {"name": secret, "items": [{"key": secret, "path": secret}]}}
            for secret in sorted(deployment.secrets)
        ]
        volumes.append({"name": "secrets", "projected": {"sources": sources}})
        mounts.append({"name": "secrets", "mountPath": SECRETS_PATH, "readOnly": True})
    sidecar = None
    deployment_annotations = _annotations(deployment)
    if shared:
        assert share is not None and gpu is not None and gpu.node is not None
        selector[GPU_LABEL] = gpu.uuid
        deployment_annotations[NODE_ANNOTATION] = gpu.node
        pipe = "/run/fast-gshare/mps"
        env |= {
            "NVIDIA_VISIBLE_DEVICES": gpu.uuid,
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
            "CUDA_MPS_PIPE_DIRECTORY": pipe,
            **client_share_env(share.sm_percent, share.memory_bytes),
            **share.thread_env(gpu, deployment.env_vars),
        }
        host = {"type": "Directory"}
        volumes += [
            {
                "name": "fast-gshare-mps",
                "hostPath": {"path": str(paths.pipe_dir(gpu.uuid)), **host},
            },
            {"name": "fast-gshare-shm", "hostPath": {"path": str(paths.shm_dir), **host}},
            {"name": "fast-gshare-tokens", "hostPath": {"path": str(paths.token_dir), **host}},
        ]
        mounts += [
            {"name": "fast-gshare-mps", "mountPath": pipe},
            {"name": "fast-gshare-shm", "mountPath": "/dev/shm"},
        ]
        registration = share.registration(gpu.uuid, "$(POD_NAME)", f"{name}.{deployment.namespace}")
        gate_args = ["--host", "0.0.0.0", "--port", str(GATE_PORT)]
        gate_args += ["--upstream", f"http://127.0.0.1:{FUNCTION_PORT}"]
        gate_args += ["--token-socket", str(paths.token_socket), *registration.argv()]
        sidecar = {
            "node": gpu.node,
            "gate_image": gate_image,
            "gate_args": gate_args,
            "gate_port": GATE_PORT,
            "token_dir": str(paths.token_dir),
        }
    elif share is not None:
        env["NVIDIA_DRIVER_CAPABILITIES"] = "compute,utility"
    if share is not None:
        env |= function_env(f"{name}.{deployment.namespace}")
    return render(
        "function-deployment.yaml.j2",
        name=deployment_name(name, gpu.uuid if gpu else None),
        namespace=deployment.namespace,
        function=name,
        replicas=replicas,
        deployment_labels={**selector, **MANAGED_BY},
        deployment_annotations=deployment_annotations,
        selector=selector,
        pod_labels={**deployment.labels, **selector},
        pod_annotations=_annotations(deployment),
        image=deployment.image,
        env=[{"name": key, "value": value} for key, value in sorted(env.items())],
        resources=_resources(deployment, share is not None and share.exclusive),
        read_only_root_filesystem=deployment.read_only_root_filesystem,
        function_port=FUNCTION_PORT,
        volumes=volumes,
        volume_mounts=mounts,
        gpu=sidecar,
    )


def function_service(deployment: FunctionDeployment, replicas: int) -> dict[str, Any]:
    """The Service of `deployment`, keeping its record and desired replica count."""
    record = json.dumps(deployment.to_wire(), sort_keys=True, separators=(",", ":"))
    annotations = {
        **_annotations(deployment),
        RECORD_ANNOTATION: record,
        REPLICAS_ANNOTATION: str(replicas),
    }
    return render(
        "function-service.yaml.j2",
        function=deployment.service,
        namespace=deployment.namespace,
        labels={FUNCTION_LABEL: deployment.service, **MANAGED_BY},
        annotations=annotations,
        selector={FUNCTION_LABEL: deployment.service},
    )


def node_agent_daemonset(
    image: str = GATE_IMAGE,
    namespace: str = "openfaas",
    gpus_per_node: int = 1,
    paths: RunDir = DEFAULT_RUN_DIR,
    metrics_port: int = 9402,
    shm_size: str = "2Gi",
) -> dict[str, Any]:
    """The node agent's DaemonSet: on every node labelled fastgshare/share=true it holds
    `gpus_per_node` GPUs from the stock device plugin and shares them."""
    return render(
        "node-agent.yaml.j2",
        image=image,
        namespace=namespace,
        gpus_per_node=gpus_per_node,
        run_dir=str(paths.root),
        shm_dir=str(paths.shm_dir),
        metrics_port=metrics_port,
        shm_size=shm_size,
    )


PROFILE_KEY = "profile.json"


def profile_config_map_name(function: str) -> str:
    """The ConfigMap that keeps function `function`'s profile."""
    return f"{function}-fast-gshare-profile"


def profile_config_map(function: str, namespace: str, profile_json: str) -> dict[str, Any]:
    """The ConfigMap of a function's profile (`fast-gshare profile` writes it)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": profile_config_map_name(function),
            "namespace": namespace,
            "labels": {FUNCTION_LABEL: function, **MANAGED_BY},
        },
        "data": {PROFILE_KEY: profile_json},
    }
