"""`kube-network-policies lab bench` for real, very short and with a small synthetic state: the JSON
line has the documented keys with positive numbers, every connection succeeded with and without
the agent, every queued packet was judged (none dropped), and nothing is left behind.

Skips when not root (or gcc/ip/nft/iptables are missing); fails instead under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import netns
import pytest

pytestmark = pytest.mark.kernel

SRC = Path(__file__).resolve().parents[2] / "src"


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and value == value and value > 0


@pytest.mark.parametrize("accept_cache", [True, False], ids=["cache", "no-cache"])
def test_lab_bench_smoke(accept_cache: bool) -> None:
    netns.require_kernel("ip", "nft", "iptables", "gcc")
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "kube_network_policies",
        "lab",
        "bench",
        "--json",
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--warmup",
        "0.5",
        "--pods",
        "300",
        "--policies",
        "30",
        "--concurrency",
        "16",
        f"--accept-cache={str(accept_cache).lower()}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Whatever happened, the run's namespaces (named knp<pid>-...) must be gone.
    left = [n for n in os.listdir("/var/run/netns") if n.startswith(f"knp{proc.pid}-")] if os.path.isdir("/var/run/netns") else []
    assert not left, f"namespaces left behind: {left}"
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    lines = out.strip().splitlines()
    assert any(line.startswith("workload1:") for line in lines) and any(line.startswith("workload2:") for line in lines), out
    doc = json.loads(lines[-1])
    assert doc["accept_cache"] is accept_cache and doc["config"]["accept_cache"] is accept_cache
    for key in ("conn_per_s_agent", "conn_per_s_baseline", "ratio", "verdict_p50_us", "verdict_p99_us"):
        assert _positive(doc[key]), (key, doc[key])
    for name in ("workload1", "workload2"):
        w = doc[name]
        for key in ("conn_per_s_agent", "conn_per_s_baseline", "ratio", "verdict_p50_us", "verdict_p99_us"):
            assert _positive(w[key]), (name, key, w[key])
        assert w["failures"] == {"agent": 0, "baseline": 0}, (name, w["failures"])
        assert w["connections"]["agent"] > 0 and w["connections"]["baseline"] > 0, (name, w["connections"])
        if accept_cache:
            # At least one connection per (client, server) tuple went through the queue (the cache
            # is emptied before the measured run), the repeated ones skipped it.
            tuples = w["client_pods"] * w["server_pods"]
            assert w["connections"]["agent"] > w["judged_packets_agent"] == w["queued_packets_agent"] >= tuples, (name, w)
            assert 0 < w["userspace_fraction"] < 1, (name, w)
        else:
            # Every connection went through the queue and was judged (allowed) by the agent.
            assert w["judged_packets_agent"] == w["queued_packets_agent"] >= w["connections"]["agent"], (name, w)
            assert w["userspace_fraction"] >= 1, (name, w)
        assert w["dropped_verdicts"] == 0 and w["unjudged_packets"] == 0 and w["kernel_queue_drops"] == 0, (name, w)
        lat = w["connect_latency_us"]
        assert all(_positive(lat[m][q]) for m in ("agent", "baseline") for q in ("p50", "p99")), (name, lat)
    assert doc["workload2"]["client_pods"] == 8 and doc["workload2"]["server_pods"] == 8


def test_nfqueue_bench_smoke() -> None:
    """`python -m kube_network_policies.lab.bench_nfqueue`: every SYN went through the queue and
    was answered without error, and its scratch namespace is gone afterwards."""
    netns.require_kernel("ip", "iptables")
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kube_network_policies.lab.bench_nfqueue", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(f"/var/run/netns/knp-bench-{proc.pid}")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    figures = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()}
    assert figures["connections_ok"] > 0 and figures["connections_failed"] == 0, figures
    # The server accepted what the clients connected, so the queue answered every SYN (a few
    # retransmitted SYNs may be queued twice).
    assert figures["packets"] >= figures["connections_ok"], figures
    assert figures["cpu_us_per_packet"] > 0 and figures["packets_per_round"] >= 1, figures
    assert figures["decide_errors"] == figures["verdict_errors"] == figures["overruns"] == 0, figures
