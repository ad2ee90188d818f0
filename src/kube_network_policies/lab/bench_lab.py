"""`kube-network-policies lab bench`: new TCP connections per second through the enforcing agent.

What it measures, in one run: connections per second and connect latency between real pods
(network namespaces) with the agent enforcing, against the same topology with no agent, in
alternating rounds (agent, baseline, agent, baseline, ...), plus the agent's own per-packet time
read from its metrics over the agent rounds only.

Set-up and why
--------------
* One node. Every connection is then judged exactly once (client egress and server ingress are
  both local, one `evaluate` answers both directions), and on a 2-core box the CPU is shared by
  one agent and the load generator only; a second node would add a second agent competing for
  the same two cores and measure the same per-packet path twice.
* The agent's state holds `pods` synthetic pods on 100 other nodes (lab/bench_engine.py's
  generator) plus the real pods, and `policies` NetworkPolicies: the synthetic ones plus, in the
  real pods' namespace, `filler_policies` (default 2: default-deny with DNS egress, ingress from
  monitoring; more add rules of the synthetic policies' shapes) selecting every real pod and
  never matching the benchmark traffic, and two that allow it (clients -> servers, the server
  side by the named port `http`). Their names sort the filler rules first, so every decision
  walks them before the allowing rule. Every real pod is selected for ingress and egress, so
  every new connection is queued and judged. Manifests are written as JSON (`kind: List`).
* Baseline = the same namespaces, pods, servers and the same (idle) agent process, with the
  agent's nftables table and iptables queue rules ABSENT. The agent is started once; before a
  baseline round the bench removes the ruleset (`Ruleset.remove()`, what a fail-closed agent
  does at shutdown), before an agent round it re-installs it with the agent's own code and
  config (`Ruleset.sync()` with the agent's diverted IPs from /statusz) and checks that the
  kernel now holds exactly what the agent had installed (canonical `nft -j list table` and the
  iptables mangle chains). Restarting the agent per round would cost seconds of state loading
  per round and change its warm state; keeping it idle costs nothing (it sleeps in poll).
  Note: without the table nothing in the node namespace uses conntrack, so the baseline pays no
  conntrack either: the gap is everything the agent adds, conntrack included (measured apart:
  the ruleset without its queue rule costs about 10 % of the baseline rate here).
* Conntrack: the node namespace's CLOSE timeout is 1 s (CONNTRACK_CLOSE_TIMEOUT_S) and the
  table is flushed before every round, so rounds are independent and the table never fills.
* Two workloads, each with a warm-up run before every measured run:
  1. `w1_clients` client pods reconnecting to one server pod, one port (the Go agent's ab run);
  2. `w2_clients` x `w2_servers`: every client connects round-robin to every server, so
     consecutive connections are distinct pod pairs (nothing per pair can be reused).
  knp-loadgen (C, epoll) runs one `connect` process per client pod and one `serve` per server
  pod; `concurrency` connections are in flight in total, split over the client pods.
* Per-packet time: the agent's `packet_process_duration_microseconds` summary quantiles, scraped
  after each measured agent round once the worker has shipped its metrics (the window holds the
  round's last 8192 packets), and, exactly over the measured agent periods, the
  `packet_process_time` histogram deltas (fractions at or under 10 and 50 µs, interpolated
  quantiles). The kernel's queue counters (/proc/net/netfilter/nfnetlink_queue in the node
  namespace) tell how many packets were queued: every one must be judged in an agent round and
  none may be queued in a baseline round.
* CPU context: /proc/stat and the processes' own CPU time over each measured run (agent worker,
  agent control, load generator clients and servers; the rest is kernel softirq and others).
* The accept cache (`--accept-cache`, default on, as in the agent): the agent remembers accepted
  (src, dst, protocol, dst port) tuples in the kernel, so a repeated tuple skips userspace. Both
  workloads repeat few tuples (4 and 64), so they measure the cache's best case. The cache is
  emptied right before every measured agent run (after the warm-up), so every run pays its cold
  misses and at least one packet per tuple is judged. `userspace_fraction` = packets queued /
  connections (1.0 without the cache: every connection's SYN). The summary quantiles then cover
  the last 8192 packets judged at all (warm-ups and earlier rounds included, all cold misses);
  `verdict_histogram` covers exactly the measured runs' packets (few: treat as indicative).

Cleanup: namespaces, agent and load generators go on success, failure, Ctrl-C and (with the
CLI's exit_on_sigterm) SIGTERM; a SIGKILLed run is swept by `Topology.cleanup_stale()` next time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kube_network_policies.dataplane.netns import entered
from kube_network_policies.dataplane.nfqueue import QueueStats, read_queue_stats
from kube_network_policies.dataplane.nftables import (
    CACHE_V4,
    CACHE_V6,
    TABLE,
    Backend,
    RulesetConfig,
    flush_cache_commands,
)
from kube_network_policies.dataplane.ruleset import (
    DataplaneError,
    Ruleset,
    detect_backend,
    run_command,
)
from kube_network_policies.lab import loadgen
from kube_network_policies.lab.bench_engine import network_policy_object, pod_object
from kube_network_policies.lab.netns_mode import (
    AgentProcess,
    LabError,
    check_lab_prerequisites,
)
from kube_network_policies.lab.topology import Topology, TopologyError
from kube_network_policies.sources.files import manifest_digest

NODE = "bench-node"
NODE_IP = "172.18.0.2"
NAMESPACE = "bench"
PORT = 8080
METRICS_PORT = 9080
QUEUE_ID = 100
FILLER_POLICIES = 2
SYNTHETIC_NAMESPACES = 100
AGENT_START_TIMEOUT_S = 180.0
FLUSH_TIMEOUT_S = 6.0
CONNECT_TIMEOUT_S = 1.0
# Seconds conntrack keeps a reset connection (kernel default 10). Every benchmark connection ends
# in CLOSE (the client resets it); at 25-50k new connections/s the default keeps 250-500k entries
# and the conntrack table (nf_conntrack_max, 262,144 here, counted per namespace) overflows:
# "nf_conntrack: table full, dropping packet", SYNs lost, 1 s timeouts. Set in the node
# namespace only (a per-namespace sysctl); a real node under such churn needs the same tuning.
CONNTRACK_CLOSE_TIMEOUT_S = 1
METRIC = "kube_network_policies_"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    seconds: float = 5.0
    rounds: int = 3
    warmup: float = 1.0
    pods: int = 10_000  # synthetic pods on other nodes (the real pods come on top)
    policies: int = 1_000  # NetworkPolicies in total
    concurrency: int = 64  # connections in flight, over all client pods of a workload
    w1_clients: int = 4
    w2_clients: int = 8
    w2_servers: int = 8
    loadgen_threads: int = 1  # per client process (one process per client pod)
    server_threads: int = 2  # per server pod (SO_REUSEPORT listeners)
    filler_policies: int = FILLER_POLICIES  # non-matching policies selecting the real pods
    queues: int = 1  # the agent's -nfqueue-count (one worker process per queue)
    accept_cache: bool = True  # the agent's -accept-cache

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("--seconds must be > 0, --warmup >= 0 and --rounds >= 1")
        if self.filler_policies < 0 or self.policies < self.filler_policies + 2:
            raise ValueError(f"--policies must be at least {self.filler_policies + 2} (the bench namespace's own policies)")
        if not 1 <= self.queues <= 8:
            raise ValueError("--queues must be within 1..8")
        if self.pods < 0:
            raise ValueError("--pods must be >= 0")
        if min(self.w1_clients, self.w2_clients, self.w2_servers) < 1 or max(self.w1_clients, self.w2_clients, self.w2_servers) > 100:
            raise ValueError("client and server pod counts must be within 1..100")
        if self.concurrency < max(self.w1_clients, self.w2_clients):
            raise ValueError("--concurrency must be at least the number of client pods")


@dataclass(frozen=True, slots=True)
class Workload:
    key: str
    title: str
    clients: tuple[str, ...]  # pod keys
    servers: tuple[str, ...]


# --- manifests ------------------------------------------------------------------------------


def client_ip(i: int) -> str:
    return f"10.244.0.{10 + i}"


def server_ip(i: int) -> str:
    return f"10.244.1.{10 + i}"


def _real_pod(name: str, ip: str, role: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "bench", "role": role}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def _np(name: str, selector: dict[str, Any], ingress: list[dict[str, Any]], egress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"podSelector": selector, "policyTypes": ["Ingress", "Egress"], "ingress": ingress, "egress": egress},
    }


def bench_namespace_policies(filler: int = FILLER_POLICIES) -> list[dict[str, Any]]:
    """The real pods' namespace: `filler` policies that select every real pod and never match the
    benchmark traffic (the first two are what a namespace typically has: default-deny with DNS
    egress, ingress from monitoring; more repeat rules of the synthetic policies' shapes), then
    the two that allow it. Sorted by name, the filler rules come first in every pod's plan."""
    out = []
    for i in range(filler):
        if i == 0:
            dns = {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
            out.append(
                _np("filler-0-default-deny", {}, [], [{"to": [dns], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}])
            )
            continue
        if i == 1:
            mon = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            out.append(_np("filler-1-monitoring", {}, [{"from": [mon], "ports": [{"protocol": "TCP", "port": 9090}]}], []))
            continue
        ingress: list[dict[str, Any]] = [
            {"from": [{"podSelector": {"matchLabels": {"app": f"app-{i}"}}}], "ports": [{"port": PORT}, {"port": "http"}]},
            {
                "from": [
                    {
                        "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]},
                        "podSelector": {"matchLabels": {"tier": "web"}},
                    }
                ],
                "ports": [{"protocol": "TCP", "port": 9000, "endPort": 9100}],
            },
            {"from": [{"ipBlock": {"cidr": f"192.168.{i}.0/24", "except": [f"192.168.{i}.128/25"]}}]},
        ]
        egress: list[dict[str, Any]] = [
            {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "app-0"}}}], "ports": [{"protocol": "UDP", "port": 53}]},
            {"to": [{"ipBlock": {"cidr": f"203.0.{(113 + i) % 256}.0/24"}}]},
        ]
        out.append(_np(f"filler-{i}", {}, ingress, egress))
    role = {"matchLabels": {"app": "bench", "role": "client"}}
    server = {"matchLabels": {"app": "bench", "role": "server"}}
    out.append(_np("zz-allow-clients", role, [], [{"to": [{"podSelector": server}], "ports": [{"protocol": "TCP", "port": PORT}]}]))
    out.append(_np("zz-allow-servers", server, [{"from": [{"podSelector": role}], "ports": [{"protocol": "TCP", "port": "http"}]}], []))
    return out


def write_manifests(directory: Path, config: BenchConfig, clients: int, servers: int) -> None:
    rng = random.Random(42)
    namespaces = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns-{n}", "labels": {"team": "abx"[n % 3]}}}
        for n in range(SYNTHETIC_NAMESPACES)
    ]
    namespaces.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": {"team": "bench"}}})
    pods = [pod_object(i, SYNTHETIC_NAMESPACES, rng) for i in range(config.pods)]
    pods += [_real_pod(f"client-{i}", client_ip(i), "client") for i in range(clients)]
    pods += [_real_pod(f"server-{i}", server_ip(i), "server") for i in range(servers)]
    own = bench_namespace_policies(config.filler_policies)
    policies = [network_policy_object(i, SYNTHETIC_NAMESPACES, rng) for i in range(config.policies - len(own))] + own
    for name, items in (("namespaces", namespaces), ("pods", pods), ("networkpolicies", policies)):
        tmp = directory / f".{name}.json.tmp"
        tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        tmp.replace(directory / f"{name}.json")


# --- metrics --------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(slots=True)
class MetricsSnapshot:
    buckets: dict[float, int]  # cumulative, summed over protocol/family; math.inf included
    count: int
    total_us: float
    quantiles: dict[float, float]
    accepted: int
    dropped: int
    errors: int


def parse_metrics(text: str) -> MetricsSnapshot:
    snap = MetricsSnapshot({}, 0, 0.0, {}, 0, 0, 0)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, raw_labels, raw_value = m.groups()
        labels = dict(_LABEL.findall(raw_labels or ""))
        value = float(raw_value)
        if name == METRIC + "packet_process_time_bucket":
            le = math.inf if labels["le"] == "+Inf" else float(labels["le"])
            snap.buckets[le] = snap.buckets.get(le, 0) + int(value)
        elif name == METRIC + "packet_process_time_count":
            snap.count += int(value)
        elif name == METRIC + "packet_process_time_sum":
            snap.total_us += value
        elif name == METRIC + "packet_process_duration_microseconds" and "quantile" in labels:
            snap.quantiles[float(labels["quantile"])] = value
        elif name == METRIC + "packet_count":
            if labels.get("verdict") == "drop":
                snap.dropped += int(value)
            else:
                snap.accepted += int(value)
        elif name == METRIC + "packet_errors_total":
            snap.errors += int(value)
    return snap


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float:
    """Prometheus-style: linear interpolation inside the bucket holding rank q; `counts` are per
    bucket (not cumulative), the last bucket is +Inf (answered with the last finite bound)."""
    total = sum(counts)
    if total == 0:
        return math.nan
    rank = q * total
    seen = 0
    lower = 0.0
    for bound, c in zip(bounds, counts, strict=True):
        if c and seen + c >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - seen) / c
        seen += c
        if not math.isinf(bound):
            lower = bound
    return lower


# --- CPU ------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it is gone)."""
    return sum(_proc_cpu_split(pid))


def _proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process ((0, 0) when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _runqueue_wait(pid: int) -> float:
    """Seconds the process spent runnable but waiting for a CPU (/proc/PID/schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                out += [int(p) for p in f.read().split()]
    return out


def _system_cpu() -> tuple[float, float, float]:
    """(busy, softirq, total) CPU seconds over all CPUs since boot."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    _user, _nice, _system, idle, iowait, _irq, softirq, _steal = values
    total = sum(values)
    return (total - idle - iowait) / _TICK, softirq / _TICK, total / _TICK


@dataclass(slots=True)
class CpuSnapshot:
    at: float
    system: tuple[float, float, float]
    worker: float
    worker_sys: float
    worker_wait: float
    control: float
    servers: float
    clients: float  # reaped children (the client load generators)

    @staticmethod
    def take(worker_pids: Sequence[int], control_pid: int | None, server_pids: Sequence[int]) -> CpuSnapshot:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        workers = [_proc_cpu_split(p) for p in worker_pids]
        return CpuSnapshot(
            time.monotonic(),
            _system_cpu(),
            sum(u + s for u, s in workers),
            sum(s for _, s in workers),
            sum(_runqueue_wait(p) for p in worker_pids),
            _proc_cpu(control_pid) if control_pid else 0.0,
            sum(_proc_cpu(p) for p in server_pids),
            ru.ru_utime + ru.ru_stime,
        )

    def until(self, later: CpuSnapshot) -> dict[str, float]:
        """CPU used between the snapshots, in cores (seconds of CPU per second of wall time)."""
        wall = max(later.at - self.at, 1e-9)
        busy = later.system[0] - self.system[0]
        total = later.system[2] - self.system[2]
        out = {
            "cores_busy": busy / wall,
            "agent_worker": (later.worker - self.worker) / wall,
            "agent_worker_runqueue_wait": (later.worker_wait - self.worker_wait) / wall,
            "agent_control": (later.control - self.control) / wall,
            "loadgen_clients": (later.clients - self.clients) / wall,
            "loadgen_servers": (later.servers - self.servers) / wall,
            "softirq": (later.system[1] - self.system[1]) / wall,
        }
        # Softirq time is also counted in the CPU time of the process it interrupted (the agent's
        # worker runs most of the reinjected packets' path in softirq inside its verdict send), so
        # it is shown on its own and not subtracted: "other" is kernel threads and other processes.
        out["other"] = out["cores_busy"] - sum(out[k] for k in ("agent_worker", "agent_control", "loadgen_clients", "loadgen_servers"))
        out["busy_fraction"] = busy / total if total > 0 else math.nan
        return out


# --- the ruleset: present for agent rounds, absent for baseline rounds -----------------------


class RulesetToggle:
    """Removes and re-installs the agent's ruleset in the node namespace, with the agent's code
    and config, and checks that a re-install gives back exactly what the agent installed.

    The agent restores a ruleset someone else removed (agent.py, README "Staying in force"), so
    its control process (`agent_pid`) is stopped (SIGSTOP) while the ruleset is absent and
    continued once it is back: it is idle during the bench anyway. On continuing, it reads the
    notifications of the removal and re-install, checks, and finds the ruleset as it left it."""

    def __init__(
        self, netns: str, v4: Sequence[str], v6: Sequence[str], queues: int = 1, accept_cache: bool = True, agent_pid: int | None = None
    ) -> None:
        self.netns = netns
        self.agent_pid = agent_pid
        self.v4 = list(v4)
        self.v6 = list(v6)
        self.backend = detect_backend(netns=netns)
        self.config = RulesetConfig(backend=self.backend, queue_id=QUEUE_ID, queue_count=queues, fail_open=False, accept_cache=accept_cache)
        self.snapshot = self._listing()
        if not self.snapshot[0]:
            raise LabError("the agent's nftables table is missing after start-up")
        self.present = True

    def _listing(self) -> tuple[str, str]:
        """(canonical JSON of our nft table, our iptables mangle rules)."""
        prefix = ("ip", "netns", "exec", self.netns)
        res = run_command((*prefix, "nft", "-j", "list", "table", "inet", TABLE))
        table = ""
        if res.returncode == 0:
            items = json.loads(res.stdout).get("nftables", [])
            canon = []
            for item in items:
                if not isinstance(item, dict) or "metainfo" in item:
                    continue
                for body in item.values():
                    if isinstance(body, dict):
                        body.pop("handle", None)
                        if body.get("name") in (CACHE_V4, CACHE_V6):
                            body.pop("elem", None)  # the accept cache's contents come and go
                        if isinstance(body.get("elem"), list):
                            body["elem"] = sorted(body["elem"], key=json.dumps)
                canon.append(item)
            table = json.dumps(canon, sort_keys=True)
        xt = []
        if self.backend is Backend.XT_NFQUEUE:
            for binary in ("iptables", "ip6tables"):
                for chain in ("POSTROUTING", "INPUT"):
                    res = run_command((*prefix, binary, "-w", "-t", "mangle", "-S", chain))
                    xt += [f"{binary} {line}" for line in res.stdout.splitlines() if TABLE in line]
        return table, "\n".join(xt)

    def remove(self) -> None:
        if self.present:
            if self.agent_pid is not None:
                os.kill(self.agent_pid, signal.SIGSTOP)
            Ruleset(self.config, netns=self.netns).remove()
            self.present = False
        if self._listing() != ("", ""):
            raise LabError("the agent's ruleset is still present after removing it")

    def flush_cache(self) -> None:
        """Empty the accept cache (what the agent does after every state change)."""
        commands = flush_cache_commands(self.config)
        if commands and self.present:
            res = run_command(("ip", "netns", "exec", self.netns, "nft", "-f", "-"), "".join(c + "\n" for c in commands))
            if res.returncode != 0:
                raise LabError(f"flushing the accept cache failed: {res.stderr.strip()}")

    def install(self) -> None:
        if not self.present:
            Ruleset(self.config, netns=self.netns).sync(self.v4, self.v6)
            self.present = True
            if self.agent_pid is not None:
                os.kill(self.agent_pid, signal.SIGCONT)
        now = self._listing()
        if now != self.snapshot:
            raise LabError(f"the re-installed ruleset differs from the one the agent installed:\n{now}\n--- agent's:\n{self.snapshot}")


# --- the lab --------------------------------------------------------------------------------


def _netns_prefix(netns: str) -> list[str]:
    return [shutil.which("ip") or "ip", "netns", "exec", netns]


@dataclass(slots=True)
class RoundResult:
    mode: str  # "agent" or "baseline"
    conn_per_s: float
    connections: int
    failures: int
    timeouts: int
    latency_p50_us: float
    latency_p99_us: float
    cpu: dict[str, float]
    queued: int  # packets the kernel queued during the measured run
    judged: int = 0  # packets the agent timed (histogram count delta)
    buckets: list[int] = field(default_factory=list)  # per bucket (not cumulative), agent rounds
    summary: dict[float, float] = field(default_factory=dict)
    dropped: int = 0
    errors: int = 0
    queue_drops: int = 0
    sum_us: float = 0.0  # histogram sum delta (agent rounds)
    failure_kinds: dict[str, int] = field(default_factory=dict)  # knp-loadgen's, plus "timeout"


def _failure_kinds(reports: Sequence[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reports:
        for kind, n in (r.get("failure_kinds") or {}).items():
            if n:
                out[kind] = out.get(kind, 0) + int(n)
        if r.get("timeouts"):
            out["timeout"] = out.get("timeout", 0) + int(r["timeouts"])
    return out


class BenchLab:
    """The topology, servers and agent, kept for all rounds; close() removes everything."""

    def __init__(self, config: BenchConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self.topology: Topology | None = None
        self.agent: AgentProcess | None = None
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self._clients: list[subprocess.Popen[str]] = []
        self._workdir = Path(tempfile.mkdtemp(prefix="knp-bench-"))
        n_clients = max(config.w1_clients, config.w2_clients)
        n_servers = max(1, config.w2_servers)
        self.client_keys = [f"{NAMESPACE}/client-{i}" for i in range(n_clients)]
        self.server_keys = [f"{NAMESPACE}/server-{i}" for i in range(n_servers)]
        self.worker_pids: list[int] = []
        self.toggle: RulesetToggle | None = None
        self.bounds: list[float] = []
        self._offset = 0  # queued - judged - errors - kernel drops before the first round
        try:
            self._build(n_clients, n_servers)
        except BaseException:
            self.close()
            raise

    def _build(self, n_clients: int, n_servers: int) -> None:
        cfg = self.config
        loadgen.ensure_built()
        manifests = self._workdir / "manifests"
        manifests.mkdir()
        t0 = time.monotonic()
        write_manifests(manifests, cfg, n_clients, n_servers)
        pods = [(k, NODE, [client_ip(i)], False) for i, k in enumerate(self.client_keys)]
        pods += [(k, NODE, [server_ip(i)], False) for i, k in enumerate(self.server_keys)]
        self.topology = Topology.build(nodes=[(NODE, [NODE_IP])], pods=pods)
        with entered(self.topology.node_netns(NODE)):
            try:
                with open("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close", "w", encoding="ascii") as f:
                    f.write(str(CONNTRACK_CLOSE_TIMEOUT_S))
            except OSError as exc:
                self.log(f"warning: cannot shorten conntrack's CLOSE timeout in the node namespace ({exc}); long runs may fill the conntrack table")
        self.log(f"set-up: {len(pods)} pods in network namespaces on 1 node, manifests written ({time.monotonic() - t0:.1f} s)")
        for key in self.server_keys:
            self.servers[key] = loadgen.serve(_netns_prefix(self.topology.netns_of(key)), [PORT], threads=self.config.server_threads)
        t0 = time.monotonic()
        flags = ["-nfqueue-id", str(QUEUE_ID), "-nfqueue-count", str(cfg.queues), f"-accept-cache={'true' if cfg.accept_cache else 'false'}"]
        self.agent = AgentProcess(self.topology, NODE, manifests, flags, METRICS_PORT, self._workdir / "agent.log")
        digest = manifest_digest([str(manifests)])
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        while True:
            if self.agent.process.poll() is not None:
                raise LabError(f"the agent exited with status {self.agent.process.returncode} during start-up:\n{self.agent.log_tail()}")
            st = self.agent.status()
            if st is not None and st.get("ready") and st.get("digest") == digest:
                break
            if time.monotonic() > deadline:
                raise LabError(f"the agent was not ready within {AGENT_START_TIMEOUT_S:.0f} s:\n{self.agent.log_tail()}")
            time.sleep(0.1)
        self.objects = int(st.get("objects", 0))
        v4 = list(st.get("diverted_ipv4", []))
        expected = sorted([client_ip(i) for i in range(n_clients)] + [server_ip(i) for i in range(n_servers)])
        if sorted(v4) != expected:
            raise LabError(f"the agent diverts {v4}, expected every real pod: {expected}")
        self.log(f"agent ready in {time.monotonic() - t0:.1f} s: {self.objects} objects, {len(v4)} local pod IPs diverted")
        self.worker_pids = _children(self.agent.process.pid)
        if len(self.worker_pids) != cfg.queues:
            raise LabError(f"expected {cfg.queues} agent worker process(es), found {self.worker_pids}")
        self.toggle = RulesetToggle(
            self.topology.node_netns(NODE), v4, list(st.get("diverted_ipv6", [])), cfg.queues, cfg.accept_cache, self.agent.process.pid
        )
        snap, q = self._metrics(), self._queue()
        self._offset = q.id_sequence - q.queue_dropped - q.user_dropped - snap.count - snap.errors

    # -- observation --

    def _metrics(self) -> MetricsSnapshot:
        assert self.topology is not None
        with entered(self.topology.node_netns(NODE)):
            conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=5)
            conn.connect()
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            body = resp.read().decode()
            if resp.status != 200:
                raise LabError(f"/metrics answered {resp.status}")
        finally:
            conn.close()
        return parse_metrics(body)

    def _queue(self) -> QueueStats:
        assert self.topology is not None
        with entered(self.topology.node_netns(NODE)):
            stats = read_queue_stats("/proc/thread-self/net/netfilter/nfnetlink_queue")
        found = [stats.get(n) for n in range(QUEUE_ID, QUEUE_ID + self.config.queues)]
        if any(q is None for q in found):
            raise LabError(
                f"no consumer is bound to some NFQUEUE of {QUEUE_ID}..{QUEUE_ID + self.config.queues - 1} in the node namespace (did an agent worker die?)"
            )
        return QueueStats(*(sum(getattr(q, f) for q in found) for f in QueueStats._fields))

    def _flushed(self) -> tuple[MetricsSnapshot, QueueStats]:
        """Metrics once the worker has shipped every packet the kernel queued (it ships about
        once a second): judged + errors + kernel drops == queued, minus the start-up offset."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while True:
            q = self._queue()
            snap = self._metrics()
            if q.id_sequence - q.queue_dropped - q.user_dropped - snap.count - snap.errors == self._offset:
                return snap, q
            if time.monotonic() > deadline:
                self.log("warning: the agent's metrics did not catch up with the queue counters; using what it reported")
                return snap, q
            time.sleep(0.1)

    def _flush_conntrack(self) -> None:
        assert self.topology is not None
        if shutil.which("conntrack") is None:
            return
        subprocess.run([*_netns_prefix(self.topology.node_netns(NODE)), "conntrack", "-F"], capture_output=True, timeout=30, check=False)

    # -- load --

    def _run_clients(self, workload: Workload, duration: float) -> list[dict[str, Any]]:
        assert self.topology is not None
        binary = str(loadgen.ensure_built())
        per_client = max(1, self.config.concurrency // len(workload.clients))
        targets = ",".join(loadgen.format_target((server_ip(self.server_keys.index(s)), PORT)) for s in workload.servers)
        procs = []
        try:
            for key in workload.clients:
                cmd = [
                    *_netns_prefix(self.topology.netns_of(key)),
                    binary,
                    "connect",
                    "--targets",
                    targets,
                    "--duration",
                    repr(float(duration)),
                    "--concurrency",
                    str(per_client),
                    "--threads",
                    str(self.config.loadgen_threads),
                    "--timeout",
                    repr(CONNECT_TIMEOUT_S),
                    "--json",
                ]
                procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            self._clients = procs
            reports = []
            for key, proc in zip(workload.clients, procs, strict=True):
                out, err = proc.communicate(timeout=duration + CONNECT_TIMEOUT_S + 60)
                if proc.returncode != 0:
                    raise LabError(f"knp-loadgen connect in {key} exited {proc.returncode}: {err.strip()}")
                try:
                    report = json.loads(out)
                except ValueError:
                    raise LabError(f"knp-loadgen connect in {key}: output is not JSON: {out!r} {err.strip()}") from None
                reports.append(report)
            return reports
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            self._clients = []

    def run_round(self, workload: Workload, mode: str) -> RoundResult:
        assert self.toggle is not None and self.agent is not None
        if mode == "agent":
            self.toggle.install()
        else:
            # The agent's control process (which serves /metrics) is stopped while the ruleset
            # is absent: its metrics are read before. Nothing can be judged in a baseline round
            # (the queue counters below show nothing was queued), so they stand for both ends.
            idle = self._metrics()
            self.toggle.remove()
        self._flush_conntrack()  # every round starts from an empty conntrack table
        if self.config.warmup > 0:
            warm = self._run_clients(workload, self.config.warmup)
            bad = sum(r["failures"] + r["timeouts"] for r in warm)
            if bad:
                kinds = [r.get("failure_kinds") for r in warm]
                raise LabError(f"{workload.title}, {mode} warm-up: {bad} connections failed or timed out ({kinds})")
        if mode == "agent":
            self.toggle.flush_cache()  # every measured run starts cold: its misses are measured too
            before, q0 = self._flushed()
        else:
            before, q0 = idle, self._queue()
        servers = [p.pid for p in self.servers.values()]
        cpu0 = CpuSnapshot.take(self.worker_pids, self.agent.process.pid, servers)
        reports = self._run_clients(workload, self.config.seconds)
        cpu1 = CpuSnapshot.take(self.worker_pids, self.agent.process.pid, servers)
        if mode == "agent":
            after, q1 = self._flushed()
        else:
            after, q1 = idle, self._queue()
        conns = sum(int(r["connections"]) for r in reports)
        weights = [max(int(r["connections"]), 0) for r in reports]

        def weighted(key: str) -> float:
            vals = [float(r["latency_us"][key]) for r in reports]
            return sum(v * w for v, w in zip(vals, weights, strict=True)) / sum(weights) if sum(weights) else math.nan

        bounds = sorted(before.buckets)
        cum_b = [after.buckets.get(b, 0) - before.buckets.get(b, 0) for b in bounds]
        per_bucket = [c - (cum_b[i - 1] if i else 0) for i, c in enumerate(cum_b)]
        result = RoundResult(
            mode=mode,
            conn_per_s=sum(float(r["conn_per_s"]) for r in reports),
            connections=conns,
            failures=sum(int(r["failures"]) for r in reports),
            timeouts=sum(int(r["timeouts"]) for r in reports),
            latency_p50_us=weighted("p50"),
            latency_p99_us=weighted("p99"),
            cpu=cpu0.until(cpu1),
            queued=q1.id_sequence - q0.id_sequence,
            judged=after.count - before.count,
            buckets=per_bucket,
            summary=dict(after.quantiles) if mode == "agent" else {},
            dropped=after.dropped - before.dropped,
            errors=after.errors - before.errors,
            queue_drops=(q1.queue_dropped - q0.queue_dropped) + (q1.user_dropped - q0.user_dropped),
            sum_us=after.total_us - before.total_us,
            failure_kinds=_failure_kinds(reports),
        )
        result.cpu["agent_worker_us_per_packet"] = (cpu1.worker - cpu0.worker) * 1e6 / result.judged if result.judged else math.nan
        result.cpu["agent_worker_sys_us_per_packet"] = (cpu1.worker_sys - cpu0.worker_sys) * 1e6 / result.judged if result.judged else math.nan
        result.cpu["agent_control_us_per_packet"] = (cpu1.control - cpu0.control) * 1e6 / result.judged if result.judged else math.nan
        if mode == "baseline" and result.queued:
            raise LabError(f"{result.queued} packets were queued during a baseline round: the ruleset was not absent")
        if mode == "agent" and result.queued == 0:
            raise LabError("no packet was queued during an agent round: the agent's ruleset did not divert the traffic")
        self.bounds = bounds
        return result

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.kill()
                client.wait(2)
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                loadgen.stop_server(server, timeout=2)
        self.servers = {}
        if self.agent is not None:
            with contextlib.suppress(Exception):
                os.kill(self.agent.process.pid, signal.SIGCONT)  # stopped during a baseline round
            with contextlib.suppress(Exception):
                self.agent.stop()
            self.agent = None
        if self.topology is not None:
            try:
                self.topology.close()
            except TopologyError as exc:
                print(f"warning: {exc}", file=sys.stderr)
            self.topology = None
        shutil.rmtree(self._workdir, ignore_errors=True)


# --- summary --------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def _sum_kinds(dicts: Sequence[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, n in d.items():
            out[k] = out.get(k, 0) + n
    return out


def summarize(workload: Workload, rounds: Sequence[RoundResult], bounds: Sequence[float], accept_cache: bool = False) -> dict[str, Any]:
    agent = [r for r in rounds if r.mode == "agent"]
    base = [r for r in rounds if r.mode == "baseline"]
    cps_a = _median([r.conn_per_s for r in agent])
    cps_b = _median([r.conn_per_s for r in base])
    counts = [sum(col) for col in zip(*(r.buckets for r in agent), strict=True)] if agent else []
    total = sum(counts)

    def at_or_under(limit: float) -> float:
        return sum(c for b, c in zip(bounds, counts, strict=True) if b <= limit) / total if total else math.nan

    def cpu(rs: Sequence[RoundResult], key: str) -> float:
        return round(_median([r.cpu.get(key, math.nan) for r in rs]), 3)

    judged = sum(r.judged for r in agent)
    queued = sum(r.queued for r in agent)
    connections = sum(r.connections for r in agent)
    return {
        "workload": workload.title,
        "accept_cache": accept_cache,
        "userspace_fraction": round(queued / connections, 5) if connections else math.nan,
        "client_pods": len(workload.clients),
        "server_pods": len(workload.servers),
        "conn_per_s_agent": round(cps_a),
        "conn_per_s_baseline": round(cps_b),
        "ratio": round(cps_a / cps_b, 3) if cps_b else math.nan,
        "connect_latency_us": {
            "agent": {"p50": round(_median([r.latency_p50_us for r in agent]), 1), "p99": round(_median([r.latency_p99_us for r in agent]), 1)},
            "baseline": {"p50": round(_median([r.latency_p50_us for r in base]), 1), "p99": round(_median([r.latency_p99_us for r in base]), 1)},
        },
        "verdict_p50_us": round(_median([r.summary.get(0.5, math.nan) for r in agent]), 2),
        "verdict_p99_us": round(_median([r.summary.get(0.99, math.nan) for r in agent]), 2),
        "verdict_histogram": {
            "packets": total,
            "p50_us": round(histogram_quantile(0.5, bounds, counts), 2),
            "p99_us": round(histogram_quantile(0.99, bounds, counts), 2),
            "fraction_le_10us": round(at_or_under(10), 4),
            "fraction_le_50us": round(at_or_under(50), 4),
            "mean_us": round(sum(r.sum_us for r in agent) / total, 2) if total else math.nan,
        },
        "queued_packets_agent": sum(r.queued for r in agent),
        "judged_packets_agent": judged,
        "dropped_verdicts": sum(r.dropped for r in agent),
        "unjudged_packets": sum(r.errors for r in agent),
        "kernel_queue_drops": sum(r.queue_drops for r in agent),
        "connections": {"agent": sum(r.connections for r in agent), "baseline": sum(r.connections for r in base)},
        "failures": {"agent": sum(r.failures + r.timeouts for r in agent), "baseline": sum(r.failures + r.timeouts for r in base)},
        "failure_kinds": {mode: _sum_kinds([r.failure_kinds for r in rs]) for mode, rs in (("agent", agent), ("baseline", base))},
        "cpu_cores": {
            "agent": {
                k: cpu(agent, k)
                for k in (
                    "cores_busy",
                    "agent_worker",
                    "agent_worker_runqueue_wait",
                    "agent_control",
                    "loadgen_clients",
                    "loadgen_servers",
                    "softirq",
                    "other",
                )
            },
            "baseline": {k: cpu(base, k) for k in ("cores_busy", "loadgen_clients", "loadgen_servers", "softirq", "other")},
        },
        "agent_cpu_us_per_packet": {
            "worker": cpu(agent, "agent_worker_us_per_packet"),
            "worker_kernel": cpu(agent, "agent_worker_sys_us_per_packet"),
            "control": cpu(agent, "agent_control_us_per_packet"),
        },
        "rounds": [
            {
                "mode": r.mode,
                "conn_per_s": round(r.conn_per_s),
                "latency_p50_us": round(r.latency_p50_us, 1),
                "latency_p99_us": round(r.latency_p99_us, 1),
                **(
                    {"verdict_p50_us": round(r.summary.get(0.5, math.nan), 2), "verdict_p99_us": round(r.summary.get(0.99, math.nan), 2)}
                    if r.mode == "agent"
                    else {}
                ),
            }
            for r in rounds
        ],
    }


def _kinds(kinds: dict[str, int]) -> str:
    return " (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")" if kinds else ""


def _lines(key: str, s: dict[str, Any]) -> list[str]:
    lat = s["connect_latency_us"]
    h = s["verdict_histogram"]
    ca, cb = s["cpu_cores"]["agent"], s["cpu_cores"]["baseline"]
    per = s["agent_cpu_us_per_packet"]
    return [
        f"{key}: {s['workload']}",
        f"  conn/s      agent {s['conn_per_s_agent']:>8,}   baseline {s['conn_per_s_baseline']:>8,}   ratio {s['ratio']:.2f}",
        f"  connect µs  agent p50 {lat['agent']['p50']:.0f} p99 {lat['agent']['p99']:.0f}   baseline p50 {lat['baseline']['p50']:.0f} p99 {lat['baseline']['p99']:.0f}",
        f"  userspace   {s['queued_packets_agent']:,} packets queued for {s['connections']['agent']:,} connections ({s['userspace_fraction']:.2%});"
        f" accept cache {'on (emptied before every measured run)' if s['accept_cache'] else 'off'}",
        f"  per packet  agent p50 {s['verdict_p50_us']:.1f} µs, p99 {s['verdict_p99_us']:.1f} µs (summary, last 8192 packets judged {'at all' if s['accept_cache'] else 'of each agent round'});"
        f" histogram over {h['packets']:,} packets: {h['fraction_le_10us']:.1%} <= 10 µs, {h['fraction_le_50us']:.2%} <= 50 µs",
        f"  agent CPU   worker {per['worker']:.1f} µs/packet ({per['worker_kernel']:.1f} in the kernel), control {per['control']:.1f} µs/packet;"
        f" {s['judged_packets_agent']:,} judged of {s['queued_packets_agent']:,} queued, {s['dropped_verdicts']} dropped, {s['kernel_queue_drops']} kernel queue drops",
        f"  CPU cores   agent rounds: {ca['cores_busy']:.2f} busy (worker {ca['agent_worker']:.2f} + {ca['agent_worker_runqueue_wait']:.2f} waiting for a CPU, control {ca['agent_control']:.2f},"
        f" loadgen {ca['loadgen_clients']:.2f}+{ca['loadgen_servers']:.2f} srv, other {ca['other']:.2f}; softirq in any of these {ca['softirq']:.2f});"
        f" baseline: {cb['cores_busy']:.2f} busy (loadgen {cb['loadgen_clients']:.2f}+{cb['loadgen_servers']:.2f} srv, other {cb['other']:.2f}; softirq {cb['softirq']:.2f})",
        f"  failures    agent {s['failures']['agent']} of {s['connections']['agent']:,}{_kinds(s['failure_kinds']['agent'])},"
        f" baseline {s['failures']['baseline']} of {s['connections']['baseline']:,}{_kinds(s['failure_kinds']['baseline'])}",
    ]


def run_lab_bench(
    seconds: float = 5.0,
    rounds: int = 3,
    as_json: bool = False,
    warmup: float = 1.0,
    pods: int = 10_000,
    policies: int = 1_000,
    concurrency: int = 64,
    filler_policies: int = FILLER_POLICIES,
    queues: int = 1,
    out: TextIO | None = None,
    accept_cache: bool = True,
) -> int:
    """The `lab bench` command. Returns the exit status (2: cannot run here, 1: the lab failed)."""
    stream = out or sys.stdout

    def log(text: str) -> None:
        print(text, file=stream, flush=True)

    problem = check_lab_prerequisites()
    if problem:
        print(f"error: {problem.replace(', or use --engine-only', '')}", file=sys.stderr)
        return 2
    try:
        config = BenchConfig(
            seconds=seconds,
            rounds=rounds,
            warmup=warmup,
            pods=pods,
            policies=policies,
            concurrency=concurrency,
            filler_policies=filler_policies,
            queues=queues,
            accept_cache=accept_cache,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Topology.cleanup_stale()
    clients = tuple(f"{NAMESPACE}/client-{i}" for i in range(max(config.w1_clients, config.w2_clients)))
    servers = tuple(f"{NAMESPACE}/server-{i}" for i in range(config.w2_servers))
    workloads = [
        Workload(
            "workload1", f"{config.w1_clients} client pods -> 1 server pod, port {PORT} (reconnecting)", clients[: config.w1_clients], servers[:1]
        ),
        Workload(
            "workload2",
            f"{config.w2_clients} client pods x {config.w2_servers} server pods, port {PORT} (distinct pod pairs)",
            clients[: config.w2_clients],
            servers,
        ),
    ]
    try:
        lab = BenchLab(config, log)
    except (LabError, TopologyError, DataplaneError, loadgen.LoadgenError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        assert lab.toggle is not None
        log(
            f"lab bench: 1 node, {len(lab.client_keys) + len(lab.server_keys)} real pods + {config.pods:,} synthetic "
            f"({lab.objects:,} objects, {config.policies:,} NetworkPolicies, every real pod selected), backend {lab.toggle.backend.value}; "
            f"{config.rounds} x (agent, baseline) rounds of {config.seconds:g} s after a {config.warmup:g} s warm-up; "
            f"{config.concurrency} connections in flight; {os.cpu_count()} CPUs shared by agent, load generator and kernel; "
            f"accept cache {'on' if config.accept_cache else 'off'}"
        )
        summaries: dict[str, dict[str, Any]] = {}
        for wl in workloads:
            results: list[RoundResult] = []
            for n in range(config.rounds):
                for mode in ("agent", "baseline"):
                    r = lab.run_round(wl, mode)
                    results.append(r)
                    extra = (
                        f", per packet p50 {r.summary.get(0.5, math.nan):.1f} µs p99 {r.summary.get(0.99, math.nan):.1f} µs"
                        if mode == "agent"
                        else ""
                    )
                    log(
                        f"  {wl.key} round {n + 1} {mode:8s} {r.conn_per_s:>9,.0f} conn/s, connect p50 {r.latency_p50_us:.0f} µs p99 {r.latency_p99_us:.0f} µs, "
                        f"{r.failures + r.timeouts} failed, CPU {r.cpu['cores_busy']:.2f} cores{extra}"
                    )
            summaries[wl.key] = summarize(wl, results, lab.bounds, config.accept_cache)
            for line in _lines(wl.key, summaries[wl.key]):
                log(line)
    except (LabError, TopologyError, DataplaneError, loadgen.LoadgenError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if lab.agent is not None:
            tail = lab.agent.log_tail()
            if tail:
                print(f"agent log:\n{tail}", file=sys.stderr)
        return 1
    finally:
        lab.close()
    w1, w2 = summaries["workload1"], summaries["workload2"]
    if as_json:
        doc = {
            **{
                k: w1[k]
                for k in (
                    "conn_per_s_agent",
                    "conn_per_s_baseline",
                    "ratio",
                    "verdict_p50_us",
                    "verdict_p99_us",
                    "accept_cache",
                    "userspace_fraction",
                )
            },
            "workload1": w1,
            "workload2": w2,
            "config": {
                "seconds": config.seconds,
                "rounds": config.rounds,
                "warmup": config.warmup,
                "synthetic_pods": config.pods,
                "network_policies": config.policies,
                "filler_policies": config.filler_policies,
                "concurrency": config.concurrency,
                "queues": config.queues,
                "server_threads": config.server_threads,
                "cpus": os.cpu_count(),
                "accept_cache": config.accept_cache,
            },
        }
        print(json.dumps(doc, allow_nan=True), file=stream, flush=True)
    return 0
