"""Secrets at /var/openfaas/secrets, where OpenFaaS functions read them, each replica its own.

On Linux, where the provider may make mount namespaces (as root, or in an unprivileged user
namespace), each replica's runtime starts in a mount namespace of its own (util-linux
`unshare`, private propagation), in which its function's secret directory is bind-mounted
read-only at /var/openfaas/secrets and the state directory, which holds every function's
secrets, is covered by an empty read-only tmpfs. The bind is of the directory, not of its
files, so a secret created or updated while the replica runs shows at once; the runtime's
children (an fprocess) inherit the namespace. The gate needs none of it and runs outside.

Where that cannot be done, replicas read their secrets at `$secret_mount_path` only, the
directory itself; with the view it is SECRETS_PATH. Replicas run as the provider's user:
this is each function's own view of the path, not a sandbox against a hostile function.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from faas_provider.backends.local.launch import LaunchSpec

log = logging.getLogger("fast_gshare.local")

SECRETS_PATH = Path("/var/openfaas/secrets")
# run inside the new namespace: $1 the function's secrets, $2 SECRETS_PATH, $3 the directory
# to cover, then the replica's command, which keeps the pid (exec)
_SETUP = (
    'mount --bind -o ro "$1" "$2" && mount -t tmpfs -o ro,size=4k,mode=700 fast-gshare "$3" '
    '&& shift 3 && exec "$@"'
)


@dataclass(frozen=True)
class SecretView:
    """How to start a process that sees one function's secrets at SECRETS_PATH."""

    unshare: tuple[str, ...]  # the unshare command line, up to the command it runs
    hidden: Path  # covered in every replica's namespace: the provider's state directory

    def wrap(self, argv: list[str], secrets_dir: Path) -> list[str]:
        """`argv`, run in a mount namespace of its own with `secrets_dir` at SECRETS_PATH."""
        setup = ["sh", "-c", _SETUP, "fast-gshare-secrets"]
        return [*self.unshare, *setup, str(secrets_dir), str(SECRETS_PATH), str(self.hidden), *argv]

    def apply(self, spec: LaunchSpec, secrets_dir: Path) -> LaunchSpec:
        """The replica `spec` with `secrets_dir` at SECRETS_PATH, and `secret_mount_path` there."""
        env = {**spec.env, "secret_mount_path": str(SECRETS_PATH)}
        return replace(spec, argv=self.wrap(spec.argv, secrets_dir), env=env)


SecretProbe = Callable[[Path], Awaitable["SecretView | str"]]


async def probe_secret_view(hidden: Path) -> SecretView | str:
    """A SecretView when this machine lets the provider make one, else why not (one line).

    As root the mount point is created when missing (empty); otherwise it must exist. The
    whole setup is tried once, on scratch directories, before any replica relies on it.
    """
    view = _secret_view(hidden)
    if isinstance(view, str):
        return view
    with tempfile.TemporaryDirectory(prefix="fast-gshare-probe-") as scratch:
        secrets, cover = _scratch_secrets(Path(scratch))
        check = ["cat", str(SECRETS_PATH / "probe")]
        process = await asyncio.create_subprocess_exec(
            *SecretView(view.unshare, cover).wrap(check, secrets),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        said, _ = await process.communicate()
    if process.returncode != 0 or said != b"ok":
        lines = said.decode(errors="replace").strip().splitlines() or ["no output"]
        return f"a private mount namespace could not be made: {lines[-1]}"
    return view


def _secret_view(hidden: Path) -> SecretView | str:
    """The view this machine would allow, untried, or why there is none."""
    if not sys.platform.startswith("linux"):
        return f"mount namespaces are Linux's; this is {sys.platform}"
    missing = [tool for tool in ("unshare", "mount", "sh") if shutil.which(tool) is None]
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
    unshare = ["unshare"] if root else ["unshare", "--user", "--map-root-user"]
    return SecretView((*unshare, "--mount", "--propagation", "private", "--"), hidden.absolute())


def _scratch_secrets(scratch: Path) -> tuple[Path, Path]:
    """A secrets directory holding `probe` ("ok") and an empty directory to cover, in `scratch`."""
    secrets, cover = scratch / "secrets", scratch / "cover"
    secrets.mkdir()
    cover.mkdir()
    (secrets / "probe").write_text("ok")
    return secrets, cover
