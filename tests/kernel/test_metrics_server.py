"""The agent's metrics port under attack from a pod, on the real kernel.

    pod t/attacker (10.244.1.2) ─┐
                                 node-1 (172.18.0.2): `kube-network-policies run`, metrics on :19081
    pod t/scraper  (10.244.1.3) ─┘

The attacker opens thousands of connections to the node's address and never finishes a
request, and keeps opening more while the kubelet (the node itself, from its own address) and
a scraper (another pod) ask /healthz, /readyz and /metrics. The agent must not grow a thread per
connection, and both must be answered at once; /statusz must not show pod IPs by default.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import netns  # tests/kernel/netns.py
import pytest

from kube_network_policies.lab.topology import Topology, entered

pytestmark = pytest.mark.kernel

SRC = Path(__file__).resolve().parents[2] / "src"
NODE, NODE4 = "node-1", "172.18.0.2"
ATTACKER4, SCRAPER4 = "10.244.1.2", "10.244.1.3"
PORT = 19081
HELD = 3000  # half-sent requests the attacker opens before the probes start


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    netns.require_kernel("ip", "nft", "iptables")
    Topology.cleanup_stale()
    with Topology.build(nodes=[(NODE, [NODE4])], pods=[("t/attacker", NODE, [ATTACKER4], False), ("t/scraper", NODE, [SCRAPER4], False)]) as t:
        yield t


def get(ns: str, path: str, timeout: float = 5.0) -> tuple[int, bytes, float]:
    """GET http://NODE4:PORT/path from a socket made in `ns`: (status, body, milliseconds)."""
    with entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    started = time.perf_counter()
    try:
        sock.settimeout(timeout)
        sock.connect((NODE4, PORT))
        conn = http.client.HTTPConnection(NODE4, PORT, timeout=timeout)
        conn.sock = sock
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body, (time.perf_counter() - started) * 1000
    finally:
        sock.close()


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_connection_flood_holds_no_threads_and_probes_are_answered(topo: Topology, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < HELD + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, HELD + 1000), hard))
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "ns.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: t}\n")
    node_ns = topo.node_netns(NODE)
    log_path = tmp_path / "agent.log"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            [
                shutil.which("ip") or "ip",
                "netns",
                "exec",
                node_ns,
                sys.executable,
                "-m",
                "kube_network_policies",
                "run",
                "--manifests",
                str(manifests),
                "--hostname-override",
                NODE,
                "-metrics-bind-address",
                f":{PORT}",
                "-nfqueue-id",
                "117",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    held: list[socket.socket] = []
    stop = threading.Event()
    churned = [0]
    try:
        deadline = time.monotonic() + 20
        while True:
            assert agent.poll() is None, log_path.read_text()
            try:
                if get(node_ns, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        threads_before = threads_of(agent.pid)
        # The default /statusz: counts, not the pod IPs of the node.
        status = json.loads(get(node_ns, "/statusz")[1])
        assert "diverted_ipv4" not in status and status["details"] is False

        attacker_ns = topo.netns_of("t/attacker")
        with entered(attacker_ns):
            for _ in range(HELD):
                s = socket.create_connection((NODE4, PORT), timeout=5)
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
                held.append(s)

        def churn() -> None:  # and keeps opening more, as fast as it can
            with entered(attacker_ns):
                while not stop.is_set():
                    try:
                        s = socket.create_connection((NODE4, PORT), timeout=5)
                        s.sendall(b"GET / HTTP/1.1\r\n")
                        held.append(s)
                        churned[0] += 1
                    except OSError:
                        time.sleep(0.001)

        churners = [threading.Thread(target=churn, daemon=True) for _ in range(3)]
        for t in churners:
            t.start()
        time.sleep(0.5)
        kubelet: list[float] = []
        scraper: list[float] = []
        scraper_failed = 0
        for i in range(30):
            status_code, _, ms = get(node_ns, "/healthz" if i % 2 else "/readyz")
            assert status_code == 200
            kubelet.append(ms)
            try:
                status_code, body, ms = get(topo.netns_of("t/scraper"), "/metrics")
                assert status_code == 200 and b"process_cpu_seconds_total" in body
                scraper.append(ms)
            except (OSError, http.client.HTTPException):
                scraper_failed += 1
            time.sleep(0.02)
        threads_during = threads_of(agent.pid)
        stop.set()
        for t in churners:
            t.join(5)
        print(
            f"\n{HELD} half-sent requests held + {churned[0]} more opened during the probes: agent threads {threads_before} -> {threads_during}; "
            f"kubelet /healthz,/readyz median {statistics.median(kubelet):.1f} ms, max {max(kubelet):.1f} ms; "
            f"scraper /metrics {len(scraper)} ok, {scraper_failed} failed, median {statistics.median(scraper):.1f} ms, max {max(scraper):.1f} ms"
        )
        assert threads_during <= threads_before, "the agent grew threads for connections"
        assert max(kubelet) < 1000 and statistics.median(kubelet) < 100
        # The scraper competes with the attacker for the remote slots: eviction lets it in.
        assert scraper_failed <= 3 and statistics.median(scraper) < 200
        assert agent.poll() is None
    finally:
        stop.set()
        for s in held:
            s.close()
        if agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
    assert "Traceback" not in log_path.read_text()
