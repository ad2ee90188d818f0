"""The lab's cluster in a box against the real kernel: namespaces as nodes, pods and external
hosts (lab/topology.py), and in-process servers and parallel probes (lab/probe.py).

Cluster under test:

    node-1 172.18.0.2 fc00:f853:ccd:e793::2      node-2 172.18.0.3 fc00:f853:ccd:e793::3
      x/a 10.244.1.10 fd00:10:244:1::a             x/b 10.244.2.10 fd00:10:244:2::a
      y/c 10.244.1.11 (IPv4 only)                  y/h hostNetwork
    externals: 203.0.113.5, 2001:db8::5 (one per family, so both families reach an outside host)
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import netns  # tests/kernel/netns.py: require_kernel skips, or fails under CI=true
import pytest

from kube_network_policies.lab.probe import (
    ProbeError,
    Prober,
    ProbeRequest,
    crc32c,
    parse_sctp_init,
    sctp_init_packet,
)
from kube_network_policies.lab.topology import (
    IpCommandError,
    Topology,
    TopologyError,
    run_batches,
)

NODES = [
    ("node-1", ["172.18.0.2", "fc00:f853:ccd:e793::2"]),
    ("node-2", ["172.18.0.3", "fc00:f853:ccd:e793::3"]),
]
PODS = [
    ("x/a", "node-1", ["10.244.1.10", "fd00:10:244:1::a"], False),
    ("x/b", "node-2", ["10.244.2.10", "fd00:10:244:2::a"], False),
    ("y/c", "node-1", ["10.244.1.11"], False),
    ("y/h", "node-2", [], True),
]
EXTERNAL = ["203.0.113.5", "2001:db8::5"]
PROTOCOLS = ("TCP", "UDP", "SCTP")
PORT = 80


def _ours(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(netns.NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _endpoints(topo: Topology) -> list[str]:
    return [key for key, *_ in PODS] + [name for name, _ in NODES] + EXTERNAL


def _all_probes(topo: Topology) -> list[ProbeRequest]:
    """Every endpoint to every other endpoint, in each family both have, over every protocol.
    Duplicates (a hostNetwork pod is its node) and self-probes are left out."""
    seen: set[tuple[str, str, str]] = set()
    out: list[ProbeRequest] = []
    for client in _endpoints(topo):
        for server in _endpoints(topo):
            cns = topo.netns_of(client)
            for cip in topo.ips_of(client):
                for sip in topo.ips_of(server):
                    if ipaddress.ip_address(cip).version != ipaddress.ip_address(sip).version or cip == sip:
                        continue
                    if (cns, cip, sip) in seen:
                        continue
                    seen.add((cns, cip, sip))
                    out.extend((cns, cip, sip, proto, PORT) for proto in PROTOCOLS)
    return out


def _failures(probes: list[ProbeRequest], got: list[bool], want: list[bool]) -> list[str]:
    return [f"{p[1]} -> {p[2]} {p[3]}/{p[4]} (from {p[0]}): got {g}, want {w}" for p, g, w in zip(probes, got, want, strict=True) if g != w]


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[Topology, Prober]]:
    netns.require_kernel("ip", "iptables")
    Topology.cleanup_stale()
    started = time.monotonic()
    with Topology.build(NODES, PODS, EXTERNAL) as topo:
        print(f"\nbuild: {topo.build_seconds * 1000:.1f} ms for {len(topo.namespaces)} namespaces")
        with Prober(topo) as prober:
            for endpoint in _endpoints(topo):
                prober.serve(topo.netns_of(endpoint), {(proto, PORT) for proto in PROTOCOLS})
            yield topo, prober
        prefix = topo.prefix
    assert _ours(prefix) == [], "teardown left namespaces behind"
    print(f"lab total: {time.monotonic() - started:.2f} s")


# --- pure functions (no kernel needed) --------------------------------------------------------


def test_crc32c_known_vectors() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_sctp_init_packet_round_trip() -> None:
    packet = sctp_init_packet(40000, 80, 0xDEADBEEF)
    assert len(packet) == 32
    assert parse_sctp_init(packet) == (40000, 80, 0xDEADBEEF)
    corrupted = packet[:-1] + bytes([packet[-1] ^ 1])
    assert parse_sctp_init(corrupted) is None  # the checksum covers the chunk


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(TopologyError, match="unknown node"):
        Topology.build(NODES, [("x/a", "node-9", ["10.0.0.1"], False)])
    with pytest.raises(TopologyError, match="used by node node-1 and pod x/a"):
        Topology.build(NODES, [("x/a", "node-1", ["172.18.0.2"], False)])
    with pytest.raises(TopologyError, match="invalid IP"):
        Topology.build([("node-1", ["nope"])], [])


# --- the kernel -----------------------------------------------------------------------------


@pytest.mark.kernel
def test_endpoints_resolve(lab: tuple[Topology, Prober]) -> None:
    topo, _ = lab
    assert topo.netns_of("y/h") == topo.node_netns("node-2")  # hostNetwork: the node's namespace
    assert topo.netns_of("node-1") == topo.node_netns("node-1")
    assert topo.netns_of("172.18.0.3") == topo.node_netns("node-2")
    assert topo.netns_of("fd00:10:244:1::a") == topo.netns_of("x/a")
    assert topo.netns_of("203.0.113.5") not in (topo.netns_of("x/a"), topo.node_netns("node-1"))
    assert topo.ips_of("y/h") == ("172.18.0.3", "fc00:f853:ccd:e793::3")
    with pytest.raises(TopologyError, match="unknown endpoint"):
        topo.netns_of("z/nope")
    assert all(n.startswith(topo.prefix) for n in topo.namespaces)
    assert sorted(topo.namespaces) == _ours(topo.prefix)


@pytest.mark.kernel
def test_everything_reaches_everything(lab: tuple[Topology, Prober]) -> None:
    topo, prober = lab
    probes = _all_probes(topo)
    assert sum(1 for p in probes if ":" in p[2]) >= 60, "IPv6 must be covered"
    started = time.monotonic()
    results = prober.run(probes)
    print(f"\n{len(probes)} probes in {(time.monotonic() - started) * 1000:.1f} ms")
    bad = [f"{p[1]} -> {p[2]} {p[3]}: {r.detail}" for p, r in zip(probes, results, strict=True) if not r.ok]
    assert bad == [], "\n".join(bad)


@pytest.mark.kernel
def test_drop_rule_fails_exactly_the_dropped_probes(lab: tuple[Topology, Prober]) -> None:
    topo, prober = lab
    node = topo.node_netns("node-1")
    target = "10.244.1.10"  # x/a on node-1
    rules = [["-d", target, "-p", proto, "--dport", str(PORT), "-j", "DROP"] for proto in ("tcp", "sctp")]
    probes = _all_probes(topo)
    # FORWARD sees what node-1 routes to x/a; node-1's own traffic goes through OUTPUT instead.
    want = [not (p[2] == target and p[3] in ("TCP", "SCTP") and p[0] != node) for p in probes]
    assert want.count(False) >= 8
    for rule in rules:
        topo.run(node, "iptables", "-A", "FORWARD", *rule)
    try:
        got = prober.probe(probes)
    finally:
        for rule in rules:
            topo.run(node, "iptables", "-D", "FORWARD", *rule)
    assert _failures(probes, got, want) == []
    # Rules gone: the same (fresh) probes get through again.
    again = [p for p, w in zip(probes, want, strict=True) if not w]
    assert prober.probe(again) == [True] * len(again)


@pytest.mark.kernel
def test_unserved_port_fails_fast_or_times_out(lab: tuple[Topology, Prober]) -> None:
    topo, prober = lab
    a, b = topo.netns_of("x/a"), "10.244.2.10"
    results = prober.run([(a, "10.244.1.10", b, proto, 81) for proto in PROTOCOLS], timeout=0.3)
    assert [r.ok for r in results] == [False, False, False]
    assert [r.detail for r in results] == ["refused", "refused", "timeout"]  # RST, ICMP, nothing


@pytest.mark.kernel
def test_each_probe_uses_a_new_source_port(lab: tuple[Topology, Prober]) -> None:
    topo, prober = lab
    node2 = topo.node_netns("node-2")
    client = topo.netns_of("x/a")
    probes: list[ProbeRequest] = [(client, "10.244.1.10", "10.244.2.10", proto, PORT) for proto in ("TCP", "UDP") for _ in range(20)]
    topo.run(node2, "iptables", "-A", "FORWARD", "-d", "10.244.2.10", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT")
    try:
        assert prober.probe(probes) == [True] * len(probes)
        entries = topo.run(node2, "conntrack", "-L", "-d", "10.244.2.10", check=False).stdout
    finally:
        topo.run(node2, "iptables", "-D", "FORWARD", "-d", "10.244.2.10", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT")
    if not entries:
        pytest.skip("conntrack tool not available to count entries")
    sports = [w.split("=", 1)[1] for line in entries.splitlines() if "src=10.244.1.10" in line for w in line.split() if w.startswith("sport=")][::2]
    assert len(sports) >= len(probes)
    assert len(set(sports)) == len(sports), "a source port was reused"


@pytest.mark.kernel
def test_bad_probe_is_a_clear_error(lab: tuple[Topology, Prober]) -> None:
    topo, prober = lab
    with pytest.raises(ProbeError, match="not an address of netns"):
        prober.probe([(topo.netns_of("x/a"), "10.244.2.10", "10.244.1.11", "TCP", PORT)])
    with pytest.raises(ProbeError, match="unsupported protocol"):
        prober.probe([(topo.netns_of("x/a"), "10.244.1.10", "10.244.1.11", "ICMP", PORT)])
    with pytest.raises(IpCommandError, match=r"route add 10\.0\.0\.0/8 via 192\.0\.2\.1.*: .+"):
        run_batches([(topo.netns_of("x/a"), ["link set lo up", "route add 10.0.0.0/8 via 192.0.2.1"])])


@pytest.mark.kernel
def test_close_kills_processes_and_removes_everything() -> None:
    netns.require_kernel("ip")
    topo = Topology.build(NODES[:1], [("x/a", "node-1", ["10.244.1.10"], False)], ["203.0.113.5"])
    names = topo.namespaces
    assert _ours(topo.prefix) == sorted(names)
    sleeper = subprocess.Popen(["ip", "netns", "exec", topo.netns_of("x/a"), "sleep", "600"])
    time.sleep(0.1)
    topo.close()
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert _ours(topo.prefix) == []
    topo.close()  # idempotent


@pytest.mark.kernel
def test_exception_inside_with_still_cleans_up() -> None:
    netns.require_kernel("ip")
    prefix = ""
    with pytest.raises(KeyboardInterrupt):
        with Topology.build(NODES[:1], [("x/a", "node-1", ["10.244.1.10"], False)]) as topo:
            prefix = topo.prefix
            Prober(topo).serve(topo.netns_of("x/a"), {("TCP", PORT)})
            raise KeyboardInterrupt  # as Ctrl-C would
    assert prefix and _ours(prefix) == []


CHILD = textwrap.dedent(
    """
    import sys, time
    from kube_network_policies.lab.topology import Topology, exit_on_sigterm
    exit_on_sigterm()
    with Topology.build([("node-1", ["172.18.0.2"])], [("x/a", "node-1", ["10.244.1.10"], False)]) as topo:
        print(topo.prefix, flush=True)
        time.sleep(60)
    """
)


def _child() -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    prefix = proc.stdout.readline().strip()
    assert prefix.startswith(f"knp{proc.pid}-"), prefix
    return proc, prefix


@pytest.mark.kernel
def test_sigterm_cleans_up() -> None:
    netns.require_kernel("ip")
    proc, prefix = _child()
    assert _ours(prefix)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert _ours(prefix) == []


@pytest.mark.kernel
def test_cleanup_stale_removes_namespaces_of_dead_runs_only() -> None:
    netns.require_kernel("ip")
    proc, dead_prefix = _child()
    proc.kill()  # SIGKILL: no teardown runs, the namespaces stay
    proc.wait(timeout=10)
    left = _ours(dead_prefix)
    assert left, "a SIGKILLed run leaves its namespaces"
    with Topology.build(NODES[:1], []) as live:  # a live run's namespaces must survive
        removed = Topology.cleanup_stale()
        assert set(left) <= set(removed)
        assert _ours(dead_prefix) == []
        assert _ours(live.prefix) == sorted(live.namespaces)
        assert not any(n.startswith(live.prefix) for n in removed)
