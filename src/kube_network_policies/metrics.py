"""Prometheus metrics with the Go agent's names, types and labels (endpoints.py serves them).

Exposed (all prefixed ``kube_network_policies_``, as the Go agent's namespace does):

=====================================  =========  ==========================  ===================
name                                   type       labels                      unit / source
=====================================  =========  ==========================  ===================
packet_process_time                    histogram  protocol, family            µs per packet
packet_process_duration_microseconds   summary    (none; 0.5, 0.9, 0.99)      µs per packet
packet_count                           counter    protocol, family, verdict   packets
nfqueue_queue_total                    gauge      queue                       /proc, at scrape
nfqueue_queue_dropped                  gauge      queue                       /proc, at scrape
nfqueue_user_dropped                   gauge      queue                       /proc, at scrape
nfqueue_packet_id                      gauge      queue                       /proc, at scrape
packet_errors_total (ours, not Go's)   counter    reason                      packets not judged
ruleset_restores_total (ours)          counter    (none)                      ControlCounters
control_errors_total (ours)            counter    operation                   ControlCounters
ruleset_in_sync (ours)                 gauge      (none)                      ControlCounters
=====================================  =========  ==========================  ===================

Label values as the Go agent writes them: protocol ``TCP``/``UDP``/``SCTP`` (``""`` for any
other), family ``IPv4``/``IPv6``, verdict ``accept``/``drop``.

Why not prometheus_client's Histogram/Counter/Summary for the packet metrics:
- cost: a pre-resolved Histogram child plus Counter child cost ~1 µs per packet here (locks,
  bucket loop); :meth:`PacketMetrics.observe` ~0.3 µs, against a ~10 µs budget per queued
  packet (``python -m kube_network_policies.lab.bench_metrics``);
- its Summary has no quantiles; ours are computed at scrape time from a ring buffer;
- it always exposes counters as ``<name>_total``; the Go agent's counter is ``packet_count``.
So the packet path only bumps plain integers; scrapes turn them into metric families, and
:func:`exposition` writes the text format itself (Go-style counter names and float formats).
The registry is a dedicated CollectorRegistry, never the global one.

Packet workers run in their own processes: each keeps a PacketMetrics, ships
:meth:`PacketMetrics.take_delta` about once a second, and the serving process merges it.

This module imports nothing of the package: the dataplane's worker uses PacketMetrics, so a
metrics module that imported the dataplane would be a loop. What it reads from elsewhere is
handed in (the agent gives :class:`Metrics` dataplane.nfqueue.read_queue_stats).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "BUCKETS_US",
    "QUANTILES",
    "ControlCounters",
    "ErrorCounters",
    "Metrics",
    "PacketDelta",
    "PacketMetrics",
    "QueueCollector",
    "exposition",
]

log = logging.getLogger(__name__)

NAMESPACE = "kube_network_policies"

# A superset of the Go agent's buckets (1, 10, 50, 200, 500, 750, 1000, 2000, 5000, 10000,
# 100000), so its dashboards keep working, plus 5, 25 and 100 where this agent's packets land
# (median ~10-20 µs: NOTES.md).
BUCKETS_US: tuple[float, ...] = (1, 5, 10, 25, 50, 100, 200, 500, 750, 1000, 2000, 5000, 10000, 100000)
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)
DEFAULT_WINDOW = 8192  # samples behind the summary quantiles (a power of two: index by mask)

_PROTOCOLS = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP", 132: "SCTP"}  # 132: IPPROTO_SCTP
# Accept both IP versions (4, 6) and address families (AF_INET = 2, AF_INET6 = 10).
_FAMILIES = {4: "IPv4", socket.AF_INET: "IPv4", 6: "IPv6", socket.AF_INET6: "IPv6"}


@dataclass(slots=True)
class _Series:
    """Mutable accumulator for one (protocol, family, verdict): bumped per packet, read per scrape.

    count is not stored: it is sum(buckets), so a scrape can never see a count that disagrees
    with the buckets.
    """

    labels: tuple[str, str, str]  # protocol, family, verdict
    buckets: list[int]  # NOT cumulative; last slot is +Inf
    sum: float = 0.0


@dataclass(frozen=True, slots=True)
class PacketDelta:
    """Observations since the previous take_delta(): small and picklable, so a packet worker
    process can ship them to the process that serves /metrics (merge_delta)."""

    series: tuple[tuple[tuple[str, str, str], tuple[int, ...], float], ...]  # labels, buckets, sum
    samples: tuple[float, ...]  # the latest ones, at most one window


class PacketMetrics:
    """Per-packet processing metrics, cheap to record; a prometheus_client collector.

    observe() (or merge_delta()) is meant to be called by one thread (the packet loop, or the
    thread reading worker messages); any thread may scrape. (With several writers a rare
    increment could be lost to a race; nothing worse.) The summary's quantiles cover the last
    ``window`` packets, whatever their age (the Go client's summary covers the last 10
    minutes); its sum and count cover all packets.
    """

    def __init__(self, *, window: int = DEFAULT_WINDOW) -> None:
        if window < 1 or window & (window - 1):
            raise ValueError(f"window must be a power of two, got {window}")
        self._bounds = BUCKETS_US
        self._series: dict[tuple[int, int, bool], _Series] = {}
        self._by_labels: dict[tuple[str, str, str], _Series] = {}
        self._ring = [0.0] * window
        self._mask = window - 1
        self._n = 0  # samples ever observed; the ring slot of the next one is _n & _mask
        self._lock = threading.Lock()  # only for creating series (rare), never per packet
        self._taken: dict[tuple[str, str, str], tuple[list[int], float]] = {}  # at last take_delta
        self._taken_n = 0
        for proto in _PROTOCOLS:
            for family in _FAMILIES:
                for allowed in (True, False):
                    self._new_series(proto, family, allowed)

    def observe(self, protocol: int, family: int, allowed: bool, micros: float) -> None:
        """Record one packet: IP protocol number, IP version or AF_*, verdict, time in µs."""
        series = self._series.get((protocol, family, allowed))
        if series is None:
            series = self._new_series(protocol, family, allowed)
        series.buckets[bisect_left(self._bounds, micros)] += 1  # bisect_left: `le` is inclusive
        series.sum += micros
        n = self._n
        self._ring[n & self._mask] = micros
        self._n = n + 1

    def observe_verdict(self, flow: Sequence[Any], decision: Sequence[Any], micros: float) -> None:
        """observe() as a verdict observer of the packet worker (dataplane/worker.py): protocol,
        family and verdict read off the flow and its decision (engine.Flow and engine.Decision,
        typed structurally: metrics imports nothing of the package). The body repeats observe()'s
        rather than calling it: one call less per packet."""
        key = (flow[2], 4 if len(flow[0]) == 4 else 6, decision[0])
        series = self._series.get(key)
        if series is None:
            series = self._new_series(*key)
        series.buckets[bisect_left(self._bounds, micros)] += 1
        series.sum += micros
        n = self._n
        self._ring[n & self._mask] = micros
        self._n = n + 1

    def _new_series(self, protocol: int, family: int, allowed: bool) -> _Series:
        labels = (_PROTOCOLS.get(protocol, ""), _FAMILIES.get(family, ""), "accept" if allowed else "drop")
        series = self._labelled(labels)
        with self._lock:
            self._series[(protocol, family, bool(allowed))] = series
        return series

    def _labelled(self, labels: tuple[str, str, str]) -> _Series:
        with self._lock:
            # Several keys may share labels (e.g. ICMP and GRE are both protocol=""): one series.
            series = self._by_labels.get(labels)
            if series is None:
                series = self._by_labels[labels] = _Series(labels, [0] * (len(self._bounds) + 1))
            return series

    def take_delta(self) -> PacketDelta:
        """What was observed since the previous call (the counters themselves keep counting:
        observe() never waits for, nor races with, a reset)."""
        with self._lock:
            all_series = list(self._by_labels.values())
        out = []
        for s in all_series:
            buckets, ssum = list(s.buckets), s.sum
            before = self._taken.get(s.labels)
            if before is not None:
                diff = tuple(a - b for a, b in zip(buckets, before[0], strict=True))
                dsum = ssum - before[1]
            else:
                diff, dsum = tuple(buckets), ssum
            if any(diff):
                out.append((s.labels, diff, dsum))
            self._taken[s.labels] = (buckets, ssum)
        n = self._n
        k = min(n - self._taken_n, len(self._ring))
        ring, mask = self._ring, self._mask
        samples = tuple(ring[i & mask] for i in range(n - k, n))
        self._taken_n = n
        return PacketDelta(tuple(out), samples)

    def merge_delta(self, delta: PacketDelta) -> None:
        """Add a worker's take_delta() to these metrics."""
        width = len(self._bounds) + 1
        for labels, buckets, dsum in delta.series:
            if len(buckets) != width or len(labels) != 3:
                log.warning("ignoring a packet metrics delta with another bucket layout")
                continue
            s = self._labelled(labels)
            for i, c in enumerate(buckets):
                s.buckets[i] += c
            s.sum += dsum
        n, ring, mask = self._n, self._ring, self._mask
        for v in delta.samples:
            ring[n & mask] = v
            n += 1
        self._n = n

    def quantiles(self) -> tuple[int, dict[float, float]]:
        """(samples in the window, {quantile: value}) by nearest rank; NaN when empty."""
        n = self._n
        ring = list(self._ring)  # one C-level copy: consistent enough against the writer
        size = min(n, len(ring))
        samples = sorted(ring[:size])  # until the ring wraps, slots past n hold no sample
        if not samples:
            return 0, {q: math.nan for q in QUANTILES}
        return size, {q: samples[max(0, math.ceil(q * size) - 1)] for q in QUANTILES}

    def describe(self) -> list[Metric]:
        return [
            Metric(f"{NAMESPACE}_packet_process_time", "", "histogram"),
            Metric(f"{NAMESPACE}_packet_process_duration_microseconds", "", "summary"),
            Metric(f"{NAMESPACE}_packet_count", "", "counter"),
        ]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            series = list(self._by_labels.values())
        hist = Metric(f"{NAMESPACE}_packet_process_time", "Time it has taken to process each packet (microseconds)", "histogram")
        # The histogram has no verdict label: merge the accept and drop series.
        merged: dict[tuple[str, str], tuple[list[int], float]] = {}
        counter = Metric(f"{NAMESPACE}_packet_count", "Number of packets", "counter")
        total_sum, total_count = 0.0, 0
        for s in series:
            buckets, ssum = list(s.buckets), s.sum
            count = sum(buckets)
            if count == 0:
                continue  # like Go's vectors: a label set appears once it was observed
            total_sum += ssum
            total_count += count
            proto, family, verdict = s.labels
            # Go-compatible: the sample is named packet_count, without a _total suffix.
            counter.add_sample(counter.name, {"protocol": proto, "family": family, "verdict": verdict}, count)
            acc = merged.get((proto, family))
            if acc is None:
                merged[(proto, family)] = (buckets, ssum)
            else:
                merged[(proto, family)] = ([a + b for a, b in zip(acc[0], buckets, strict=True)], acc[1] + ssum)
        for (proto, family), (buckets, ssum) in sorted(merged.items()):
            labels = {"protocol": proto, "family": family}
            cumulative = 0
            for bound, c in zip((*self._bounds, math.inf), buckets, strict=True):
                cumulative += c
                hist.add_sample(f"{hist.name}_bucket", {**labels, "le": _go_float(bound)}, cumulative)
            hist.add_sample(f"{hist.name}_sum", labels, ssum)
            hist.add_sample(f"{hist.name}_count", labels, cumulative)
        summary = Metric(
            f"{NAMESPACE}_packet_process_duration_microseconds",
            "A summary of the packet processing durations in microseconds.",
            "summary",
        )
        _, qs = self.quantiles()
        for q, v in qs.items():
            summary.add_sample(summary.name, {"quantile": _go_float(q)}, v)
        summary.add_sample(f"{summary.name}_sum", {}, total_sum)
        summary.add_sample(f"{summary.name}_count", {}, total_count)
        yield hist
        yield summary
        yield counter


class _QueueStatsLike(Protocol):
    """What QueueCollector reads of dataplane.nfqueue.QueueStats (read-only attributes)."""

    @property
    def queue_total(self) -> int: ...
    @property
    def queue_dropped(self) -> int: ...
    @property
    def user_dropped(self) -> int: ...
    @property
    def id_sequence(self) -> int: ...


QueueReader = Callable[[], Mapping[int, _QueueStatsLike]]

_QUEUE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("nfqueue_queue_total", "queue_total", "Packets currently queued, waiting for a verdict from userspace"),
    (
        "nfqueue_queue_dropped",
        "queue_dropped",
        "Packets the kernel dropped because the queue was full (too many packets waiting for a verdict)",
    ),
    (
        "nfqueue_user_dropped",
        "user_dropped",
        "Packets dropped in netlink because the socket receive buffer was full (userspace too slow to read)",
    ),
    ("nfqueue_packet_id", "id_sequence", "ID of the most recent packet queued"),
)


class QueueCollector:
    """The kernel's per-queue counters as gauges, read at scrape time (not polled) by `reader`
    (the agent's: dataplane.nfqueue.read_queue_stats, from /proc)."""

    def __init__(self, reader: QueueReader) -> None:
        self._reader = reader

    def describe(self) -> list[Metric]:
        return [Metric(f"{NAMESPACE}_{name}", "", "gauge") for name, _, _ in _QUEUE_GAUGES]

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._reader()
        except (OSError, ValueError) as e:  # a scrape must not fail because /proc did
            log.warning("reading nfqueue stats: %s", e)
            stats = {}
        for name, attr, doc in _QUEUE_GAUGES:
            metric = Metric(f"{NAMESPACE}_{name}", doc, "gauge")
            for queue, st in sorted(stats.items()):
                metric.add_sample(metric.name, {"queue": str(queue)}, float(getattr(st, attr)))
            yield metric


class ErrorCounters:
    """Queued packets answered with the default verdict without being judged, by reason
    (e.g. not_ready, or why the packet did not parse). Not in the Go agent, hence the
    conventional ``_total`` name: ``kube_network_policies_packet_errors_total{reason}``."""

    NAME = f"{NAMESPACE}_packet_errors"

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            for reason, n in counts.items():
                self._counts[str(reason)] = self._counts.get(str(reason), 0) + int(n)

    def describe(self) -> list[Metric]:
        return [Metric(self.NAME, "", "counter")]

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.NAME, "Queued packets given the default verdict without evaluation, by reason", "counter")
        with self._lock:
            counts = sorted(self._counts.items())
        for reason, n in counts:
            metric.add_sample(f"{self.NAME}_total", {"reason": reason}, n)
        yield metric


class ControlCounters:
    """What the control process itself went through (ours, not the Go agent's):

    - ``ruleset_restores_total``: times the ruleset was found changed by someone else (flushed,
      deleted, edited) and installed again;
    - ``control_errors_total{operation}``: failures that left the previous state in force
      (``ruleset_sync``, ``ruleset_check``, ``ruleset_restore``, ``cache_flush``, ``apply``,
      ``source``, ``worker_timeout``);
    - ``ruleset_in_sync``: 1 while the kernel holds the ruleset the agent believes it installed
      (last sync and check succeeded), else 0; /readyz fails meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.restores = 0
        self.errors: dict[str, int] = {}
        self.in_sync = False

    def error(self, operation: str) -> None:
        with self._lock:
            self.errors[operation] = self.errors.get(operation, 0) + 1

    def restored(self) -> None:
        with self._lock:
            self.restores += 1

    def describe(self) -> list[Metric]:
        return [
            Metric(f"{NAMESPACE}_ruleset_restores", "", "counter"),
            Metric(f"{NAMESPACE}_control_errors", "", "counter"),
            Metric(f"{NAMESPACE}_ruleset_in_sync", "", "gauge"),
        ]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            restores, errors, in_sync = self.restores, sorted(self.errors.items()), self.in_sync
        m = Metric(f"{NAMESPACE}_ruleset_restores", "Times the ruleset was found changed by someone else and installed again", "counter")
        m.add_sample(f"{m.name}_total", {}, restores)
        yield m
        m = Metric(f"{NAMESPACE}_control_errors", "Failures of the control process that kept the previous state in force, by operation", "counter")
        for operation, n in errors:
            m.add_sample(f"{m.name}_total", {"operation": operation}, n)
        yield m
        m = Metric(f"{NAMESPACE}_ruleset_in_sync", "1 while the kernel holds the ruleset the agent installed", "gauge")
        m.add_sample(m.name, {}, 1.0 if in_sync else 0.0)
        yield m


@dataclass(slots=True, kw_only=True)
class Metrics:
    """The agent's metrics: a dedicated registry holding packet, error, queue and process
    collectors. Creating it starts no thread (the agent forks workers afterwards).

    queue_reader has no default: a forgotten reader would silently drop the queue gauges."""

    queue_reader: QueueReader
    packets: PacketMetrics = field(default_factory=PacketMetrics)
    errors: ErrorCounters = field(default_factory=ErrorCounters)
    control: ControlCounters = field(default_factory=ControlCounters)
    registry: CollectorRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(self.packets)
        self.registry.register(self.errors)
        self.registry.register(self.control)
        self.registry.register(QueueCollector(self.queue_reader))
        # process_cpu_seconds_total, process_resident_memory_bytes, ...: same names as Go's.
        ProcessCollector(registry=self.registry)

    def record_errors(self, counts: Mapping[str, int]) -> None:
        """Add a worker's per-reason counts of packets it could not judge."""
        self.errors.add(counts)

    def exposition(self) -> bytes:
        return exposition(self.registry)


# --- text exposition (format 0.0.4), Go-compatible ------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _go_float(v: float) -> str:
    """A float as Go's exposition writes it, strconv.FormatFloat(v, 'g', -1, 64): shortest
    round-trip digits, exponent form below 1e-4 or from 1e+06 (1, 0.5, 100000, 1e+06, +Inf)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "0"
    sign = "-" if v < 0 else ""
    mantissa, _, e = repr(abs(float(v))).partition("e")  # repr: the shortest digits, as Go's -1
    whole, _, frac = mantissa.partition(".")
    digits = whole + frac
    dp = len(whole) + (int(e) if e else 0)  # decimal point position within digits
    stripped = digits.lstrip("0")
    dp -= len(digits) - len(stripped)
    digits = stripped.rstrip("0") or "0"
    exp = dp - 1
    if exp < -4 or exp >= 6:
        m = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{m}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if dp <= 0:
        return f"{sign}0.{'0' * -dp}{digits}"
    if dp >= len(digits):
        return f"{sign}{digits}{'0' * (dp - len(digits))}"
    return f"{sign}{digits[:dp]}.{digits[dp:]}"


def _escape_label(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format, written the way the Go client writes it.

    Unlike prometheus_client.generate_latest, a counter keeps the name its samples carry (the
    Go agent's ``packet_count`` has no ``_total``), and numbers are formatted like Go's
    (``le="1"``, not ``le="1.0"``). OpenMetrics-only ``_created`` samples are left out.
    """
    out: list[str] = []
    for metric in registry.collect():
        samples = [s for s in metric.samples if not s.name.endswith("_created")]
        name = metric.name
        if metric.type == "counter" and samples and samples[0].name == f"{metric.name}_total":
            name = f"{metric.name}_total"  # prometheus_client-made counters (process_*)
        mtype = {"unknown": "untyped", "info": "gauge", "stateset": "gauge"}.get(metric.type, metric.type)
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n")
        for s in samples:
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels.items())
            out.append(f"{s.name}{{{labels}}} {_go_float(s.value)}\n" if labels else f"{s.name} {_go_float(s.value)}\n")
    return "".join(out).encode()
