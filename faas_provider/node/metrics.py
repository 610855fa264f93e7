"""The node agent's Prometheus metrics: its GPUs, and each function's share and use of them.

Served by `fast-gshare node` at /metrics on a cluster, and by the provider's /metrics with
the local backend, whose agent runs inside it. Labels: `function_name` (`name.namespace`, as
the gateway's), `gpu` (the UUID) and `node`.
"""

from __future__ import annotations

import socket

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from faas_provider.node.agent import NodeAgent


class NodeCollector(Collector):
    """What a scrape sees of one node agent."""

    def __init__(self, agent: NodeAgent, node: str | None = None) -> None:
        self._agent = agent
        self._node = node or socket.gethostname()

    def collect(self) -> list[Metric]:
        labels = ("function_name", "gpu", "node")
        charged = CounterMetricFamily(
            "fast_gshare_gpu_time_seconds",
            "GPU time charged to a function's gates on a GPU (its rate is the share it used)",
            labels=labels,
        )
        sm = GaugeMetricFamily(
            "fast_gshare_function_sm_share_ratio",
            "A function's SM partition on a GPU (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE / 100)",
            labels=labels,
        )
        request = GaugeMetricFamily(
            "fast_gshare_function_quota_request_ratio",
            "A function's guaranteed share of each scheduling window on a GPU",
            labels=labels,
        )
        limit = GaugeMetricFamily(
            "fast_gshare_function_quota_limit_ratio",
            "The most of each scheduling window a function may use on a GPU",
            labels=labels,
        )
        gates = GaugeMetricFamily(
            "fast_gshare_function_gates",
            "A function's replicas registered with a GPU's token scheduler",
            labels=labels,
        )
        waited = CounterMetricFamily(
            "fast_gshare_gate_wait_seconds",
            "Seconds a function's gates waited for tokens of a GPU's scheduler",
            labels=labels,
        )
        grants = CounterMetricFamily(
            "fast_gshare_gate_grants",
            "Tokens a GPU's scheduler granted to a function's gates (wait / grants: the mean wait)",
            labels=labels,
        )
        queued = GaugeMetricFamily(
            "fast_gshare_function_queued_requests",
            "Requests waiting at a function's gates on a GPU for a token, as the gates last said",
            labels=labels,
        )
        memory_limit = GaugeMetricFamily(
            "fast_gshare_function_memory_limit_bytes",
            "The GPU memory caps of a function's replicas on a GPU, summed (fastgshare/gpu_mem)",
            labels=labels,
        )
        for use in self._agent.usage():
            where = (use.function, use.gpu, self._node)
            charged.add_metric(where, use.charged_s)
            waited.add_metric(where, use.waited_s)
            grants.add_metric(where, use.grants)
            gates.add_metric(where, use.gates)
            if use.share is not None:
                sm.add_metric(where, use.share.sm_percent / 100)
                request.add_metric(where, use.share.quota_request)
                limit.add_metric(where, use.share.quota_limit)
                queued.add_metric(where, use.queued)
            if use.memory_limit_bytes is not None:
                memory_limit.add_metric(where, use.memory_limit_bytes)
        return [charged, sm, request, limit, gates, waited, grants, queued, memory_limit,
                *self._readings(), *self._mps()]  # fmt: skip

    def _readings(self) -> list[Metric]:
        """NVML's figures: each GPU's utilisation and memory used, each function's memory."""
        utilization = GaugeMetricFamily(
            "fast_gshare_gpu_utilization_ratio",
            "Share of NVML's last sample period in which a kernel ran on the GPU "
            "(DCGM_FI_DEV_GPU_UTIL / 100)",
            labels=("gpu", "node"),
        )
        used = GaugeMetricFamily(
            "fast_gshare_gpu_memory_used_bytes",
            "GPU memory in use, by every process (DCGM_FI_DEV_FB_USED in bytes)",
            labels=("gpu", "node"),
        )
        by_function = GaugeMetricFamily(
            "fast_gshare_function_memory_used_bytes",
            "GPU memory held by a function's processes on a GPU (hami_vgpu_memory_used_bytes)",
            labels=("function_name", "gpu", "node"),
        )
        for reading in self._agent.readings():
            if reading.utilization_ratio is not None:
                utilization.add_metric((reading.uuid, self._node), reading.utilization_ratio)
            used.add_metric((reading.uuid, self._node), reading.memory_used_bytes)
            for function, held in sorted(reading.memory_by_function.items()):
                by_function.add_metric((function, reading.uuid, self._node), held)
        return [utilization, used, by_function]

    def _mps(self) -> list[Metric]:
        """Each GPU's MPS daemon: up or not, and how often its clients lost their server."""
        mps = GaugeMetricFamily(
            "fast_gshare_mps_daemon_up",
            "Whether a GPU's MPS control daemon runs (1) or not (0)",
            labels=("gpu", "node"),
        )
        losses = CounterMetricFamily(
            "fast_gshare_mps_server_losses",
            "Times a GPU's MPS clients lost their server (a fatal fault, the server or its "
            "daemon gone), each followed by a restart of that GPU's replicas",
            labels=("gpu", "node"),
        )
        for device in self._agent.devices:
            if not device.virtual:
                losses.add_metric((device.uuid, self._node), self._agent.losses.get(device.uuid, 0))
                daemon = self._agent.daemon(device.index)
                mps.add_metric(
                    (device.uuid, self._node), int(daemon is not None and daemon.running())
                )
        return [mps, losses]
