"""The component benchmarks in lab/ run and report what they promise (tiny sizes; the figures
themselves are not judged here). The NFQUEUE one needs root: tests/kernel/test_lab_bench.py."""

from __future__ import annotations

import pytest

from kube_network_policies.lab import bench_metrics, bench_packet


def test_packet_bench_times_each_packet_as_bytes_and_as_memoryview() -> None:
    figures = bench_packet.bench(rounds=1, loops=100)
    packets = ("ipv4 tcp syn", "ipv6 tcp syn", "ipv6 hbh+dstopts tcp")
    assert set(figures) == {f"{p} ({kind})" for p in packets for kind in ("bytes", "memoryview")}
    assert all(isinstance(v, float) for v in figures.values())


def test_packet_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_packet.main(["--rounds", "1", "--loops", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.endswith("µs/packet") for line in lines), lines


def test_metrics_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_metrics.main(["-n", "2000"]) == 0
    out = capsys.readouterr().out
    for figure in ("PacketMetrics.observe():", "prometheus_client Histogram+Counter children:", "scrape (collect + text,"):
        assert figure in out, out
