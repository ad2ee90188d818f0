"""Reliability of the agent in Kubernetes mode against a real kube-apiserver + etcd.

- Pod churn: 200 pods, then thousands of label and IP changes as fast as the API takes them;
  the agent must keep up (applied resourceVersion reaches the last write soon after it) and its
  control process must not grow with the churn.
- Restart under load with -fail-open: a client opens fresh TCP connections in a loop to a pod
  selected by a policy while the agent is stopped (SIGTERM) and a new one started; none fails.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import builders  # tests/builders.py
from kube_network_policies.lab.apiproxy import ApiProxy
from kube_network_policies.lab.controlplane import ControlPlane
from kube_network_policies.lab.netns_mode import AgentProcess
from kube_network_policies.lab.probe import Prober
from kube_network_policies.lab.topology import Topology
from skips import require_root

METRICS_PORT = 19180


def need_root() -> None:
    require_root("ip", "nft", why="the agent installs nftables rules in a network namespace")


# ---- API helpers -----------------------------------------------------------------------------


def ok(cp: ControlPlane, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    status, out = cp.request(method, path, body, **kw)
    assert status in (200, 201, 202), f"{method} {path}: HTTP {status}: {out}"
    return out


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def make_namespace(cp: ControlPlane, name: str) -> None:
    ok(cp, "POST", "/api/v1/namespaces", builders.namespace(name))


def delete_namespace(cp: ControlPlane, name: str) -> None:
    """Pods first (no namespace controller runs here), then the namespace, finalized by hand."""
    cp.request("DELETE", f"/api/v1/namespaces/{name}/pods?gracePeriodSeconds=0")
    cp.request("DELETE", f"/apis/networking.k8s.io/v1/namespaces/{name}/networkpolicies")
    status, _ = cp.request("DELETE", f"/api/v1/namespaces/{name}")
    if status in (200, 202):
        status, ns = cp.request("GET", f"/api/v1/namespaces/{name}")
        if status == 200:
            ns["spec"]["finalizers"] = []
            cp.request("PUT", f"/api/v1/namespaces/{name}/finalize", ns)


def pod(name: str, node: str, **labels: str) -> dict[str, Any]:
    """A pod as created through the API (its status comes later, as a kubelet's would)."""
    return builders.pod(None, name, node=node, labels=labels, image=builders.PAUSE_IMAGE, ports=[{"name": "http", "containerPort": 8080}], phase=None)


def pod_status(ip: str) -> dict[str, Any]:
    return {"status": builders.pod_status(ip)}


def create_client_and_server(cp: ControlPlane, ns: str, node: str, client_ip: str, server_ip: str) -> str:
    """Pods x/client (app=client) and x/server (app=server) on `node`, with their IPs written
    through the status subresource; returns the pods' API path."""
    base = f"/api/v1/namespaces/{ns}/pods"
    for name, ip, app in (("client", client_ip, "client"), ("server", server_ip, "server")):
        ok(cp, "POST", base, pod(name, node, app=app))
        ok(cp, "PATCH", f"{base}/{name}/status", pod_status(ip), content_type="application/merge-patch+json")
    return base


def network_policy(name: str, match: dict[str, str], allow_all: bool = False) -> dict[str, Any]:
    ingress = [{}] if allow_all else [{"from": [{"podSelector": {}}], "ports": [{"port": "http"}]}]
    return builders.network_policy(None, name, {"podSelector": {"matchLabels": match}, "policyTypes": ["Ingress"], "ingress": ingress})


class FastApi:
    """Keep-alive HTTP/1.1 clients (one per thread) for floods; remembers the highest
    resourceVersion any write returned."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()
        self.last_rv = 0
        self.writes = 0

    def _client(self) -> httpx.Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = httpx.Client(base_url=self.cp.url, verify=self.cp.ssl_context(), headers={"Authorization": f"Bearer {self.cp.token}"}, timeout=30)
            self._local.client = c
            with self._lock:
                self._clients.append(c)
        return c

    def write(self, method: str, path: str, body: Any, content_type: str = "application/json") -> dict[str, Any]:
        import json

        r = self._client().request(method, path, content=json.dumps(body).encode(), headers={"Content-Type": content_type})
        assert r.status_code in (200, 201), f"{method} {path}: HTTP {r.status_code}: {r.text}"
        out: dict[str, Any] = r.json()
        rv = int(out["metadata"]["resourceVersion"])
        with self._lock:
            self.last_rv = max(self.last_rv, rv)
            self.writes += 1
        return out

    def merge(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.write("PATCH", path, patch, "application/merge-patch+json")

    def close(self) -> None:
        for c in self._clients:
            c.close()


# ---- the agent in a node namespace -------------------------------------------------------------


@contextlib.contextmanager
def lab(cp: ControlPlane, pods: list[tuple[str, str, list[str], bool]]) -> Iterator[tuple[Topology, str, ApiProxy, Path]]:
    """A one-node topology (plus `pods`) and a relay to the API server inside the node namespace."""
    node = unique("knp-rel-node")
    workdir = Path(tempfile.mkdtemp(prefix="knp-rel-"))
    topo = Topology.build(nodes=[(node, ["172.31.250.2"])], pods=[(k, node if n == "" else n, ips, h) for k, n, ips, h in pods])
    proxy = ApiProxy("127.0.0.1", int(cp.url.rsplit(":", 1)[1].rstrip("/")))
    try:
        proxy.listen_in(topo.node_netns(node))
        yield topo, node, proxy, workdir
    finally:
        proxy.close()
        topo.close()


def start_agent(topo: Topology, node: str, cp: ControlPlane, log: Path, flags: list[str]) -> AgentProcess:
    return AgentProcess(topo, node, None, flags, METRICS_PORT, log, kubeconfig=cp.kubeconfig_path)


def applied_rv(status: dict[str, Any] | None, plural: str) -> int:
    if not status:
        return -1
    for name, st in (status.get("sources") or {}).items():
        if name.split(".")[0] == plural and isinstance(st, dict):
            rv = st.get("appliedResourceVersion")
            return int(rv) if rv is not None and str(rv).isdigit() else -1
    return -1


def wait_for(agent: AgentProcess, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        assert agent.process.poll() is None, f"the agent exited ({agent.process.returncode}) waiting for {what}:\n{agent.log_tail(40)}"
        st = agent.status()
        if st is not None and predicate(st):
            return st
        assert time.monotonic() < deadline, f"timed out ({timeout:.0f} s) waiting for {what}; status {st and st.get('sources')}\n{agent.log_tail(40)}"
        time.sleep(0.05)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# ---- tests -------------------------------------------------------------------------------------


# No accept cache: every new connection's SYN goes to the queue (the cache would let the repeated
# client -> server:8080 tuple skip userspace, and the restart would test nothing).
RESTART_FLAGS = ["-fail-open", "-accept-cache=false"]
# A connection slower than the first SYN retransmission (1 s) had its SYN dropped: a failure too.
SYN_RTO_S = 0.9
N_PODS = 200
N_UPDATES = 3000


def test_pod_churn_flood(controlplane: ControlPlane) -> None:
    need_root()
    cp = controlplane
    ns = unique("knp-churn")
    make_namespace(cp, ns)
    api = FastApi(cp)
    try:
        with lab(cp, []) as (topo, node, _proxy, workdir):
            agent = start_agent(topo, node, cp, workdir / "agent.log", [])
            try:
                wait_for(agent, lambda s: s.get("ready"), 40, "ready")
                base = f"/api/v1/namespaces/{ns}/pods"
                api.write("POST", f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies", network_policy("web", {"app": "web"}))

                def create(j: int) -> None:
                    api.write("POST", base, pod(f"p{j}", node if j % 2 == 0 else "elsewhere", app="web" if j % 3 == 0 else "other"))
                    api.merge(f"{base}/p{j}/status", pod_status(f"10.250.0.{j + 1}"))

                with ThreadPoolExecutor(8) as ex:
                    list(ex.map(create, range(N_PODS)))
                target = api.last_rv
                wait_for(agent, lambda s: applied_rv(s, "pods") >= target and applied_rv(s, "networkpolicies") >= 0, 30, "the initial pods")
                time.sleep(3)
                rss_before = rss_kib(agent.process.pid)
                diverted_before = len(agent.status()["diverted_ipv4"])  # type: ignore[index]

                def update(i: int) -> None:
                    j, gen = i % N_PODS, i // N_PODS + 1
                    if i % 2 == 0:
                        api.merge(f"{base}/p{j}", {"metadata": {"labels": {"app": "web" if (i // 2) % 2 == 0 else "other", "gen": str(gen)}}})
                    else:
                        api.merge(f"{base}/p{j}/status", pod_status(f"10.250.{gen % 250}.{j + 1}"))

                writes_before = api.writes
                t0 = time.monotonic()
                with ThreadPoolExecutor(8) as ex:
                    list(ex.map(update, range(N_UPDATES)))
                last_write = time.monotonic()
                sent = api.writes - writes_before
                rate = sent / (last_write - t0)
                target = api.last_rv
                st = wait_for(agent, lambda s: applied_rv(s, "pods") >= target, 30, f"pods resourceVersion {target}")
                caught_up = time.monotonic() - last_write
                # The agent's view matches the API's: the pods on this node with app=web.
                want = sorted(
                    p["status"]["podIP"] for p in ok(cp, "GET", f"{base}?labelSelector=app%3Dweb")["items"] if p["spec"]["nodeName"] == node
                )
                st = wait_for(agent, lambda s: all(ip in s["diverted_ipv4"] for ip in want), 10, "the diverted set")
                assert not [ip for ip in st["diverted_ipv4"] if ip.startswith("10.250.") and ip not in want], (st["diverted_ipv4"], want)
                time.sleep(5)  # let the agent settle (its allocator and gc)
                rss_after = rss_kib(agent.process.pid)
                print(
                    f"\nchurn: {sent} pod updates in {last_write - t0:.1f} s ({rate:.0f}/s), caught up {caught_up:.2f} s after the last write "
                    f"(rv {target}); diverted {diverted_before} -> {len(st['diverted_ipv4'])}; "
                    f"control RSS {rss_before / 1024:.1f} MiB -> {rss_after / 1024:.1f} MiB ({(rss_after - rss_before) / 1024:+.1f} MiB)"
                )
                assert sent >= N_UPDATES
                assert caught_up <= 30
                assert rss_after - rss_before <= 20 * 1024, f"RSS grew {(rss_after - rss_before) / 1024:.1f} MiB with churn"
                agent.process.send_signal(signal.SIGTERM)
                assert agent.process.wait(15) == 0, agent.log_tail(40)
            finally:
                agent.stop()
    finally:
        api.close()
        delete_namespace(cp, ns)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_under_load_fail_open(controlplane: ControlPlane, sig: signal.Signals) -> None:
    """SIGTERM: a clean stop; SIGKILL: the agent dies with its rules still in place, and only
    fail-open (the queue's bypass) lets packets through until the new agent binds the queue."""
    need_root()
    cp = controlplane
    ns = unique("knp-restart")
    make_namespace(cp, ns)
    client_ip, server_ip = "10.251.0.2", "10.251.0.3"
    try:
        with lab(cp, [(f"{ns}/client", "", [client_ip], False), (f"{ns}/server", "", [server_ip], False)]) as (topo, node, _proxy, workdir):
            create_client_and_server(cp, ns, node, client_ip, server_ip)
            ok(
                cp,
                "POST",
                f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
                network_policy("allow-all", {"app": "server"}, allow_all=True),
            )
            with Prober(topo, timeout=2.0) as prober:
                server_netns = topo.netns_of(f"{ns}/server")
                client_netns = topo.netns_of(f"{ns}/client")
                prober.serve(server_netns, [("TCP", 8080)])
                request = (client_netns, client_ip, server_ip, "TCP", 8080)
                agent = start_agent(topo, node, cp, workdir / "agent-1.log", RESTART_FLAGS)
                agents = [agent]
                try:
                    wait_for(agent, lambda s: s.get("ready") and server_ip in s["diverted_ipv4"], 40, "the server pod diverted")
                    assert prober.probe([request]) == [True]

                    results: list[tuple[float, bool, str]] = []
                    stop = threading.Event()

                    def client() -> None:
                        while not stop.is_set():
                            r = prober.run([request])[0]
                            results.append((time.monotonic(), r.ok and r.seconds < SYN_RTO_S, f"{r.detail} in {r.seconds:.3f} s"))

                    t = threading.Thread(target=client, daemon=True)
                    t.start()
                    time.sleep(1.0)
                    window_start = time.monotonic()
                    agent.process.send_signal(sig)
                    assert agent.process.wait(15) == (0 if sig == signal.SIGTERM else -signal.SIGKILL), agent.log_tail(40)
                    down = time.monotonic()
                    agent = start_agent(topo, node, cp, workdir / "agent-2.log", RESTART_FLAGS)
                    agents.append(agent)
                    wait_for(agent, lambda s: s.get("ready") and server_ip in s["diverted_ipv4"], 40, "the new agent ready")
                    up = time.monotonic()
                    time.sleep(1.0)
                    stop.set()
                    t.join(10)
                    window = [r for r in results if r[0] >= window_start]
                    failed = [r for r in results if not r[1]]
                    slowest = max(float(r[2].split(" in ")[1].split()[0]) for r in results)
                    print(
                        f"\nrestart ({sig.name}): {len(results)} connections attempted ({len(window)} from the signal on), {len(failed)} failed, slowest {slowest * 1000:.1f} ms; "
                        f"old agent gone {down - window_start:.2f} s after the signal, new one ready {up - down:.2f} s later"
                    )
                    assert len(window) >= 10, len(window)
                    assert not failed, failed[:10]
                    assert not prober.server_errors, prober.server_errors
                finally:
                    for a in agents:
                        a.stop()
    finally:
        delete_namespace(cp, ns)


def test_crash_restart_under_load_fail_closed(controlplane: ControlPlane) -> None:
    """Fail-closed, the agent killed (a crash or OOM) and started again while a denied client keeps
    connecting: its rules stay without a listener (the kernel drops), and the new agent judges
    nothing before its first complete sync (not-ready workers drop), so no connection the policy
    denies gets through at any moment. (A SIGTERM stop removes the rules by design, see the
    README: a stopped fail-closed agent must not blackhole the node.)"""
    need_root()
    cp = controlplane
    ns = unique("knp-crash")
    make_namespace(cp, ns)
    client_ip, server_ip = "10.252.0.2", "10.252.0.3"
    flags = ["-accept-cache=false"]
    try:
        with lab(cp, [(f"{ns}/client", "", [client_ip], False), (f"{ns}/server", "", [server_ip], False)]) as (topo, node, _proxy, workdir):
            create_client_and_server(cp, ns, node, client_ip, server_ip)
            # The server accepts only from pods labelled app=nobody: the client is denied.
            only_nobody = {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "only-nobody"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "server"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "nobody"}}}]}],
                },
            }
            ok(cp, "POST", f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies", only_nobody)
            with Prober(topo, timeout=0.3) as prober:
                prober.serve(topo.netns_of(f"{ns}/server"), [("TCP", 8080)])
                request = (topo.netns_of(f"{ns}/client"), client_ip, server_ip, "TCP", 8080)
                agent = start_agent(topo, node, cp, workdir / "agent-1.log", flags)
                agents = [agent]
                try:
                    wait_for(agent, lambda s: s.get("ready") and server_ip in s["diverted_ipv4"], 40, "the server pod diverted")
                    results: list[bool] = []
                    stop = threading.Event()

                    def client() -> None:
                        while not stop.is_set():
                            results.append(prober.probe([request])[0])

                    t = threading.Thread(target=client, daemon=True)
                    t.start()
                    time.sleep(1.0)
                    agent.process.send_signal(signal.SIGKILL)
                    agent.process.wait(15)
                    agent = start_agent(topo, node, cp, workdir / "agent-2.log", flags)
                    agents.append(agent)
                    wait_for(agent, lambda s: s.get("ready") and server_ip in s["diverted_ipv4"], 40, "the new agent ready")
                    time.sleep(1.0)
                    stop.set()
                    t.join(10)
                    print(f"\ncrash restart, fail-closed: {len(results)} denied connections attempted, {sum(results)} got through")
                    assert len(results) >= 5, len(results)
                    assert not any(results)
                finally:
                    for a in agents:
                        a.stop()
    finally:
        delete_namespace(cp, ns)


def test_objects_deleted_while_the_agent_is_down(controlplane: ControlPlane) -> None:
    """A policy deleted and a pod relabelled while no agent runs: the next agent enforces the
    cluster as it is now, not as its predecessor last saw it."""
    need_root()
    cp = controlplane
    ns = unique("knp-down")
    make_namespace(cp, ns)
    client_ip, server_ip = "10.253.0.2", "10.253.0.3"
    try:
        with lab(cp, [(f"{ns}/client", "", [client_ip], False), (f"{ns}/server", "", [server_ip], False)]) as (topo, node, _proxy, workdir):
            base = create_client_and_server(cp, ns, node, client_ip, server_ip)
            policies = f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"
            deny = {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "deny-server"},
                "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]},
            }
            ok(cp, "POST", policies, deny)
            with Prober(topo, timeout=0.3) as prober:
                prober.serve(topo.netns_of(f"{ns}/server"), [("TCP", 8080)])
                request = (topo.netns_of(f"{ns}/client"), client_ip, server_ip, "TCP", 8080)
                agent = start_agent(topo, node, cp, workdir / "agent-1.log", [])
                try:
                    wait_for(agent, lambda s: s.get("ready") and server_ip in s["diverted_ipv4"], 40, "the server pod diverted")
                    assert prober.probe([request]) == [False]
                finally:
                    agent.stop()  # fail-closed SIGTERM: rules removed, nothing judged while down
                # While no agent runs: the deny policy goes, and the client is relabelled into a
                # second policy's reach that only exists now.
                ok(cp, "DELETE", f"{policies}/deny-server")
                only_trusted = dict(
                    deny,
                    metadata={"name": "only-trusted"},
                    spec={
                        "podSelector": {"matchLabels": {"app": "server"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"trusted": "yes"}}}]}],
                    },
                )
                ok(cp, "POST", policies, only_trusted)
                ok(
                    cp,
                    "PATCH",
                    f"{base}/client",
                    {"metadata": {"labels": {"app": "client", "trusted": "yes"}}},
                    content_type="application/merge-patch+json",
                )
                agent = start_agent(topo, node, cp, workdir / "agent-2.log", [])
                try:
                    wait_for(agent, lambda s: s.get("ready") and server_ip in s["diverted_ipv4"], 40, "the new agent ready")
                    assert prober.probe([request]) == [True]  # allowed: deny-server is gone, only-trusted admits it
                    ok(cp, "PATCH", f"{base}/client", {"metadata": {"labels": {"trusted": None}}}, content_type="application/merge-patch+json")
                    deadline = time.monotonic() + 10
                    while prober.probe([request])[0] and time.monotonic() < deadline:
                        pass
                    assert prober.probe([request]) == [False]  # and it keeps following changes
                finally:
                    agent.stop()
    finally:
        delete_namespace(cp, ns)
