"""Policy-change-to-enforcement latency through a real API server, as seen by probes.

A one-node lab with a client and a server pod; the agent watches the API server. Each change
toggles a NetworkPolicy that denies the client (or deletes it again); right after the write is
sent, the client probes with fresh connections every few milliseconds until the observed verdict
flips. The latency of a change is the time from just before the API write to the start of the
first probe that shows the new verdict. The server stays selected by a second policy throughout,
so what is measured is the policy path (watch, batch, workers); `--reselect` measures changes that
also alter the diverted IP set (an nftables sync).
"""

from __future__ import annotations

import json
import time
from typing import Any

from kube_network_policies.lab.apiserver_mode import ApiLabMode
from kube_network_policies.lab.runner import ScenarioCluster
from kube_network_policies.lab.scenario import parse_scenario

PROBE_TIMEOUT_S = 0.02
GIVE_UP_S = 5.0

SCENARIO: dict[str, Any] = {
    "name": "latency",
    "source": "benchmark",
    "cluster": {
        "namespaces": [{"name": "x", "labels": {"ns": "x"}}],
        "pods": [
            {"namespace": "x", "name": "client", "labels": {"app": "client"}, "ip": "10.244.1.10", "ports": []},
            {
                "namespace": "x",
                "name": "server",
                "labels": {"app": "server"},
                "ip": "10.244.1.11",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            },
        ],
    },
    "steps": [{"description": "serve", "probes": [{"protocol": "TCP", "port": 80, "default": "allow", "from": ["x/client"], "to": ["x/server"]}]}],
}


def _policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": "x"}, "spec": spec}


KEEP_SELECTED = _policy(
    "keep-selected",
    {
        "podSelector": {"matchLabels": {"app": "server"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "nobody"}}}]}, {"ports": [{"port": 81}]}],
    },
)
ALLOW_CLIENT = _policy(
    "allow-client", {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}
)


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def run_latency(changes: int = 40, reselect: bool = False, as_json: bool = False) -> int:
    mode = ApiLabMode(timeout=PROBE_TIMEOUT_S)
    try:
        scenario = parse_scenario(SCENARIO, "<latency benchmark>")
        session = mode.open(ScenarioCluster(scenario))
        try:
            assert session.topology is not None
            client_ns = session.topology.netns_of("x/client")
            request = [(client_ns, "10.244.1.10", "10.244.1.11", "TCP", 80)]
            api = session.api
            if not reselect:
                api.apply(KEEP_SELECTED)
            api.apply(ALLOW_CLIENT)
            session._wait_written("apply the set-up")
            results: dict[str, list[float]] = {"deny": [], "allow": []}
            for i in range(changes):
                deny = i % 2 == 0
                started = time.monotonic()
                if deny:
                    api.delete("NetworkPolicy", "x", "allow-client")
                    if reselect:
                        api.apply(_policy("deny", {"podSelector": {"matchLabels": {"app": "server"}}}))
                else:
                    api.apply(ALLOW_CLIENT)
                    if reselect:
                        api.delete("NetworkPolicy", "x", "deny")
                want = not deny
                while True:
                    sent = time.monotonic()
                    ok = session.prober.probe(request, timeout=PROBE_TIMEOUT_S)[0]
                    if ok == want:
                        results["allow" if want else "deny"].append((sent - started) * 1000)
                        break
                    if sent - started > GIVE_UP_S:
                        raise RuntimeError(f"change {i} did not take effect within {GIVE_UP_S} s")
                session._wait_written("settle")
        finally:
            session.close()
    finally:
        mode.close()
    everything = results["deny"] + results["allow"]
    figures = {
        "changes": changes,
        "reselect": reselect,
        "latency_p50_ms": round(_quantile(everything, 0.5), 1),
        "latency_p99_ms": round(_quantile(everything, 0.99), 1),
        "latency_max_ms": round(max(everything), 1),
        "to_deny_p50_ms": round(_quantile(results["deny"], 0.5), 1),
        "to_allow_p50_ms": round(_quantile(results["allow"], 0.5), 1),
    }
    print(f"policy change -> enforcement through the API server ({changes} changes{', with nftables resyncs' if reselect else ''}):")
    print(f"  p50 {figures['latency_p50_ms']} ms, p99 {figures['latency_p99_ms']} ms, max {figures['latency_max_ms']} ms")
    print(f"  allow->deny p50 {figures['to_deny_p50_ms']} ms, deny->allow p50 {figures['to_allow_p50_ms']} ms")
    if as_json:
        print(json.dumps(figures))
    return 0
