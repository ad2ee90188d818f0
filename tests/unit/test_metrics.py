"""Metrics: Go-compatible names/types/labels, quantiles, /proc queue gauges (the HTTP endpoints: test_endpoints.py)."""

from __future__ import annotations

import math
import pickle
import re
import socket
import threading
from pathlib import Path

import pytest

from kube_network_policies.dataplane.nfqueue import read_queue_stats
from kube_network_policies.metrics import (
    BUCKETS_US,
    Metrics,
    PacketDelta,
    PacketMetrics,
    _go_float,
    exposition,
)

NS = "kube_network_policies"


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """(TYPE per family name, {(sample name, labels): value}) from the text format."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ", 3)
            types[name] = typ
        elif line and not line.startswith("#"):
            m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
            assert m, line
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            samples[(m.group(1), labels)] = float(m.group(3))
    return types, samples


def lbl(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


class FakeQueue:
    def __init__(self, total: int, dropped: int, user: int, seq: int) -> None:
        self.queue_total, self.queue_dropped, self.user_dropped, self.id_sequence = total, dropped, user, seq


def sample_metrics() -> Metrics:
    m = Metrics(packets=PacketMetrics(window=1024), queue_reader=lambda: {100: FakeQueue(3, 1, 2, 4242), 101: FakeQueue(0, 0, 0, 7)})
    for i in range(1, 101):  # TCP/IPv4: 1..100 µs, 90 accepted, 10 dropped
        m.packets.observe(6, 4, i <= 90, float(i))
    m.packets.observe(17, socket.AF_INET6, True, 2000.0)  # AF_INET6 means IPv6 too
    m.packets.observe(1, 4, False, 5.0)  # ICMP: protocol "" like the Go agent
    return m


def test_names_types_and_labels_match_the_go_agent() -> None:
    types, samples = parse(sample_metrics().exposition().decode())
    assert types[f"{NS}_packet_process_time"] == "histogram"
    assert types[f"{NS}_packet_process_duration_microseconds"] == "summary"
    assert types[f"{NS}_packet_count"] == "counter"  # no _total: Go's name
    for g in ("nfqueue_queue_total", "nfqueue_queue_dropped", "nfqueue_user_dropped", "nfqueue_packet_id"):
        assert types[f"{NS}_{g}"] == "gauge"
    assert f"{NS}_packet_count_total" not in types

    assert samples[(f"{NS}_packet_count", lbl(protocol="TCP", family="IPv4", verdict="accept"))] == 90
    assert samples[(f"{NS}_packet_count", lbl(protocol="TCP", family="IPv4", verdict="drop"))] == 10
    assert samples[(f"{NS}_packet_count", lbl(protocol="UDP", family="IPv6", verdict="accept"))] == 1
    assert samples[(f"{NS}_packet_count", lbl(protocol="", family="IPv4", verdict="drop"))] == 1
    # Unobserved label sets are absent, as with Go's vectors.
    assert (f"{NS}_packet_count", lbl(protocol="SCTP", family="IPv4", verdict="accept")) not in samples

    h = f"{NS}_packet_process_time"
    tcp4 = {"protocol": "TCP", "family": "IPv4"}
    assert samples[(f"{h}_count", lbl(**tcp4))] == 100  # accept and drop merged: no verdict label
    assert samples[(f"{h}_sum", lbl(**tcp4))] == sum(range(1, 101))
    # Cumulative buckets; `le` is inclusive and written like Go (1, not 1.0).
    assert samples[(f"{h}_bucket", lbl(**tcp4, le="1"))] == 1
    assert samples[(f"{h}_bucket", lbl(**tcp4, le="10"))] == 10
    assert samples[(f"{h}_bucket", lbl(**tcp4, le="100"))] == 100
    assert samples[(f"{h}_bucket", lbl(**tcp4, le="100000"))] == 100
    assert samples[(f"{h}_bucket", lbl(**tcp4, le="+Inf"))] == 100
    les = [le for (name, labels), _ in samples.items() if name == f"{h}_bucket" and ("protocol", "TCP") in labels for k, le in labels if k == "le"]
    assert les == [_go_float(b) for b in BUCKETS_US] + ["+Inf"]
    # The Go agent's buckets are all still there.
    for go_bucket in ("1", "10", "50", "200", "500", "750", "1000", "2000", "5000", "10000", "100000"):
        assert (f"{h}_bucket", lbl(**tcp4, le=go_bucket)) in samples

    q = samples[(f"{NS}_nfqueue_queue_total", lbl(queue="100"))]
    assert q == 3
    assert samples[(f"{NS}_nfqueue_queue_dropped", lbl(queue="100"))] == 1
    assert samples[(f"{NS}_nfqueue_user_dropped", lbl(queue="100"))] == 2
    assert samples[(f"{NS}_nfqueue_packet_id", lbl(queue="100"))] == 4242
    assert samples[(f"{NS}_nfqueue_packet_id", lbl(queue="101"))] == 7


def test_summary_quantiles() -> None:
    _, samples = parse(sample_metrics().exposition().decode())
    s = f"{NS}_packet_process_duration_microseconds"
    # 102 samples: 1..100, 2000, 5. Nearest rank.
    values = sorted([*range(1, 101), 2000, 5])
    for q in (0.5, 0.9, 0.99):
        assert samples[(s, lbl(quantile=_go_float(q)))] == values[math.ceil(q * len(values)) - 1]
    assert samples[(f"{s}_count", frozenset())] == 102
    assert samples[(f"{s}_sum", frozenset())] == sum(values)


def test_summary_window_is_recent_samples_and_empty_is_nan() -> None:
    pm = PacketMetrics(window=64)
    n, qs = pm.quantiles()
    assert n == 0 and all(math.isnan(v) for v in qs.values())
    for _ in range(1000):
        pm.observe(6, 4, True, 1000.0)
    for _ in range(64):  # the window now holds only these
        pm.observe(6, 4, True, 3.0)
    n, qs = pm.quantiles()
    assert n == 64 and qs == {0.5: 3.0, 0.9: 3.0, 0.99: 3.0}
    _, samples = parse(exposition(Metrics(packets=pm, queue_reader=lambda: {}).registry).decode())
    assert samples[(f"{NS}_packet_process_duration_microseconds_count", frozenset())] == 1064  # all time


def test_empty_metrics_scrape() -> None:
    types, samples = parse(Metrics(queue_reader=lambda: {}).exposition().decode())
    assert types[f"{NS}_packet_count"] == "counter"
    assert math.isnan(samples[(f"{NS}_packet_process_duration_microseconds", lbl(quantile="0.5"))])
    assert samples[(f"{NS}_packet_process_duration_microseconds_count", frozenset())] == 0
    assert not any(name.startswith(f"{NS}_nfqueue") for name, _ in samples)
    assert "process_cpu_seconds_total" in types  # process collector, Go's names


def test_queue_reader_errors_do_not_break_scrapes() -> None:
    def broken() -> dict[int, FakeQueue]:
        raise OSError("boom")

    _, samples = parse(Metrics(queue_reader=broken).exposition().decode())
    assert (f"{NS}_packet_process_duration_microseconds_count", frozenset()) in samples


def test_proc_file_parsing(tmp_path: Path) -> None:
    # Columns: queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
    f = tmp_path / "nfnetlink_queue"
    f.write_text("  100  12345     2 2   128     0     5    99871 1\n  101      0     0 2 65531     3     0        0 1\n")
    stats = read_queue_stats(str(f))
    assert stats[100].queue_total == 2 and stats[100].user_dropped == 5 and stats[100].id_sequence == 99871
    assert stats[101].queue_dropped == 3
    assert read_queue_stats(str(tmp_path / "absent")) == {}
    _, samples = parse(Metrics(queue_reader=lambda: read_queue_stats(str(f))).exposition().decode())
    assert samples[(f"{NS}_nfqueue_packet_id", lbl(queue="100"))] == 99871


def test_dedicated_registry() -> None:
    from prometheus_client import REGISTRY

    Metrics(queue_reader=lambda: {}).packets.observe(6, 4, True, 1.0)
    assert REGISTRY.get_sample_value(f"{NS}_packet_count", {"protocol": "TCP", "family": "IPv4", "verdict": "accept"}) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [(1, "1"), (0, "0"), (0.5, "0.5"), (0.99, "0.99"), (100000, "100000"), (1e6, "1e+06"), (1234567, "1.234567e+06"),
     (1e-5, "1e-05"), (0.0001, "0.0001"), (-2.5, "-2.5"), (math.inf, "+Inf"), (math.nan, "NaN"), (42.0, "42")],
)  # fmt: skip
def test_go_float(value: float, text: str) -> None:
    assert _go_float(value) == text


def test_observe_is_safe_with_concurrent_scrapes() -> None:
    m = Metrics(queue_reader=lambda: {})
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            while not stop.is_set():
                _, samples = parse(m.exposition().decode())
                for (name, labels), v in samples.items():
                    if name.endswith("_bucket") and dict(labels).get("le") == "+Inf":
                        count = samples[(name[: -len("_bucket")] + "_count", labels - {("le", "+Inf")})]
                        assert v == count
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=scrape)
    t.start()
    for i in range(200_000):
        m.packets.observe(6 if i & 1 else 17, 4, bool(i & 2), float(i % 300))
    stop.set()
    t.join()
    assert not errors, errors[0]


def test_worker_deltas_merge_into_the_served_metrics() -> None:
    worker = PacketMetrics(window=64)
    for i in range(100):
        worker.observe(6, 4, True, float(i))
    worker.observe(17, 6, False, 7.0)
    first = pickle.loads(pickle.dumps(worker.take_delta()))  # crosses a process boundary
    assert isinstance(first, PacketDelta)
    assert len(first.samples) == 64 and first.samples[-1] == 7.0  # the latest, one window at most
    assert worker.take_delta() == PacketDelta((), ())  # nothing new
    worker.observe(6, 4, True, 1000.0)
    second = worker.take_delta()
    assert second.samples == (1000.0,)
    ((labels, buckets, dsum),) = second.series
    assert labels == ("TCP", "IPv4", "accept") and sum(buckets) == 1 and dsum == 1000.0

    served = Metrics(queue_reader=lambda: {})
    served.packets.merge_delta(first)
    served.packets.merge_delta(second)
    _, samples = parse(served.exposition().decode())
    assert samples[(f"{NS}_packet_count", lbl(protocol="TCP", family="IPv4", verdict="accept"))] == 101
    assert samples[(f"{NS}_packet_count", lbl(protocol="UDP", family="IPv6", verdict="drop"))] == 1
    assert samples[(f"{NS}_packet_process_time_sum", lbl(protocol="TCP", family="IPv4"))] == sum(range(100)) + 1000
    assert samples[(f"{NS}_packet_process_duration_microseconds_count", frozenset())] == 102
    assert served.packets.quantiles()[0] == 65


def test_record_errors() -> None:
    m = Metrics(queue_reader=lambda: {})
    m.record_errors({"not_ready": 3, "too_short": 1})
    m.record_errors({"not_ready": 2})
    types, samples = parse(m.exposition().decode())
    assert types[f"{NS}_packet_errors_total"] == "counter"
    assert samples[(f"{NS}_packet_errors_total", lbl(reason="not_ready"))] == 5
    assert samples[(f"{NS}_packet_errors_total", lbl(reason="too_short"))] == 1


def test_the_queue_reader_is_handed_in() -> None:
    # metrics.py imports nothing of the dataplane: the agent passes read_queue_stats. A Metrics
    # without a reader would silently expose no queue gauges, so it cannot be made.
    with pytest.raises(TypeError, match="queue_reader"):
        Metrics()  # type: ignore[call-arg]


def test_the_agent_reads_the_kernels_queue_stats() -> None:
    from kube_network_policies.agent import Agent, AgentConfig

    assert Agent(AgentConfig(manifests=("x",), node="n")).metrics.queue_reader is read_queue_stats
