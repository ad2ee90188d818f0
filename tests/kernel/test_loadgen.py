"""knp-loadgen (tools/loadgen/loadgen.c) built by lab.loadgen and run between two network
namespaces joined by a veth: a listening port gives connections, a closed port RSTs (failures), a
port DROPped by iptables in the server namespace gives timeouts.

Skips when not root, or when gcc / ip / iptables are missing; fails instead under CI=true.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest

from kube_network_policies.lab import loadgen

pytestmark = pytest.mark.kernel

OPEN_PORTS = (80, 81)
CLOSED_PORT = 82  # nothing listens: the server's kernel answers RST
DROPPED_PORT = 83  # listened on, but iptables DROPs it in the server namespace
EXTRA_CLIENT_IP4 = "10.213.0.11"


def _require_gcc() -> None:
    if shutil.which("gcc") is None:
        netns.skip_or_fail("needs gcc on PATH to build knp-loadgen")


def _prefix(ns: netns.Netns) -> list[str]:
    return ["ip", "netns", "exec", ns.name]


# --- building -----------------------------------------------------------------------------------


def test_build_is_cached_and_follows_the_source(tmp_path: Path) -> None:
    _require_gcc()
    src = tmp_path / "loadgen.c"
    src.write_bytes(loadgen.source_path().read_bytes())
    first = loadgen.ensure_built(src, tmp_path / "cache")
    assert first.name == "knp-loadgen" and first.is_file()
    mtime = first.stat().st_mtime_ns
    assert loadgen.ensure_built(src, tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == mtime  # not rebuilt
    src.write_text(src.read_text() + "\n/* changed */\n")
    second = loadgen.ensure_built(src, tmp_path / "cache")
    assert second != first and second.is_file()
    help_text = subprocess.run([str(second), "--help"], capture_output=True, text=True, check=True).stdout
    assert "serve" in help_text


def test_build_failure_names_the_gcc_error(tmp_path: Path) -> None:
    _require_gcc()
    broken = tmp_path / "broken.c"
    broken.write_text("int main(void) { return undeclared_thing; }\n")
    with pytest.raises(loadgen.LoadgenError, match=r"(?s)gcc failed.*undeclared_thing"):
        loadgen.ensure_built(broken, tmp_path / "cache")


def test_cache_root_follows_knp_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KNP_CACHE", str(tmp_path))
    assert loadgen.cache_root() == tmp_path / "loadgen"
    monkeypatch.delenv("KNP_CACHE")
    assert loadgen.cache_root() == Path("/var/cache/kube-network-policies/loadgen")


def test_format_target() -> None:
    assert loadgen.format_target(("10.0.0.2", 80)) == "10.0.0.2:80"
    assert loadgen.format_target(("fd00::2", 8080)) == "[fd00::2]:8080"
    assert loadgen.format_target("[fd00::2]:1") == "[fd00::2]:1"


# --- the real kernel ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[netns.NetnsPair]:
    netns.require_kernel("ip", "iptables")
    _require_gcc()
    loadgen.ensure_built()
    netns.remove_stale()
    with netns.netns_pair() as p:
        p.client.run("ip", "addr", "add", f"{EXTRA_CLIENT_IP4}/24", "dev", "veth0")
        p.server.run("iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(DROPPED_PORT), "-j", "DROP")
        # Counts SYNs per source address, for the --bind round-robin test.
        for src in (p.client_ip4, EXTRA_CLIENT_IP4):
            p.server.run("iptables", "-A", "INPUT", "-s", src, "-p", "tcp", "--syn", "--dport", "80")
        yield p


@pytest.fixture(scope="module")
def server(pair: netns.NetnsPair) -> Iterator[None]:
    proc = loadgen.serve(_prefix(pair.server), [*OPEN_PORTS, DROPPED_PORT])
    try:
        # Warm up both families: in a fresh namespace the first IPv6 neighbour solicitation can
        # go unanswered (the veth is still coming up), which costs one 1 s SYN retransmission.
        with pair.client.entered():
            for host in (pair.server_ip4, pair.server_ip6):
                socket.create_connection((host, OPEN_PORTS[0]), timeout=5).close()
        yield
    finally:
        report = loadgen.stop_server(proc)
    assert report["accepted"] > 1000


def _syn_count(pair: netns.NetnsPair, src: str) -> int:
    out = pair.server.run("iptables", "-nvxL", "INPUT").stdout
    for line in out.splitlines():
        fields = line.split()  # pkts bytes [target] prot opt in out source destination ...
        if src in fields and "dpt:80" in line and "flags:" in line:
            return int(fields[0])
    raise AssertionError(f"no counting rule for {src} in:\n{out}")


def test_connections_between_namespaces(pair: netns.NetnsPair, server: None) -> None:
    targets = [(pair.server_ip4, port) for port in OPEN_PORTS]
    r = loadgen.connect(_prefix(pair.client), targets, duration=2, concurrency=64)
    assert r["connections"] > 1000, r
    assert r["failures"] == 0 and r["timeouts"] == 0, r
    assert 1.9 < r["seconds"] < 3
    assert r["conn_per_s"] == pytest.approx(r["connections"] / r["seconds"], rel=0.01)
    lat = r["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], r


def test_ipv6_and_threads(pair: netns.NetnsPair, server: None) -> None:
    targets = [(pair.server_ip6, OPEN_PORTS[0]), (pair.server_ip4, OPEN_PORTS[1])]
    r = loadgen.connect(_prefix(pair.client), targets, duration=1, concurrency=32, threads=2)
    assert r["threads"] == 2 and r["pairs"] == 2
    assert r["connections"] > 1000 and r["failures"] == 0 and r["timeouts"] == 0, r


def test_round_robin_over_source_addresses(pair: netns.NetnsPair, server: None) -> None:
    before = {src: _syn_count(pair, src) for src in (pair.client_ip4, EXTRA_CLIENT_IP4)}
    r = loadgen.connect(_prefix(pair.client), [(pair.server_ip4, 80)], duration=1, concurrency=16, binds=[pair.client_ip4, EXTRA_CLIENT_IP4])
    assert r["connections"] > 1000 and r["failures"] == 0, r
    sent = {src: _syn_count(pair, src) - n for src, n in before.items()}
    # Attempts alternate between the sources. A few SYNs are sent twice: a reused port can meet
    # the server's previous socket for that 4-tuple, which answers with an ACK; the client RSTs it
    # and Linux retransmits the SYN within milliseconds (about 1 in 10,000 here).
    assert r["attempts"] <= sum(sent.values()) <= r["attempts"] * 1.01, (sent, r)
    assert abs(sent[pair.client_ip4] - sent[EXTRA_CLIENT_IP4]) <= 16 + r["attempts"] * 0.01, sent


def test_closed_port_counts_failures(pair: netns.NetnsPair, server: None) -> None:
    r = loadgen.connect(_prefix(pair.client), [(pair.server_ip4, CLOSED_PORT)], duration=0.5, concurrency=8)
    assert r["connections"] == 0 and r["timeouts"] == 0, r
    assert r["failures"] > 0 and r["failure_kinds"]["refused"] == r["failures"], r


def test_dropped_port_counts_timeouts(pair: netns.NetnsPair, server: None) -> None:
    r = loadgen.connect(_prefix(pair.client), [(pair.server_ip4, DROPPED_PORT)], duration=1.5, concurrency=8, timeout=0.5)
    assert r["connections"] == 0 and r["failures"] == 0, r
    # Each slot times out at 0.5 s and 1.0 s (the attempt started at 1.0 s is abandoned at 1.5 s).
    assert r["timeouts"] >= 8, r
    assert r["abandoned"] == 8, r


def test_bad_arguments_raise_with_stderr(pair: netns.NetnsPair) -> None:
    with pytest.raises(loadgen.LoadgenError, match="bad target"):
        loadgen.connect(_prefix(pair.client), ["10.213.0.2"], duration=0.1, concurrency=1)
    with pytest.raises(loadgen.LoadgenError, match="same family"):
        loadgen.connect(_prefix(pair.client), [(pair.server_ip4, 80)], duration=0.1, concurrency=1, binds=[pair.client_ip6])
