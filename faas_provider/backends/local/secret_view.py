"""Secrets at /var/openfaas/secrets, where OpenFaaS functions read them, each replica its own.

On Linux, where the provider may make mount namespaces (as root, or in an unprivileged user
namespace), each replica's runtime starts in a mount namespace of its own (private
propagation), entered by the fork server's child before it becomes the runtime (`enter`), in
which its function's secret directory is bind-mounted read-only at /var/openfaas/secrets and the
state directory, which holds every function's secrets, is covered by an empty read-only tmpfs.
The bind is of the directory, not of its files, so a secret created or updated while the replica
runs shows at once; the runtime's children (an fprocess) inherit the namespace. The gate needs
none of it and runs outside.

Where that cannot be done, replicas read their secrets at `$secret_mount_path` only, the
directory itself; with the view it is SECRETS_PATH. Replicas run as the provider's user:
this is each function's own view of the path, not a sandbox against a hostile function.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from faas_provider.backends.local.forkserver import ForkServer
from faas_provider.backends.local.launch import LaunchSpec

log = logging.getLogger("fast_gshare.local")

SECRETS_PATH = Path("/var/openfaas/secrets")
# run inside the new namespace: $1 the function's secrets, $2 SECRETS_PATH, $3 the directory
# to cover
_MOUNTS = (
    'mount --make-rprivate / && mount --bind -o ro "$1" "$2" '
    '&& mount -t tmpfs -o ro,size=4k,mode=700 fast-gshare "$3"'
)
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000


@dataclass(frozen=True)
class SecretView:
    """How a replica comes to see one function's secrets at SECRETS_PATH."""

    hidden: Path  # covered in every replica's namespace: the provider's state directory
    user_namespace: bool  # not root: the namespace is made in a user namespace of its own

    def request(self, secrets_dir: Path) -> dict[str, Any]:
        """What the fork server's child needs to enter the view of `secrets_dir` (`enter`)."""
        return {
            "secrets": str(secrets_dir),
            "hidden": str(self.hidden),
            "user_namespace": self.user_namespace,
        }

    def apply(self, spec: LaunchSpec, secrets_dir: Path) -> LaunchSpec:
        """The replica `spec` with `secrets_dir` at SECRETS_PATH, and `secret_mount_path` there."""
        env = {**spec.env, "secret_mount_path": str(SECRETS_PATH)}
        return replace(spec, env=env, secret_view=self.request(secrets_dir))


def enter(view: dict[str, Any]) -> None:
    """In a fresh single-threaded fork: move into a mount namespace of its own with the secrets
    of `view` (SecretView.request) at SECRETS_PATH; OSError saying why it could not."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNS | (_CLONE_NEWUSER if view["user_namespace"] else 0)
    if libc.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare: {os.strerror(error)}")
    if view["user_namespace"]:  # be root in it, as `unshare --map-root-user` makes one
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    setup = ["sh", "-c", _MOUNTS, "fast-gshare-secrets"]
    setup += [view["secrets"], str(SECRETS_PATH), view["hidden"]]
    done = subprocess.run(setup, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        raise OSError(f"mounting the secrets failed: {said[-1] if said else done.returncode}")


SecretProbe = Callable[[Path, ForkServer], Awaitable["SecretView | str"]]


async def probe_secret_view(hidden: Path, forks: ForkServer) -> SecretView | str:
    """A SecretView when this machine lets the provider make one, else why not (one line).
    As root the mount point is created when missing (empty); otherwise it must exist. The
    whole setup is tried once, on scratch directories, through the fork server that starts the
    replicas, before any replica relies on it.
    """
    view = _secret_view(hidden)
    if isinstance(view, str):
        return view
    with tempfile.TemporaryDirectory(prefix="fast-gshare-probe-") as scratch:
        secrets, cover = _scratch_secrets(Path(scratch))
        check = ["cat", str(SECRETS_PATH / "probe")]
        try:
            probe = SecretView(cover, view.user_namespace).request(secrets)
            child = await forks.spawn(check, dict(os.environ), Path(scratch), probe)
        except OSError as error:
            return f"a private mount namespace could not be made: {error}"
        said, errors = await child.stdout.read(), await child.stderr.read()
        code = await child.wait()
    if code != 0 or said != b"ok":
        lines = (errors or said).decode(errors="replace").strip().splitlines() or ["no output"]
        return f"a private mount namespace could not be made: {lines[-1]}"
    return view


def _secret_view(hidden: Path) -> SecretView | str:
    """The view this machine would allow, untried, or why there is none."""
    if not sys.platform.startswith("linux"):
        return f"mount namespaces are Linux's; this is {sys.platform}"
    missing = [tool for tool in ("mount", "sh") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (util-linux)"
    root = os.geteuid() == 0
    if not SECRETS_PATH.is_dir():
        if not root:
            return f"{SECRETS_PATH} does not exist, and only root may create it"
        try:
            SECRETS_PATH.mkdir(parents=True, mode=0o755)
        except OSError as error:
            return f"cannot create the mount point {SECRETS_PATH}: {error.strerror}"
        log.info("created the empty mount point %s for the replicas' secrets", SECRETS_PATH)
    return SecretView(hidden.absolute(), user_namespace=not root)


def _scratch_secrets(scratch: Path) -> tuple[Path, Path]:
    """A secrets directory holding `probe` ("ok") and an empty directory to cover, in `scratch`."""
    secrets, cover = scratch / "secrets", scratch / "cover"
    secrets.mkdir()
    cover.mkdir()
    (secrets / "probe").write_text("ok")
    return secrets, cover
