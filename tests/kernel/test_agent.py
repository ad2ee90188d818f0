"""The agent end to end: `python -m kube_network_policies run` as a subprocess in a node namespace
of a lab topology, real TCP probes between pod namespaces, its HTTP endpoints, its shutdown modes.

    pod t/a (10.244.1.2, fd00:10:244:1::2) ─┐
                                            node-1 (172.18.0.2, fc00:f853:ccd:e793::2): the agent
    pod t/b (10.244.1.3, fd00:10:244:1::3) ─┘

B serves TCP 80 and 81, A serves TCP 80. "deny-b" (default deny ingress of B) is always in force;
"allow-a" lets A reach B on port 80 only. Denied probes wait PROBE_TIMEOUT (a dropped SYN is
retransmitted only after 1 s, so a shorter wait still only sees the first SYN's fate).

Each test starts its own agent (start-up takes ~0.3 s) and leaves no rule behind: the fixture
kills any agent still running and removes the ruleset, and the module's topology is deleted at
the end (killing every process inside). Bad flags and files are tested without root in
tests/unit/test_run_cli.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import netns  # tests/kernel/netns.py
import pytest
import yaml

import builders  # tests/builders.py
from kube_network_policies.dataplane.netns import entered
from kube_network_policies.dataplane.nfqueue import read_queue_stats
from kube_network_policies.dataplane.nftables import (
    CACHE_V4,
    CACHE_V6,
    TABLE,
    Backend,
    RulesetConfig,
)
from kube_network_policies.dataplane.ruleset import Ruleset, detect_backend
from kube_network_policies.lab.probe import Prober
from kube_network_policies.lab.topology import Topology
from kube_network_policies.sources.files import manifest_digest

pytestmark = pytest.mark.kernel

SRC = Path(__file__).resolve().parents[2] / "src"
NODE = "node-1"
NODE4, NODE6 = "172.18.0.2", "fc00:f853:ccd:e793::2"
A4, A6 = "10.244.1.2", "fd00:10:244:1::2"
B4, B6 = "10.244.1.3", "fd00:10:244:1::3"
METRICS_PORT = 9080
QUEUE = 100
PROBE_TIMEOUT = 0.8
WAIT_S = 10.0

NAMESPACE = builders.namespace("t", {"team": "t"})


def pod(name: str, ip4: str, ip6: str) -> dict[str, Any]:
    return builders.pod("t", name, [ip4, ip6], node=NODE, labels={"app": name}, ports=[{"name": "http", "containerPort": 80}])


DENY_B = builders.network_policy("t", "deny-b", {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]})
ALLOW_A = builders.network_policy(
    "t",
    "allow-a",
    {
        "podSelector": {"matchLabels": {"app": "b"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 80}]}],
    },
)
INVALID = (  # refused as a whole: the except is not inside the cidr
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: t}\n"
    "spec:\n  podSelector: {}\n  ingress:\n    - from:\n"
    "        - ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/16]}\n"
)


# --- fixtures ----------------------------------------------------------------------------------


class Lab:
    def __init__(self, topo: Topology, prober: Prober) -> None:
        self.topo = topo
        self.prober = prober
        self.node_ns = topo.node_netns(NODE)
        self.a_ns = topo.netns_of("t/a")
        self.b_ns = topo.netns_of("t/b")
        self.backend = detect_backend(netns=self.node_ns)
        # xt-nfqueue (kernels without nft_queue, like this one): one iptables rule per family
        # and hook; nft-queue needs none.
        self.xt_rules = 4 if self.backend is Backend.XT_NFQUEUE else 0

    def probe(self, *pairs: tuple[str, str, int]) -> list[bool]:
        """(client, server, port) with client/server among "a4", "a6", "b4", "b6", "node4", "node6"."""
        ips = {"a4": A4, "a6": A6, "b4": B4, "b6": B6, "node4": NODE4, "node6": NODE6}
        spaces = {"a": self.a_ns, "b": self.b_ns, "node": self.node_ns}
        reqs = [(spaces[c[:-1]], ips[c], ips[s], "TCP", port) for c, s, port in pairs]
        return self.prober.probe(reqs, timeout=PROBE_TIMEOUT)

    def nft_table(self) -> subprocess.CompletedProcess[str]:
        return self.topo.run(self.node_ns, "nft", "list", "table", "inet", TABLE, check=False)

    def flush_accept_cache(self) -> None:
        for name in (CACHE_V4, CACHE_V6):
            self.topo.run(self.node_ns, "nft", "flush", "set", "inet", TABLE, name)

    def queued(self) -> int:
        """Id of the last packet the kernel queued to our queue (node namespace): grows by one per
        packet sent to userspace."""
        with entered(self.node_ns):  # /proc/thread-self/net follows this thread's namespace
            stats = read_queue_stats("/proc/thread-self/net/netfilter/nfnetlink_queue")
        return stats[QUEUE].id_sequence

    def cached(self) -> set[tuple[Any, ...]]:
        out = set()
        for name in (CACHE_V4, CACHE_V6):
            doc = json.loads(self.topo.run(self.node_ns, "nft", "-j", "list", "set", "inet", TABLE, name).stdout)
            for item in doc["nftables"]:
                for elem in item.get("set", {}).get("elem", []):
                    out.add(tuple(elem["elem"]["val"]["concat"]))
        return out

    def ping(self, client: str, src: str, dst: str, ident: int, timeout: float = PROBE_TIMEOUT) -> bool:
        """One ICMP echo (IPv4, raw socket in the client's namespace); True if answered."""
        with entered(self.a_ns if client == "a" else self.b_ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        try:
            sock.bind((src, 0))
            sock.settimeout(timeout)
            body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"knp-ping"
            total = sum(struct.unpack(f"!{len(body) // 2}H", body))
            total = (total & 0xFFFF) + (total >> 16)
            total = (total & 0xFFFF) + (total >> 16)
            sock.sendto(body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:], (dst, 0))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data, _ = sock.recvfrom(2048)
                hl = (data[0] & 0x0F) * 4
                if data[hl] == 0 and struct.unpack("!H", data[hl + 4 : hl + 6])[0] == ident:  # echo reply
                    return True
        except OSError:  # timeout
            return False
        finally:
            sock.close()
        return False

    def our_xt_rules(self) -> list[str]:
        rules = []
        for binary in ("iptables", "ip6tables"):
            out = self.topo.run(self.node_ns, binary, "-w", "-t", "mangle", "-S").stdout
            rules += [f"{binary} {line}" for line in out.splitlines() if TABLE in line]
        return rules


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    netns.require_kernel("ip", "nft", "iptables", "ip6tables")
    Topology.cleanup_stale()
    with Topology.build(
        nodes=[(NODE, [NODE4, NODE6])],
        pods=[("t/a", NODE, [A4, A6], False), ("t/b", NODE, [B4, B6], False)],
    ) as topo:
        prober = Prober(topo, timeout=PROBE_TIMEOUT)  # closed by the topology
        prober.serve(topo.netns_of("t/b"), {("TCP", 80), ("TCP", 81)})
        prober.serve(topo.netns_of("t/a"), {("TCP", 80)})
        yield Lab(topo, prober)


class AgentProcess:
    """One `kube-network-policies run` in the node namespace, its log in a file."""

    def __init__(self, lab: Lab, manifests: Path, log_path: Path, flags: tuple[str, ...]) -> None:
        self.lab = lab
        self.manifests = manifests
        self.log_path = log_path
        argv = [
            shutil.which("ip") or "ip",
            "netns",
            "exec",
            lab.node_ns,
            sys.executable,
            "-m",
            "kube_network_policies",
            "run",
            "--manifests",
            str(manifests),
            "--hostname-override",
            NODE,
            "-metrics-bind-address",
            f"127.0.0.1:{METRICS_PORT}",
            "-status-details",
            *flags,
        ]
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        env.pop("KNP_DEBUG", None)
        with open(log_path, "wb") as log:
            # `ip netns exec` execs: the pid is the agent's own.
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, str]:
        with entered(self.lab.node_ns):  # the socket belongs to the node namespace
            conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=3)
            conn.connect()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def status(self) -> dict[str, Any] | None:
        try:
            code, body = self.get("/statusz")
        except (OSError, http.client.HTTPException):
            return None
        return json.loads(body) if code == 200 else None

    def wait_applied(self, timeout: float = WAIT_S) -> dict[str, Any]:
        """Until the agent is ready and reports the digest of what the manifest dir holds now."""
        want = manifest_digest([str(self.manifests)])
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the agent exited with status {self.process.returncode}:\n{self.log}")
            st = self.status()
            if st is not None and st.get("ready") and st.get("digest") == want:
                return st
            if time.monotonic() > deadline:
                pytest.fail(f"the agent did not apply digest {want} within {timeout} s (status {st}):\n{self.log}")
            time.sleep(0.02)

    def workers(self) -> list[int]:
        """Pids of the agent's child processes (its packet workers), zombies excluded."""
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == self.process.pid and fields[0] != "Z":
                out.append(int(entry))
        return out

    def terminate(self, timeout: float = 10.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT_S, detail: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{detail()}")
        time.sleep(0.02)


def zombie_or_gone(pid: int) -> bool:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    return True  # gone


def write(path: Path, docs: list[dict[str, Any]] | str) -> None:
    """Atomically (rename), so the agent never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")  # not a manifest suffix: never read
    tmp.write_text(docs if isinstance(docs, str) else yaml.safe_dump_all(docs, sort_keys=False))
    tmp.replace(path)


@pytest.fixture
def start(lab: Lab, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """start(*flags, allow=False) -> a ready agent enforcing the base objects (+ allow-a)."""
    agents: list[AgentProcess] = []
    manifests = tmp_path / "manifests"
    manifests.mkdir()

    def _start(*flags: str, allow: bool = False) -> AgentProcess:
        write(manifests / "base.yaml", [NAMESPACE, pod("a", A4, A6), pod("b", B4, B6), DENY_B])
        if allow:
            write(manifests / "allow.yaml", [ALLOW_A])
        agent = AgentProcess(lab, manifests, tmp_path / f"agent-{len(agents)}.log", flags)
        agents.append(agent)
        agent.wait_applied()
        return agent

    try:
        yield _start
    finally:
        for agent in agents:
            agent.kill()
        # Whatever the test did, leave the node without our table and iptables rules.
        Ruleset(RulesetConfig(backend=lab.backend, queue_id=QUEUE), netns=lab.node_ns).remove()


# --- metrics parsing ---------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"malformed exposition line: {line!r}"
        out[(m.group(1), frozenset(_LABEL.findall(m.group(2) or "")))] = float(m.group(3))
    return out


def sample(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((f"kube_network_policies_{name}", frozenset(labels.items())))


# --- tests -------------------------------------------------------------------------------------


def test_enforcement_reload_refusal_and_metrics(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    agent = start()
    st = agent.status()
    assert st is not None and st["diverted_ipv4"] == [B4] and st["diverted_ipv6"] == [B6]
    generation = st["generation"]

    # Default deny on B, in both families; B's own egress is diverted too and accepted.
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80), ("b4", "a4", 80), ("b6", "a6", 80)) == [False, False, True, True]

    # An allow policy added to the directory is picked up.
    write(agent.manifests / "allow.yaml", [ALLOW_A])
    st = agent.wait_applied()
    assert st["generation"] > generation
    generation, digest = st["generation"], st["digest"]
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80), ("a4", "b4", 81), ("a6", "b6", 81)) == [True, True, False, False]

    # An invalid manifest is refused as a whole: the error is logged, the previous state stays,
    # and the agent is not ready (what it enforces is not what the files say) until it is fixed.
    bad = agent.manifests / "zz-invalid.yaml"
    write(bad, INVALID)
    wait_for("the refusal in the log", lambda: "manifests not applied" in agent.log, detail=lambda: agent.log)
    assert f"{bad} document 1" in agent.log and "spec.ingress[0].from[0].ipBlock.except[0]" in agent.log
    assert "Traceback" not in agent.log
    wait_for("/readyz to fail", lambda: agent.get("/readyz") == (503, "not ready\n"))
    st = agent.status()
    assert st is not None and (st["generation"], st["digest"], st["ready"]) == (generation, digest, False)
    assert "source:manifests" in st["problems"]
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80), ("a4", "b4", 81)) == [True, True, False]
    bad.unlink()
    wait_for("/readyz to answer again", lambda: agent.get("/readyz") == (200, "ok\n"))

    # /metrics after traffic (workers ship their counters about once a second).
    def scraped() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        code, body = agent.get("/metrics")
        assert code == 200
        return samples(body)

    def counted() -> bool:
        found = scraped()
        return all(
            (sample(found, "packet_count", protocol="TCP", family=family, verdict=verdict) or 0) > 0
            for family in ("IPv4", "IPv6")
            for verdict in ("accept", "drop")
        )

    wait_for("accept and drop packet counts for IPv4 and IPv6", counted, timeout=5.0, detail=lambda: agent.get("/metrics")[1])
    found = scraped()
    for q in ("0.5", "0.9", "0.99"):
        v = sample(found, "packet_process_duration_microseconds", quantile=q)
        assert v is not None and not math.isnan(v) and 0 < v < 1e6, (q, v)
    assert (sample(found, "packet_process_duration_microseconds_count") or 0) >= 4
    assert sample(found, "nfqueue_queue_total", queue=str(QUEUE)) == 0
    assert sample(found, "nfqueue_packet_id", queue=str(QUEUE)) is not None
    assert agent.terminate() == 0


def test_worker_crash_is_restarted_with_the_full_state(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    agent = start(allow=True)
    assert lab.probe(("a4", "b4", 80), ("a4", "b4", 81)) == [True, False]
    (worker,) = agent.workers()
    os.kill(worker, signal.SIGKILL)
    wait_for("a new worker", lambda: (w := agent.workers()) != [] and w != [worker], detail=lambda: agent.log)
    assert "worker for queue 100 exited (code -9); restarting it" in agent.log
    assert agent.process.poll() is None
    # Enforcement continues with the whole state: the allow rule and the default deny. Until
    # the new worker has the state it answers with the default (drop): retry briefly.
    expected = [True, True, False, False, True]
    deadline = time.monotonic() + 5
    while (got := lab.probe(("a4", "b4", 80), ("a6", "b6", 80), ("a4", "b4", 81), ("a6", "b6", 81), ("b4", "a4", 80))) != expected:
        assert time.monotonic() < deadline, f"after the restart: {got}, expected {expected}\n{agent.log}"
    st = agent.status()
    assert st is not None and st["ready"]
    assert agent.terminate() == 0


def test_node_originated_traffic_is_not_judged(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    """Kubelet probes: a root socket in the node namespace reaches a default-deny pod."""
    agent = start()
    assert lab.probe(("node4", "b4", 80), ("node6", "b6", 80), ("a4", "b4", 80)) == [True, True, False]
    assert agent.terminate() == 0


def test_fail_closed_sigterm_removes_the_ruleset(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    """Standalone mode: nothing tells a restart from an uninstall, so by default (auto) a
    fail-closed agent removes its rules on SIGTERM (Kubernetes mode asks the API instead:
    tests/integration/test_exit_decision.py)."""
    agent = start()
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80)) == [False, False]
    assert lab.nft_table().returncode == 0 and len(lab.our_xt_rules()) == lab.xt_rules
    assert agent.terminate() == 0
    assert "removing the ruleset on exit: standalone mode, fail-closed" in agent.log
    assert lab.nft_table().returncode != 0, "the table is still there"
    assert lab.our_xt_rules() == []
    # No agent and no rules: traffic flows unjudged (rather than being blackholed).
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80)) == [True, True]


def test_fail_open_shutdown_keeps_rules_and_bypasses(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    agent = start("-fail-open")
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80)) == [False, False]  # enforced while running
    assert agent.terminate() == 0
    assert "keeping the ruleset on exit: fail-open" in agent.log
    table = lab.nft_table()
    assert table.returncode == 0, "fail-open must keep the table"
    rules = lab.our_xt_rules()
    assert len(rules) == lab.xt_rules and all("--queue-bypass" in r for r in rules), rules
    if lab.backend is Backend.NFT_QUEUE:
        assert "bypass" in table.stdout
    # Nobody listens on the queue: the kernel bypasses, so selected pods stay reachable.
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80), ("b4", "a4", 80)) == [True, True, True]


def test_fail_closed_kill_9_keeps_rules_and_drops_until_an_agent_returns(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    """EXPECTED fail-closed behaviour: an agent killed without its shutdown (SIGKILL, OOM) leaves
    its rules, and without --queue-bypass the kernel drops new connections of selected pods while
    no agent listens. The next agent takes over and enforces again."""
    agent = start(allow=True)
    assert lab.probe(("a4", "b4", 80), ("b4", "a4", 80)) == [True, True]
    (worker,) = agent.workers()
    agent.kill()
    # The worker notices the closed pipe and exits, unbinding the queue.
    wait_for("the worker to exit", lambda: zombie_or_gone(worker))
    assert lab.nft_table().returncode == 0 and len(lab.our_xt_rules()) == lab.xt_rules
    # The accept cache still passes the tuples the dead agent accepted (under its last state)
    # until their timeout (ACCEPT_CACHE_TIMEOUT_S); empty it as the timeout would.
    assert lab.probe(("a4", "b4", 80), ("b4", "a4", 80)) == [True, True]
    lab.flush_accept_cache()
    # Even allowed connections, and a selected pod's egress, are dropped now; traffic the
    # ruleset does not divert (node-originated) still flows.
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80), ("b4", "a4", 80), ("node4", "b4", 80)) == [False, False, False, True]
    again = start(allow=True)
    assert lab.probe(("a4", "b4", 80), ("a4", "b4", 81)) == [True, False]
    assert again.terminate() == 0
    assert lab.nft_table().returncode != 0 and lab.our_xt_rules() == []


# --- the accept cache ----------------------------------------------------------------------------


def packet_counts(agent: AgentProcess) -> dict[str, float]:
    """packet_count per (family, verdict) for TCP, as the agent reports it."""
    found = samples(agent.get("/metrics")[1])
    return {
        f"{fam}/{v}": sample(found, "packet_count", protocol="TCP", family=fam, verdict=v) or 0
        for fam in ("IPv4", "IPv6")
        for v in ("accept", "drop")
    }


def settled_counts(agent: AgentProcess) -> dict[str, float]:
    """packet_count once the worker has shipped everything (it ships about once a second)."""
    last = packet_counts(agent)
    while True:
        time.sleep(1.2)
        now = packet_counts(agent)
        if now == last:
            return now
        last = now


def test_accept_cache_skips_userspace_until_the_state_changes(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    agent = start(allow=True)
    assert lab.cached() == set()
    # First connection A -> B:80 (both families): judged in userspace, accepted, remembered.
    before = lab.queued()
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80)) == [True, True]
    assert lab.queued() == before + 2
    assert lab.cached() == {(A4, B4, "tcp", 80), (A6, B6, "tcp", 80)}
    counts = settled_counts(agent)
    assert counts["IPv4/accept"] >= 1 and counts["IPv6/accept"] >= 1
    # Repeated connections (fresh source ports) complete without reaching userspace.
    queued = lab.queued()
    for _ in range(5):
        assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80)) == [True, True]
    assert lab.queued() == queued, "a repeated accepted tuple was queued again"
    assert settled_counts(agent) == counts
    found = samples(agent.get("/metrics")[1])
    assert sample(found, "nfqueue_packet_id", queue=str(QUEUE)) == queued
    # Denied tuples are never remembered: every attempt goes to userspace and is dropped.
    assert lab.probe(("a4", "b4", 81)) == [False]
    assert lab.probe(("a4", "b4", 81)) == [False]
    assert lab.queued() >= queued + 2
    # B's own egress (selected: diverted) is remembered per tuple; replies are never "new".
    queued = lab.queued()
    assert lab.probe(("b4", "a4", 80)) == [True]  # one after the other: two SYNs in flight at
    assert lab.probe(("b4", "a4", 80)) == [True]  # once would both be queued (a cold miss each)
    assert lab.queued() == queued + 1
    # ICMP is diverted every time (never cached: `th dport` would be its checksum).
    queued = lab.queued()
    assert lab.ping("b", B4, A4, 0x4B01) and lab.ping("b", B4, A4, 0x4B02)
    assert lab.queued() == queued + 2
    assert not lab.ping("a", A4, B4, 0x4B03)  # default deny of B: ICMP too
    assert not any(t[2] not in ("tcp", "udp", "sctp") for t in lab.cached())

    # A policy change that denies A -> B:80 (and allows 81). It leaves the diverted IPs as they
    # are (only B), so the ruleset is not re-synced: the flush after the workers applied it must
    # empty the cache by itself.
    diverted = agent.status()
    generation = diverted["generation"] if diverted else 0
    write(
        agent.manifests / "allow.yaml",
        [{**ALLOW_A, "spec": {**ALLOW_A["spec"], "ingress": [{**ALLOW_A["spec"]["ingress"][0], "ports": [{"port": 81}]}]}}],
    )
    st = agent.wait_applied()
    assert st["generation"] > generation and st["diverted_ipv4"] == [B4] and st["diverted_ipv6"] == [B6]
    assert lab.cached() == set()
    queued = lab.queued()
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80), ("a4", "b4", 81), ("b4", "a4", 80)) == [False, False, True, True]
    assert lab.queued() >= queued + 4  # every one judged again under the new state
    assert lab.cached() == {(A4, B4, "tcp", 81), (B4, A4, "tcp", 80)}
    assert lab.probe(("a4", "b4", 80), ("a4", "b4", 81)) == [False, True]
    assert agent.terminate() == 0


def test_accept_cache_off(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    agent = start("-accept-cache=false", allow=True)
    assert f"set {CACHE_V4}" not in lab.nft_table().stdout
    queued = lab.queued()
    for _ in range(3):
        assert lab.probe(("a4", "b4", 80)) == [True]
    assert lab.queued() == queued + 3  # every connection judged in userspace
    assert agent.terminate() == 0
