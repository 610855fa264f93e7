"""How the local backend starts a function's replicas: the runtime command line and environment.

Images cannot be pulled on one machine, so a function runs either from a handler directory
under the functions root, named by the last path segment of its image without tag or digest
(`ghcr.io/acme/tiny-cpu:0.2` -> `<functions root>/tiny-cpu/handler.py`), or, when there is no
such directory, from its `envProcess` (faas-cli's `fprocess`, a classic-watchdog command). A
handler directory is the image's code: an `envProcess` beside it names the server that the
image's of-watchdog would start (faas-cli sends the template's, `python index.py` or
`./handler`), whose place the runtime takes, so it is not run.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from faas_provider.errors import InvalidRequest
from faas_provider.gpu.discovery import GpuDevice
from faas_provider.gpu.readings import function_env
from faas_provider.gpu.share import GpuShare
from faas_provider.models import FunctionDeployment
from faas_provider.node.agent import NodeAgent

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one replica process of a function."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    gate_argv: list[str] | None = None  # the time-quota gate to run in front, for GPU replicas
    secret_view: dict[str, Any] | None = None  # the runtime's own secrets view (secret_view.py)


def python_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The provider's environment and `extra`, with this package importable, installed or not:
    what a runtime, a gate and the fork server start with."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return env


def handler_directory(image: str, functions_root: Path) -> Path | None:
    """The handler directory an image names, if `handler.py` exists there."""
    last = _image_segment(image)
    if not _SAFE_SEGMENT.match(last) or ".." in last:
        return None
    candidate = functions_root / last
    return candidate if (candidate / "handler.py").is_file() else None


def launch_spec(
    deployment: FunctionDeployment, functions_root: Path, secrets_dir: Path, work_dir: Path
) -> LaunchSpec:
    """The replica command for `deployment`; InvalidRequest when it resolves to nothing."""
    handler_dir = handler_directory(deployment.image, functions_root)
    argv = [sys.executable, "-m", "faas_provider.runtime", "--port", "0"]
    argv += ["--parent-pid", str(os.getpid())]
    env = python_environment(deployment.env_vars)
    env["secret_mount_path"] = str(secrets_dir)
    if handler_dir is not None:
        argv += ["--handler", str(handler_dir)]
        env.pop("fprocess", None)
    elif deployment.env_process:
        env["fprocess"] = deployment.env_process
    else:
        raise InvalidRequest(
            f"image {deployment.image!r} resolves to no function: looked for "
            f"{functions_root / _image_segment(deployment.image) / 'handler.py'} and the "
            "deployment has no envProcess (fprocess); add one of them"
        )
    return LaunchSpec(argv=argv, env=env, cwd=handler_dir or work_dir)


def on_gpu(
    spec: LaunchSpec,
    device: GpuDevice,
    share: GpuShare,
    node: NodeAgent,
    client: str,
    function: str,
) -> LaunchSpec:
    """`spec` for replica `client` of `function` (`name.namespace`) placed on `device`: an
    MPS client of that GPU's daemon with its SM partition and memory cap (on a real GPU),
    behind a gate registered with the node's token service (unless it holds the GPU whole:
    nobody to share time with), running the share's CPU threads (`GpuShare.thread_env`)."""
    daemon = node.daemon(device.index)
    env = function_env(function)
    if daemon is not None and not share.exclusive:
        env |= daemon.client_env(share.sm_percent, share.memory_bytes)
    elif not device.virtual:
        env["CUDA_VISIBLE_DEVICES"] = device.uuid
    gate_argv = None
    if not share.exclusive:
        gate_argv = [sys.executable, "-m", "faas_provider.gate"]
        gate_argv += ["--token-socket", str(node.token_socket)]
        gate_argv += share.registration(device.uuid, client, function).argv()
        gate_argv += ["--parent-pid", str(os.getpid())]
    env |= share.thread_env(device, spec.env)
    # The share's variables come first (/proc cuts a forked child's long environment at its
    # end, and the GPU readings look for the function's name there) and win over the rest.
    return replace(spec, env={**env, **spec.env, **env}, gate_argv=gate_argv)


def _image_segment(image: str) -> str:
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
