"""The `fast-gshare` command: `fast-gshare up` runs the provider (on the embedded local backend
unless `--backend` names another)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web
from pydantic import ValidationError
from rich.console import Console

from faas_provider import __version__
from faas_provider.api.app import create_app, create_metrics_app
from faas_provider.api.worker import WorkerPool
from faas_provider.backends.base import Backend
from faas_provider.backends.factory import create_backend
from faas_provider.backends.kubernetes.manifests import (
    DEFAULT_RUN_DIR,
    GATE_IMAGE,
    node_agent_daemonset,
)
from faas_provider.backends.kubernetes.render import (
    PLACEHOLDER_GPU,
    dump,
    parse_gpu,
    stack_objects,
)
from faas_provider.backends.kubernetes.settings import KubernetesSettings
from faas_provider.backends.local.forkserver import DEFAULT_PRELOAD
from faas_provider.backends.local.settings import LocalSettings, default_state_dir
from faas_provider.backends.local.state import StateDirInUse
from faas_provider.errors import NotFound, ProviderError
from faas_provider.gpu.discovery import discover_gpus
from faas_provider.gpu.share import parse_quantity
from faas_provider.models import DEFAULT_NAMESPACE, FunctionDeployment
from faas_provider.node.serve import running_node
from faas_provider.processes import stop_on_signals
from faas_provider.profile.command import measure, report
from faas_provider.profile.runner import Grid, ProfileError
from faas_provider.settings import Settings
from faas_provider.stack import StackError, load_stack
from faas_provider.top import top

log = logging.getLogger("fast_gshare")
CPUS_PER_WORKER = 4  # --workers auto: one provider process per this many CPUs
MOST_AUTO_WORKERS = 8


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fast-gshare", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fast-gshare {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run the provider, deploying a stack file's functions")
    up.add_argument(
        "--backend",
        choices=["local", "kubernetes"],
        default="local",
        help="where functions run: local, processes on this machine (default); kubernetes, "
        "the cluster of --kubeconfig, or the one the provider runs in",
    )
    _kubeconfig_flag(up, "kubernetes backend; ")
    up.add_argument(
        "--gate-image",
        default=GATE_IMAGE,
        help=f"image of the time-quota gate sidecar (kubernetes backend; default {GATE_IMAGE})",
    )
    up.add_argument("--stack", type=Path, help="faas-cli stack file whose functions to deploy")
    up.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    up.add_argument("--port", type=int, default=8081, help="port to listen on (8081)")
    up.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="also serve /metrics, and nothing else, there (for a Prometheus that cannot "
        "reach --host, e.g. 0.0.0.0:8083 in the gateway's pod)",
    )
    up.add_argument(
        "--state-dir", type=Path, default=default_state_dir(), help="where state is kept"
    )
    up.add_argument(
        "--functions-dir",
        type=Path,
        help="root of handler directories (default: functions/ beside the stack file)",
    )
    up.add_argument(
        "--basic-auth",
        action="store_true",
        default=os.environ.get("basic_auth", "").lower() == "true",
        help="require basic auth on /system/* (env basic_auth=true)",
    )
    up.add_argument(
        "--secret-mount-path",
        type=Path,
        default=Path(os.environ.get("secret_mount_path", "/var/openfaas/secrets")),
        help="directory with basic-auth-user and basic-auth-password (env secret_mount_path)",
    )
    up.add_argument(
        "--workers",
        type=_worker_count,
        default="auto",
        help="processes serving the port: invocations use this many cores (default auto: one "
        f"per {CPUS_PER_WORKER} CPUs this process may run on, at most {MOST_AUTO_WORKERS})",
    )
    up.add_argument(
        "--autoscale-tick",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often the autoscaler decides, for the functions that ask for it (default 2)",
    )
    up.add_argument(
        "--no-autoscale", action="store_true", help="no autoscaler: replicas change by API only"
    )
    up.add_argument(
        "--quota-window-ms",
        type=float,
        default=100.0,
        help="the time-quota scheduler's window, in ms (default 100)",
    )
    up.add_argument(
        "--max-system-body",
        type=_byte_count,
        default=os.environ.get("max_system_body", "2Mi"),
        help="largest request body of /system/*: bytes or a quantity such as 4Mi; larger "
        "ones get 413 (env max_system_body; default 2Mi)",
    )
    up.add_argument(
        "--max-function-body",
        type=_byte_count,
        default=os.environ.get("max_function_body", "64Mi"),
        help="largest invocation body, /function/*: bytes or a quantity such as 256Mi; larger "
        "ones get 413 (env max_function_body; default 64Mi)",
    )
    up.add_argument(
        "--preload",
        default=os.environ.get("FAST_GSHARE_PRELOAD", ",".join(DEFAULT_PRELOAD)),
        help="modules the fork server imports once for every replica, comma-separated; "
        "missing ones are skipped, '' imports none (env FAST_GSHARE_PRELOAD; default "
        f"{','.join(DEFAULT_PRELOAD)})",
    )
    up.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    render = commands.add_parser(
        "render",
        help="print the Kubernetes objects of a stack file's functions, without a cluster",
    )
    what = render.add_mutually_exclusive_group(required=True)
    what.add_argument("-f", "--stack", type=Path, help="faas-cli stack file")
    what.add_argument(
        "--node-agent",
        action="store_true",
        help="the node agent's DaemonSet instead (k8s/node-agent.yaml is its default)",
    )
    render.add_argument(
        "--gpus-per-node",
        type=int,
        default=1,
        help="with --node-agent: GPUs each node agent holds from the device plugin and shares",
    )
    render.add_argument(
        "--gpu",
        action="append",
        default=[],
        metavar="NODE/UUID[/MEMORY]",
        help="a GPU to place GPU-shared replicas on (repeatable; default one placeholder, "
        f"{PLACEHOLDER_GPU})",
    )
    render.add_argument(
        "--gate-image",
        default=GATE_IMAGE,
        help=f"image of the gate sidecar and of the node agent (default {GATE_IMAGE})",
    )
    render.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    top_command = commands.add_parser(
        "top",
        help="show who uses each GPU, refreshed every second (from the provider's /metrics)",
    )
    top_command.add_argument(
        "--url",
        default=os.environ.get("FAST_GSHARE_URL", "http://127.0.0.1:8081"),
        help="the provider (env FAST_GSHARE_URL; default http://127.0.0.1:8081)",
    )
    top_command.add_argument(
        "--node-metrics",
        action="append",
        default=[],
        metavar="URL",
        help="a node agent's metrics too, on a cluster (repeatable; e.g. http://NODE:9402)",
    )
    top_command.add_argument("--interval", type=float, default=1.0, help="seconds between looks")
    top_command.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    profile = commands.add_parser(
        "profile",
        help="measure a deployed function under a grid of GPU settings and store its profile",
    )
    profile.add_argument("name", help="the function")
    profile.add_argument("--namespace", default="openfaas-fn", help="its namespace")
    profile.add_argument(
        "--url",
        default=os.environ.get("FAST_GSHARE_URL", "http://127.0.0.1:8081"),
        help="the provider, or the gateway (env FAST_GSHARE_URL; default http://127.0.0.1:8081)",
    )
    sample = profile.add_mutually_exclusive_group(required=True)
    sample.add_argument("--body", help="the sample request's body, as text")
    sample.add_argument("--body-file", type=Path, help="the sample request's body, from a file")
    profile.add_argument("--sm", default="12,25,50,100", help="SM partitions, percent")
    profile.add_argument("--quota", default="0.25,0.5,1", help="time quotas (request = limit)")
    profile.add_argument("--concurrency", default="1,2,4,8", help="requests kept in flight")
    profile.add_argument("--seconds", type=float, default=5.0, help="measured per setting")
    profile.add_argument("--warmup", type=float, default=1.0, help="unmeasured, before each")
    profile.add_argument(
        "--poisson",
        default="0.9,0.8,0.7,0.6,0.5,0.4",
        help="Poisson rates to try, highest first, as fractions of the best closed-loop rate "
        "within the target",
    )
    profile.add_argument(
        "--latency-slo-ms",
        type=float,
        default=None,
        help="the p99 target (default: the function's fastgshare/latency_slo_ms)",
    )
    profile.add_argument("--out", type=Path, default=None, help="JSON file (NAME.profile.json)")
    profile.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    node = commands.add_parser(
        "node",
        help="run the node agent: MPS daemons, the token service and the fault watch of this "
        "node's GPUs (what the DaemonSet of k8s/ runs)",
    )
    node.add_argument(
        "--run-dir",
        type=Path,
        default=Path(str(DEFAULT_RUN_DIR.root)),
        help=f"where the token socket and MPS directories go (default {DEFAULT_RUN_DIR.root})",
    )
    node.add_argument("--host", default="0.0.0.0", help="address of /healthz and /metrics")
    node.add_argument("--port", type=int, default=9402, help="port of /healthz and /metrics")
    node.add_argument(
        "--node",
        default=os.environ.get("NODE_NAME") or None,
        help="this node's name: publish its GPUs on it, delete its pods of a GPU whose MPS "
        "server is lost (env NODE_NAME; without it the agent touches no cluster)",
    )
    _kubeconfig_flag(node)
    node.add_argument(
        "--quota-window-ms", type=float, default=100.0, help="the token scheduler's window"
    )
    node.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return parser


def _kubeconfig_flag(parser: argparse.ArgumentParser, role: str = "") -> None:
    parser.add_argument(
        "--kubeconfig",
        type=Path,
        default=os.environ.get("KUBECONFIG") or None,
        help=f"kubeconfig of the cluster ({role}default: env KUBECONFIG, else in the cluster, "
        "the pod's ServiceAccount)",
    )


def _byte_count(text: str) -> int:
    """A size flag's value: bytes, or a quantity such as 64Mi; above 0."""
    try:
        count = parse_quantity(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if count <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 bytes")
    return count


def _worker_count(text: str) -> int:
    """`--workers`: a number of processes from 1 to 64, or `auto` (`auto_workers`)."""
    if text == "auto":
        return auto_workers()
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: write auto or a number from 1 to 64")
    return count


def auto_workers() -> int:
    """One provider process per CPUS_PER_WORKER CPUs this process may run on, from 1 to
    MOST_AUTO_WORKERS: at load, the replicas, their gates and the callers need the rest."""
    return max(1, min(MOST_AUTO_WORKERS, len(os.sched_getaffinity(0)) // CPUS_PER_WORKER))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `fast-gshare` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "render":
        _render(args)
        return
    if args.command == "node":
        asyncio.run(_node(args))
        return
    if args.command == "profile":
        _profile(args)
        return
    if args.command == "top":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(top([args.url, *args.node_metrics], args.interval))
        return
    functions_dir = args.functions_dir or (
        args.stack.parent / "functions" if args.stack else Path("functions")
    )
    settings = Settings(
        host=args.host,
        port=args.port,
        backend=args.backend,
        kubernetes=KubernetesSettings(kubeconfig=args.kubeconfig, gate_image=args.gate_image),
        local=LocalSettings(
            state_dir=args.state_dir,
            functions_dir=functions_dir.resolve(),
            quota_window_s=args.quota_window_ms / 1000,
            preload=[name.strip() for name in args.preload.split(",") if name.strip()],
        ),
        basic_auth=args.basic_auth,
        secret_mount_path=args.secret_mount_path,
        workers=args.workers,
        autoscale_tick_s=None if args.no_autoscale else args.autoscale_tick,
        max_system_body=args.max_system_body,
        max_function_body=args.max_function_body,
    )
    stack: list[FunctionDeployment] = []
    if args.stack:
        try:
            stack = load_stack(args.stack)
        except StackError as error:
            raise SystemExit(f"fast-gshare: {error}") from error
    metrics_address = _address(args.metrics_address) if args.metrics_address else None
    asyncio.run(_up(settings, stack, metrics_address))


async def _node(args: argparse.Namespace) -> None:
    """Run the node agent until SIGINT or SIGTERM."""
    stopped = stop_on_signals()
    async with running_node(
        discover_gpus(),
        args.run_dir,
        args.host,
        args.port,
        args.quota_window_ms / 1000,
        args.node,
        args.kubeconfig,
    ):
        await stopped.wait()
        log.info("node agent stopping: its MPS daemons and token service end")


def _profile(args: argparse.Namespace) -> None:
    """Run `fast-gshare profile`: bad flags and a profile that cannot be made exit non-zero."""
    try:
        grid = Grid(
            sm_percents=tuple(int(v) for v in args.sm.split(",")),
            quotas=tuple(float(v) for v in args.quota.split(",")),
            concurrencies=tuple(int(v) for v in args.concurrency.split(",")),
            poisson_fractions=tuple(float(v) for v in args.poisson.split(",")),
            seconds=args.seconds,
            warmup_s=args.warmup,
        )
    except ValueError as error:
        raise SystemExit(
            f"fast-gshare profile: --sm, --quota, --concurrency and --poisson: {error}"
        ) from None
    if not all(0 < fraction <= 1 for fraction in grid.poisson_fractions):
        raise SystemExit(
            "fast-gshare profile: --poisson takes fractions above 0 and at most 1, such as "
            f"0.9,0.8, not {args.poisson}"
        )
    body = args.body.encode() if args.body is not None else args.body_file.read_bytes()
    out = args.out or Path(f"{args.name}.profile.json")
    console = Console()
    try:
        profile = asyncio.run(
            measure(args.url, args.name, args.namespace, body, grid, args.latency_slo_ms, console)
        )
    except (ProfileError, ValidationError) as error:
        raise SystemExit(f"fast-gshare profile: {error}") from None
    except aiohttp.ClientError as error:
        raise SystemExit(f"fast-gshare profile: the provider at {args.url}: {error}") from None
    report(profile, out, console)


def _render(args: argparse.Namespace) -> None:
    """Print the objects of a stack's functions, or the node agent's, as a YAML stream."""
    if args.node_agent:
        if args.gpus_per_node < 1:
            raise SystemExit("fast-gshare render: --gpus-per-node must be 1 or more")
        print(
            dump([node_agent_daemonset(args.gate_image, gpus_per_node=args.gpus_per_node)]), end=""
        )
        return
    try:
        stack = load_stack(args.stack)
        gpus = [parse_gpu(text, i) for i, text in enumerate(args.gpu or [PLACEHOLDER_GPU])]
        print(dump(stack_objects(stack, gpus, args.gate_image)), end="")
    except (StackError, ValueError, ProviderError) as error:
        raise SystemExit(f"fast-gshare render: {error}") from error


def _address(text: str) -> tuple[str, int]:
    """A HOST:PORT flag; SystemExit saying what to write instead."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(
            f"fast-gshare: --metrics-address {text!r}: write HOST:PORT, e.g. 0.0.0.0:8083"
        )
    return host.strip("[]"), int(port)


async def _up(
    settings: Settings, stack: list[FunctionDeployment], metrics_address: tuple[str, int] | None
) -> None:
    several = settings.workers > 1
    base = f"http://{settings.host}:{settings.port}"
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:  # the port first: a provider that cannot listen starts nothing
        listener = socket.create_server(
            (settings.host, settings.port), family=family, reuse_port=several
        )
    except OSError as error:
        raise SystemExit(
            f"fast-gshare: cannot listen on {base}: {error.strerror}; choose another --port"
        ) from None
    backend = create_backend(settings)
    app = create_app(backend, settings)
    runner = web.AppRunner(app, access_log=None)
    try:
        await runner.setup()
    except StateDirInUse as error:
        listener.close()
        raise SystemExit(f"fast-gshare: {error}") from None
    await web.SockSite(runner, listener).start()
    metrics_runner = web.AppRunner(create_metrics_app(app), access_log=None)
    if metrics_address is not None:
        host, port = metrics_address
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, host, port).start()
        log.info("metrics also on http://%s:%d/metrics", host, port)
    log.info(
        "provider listening on %s (%s backend, %d process(es) serving it)",
        base,
        settings.backend,
        settings.workers,
    )
    workers: WorkerPool | None = None
    control_socket = Path(tempfile.gettempdir()) / f"fast-gshare-{os.getpid()}.sock"
    if several:
        await web.UnixSite(runner, str(control_socket)).start()
        control_socket.chmod(0o600)
        workers = WorkerPool(settings, control_socket, settings.workers - 1)
        workers.start()
    stopped = stop_on_signals()
    try:
        await _deploy_stack(backend, stack, base)
        await stopped.wait()
        log.info("stopping: replicas are stopped, desired counts are kept for the next start")
    finally:
        if workers is not None:
            await workers.stop()
        await metrics_runner.cleanup()
        await runner.cleanup()
        control_socket.unlink(missing_ok=True)


async def _deploy_stack(backend: Backend, stack: list[FunctionDeployment], base: str) -> None:
    """Deploy as faas-cli does (update, else create), then print where each function answers."""
    for deployment in stack:
        try:
            try:
                await backend.update(deployment)
            except NotFound:
                await backend.deploy(deployment)
        except ProviderError as error:
            log.error("function %s not deployed: %s", deployment.service, error)
    print(f"fast-gshare provider: {base}  (point the gateway's functions_provider_url here)")
    for function in await backend.list_functions(DEFAULT_NAMESPACE):
        url = f"{base}/function/{function.name}"
        print(f"  {function.name:<20} {url:<50} replicas {function.replicas}", flush=True)


if __name__ == "__main__":
    main()
