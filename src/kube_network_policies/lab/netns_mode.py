"""Lab mode: scenarios on the real kernel.

For each scenario: network namespaces for nodes, pods and external hosts (lab/topology.py), one
real agent per node running in its node namespace with that node's view (`kube-network-policies
run --manifests DIR --hostname-override NODE`), servers on every probed port, and parallel probes
(lab/probe.py). Each step's objects are written to the agents' manifest directory; the lab waits
until every agent reports the new manifest digest as applied and synced, and records how long
that took.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kube_network_policies.dataplane.netns import entered
from kube_network_policies.errors import KnpError
from kube_network_policies.lab.probe import Prober
from kube_network_policies.lab.runner import (
    Observation,
    Pair,
    ScenarioCluster,
    StepChanges,
    combine_families,
)
from kube_network_policies.lab.scenario import Scenario
from kube_network_policies.lab.topology import Topology, TopologyError
from kube_network_policies.model import kinds
from kube_network_policies.sources.files import manifest_digest

AGENT_START_TIMEOUT_S = 30.0
APPLY_TIMEOUT_S = 30.0
STATUS_POLL_S = 0.02
# Scenario features that are agent flags (model.kinds), and how they are passed to the agent.
FEATURE_FLAGS = {flag: f"-{flag}" for flag in kinds.flags()}


class LabError(KnpError):
    """The lab could not be set up or an agent misbehaved; the message says which and why."""


def _object_key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return (obj["kind"], meta.get("namespace", "") if kinds.namespaced(obj["kind"]) else "", meta["name"])


def _probed_servers(scenario: Scenario, cluster: ScenarioCluster) -> dict[str, set[tuple[str, int]]]:
    """Every (protocol, port) each endpoint must serve over the whole scenario."""
    pods = [p.key for p in scenario.pods]
    out: dict[str, set[tuple[str, int]]] = {}
    for step in scenario.steps:
        for probe in step.probes:
            for server in probe.servers if probe.servers is not None else pods:
                out.setdefault(server, set()).add((probe.protocol, probe.port))
    return out


def _external_ips(scenario: Scenario) -> list[str]:
    known = {ip for n in scenario.nodes for ip in n.ips} | {ip for p in scenario.pods for ip in p.ips}
    found: dict[str, None] = {}
    for step in scenario.steps:
        for probe in step.probes:
            for ep in (probe.clients or ()) + (probe.servers or ()) + tuple(x for pair in probe.exceptions for x in pair):
                if "/" not in ep and ep not in known:
                    found[ep] = None
    return list(found)


class AgentProcess:
    """One agent process in a node namespace."""

    def __init__(
        self,
        topology: Topology,
        node: str,
        manifests: Path | None,
        flags: list[str],
        port: int,
        log_path: Path,
        kubeconfig: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.node = node
        self.netns = topology.node_netns(node)
        self.port = port
        self.log_path = log_path
        src = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, **(env or {}), "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        argv = [
            shutil.which("ip") or "ip",
            "netns",
            "exec",
            self.netns,
            sys.executable,
            "-m",
            "kube_network_policies",
            "run",
            *(["--manifests", str(manifests)] if manifests is not None else ["--kubeconfig", str(kubeconfig)]),
            "--hostname-override",
            node,
            # Loopback of the node namespace, so the lab's tools may see every detail.
            "-metrics-bind-address",
            f"127.0.0.1:{port}",
            "-status-details",
            *flags,
        ]
        self._log = open(log_path, "wb")  # noqa: SIM115 - the agent writes it for its whole life; stop() closes it
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def status(self) -> dict[str, Any] | None:
        """The agent's /statusz, fetched over a socket created in its namespace."""
        try:
            with entered(self.netns):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.connect()
            try:
                conn.request("GET", "/statusz")
                resp = conn.getresponse()
                if resp.status != 200:
                    return None
                doc: dict[str, Any] = json.loads(resp.read())
                return doc
            finally:
                conn.close()
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    " + t for t in text[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(2)
        self._log.close()


class LabSession:
    def __init__(self, cluster: ScenarioCluster, timeout: float) -> None:
        self.cluster = cluster
        scenario = cluster.scenario
        self.apply_seconds: list[float] = []
        self._workdir = Path(tempfile.mkdtemp(prefix="knp-lab-"))
        self._manifests = self._workdir / "manifests"
        self._manifests.mkdir()
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.agents: list[AgentProcess] = []
        self.topology: Topology | None = None
        try:
            self.topology = Topology.build(
                nodes=[(n.name, n.ips) for n in scenario.nodes],
                pods=[(p.key, p.node, p.ips, p.host_network) for p in scenario.pods],
                external_ips=_external_ips(scenario),
            )
            self.prober = Prober(self.topology, timeout=timeout)
            servers = _probed_servers(scenario, cluster)
            by_netns: dict[str, set[tuple[str, int]]] = {}
            for endpoint, ports in servers.items():
                by_netns.setdefault(self.topology.netns_of(endpoint), set()).update(ports)
            used = {port for ports in by_netns.values() for _, port in ports}
            metrics_port = next(p for p in range(9080, 65535) if p not in used)
            for netns, ports in by_netns.items():
                self.prober.serve(netns, ports)
            for obj in cluster.initial_objects():
                self._objects[_object_key(obj)] = obj
            digest = self._write()
            flags = [FEATURE_FLAGS[r] for r in scenario.requires if r in FEATURE_FLAGS]
            for node in scenario.nodes:
                self.agents.append(
                    AgentProcess(self.topology, node.name, self._manifests, flags, metrics_port, self._workdir / f"agent-{node.name}.log")
                )
            self._wait_for(digest, AGENT_START_TIMEOUT_S, "start")
        except BaseException:
            self.close()
            raise

    def _write(self) -> str:
        """Write every object to one manifest file atomically (rename), return its digest."""
        tmp = self._workdir / "cluster.yaml.tmp"
        tmp.write_text(yaml.safe_dump_all(list(self._objects.values()), sort_keys=False))
        tmp.replace(self._manifests / "cluster.yaml")
        return manifest_digest([str(self._manifests)])

    def _wait_for(self, digest: str, timeout: float, what: str) -> float:
        return self._wait_agents(lambda st: st.get("digest") == digest, timeout, what)

    def _wait_agents(self, done: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> float:
        """Poll every agent's /statusz until it is ready and `done`; the time it took."""
        started = time.monotonic()
        pending = list(self.agents)
        while pending:
            for agent in list(pending):
                if agent.process.poll() is not None:
                    raise LabError(f"the agent on {agent.node} exited with status {agent.process.returncode} during {what}:\n{agent.log_tail()}")
                st = agent.status()
                if st is not None and st.get("ready") and done(st):
                    pending.remove(agent)
            if pending:
                if time.monotonic() - started > timeout:
                    names = ", ".join(a.node for a in pending)
                    raise LabError(f"agents on {names} did not {what} within {timeout:.0f} s:\n{pending[0].log_tail()}")
                time.sleep(STATUS_POLL_S)
        return time.monotonic() - started

    def apply(self, changes: StepChanges) -> None:
        if not changes.apply and not changes.delete:
            return
        for obj in changes.apply:
            self._objects[_object_key(obj)] = obj
        for ref in changes.delete:
            namespace = ref.namespace if kinds.namespaced(ref.kind) else ""
            self._objects.pop((ref.kind, namespace, ref.name), None)
            if ref.kind == "Namespace":
                for key in [k for k in self._objects if k[1] == ref.name]:
                    del self._objects[key]
        digest = self._write()
        self.apply_seconds.append(self._wait_for(digest, APPLY_TIMEOUT_S, "apply the step"))

    def observe(self, protocol: str, port: int, pairs: list[Pair]) -> dict[Pair, Observation]:
        assert self.topology is not None
        requests = []
        owners: list[Pair] = []
        for pair in pairs:
            client_netns = self.topology.netns_of(pair[0])
            for client_ip, server_ip in self.cluster.family_pairs(pair):
                requests.append((client_netns, client_ip, server_ip, protocol, port))
                owners.append(pair)
        results = self.prober.probe(requests) if requests else []
        per_pair: dict[Pair, list[bool]] = {}
        for pair, ok in zip(owners, results, strict=True):
            per_pair.setdefault(pair, []).append(ok)
        return {pair: combine_families(per_pair.get(pair, [])) for pair in pairs}

    def notes(self) -> list[str]:
        if not self.apply_seconds:
            return []
        worst = max(self.apply_seconds)
        return [f"changes took effect in {', '.join(f'{s * 1000:.0f}' for s in self.apply_seconds)} ms (max {worst * 1000:.0f} ms)"]

    def close(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop()
        if self.topology is not None:
            try:
                self.topology.close()
            except TopologyError as exc:
                print(f"warning: {exc}", file=sys.stderr)
        shutil.rmtree(self._workdir, ignore_errors=True)


class LabMode:
    name = "lab"

    def __init__(self, timeout: float = 1.0) -> None:
        self.timeout = timeout
        Topology.cleanup_stale()

    def unsupported(self, scenario: Scenario) -> str | None:
        return None

    def open(self, cluster: ScenarioCluster) -> LabSession:
        return LabSession(cluster, self.timeout)


def check_lab_prerequisites() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, nftables, NFQUEUE): run as root, or use --engine-only"
    for tool in ("ip", "nft", "iptables"):
        if shutil.which(tool) is None:
            return f"the lab needs `{tool}`: run scripts/setup.sh as root"
    return None
