"""Prometheus metrics for one supervisor, read at scrape time from the BPF maps,
the supervisor's instance table, sock_diag and the kernel's TcpExt counters."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable, Iterator

from .errors import ReuseportStandbyError
from .kernel.sockets import Address
from .outcomes import BUCKETS, KINDS, PER_DOUBLING, Outcomes, upper_bound

if TYPE_CHECKING:
    from .supervisor import Supervisor
    from .supervisor.registry import Instance

log = logging.getLogger(__name__)

#: the latency histogram's buckets for Prometheus: one per doubling of the shared bounds (100 µs ... 52 s),
#: indices into outcomes' buckets; a series of 20 buckets instead of 79
PROMETHEUS_BUCKETS = tuple(range(0, BUCKETS - 1, PER_DOUBLING))

COUNTER_KINDS = {  # BPF counter -> (kind, role)
    "selected_primary": ("selected", "primary"),
    "selected_standby": ("selected", "standby"),
    "parked": ("parked", ""),
    "migrated_primary": ("migrated", "primary"),
    "migrated_standby": ("migrated", "standby"),
    "migrated_parked": ("migrated", "parking"),
    "fell_back": ("fell_back", ""),
    "migrate_fell_back": ("migrate_fell_back", ""),
}


def tcpext(names: tuple[str, ...] = ("TCPMigrateReqSuccess", "TCPMigrateReqFailure", "ListenDrops", "ListenOverflows")) -> dict[str, int]:
    """Counters from /proc/net/netstat's TcpExt section (what ``nstat`` shows)."""
    out: dict[str, int] = {}
    try:
        lines = open("/proc/net/netstat").read().splitlines()
    except OSError:
        return out
    for header, values in zip(lines[::2], lines[1::2]):
        if header.startswith("TcpExt:"):
            for k, v in zip(header.split()[1:], values.split()[1:]):
                if k in names:
                    out[k] = int(v)
    return out


class SupervisorCollector:
    """A prometheus_client collector; nothing is cached between scrapes."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sup = self.sup
        conns = CounterMetricFamily("reuseport_standby_connections", "Connections the BPF program placed, by kind and role",
                                    labels=["service", "address", "kind", "role"])
        weight = GaugeMetricFamily("reuseport_standby_standby_weight_percent", "Share of new connections offered to the standby first",
                                   labels=["service", "address"])
        queue = GaugeMetricFamily("reuseport_standby_queue_depth", "Connections waiting in a listener's accept queue",
                                  labels=["service", "address", "owner"])
        queues = sup.broker.queues()
        for address, st in list(sup.states.items()):
            a = str(address)
            for name, value in st.group.counters().as_dict().items():
                kind, role = COUNTER_KINDS[name]
                conns.add_metric([sup.service, a, kind, role], value)
            weight.add_metric([sup.service, a], st.group.read_config().standby_weight)
            parked = queues.get(_cookie(st.anchor))
            queue.add_metric([sup.service, a, "parking"], parked.queued if parked else 0)
        instances = GaugeMetricFamily("reuseport_standby_instances", "Instances by role and state", labels=["service", "role", "state"])
        counts: dict[tuple[str, str], int] = {}
        for inst in sup.instances:
            if inst.role is None:
                continue
            key = (inst.role.value, inst.state.value)
            counts[key] = counts.get(key, 0) + 1
            for address, cookie in inst.cookies.items():
                q = queues.get(cookie)
                queue.add_metric([sup.service, str(address), f"{inst.role.value}:{inst.pid}"], q.queued if q else 0)
        for (role, state), n in counts.items():
            instances.add_metric([sup.service, role, state], n)
        requests, latency = outcome_metrics(sup.service, sup.instances)
        demotions = CounterMetricFamily("reuseport_standby_demotions", "Instances demoted for hanging", labels=["service"])
        demotions.add_metric([sup.service], sup.broker.demotions_total)
        restorations = CounterMetricFamily(
            "reuseport_standby_program_restorations",
            "Times our program was found detached from the group and re-attached (docs/security.md)",
            labels=["service", "address"])
        bypassed = CounterMetricFamily(
            "reuseport_standby_program_bypassed_connections",
            "Connections seen reaching the port while our program was detached (a lower bound)",
            labels=["service", "address"])
        for address, st in list(sup.states.items()):
            restorations.add_metric([sup.service, str(address)], st.watch.restorations)
            bypassed.add_metric([sup.service, str(address)], st.watch.bypassed)
        swapped = GaugeMetricFamily("reuseport_standby_roles_swapped", "1 after a promote swapped the roles", labels=["service"])
        swapped.add_metric([sup.service], int(sup.broker.swapped))
        kernel = CounterMetricFamily("reuseport_standby_kernel_tcp", "TcpExt counters of this network namespace (nstat)",
                                     labels=["counter"])
        for k, v in tcpext().items():
            kernel.add_metric([k], v)
        yield from (conns, weight, queue, instances, requests, latency, demotions, restorations, bypassed, swapped,
                    kernel)


def outcome_metrics(service: str, instances: "Iterable[Instance]") -> tuple[object, object]:
    """What every registered instance and worker answered (its cumulative outcomes), per role and version:
    a counter by kind, and the latency histogram (cumulative buckets, no _sum: the workers keep none)."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    labels = ["service", "instance", "pid", "role", "version"]
    requests = CounterMetricFamily("reuseport_standby_requests", "Requests the app answered, by kind "
                                   "(status class, exception, no_response)", labels=[*labels, "kind"])
    latency = HistogramMetricFamily("reuseport_standby_request_duration_seconds",
                                    "Time from the app's call to the end of its response", labels=labels)
    for inst in instances:
        if inst.role is None:
            continue
        o: Outcomes = inst.outcomes
        values = [service, str(inst.id), str(inst.pid), inst.role.value, inst.version or ""]
        for kind in KINDS:
            requests.add_metric([*values, kind], o.counts[kind])
        buckets: list[tuple[str, float]] = []
        seen = 0
        upto = 0
        for i in PROMETHEUS_BUCKETS:
            seen += sum(o.latency[upto:i + 1])
            upto = i + 1
            buckets.append((f"{upper_bound(i):.6g}", seen))
        buckets.append(("+Inf", sum(o.latency)))
        latency.add_metric(values, buckets, None)
    return requests, latency


def _cookie(sock: object) -> int:
    from .kernel.sockets import socket_cookie

    try:
        return socket_cookie(sock)  # type: ignore[arg-type]
    except OSError:
        return -1


def require_client() -> None:
    """Fail before the supervisor loads anything when --metrics cannot work (an optional dependency)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ReuseportStandbyError("--metrics needs prometheus_client: pip install 'reuseport-standby[metrics]', "
                                    "or drop --metrics", see="metrics") from None


def serve(sup: "Supervisor", address: Address) -> object:
    """Start the /metrics HTTP endpoint in a daemon thread."""
    require_client()
    from prometheus_client import start_http_server
    from prometheus_client.core import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(sup))  # type: ignore[arg-type]
    try:
        server, _thread = start_http_server(address.port, addr=address.host, registry=registry)
    except OSError as exc:
        raise ReuseportStandbyError(f"--metrics {address}: cannot listen there ({exc.strerror or exc}); "
                                    f"pick a free address or drop --metrics", see="metrics") from None
    log.info("metrics on http://%s/metrics", address)
    return server
