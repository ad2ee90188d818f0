"""The ruleset against the real kernel, each test in fresh network namespaces.

Topology (three namespaces; the agent's ruleset lives in "node"):

    pod (10.99.1.2, fd99:1::2) --veth-- node (.1 / ::1, forwarding) --veth-- peer (10.99.2.2, fd99:2::2)

No NFQUEUE listener is bound, so a diverted packet is dropped when fail-closed and accepted
(bypass) when fail-open: that makes the diversion observable without the userspace side.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import netns  # tests/kernel/netns.py: namespace helpers shared by the kernel tests
import pytest

from kube_network_policies.dataplane.nfqueue import ACCEPT, ACCEPT_JUDGED, NfQueue
from kube_network_policies.dataplane.nftables import TABLE, Backend, RulesetConfig, base_chains
from kube_network_policies.dataplane.packet import parse_packet
from kube_network_policies.dataplane.ruleset import CommandError, Ruleset, detect_backend
from kube_network_policies.engine.flow import Flow

pytestmark = pytest.mark.kernel


@pytest.fixture(autouse=True)
def _kernel_required() -> None:
    # Skips when not root or a tool is missing, except under CI=true where it fails.
    netns.require_kernel("ip", "nft", "iptables", "ip6tables", "setpriv")


# Python for clients and servers. An unprivileged client cannot run an interpreter under /root.
PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
PORT = 8080
NOBODY = 65534

SERVER = r"""
import socket, sys, threading
def echo(c):
    with c:
        while data := c.recv(4096):
            c.sendall(data)
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(128)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""

# Connects, echoes once; with "hold", then waits for a line on stdin and echoes again.
CLIENT = r"""
import socket, sys
addr, port, timeout, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "hold"
try:
    with socket.create_connection((addr, port), timeout=timeout) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        if hold:
            print("connected", flush=True)
            sys.stdin.readline()
            c.sendall(b"pong")
            assert c.recv(4) == b"pong"
except (OSError, AssertionError) as e:
    print(e, file=sys.stderr)
    sys.exit(1)
"""


def sh(*argv: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass
class Topology:
    node: str
    pod: str
    peer: str
    servers: list[subprocess.Popen[str]] = field(default_factory=list)

    def nft(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.node, "nft", *args, stdin=stdin, check=check)

    def connect(self, ns: str, addr: str, uid: int | None = None, timeout: float = 0.6) -> bool:
        """Whether a new TCP connection from namespace ns to addr:PORT gets through."""
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
        argv = ["ip", "netns", "exec", ns, *as_user, PY, "-c", CLIENT, addr, str(PORT), str(timeout), "once"]
        return sh(*argv, check=False).returncode == 0

    def stop_servers(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()

    def hold(self, ns: str, addr: str) -> subprocess.Popen[str]:
        """An established connection, kept open until a line is written to its stdin."""
        argv = ["ip", "netns", "exec", ns, PY, "-c", CLIENT, addr, str(PORT), "2", "hold"]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
        return proc


@pytest.fixture
def topo() -> Iterator[Topology]:
    with contextlib.ExitStack() as stack:
        node, pod, peer = (stack.enter_context(netns.netns(role)) for role in ("node", "pod", "peer"))
        t = Topology(node=node.name, pod=pod.name, peer=peer.name)
        stack.callback(t.stop_servers)
        for ns in (t.node, t.pod, t.peer):
            # No duplicate address detection, also for link-local addresses: a tentative
            # address delays the first neighbour discovery (and so the first IPv6 SYN) ~1-2 s.
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        for i, (ns, dev) in enumerate(((t.pod, "pod0"), (t.peer, "peer0")), start=1):
            sh("ip", "-n", t.node, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", t.node, "addr", "add", f"10.99.{i}.1/24", "dev", dev)
            sh("ip", "-n", t.node, "addr", "add", f"fd99:{i}::1/64", "dev", dev, "nodad")
            sh("ip", "-n", t.node, "link", "set", dev, "up")
            sh("ip", "-n", ns, "addr", "add", f"10.99.{i}.2/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"fd99:{i}::2/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"10.99.{i}.1")
            sh("ip", "-n", ns, "-6", "route", "add", "default", "via", f"fd99:{i}::1")
        sh("ip", "netns", "exec", t.node, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # Until a veth is marked up, its qdisc drops what it sends: the first neighbour
        # advertisement gets lost and the first connection waits for a 1 s retransmit.
        for ns, dev in ((t.node, "pod0"), (t.node, "peer0"), (t.pod, "eth0"), (t.peer, "eth0")):
            wait_link_up(ns, dev)
        for ns in (t.node, t.pod, t.peer):
            proc = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", SERVER, str(PORT)], stdout=subprocess.PIPE, text=True)
            t.servers.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield t


def wait_link_up(ns: str, dev: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", dev).stdout)[0].get("operstate") != "UP":
        if time.monotonic() > deadline:
            raise AssertionError(f"{ns}/{dev} not up after {timeout} s")
        time.sleep(0.02)


def read_table(t: Topology) -> dict[str, Any]:
    """Our table read back with ``nft -j``: handles, set elements, chains, rules per chain."""
    items = json.loads(t.nft("-j", "list", "table", "inet", TABLE).stdout)["nftables"]
    out: dict[str, Any] = {"sets": {}, "chains": {}, "rules": {}}
    for item in items:
        if "table" in item:
            out["handle"] = item["table"]["handle"]
        elif "set" in item:
            s = item["set"]
            out["sets"][s["name"]] = {e if isinstance(e, str) else json.dumps(e) for e in s.get("elem", [])}
        elif "chain" in item:
            c = item["chain"]
            out["chains"][c["name"]] = (c.get("hook"), c.get("prio"), c["handle"])
        elif "rule" in item:
            out["rules"].setdefault(item["rule"]["chain"], []).append(item["rule"])
    return out


def table_exists(t: Topology) -> bool:
    return t.nft("list", "table", "inet", TABLE, check=False).returncode == 0


def our_xt_rules(t: Topology) -> list[str]:
    rules = []
    for binary in ("iptables", "ip6tables"):
        out = sh("ip", "netns", "exec", t.node, binary, "-t", "mangle", "-S").stdout
        rules += [f"{binary} {ln}" for ln in out.splitlines() if TABLE in ln]
    return rules


def kernel_has_nft_queue() -> bool:
    """Ground truth, independent of detect_backend: COMMIT a queue rule in a throwaway netns."""
    with netns.netns("probe") as ns:
        script = "add table inet t\nadd chain inet t c\nadd rule inet t c queue num 0\n"
        return sh("ip", "netns", "exec", ns.name, "nft", "-f", "-", stdin=script, check=False).returncode == 0


@pytest.fixture(scope="module")
def backend() -> Backend:
    netns.require_kernel("ip", "nft")  # module scope runs before the autouse check
    return Backend.NFT_QUEUE if kernel_has_nft_queue() else Backend.XT_NFQUEUE


# --- detection ------------------------------------------------------------------------------


def test_detect_backend_agrees_with_the_kernel(topo: Topology, backend: Backend) -> None:
    detected = detect_backend(netns=topo.node)
    assert detected is backend
    assert detect_backend() is backend  # in the host namespace too: check mode commits nothing
    print(f"\ndetected backend: {detected.value}")
    assert not table_exists(topo)
    assert "probe" not in sh("nft", "list", "tables").stdout


def test_this_machine_lacks_nft_queue() -> None:
    # NOTES.md: the test VMs run a kernel without CONFIG_NFT_QUEUE; detection must say so.
    if kernel_has_nft_queue():
        pytest.skip("this kernel has nft_queue: not the machine NOTES.md describes")
    assert detect_backend() is Backend.XT_NFQUEUE


# --- sync -----------------------------------------------------------------------------------


@pytest.mark.parametrize("accept_cache", [True, False], ids=["cache", "no-cache"])
def test_sync_resync_in_place(topo: Topology, backend: Backend, accept_cache: bool) -> None:
    config = RulesetConfig(backend=backend, accept_cache=accept_cache)
    cache: dict[str, set[str]] = {"accepted-v4": set(), "accepted-v6": set()} if accept_cache else {}
    rs = Ruleset(config, netns=topo.node)
    rs.sync(["10.99.1.2", "10.99.1.3"], ["fd99:1::2"])
    first = read_table(topo)
    assert first["sets"] == {"podips-v4": {"10.99.1.2", "10.99.1.3"}, "podips-v6": {"fd99:1::2"}, **cache}
    assert {name: (hook, prio) for name, (hook, prio, _) in first["chains"].items()} == {c.name: (c.hook, c.priority) for c in base_chains(config)}
    rules_before = {name: len(rules) for name, rules in first["rules"].items()}
    extra = 2 if accept_cache else 0  # the two cache lookups
    assert rules_before["postrouting"] == 8 + extra and rules_before["input"] == 5 + extra

    rs.sync(["10.99.1.4"], ["fd99:1::4", "fd99:1::5"])
    second = read_table(topo)
    assert second["sets"] == {"podips-v4": {"10.99.1.4"}, "podips-v6": {"fd99:1::4", "fd99:1::5"}, **cache}
    # Same table and base chains (same handles): nothing was deleted and re-created, so no
    # hook was unregistered, so no queued packet was dropped.
    assert second["handle"] == first["handle"]
    assert second["chains"] == first["chains"]
    assert {name: len(rules) for name, rules in second["rules"].items()} == rules_before

    rs.sync([], [])
    assert read_table(topo)["sets"] == {"podips-v4": set(), "podips-v6": set(), **cache}
    if backend is Backend.XT_NFQUEUE:
        assert len(our_xt_rules(topo)) == 4


def test_restart_does_not_duplicate_iptables_rules(topo: Topology, backend: Backend) -> None:
    config = RulesetConfig(backend=backend, fail_open=True)
    for _ in range(3):
        rs = Ruleset(config, netns=topo.node)
        rs.sync(["10.99.1.2"], [])
        rs.sync(["10.99.1.2"], [])
        rs.shutdown(keep=True)  # fail-open: kept
    expected = 4 if backend is Backend.XT_NFQUEUE else 0
    assert len(our_xt_rules(topo)) == expected
    assert read_table(topo)["sets"]["podips-v4"] == {"10.99.1.2"}


def test_xt_rules_follow_config_changes(topo: Topology) -> None:
    Ruleset(RulesetConfig(backend=Backend.XT_NFQUEUE), netns=topo.node).sync([], [])
    new = RulesetConfig(backend=Backend.XT_NFQUEUE, queue_id=200, queue_count=2, fail_open=True)
    Ruleset(new, netns=topo.node).sync([], [])
    rules = our_xt_rules(topo)
    assert len(rules) == 4
    assert all("--queue-balance 200:201" in r and "--queue-bypass" in r for r in rules), rules


def test_stale_chain_from_other_layout_is_replaced(topo: Topology) -> None:
    # A previous agent left a postrouting chain at another priority (e.g. nft-queue layout,
    # kept by a fail-open shutdown): `add chain` alone would fail, the first sync replaces it.
    t = f"inet {TABLE}"
    topo.nft(
        "-f",
        "-",
        stdin=f"add table {t}\nadd chain {t} postrouting {{ type filter hook postrouting priority 95; }}\n"
        f"add chain {t} leftover {{ type filter hook forward priority 0; }}\nadd rule {t} leftover counter\n",
    )
    config = RulesetConfig(backend=Backend.XT_NFQUEUE)
    Ruleset(config, netns=topo.node).sync(["10.99.1.2"], [])
    chains = read_table(topo)["chains"]
    assert {name: (hook, prio) for name, (hook, prio, _) in chains.items()} == {c.name: (c.hook, c.priority) for c in base_chains(config)}


def test_nft_error_is_a_clear_exception(topo: Topology) -> None:
    # Someone else created our set with another type: nft refuses, the old state stays.
    topo.nft("-f", "-", stdin=f"add table inet {TABLE}\nadd set inet {TABLE} podips-v4 {{ type ipv6_addr; }}\n")
    rs = Ruleset(RulesetConfig(backend=Backend.XT_NFQUEUE), netns=topo.node)
    with pytest.raises(CommandError) as info:
        rs.sync(["10.99.1.2"], [])
    msg = str(info.value)
    assert msg.startswith(f"`ip netns exec {topo.node} nft -f -` failed (exit 1): ")
    assert "Error:" in msg
    assert "chain" not in read_table(topo)["chains"]  # atomic: nothing of the failed sync applied


def test_nft_queue_on_a_kernel_without_it_fails_clearly(topo: Topology, backend: Backend) -> None:
    if backend is Backend.NFT_QUEUE:
        pytest.skip("this kernel has nft_queue")
    rs = Ruleset(RulesetConfig(backend=Backend.NFT_QUEUE), netns=topo.node)
    with pytest.raises(CommandError, match="No such file or directory"):
        rs.sync(["10.99.1.2"], [])
    assert not table_exists(topo)


# --- traffic --------------------------------------------------------------------------------


def test_fail_closed_without_listener_drops_new_connections_of_selected_pods(topo: Topology, backend: Backend) -> None:
    rs = Ruleset(RulesetConfig(backend=backend), netns=topo.node)
    rs.sync([], [])
    # Nobody selected: nothing diverted, every path works (so failures below are the rules).
    assert topo.connect(topo.peer, "10.99.1.2") and topo.connect(topo.peer, "fd99:1::2")
    assert topo.connect(topo.pod, "10.99.2.2") and topo.connect(topo.pod, "10.99.1.1")
    assert topo.connect(topo.node, "10.99.1.2", uid=NOBODY)

    held = topo.hold(topo.peer, "10.99.1.2")  # established before the pod becomes selected
    rs.sync(["10.99.1.2"], ["fd99:1::2"])
    try:
        assert not topo.connect(topo.peer, "10.99.1.2"), "ingress (forwarded, postrouting daddr)"
        assert not topo.connect(topo.peer, "fd99:1::2"), "IPv6 ingress"
        assert not topo.connect(topo.pod, "10.99.2.2"), "egress (forwarded, postrouting saddr)"
        assert not topo.connect(topo.pod, "10.99.1.1"), "pod to its own node (input chain)"
        assert not topo.connect(topo.node, "10.99.1.2", uid=NOBODY), "unprivileged node process"
        assert topo.connect(topo.node, "10.99.1.2"), "root on the node (kubelet probes): meta skuid 0"
        assert topo.connect(topo.peer, "10.99.1.1"), "traffic not involving a selected pod"
        assert topo.connect(topo.node, "127.0.0.1", uid=NOBODY), "loopback"
        # Only new connections are diverted: the established one keeps working.
        assert held.stdin is not None
        held.stdin.write("go\n")
        held.stdin.flush()
        assert held.wait(timeout=5) == 0
    finally:
        held.kill()
    rs.sync([], [])
    assert topo.connect(topo.peer, "10.99.1.2")


def test_fail_open_without_listener_accepts(topo: Topology, backend: Backend) -> None:
    rs = Ruleset(RulesetConfig(backend=backend, fail_open=True), netns=topo.node)
    rs.sync(["10.99.1.2"], ["fd99:1::2"])
    assert topo.connect(topo.peer, "10.99.1.2")
    assert topo.connect(topo.peer, "fd99:1::2")
    assert topo.connect(topo.pod, "10.99.1.1")
    assert topo.connect(topo.node, "10.99.1.2", uid=NOBODY)


def test_xt_mark_is_visible_to_iptables_only(topo: Topology) -> None:
    # Observer chains: one between our marking chain (-155) and iptables mangle (-150), one
    # after our clearing chain (-145). Fail-open so the diverted SYN continues (bypass).
    mark = 0x2000
    cond = f"meta mark & {mark:#x} == {mark:#x}"
    topo.nft("-f", "-", stdin=(
        "add table inet observe\n"
        "add chain inet observe mid { type filter hook postrouting priority -152; }\n"
        "add chain inet observe late { type filter hook postrouting priority 0; }\n"
        f"add rule inet observe mid {cond} counter\n"
        f"add rule inet observe late {cond} counter\n"
    ))  # fmt: skip
    rs = Ruleset(RulesetConfig(backend=Backend.XT_NFQUEUE, fail_open=True, mark=mark), netns=topo.node)
    rs.sync(["10.99.1.2"], [])
    assert topo.connect(topo.peer, "10.99.1.2")
    counters = {}
    for item in json.loads(topo.nft("-j", "list", "table", "inet", "observe").stdout)["nftables"]:
        if "rule" in item:
            counters[item["rule"]["chain"]] = next(e["counter"]["packets"] for e in item["rule"]["expr"] if "counter" in e)
    assert counters["mid"] >= 1, "the SYN was marked for iptables"
    assert counters["late"] == 0, "the mark bit was cleared after the mangle hook"
    pkts = sh("ip", "netns", "exec", topo.node, "iptables", "-t", "mangle", "-L", "POSTROUTING", "-v", "-x", "-n").stdout
    assert any("NFQUEUE" in ln and int(ln.split()[0]) >= 1 for ln in pkts.splitlines()), pkts


def cached(t: Topology) -> set[tuple[str, str, str, int]]:
    """The accept cache's tuples (both families)."""
    sets = read_table(t)["sets"]
    return {tuple(json.loads(e)["elem"]["val"]["concat"]) for e in sets["accepted-v4"] | sets["accepted-v6"]}


def test_accept_cache_holds_only_what_the_engine_judged(topo: Topology, backend: Backend) -> None:
    """Only packets whose verdict carries the judged bit are remembered. Without a listener,
    fail-closed drops diverted packets and fail-open bypasses the queue: no verdict, nothing
    remembered (before the judged bit, bypassed tuples were). With a consumer, an accept marked
    judged is remembered, a plain accept is not. flush_cache() and every sync empty the sets."""
    closed = Ruleset(RulesetConfig(backend=backend), netns=topo.node)
    closed.sync(["10.99.1.2"], ["fd99:1::2"])
    assert not topo.connect(topo.peer, "10.99.1.2") and not topo.connect(topo.peer, "fd99:1::2")
    assert cached(topo) == set()
    config = RulesetConfig(backend=backend, fail_open=True)
    opened = Ruleset(config, netns=topo.node)
    opened.sync(["10.99.1.2"], ["fd99:1::2"])
    assert topo.connect(topo.peer, "10.99.1.2") and topo.connect(topo.peer, "fd99:1::2")
    assert topo.connect(topo.pod, "10.99.1.1")  # pod to its node: the input chain
    assert cached(topo) == set(), "accepted by the kernel without a verdict (bypass)"

    def judge_ipv4_only(payload: memoryview) -> int:
        flow = parse_packet(payload)
        return ACCEPT_JUDGED if isinstance(flow, Flow) and len(flow.src_ip) == 4 else ACCEPT

    with netns.Netns(topo.node).entered():
        queue = NfQueue(config.queue_id, fail_open=True, judged_mark=config.judged_mark)
    stop = threading.Event()
    consumer = threading.Thread(target=queue.run, args=(judge_ipv4_only, stop, 0.05), daemon=True)
    consumer.start()
    try:
        assert topo.connect(topo.peer, "10.99.1.2") and topo.connect(topo.peer, "fd99:1::2")
        assert topo.connect(topo.pod, "10.99.1.1")
        assert cached(topo) == {("10.99.2.2", "10.99.1.2", "tcp", PORT), ("10.99.1.2", "10.99.1.1", "tcp", PORT)}
        opened.flush_cache()
        assert cached(topo) == set()
        assert topo.connect(topo.peer, "10.99.1.2")
        assert len(cached(topo)) == 1
        opened.sync(["10.99.1.2"], ["fd99:1::2"])
        assert cached(topo) == set()
    finally:
        stop.set()
        consumer.join(5)
        queue.close()
    assert queue.counters.accepted >= 4 and queue.counters.verdict_errors == 0


# --- shutdown -------------------------------------------------------------------------------


def test_shutdown_fail_open_keeps_rules_and_traffic_flows(topo: Topology, backend: Backend) -> None:
    rs = Ruleset(RulesetConfig(backend=backend, fail_open=True), netns=topo.node)
    rs.sync(["10.99.1.2"], [])
    before = read_table(topo)
    rs.shutdown(keep=True)
    after = read_table(topo)
    assert after["handle"] == before["handle"] and after["sets"]["podips-v4"] == {"10.99.1.2"}
    if backend is Backend.XT_NFQUEUE:
        assert len(our_xt_rules(topo)) == 4
    assert topo.connect(topo.peer, "10.99.1.2")  # bypass: no agent, traffic flows
    rs.sync(["10.99.1.3"], [])  # ignored after shutdown
    assert read_table(topo)["sets"]["podips-v4"] == {"10.99.1.2"}


def test_shutdown_without_keep_removes_rules(topo: Topology, backend: Backend) -> None:
    rs = Ruleset(RulesetConfig(backend=backend), netns=topo.node)
    rs.sync(["10.99.1.2"], [])
    assert not topo.connect(topo.peer, "10.99.1.2")
    rs.shutdown(keep=False)
    assert not table_exists(topo)
    assert our_xt_rules(topo) == []
    assert topo.connect(topo.peer, "10.99.1.2")  # not blackholed while no agent runs
    rs.sync(["10.99.1.2"], [])  # a late sync must not bring the rules back
    assert not table_exists(topo)
    Ruleset(RulesetConfig(backend=backend), netns=topo.node).remove()  # idempotent when absent


def test_sync_100k_elements(topo: Topology, backend: Backend) -> None:
    v4 = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(100_000)]
    rs = Ruleset(RulesetConfig(backend=backend), netns=topo.node)
    t0 = time.perf_counter()
    rs.sync(v4, [])
    elapsed = time.perf_counter() - t0
    print(f"\nsync of 100k IPv4 elements: {elapsed * 1e3:.0f} ms")
    assert len(read_table(topo)["sets"]["podips-v4"]) == 100_000
