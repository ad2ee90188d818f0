"""Engine benchmark: a synthetic cluster of the issue's size, decisions per second, update costs, memory.

Prints figures; it asserts nothing (targets are checked by reading them, not by a timed test).
"""

from __future__ import annotations

import gc
import json
import os
import random
import time
from typing import Any

from kube_network_policies.engine import ALL_FEATURES, ClusterState, Flow
from kube_network_policies.model import parse_object

APPS = [f"app-{i}" for i in range(10)]
TIERS = ["web", "api", "db"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pod_object(i: int, namespaces: int, rng: random.Random) -> dict[str, Any]:
    ns = f"ns-{i % namespaces}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"pod-{i}",
            "namespace": ns,
            "labels": {"app": APPS[i % len(APPS)], "tier": TIERS[i % len(TIERS)], "pod-template-hash": f"h{i % 7}"},
        },
        "spec": {
            "nodeName": f"node-{i % 100}",
            "containers": [
                {
                    "name": "c",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"name": "dns", "containerPort": 53, "protocol": "UDP"}],
                }
            ],
        },
        "status": {"phase": "Running", "podIP": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"},
    }


def network_policy_object(i: int, namespaces: int, rng: random.Random) -> dict[str, Any]:
    ns = f"ns-{i % namespaces}"
    app = APPS[(i // namespaces) % len(APPS)]
    other = APPS[(i // namespaces + 3) % len(APPS)]
    ingress: list[dict[str, Any]] = [
        {"from": [{"podSelector": {"matchLabels": {"app": other}}}], "ports": [{"port": 8080}, {"port": "http"}]},
        {
            "from": [
                {
                    "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]},
                    "podSelector": {"matchLabels": {"tier": "web"}},
                }
            ],
            "ports": [{"protocol": "TCP", "port": 9000, "endPort": 9100}],
        },
        {"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}]},
    ]
    egress: list[dict[str, Any]] = [
        {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "app-0"}}}], "ports": [{"protocol": "UDP", "port": 53}]},
        {"to": [{"podSelector": {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]}}]},
    ]
    types = ["Ingress", "Egress"] if i % 3 == 0 else ["Ingress"]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"np-{i}", "namespace": ns},
        "spec": {
            "podSelector": {"matchLabels": {"app": app}},
            "policyTypes": types,
            "ingress": ingress,
            "egress": egress if "Egress" in types else [],
        },
    }


def admin_policy_object(i: int, namespaces: int) -> dict[str, Any]:
    target = {"matchLabels": {"kubernetes.io/metadata.name": f"ns-{i % namespaces}"}}
    rules = [
        {
            "name": "deny-db",
            "action": "Deny",
            "from": [{"pods": {"namespaceSelector": {"matchLabels": {"team": "x"}}, "podSelector": {"matchLabels": {"tier": "db"}}}}],
        },
        {"name": "pass-same", "action": "Pass", "from": [{"namespaces": target}], "ports": [{"portRange": {"start": 8000, "end": 8999}}]},
    ]
    egress = [{"name": "deny-external", "action": "Deny", "to": [{"networks": ["203.0.113.0/24"]}]}]
    if i % 2 == 0:
        return {
            "apiVersion": "policy.networking.k8s.io/v1alpha1",
            "kind": "AdminNetworkPolicy",
            "metadata": {"name": f"anp-{i}"},
            "spec": {"priority": i % 1000, "subject": {"namespaces": target}, "ingress": rules, "egress": egress},
        }
    cnp_rules = [
        {
            "name": "deny-db",
            "action": "Deny",
            "from": [{"pods": {"namespaceSelector": {"matchLabels": {"team": "x"}}, "podSelector": {"matchLabels": {"tier": "db"}}}}],
        },
        {
            "name": "pass-same",
            "action": "Pass",
            "from": [{"namespaces": target}],
            "protocols": [{"tcp": {"destinationPort": {"range": {"start": 8000, "end": 8999}}}}],
        },
    ]
    return {
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": f"cnp-{i}"},
        "spec": {
            "tier": "Admin" if i % 4 == 1 else "Baseline",
            "priority": i % 1000,
            "subject": {"namespaces": target},
            "ingress": cnp_rules,
            "egress": egress,
        },
    }


def run_benchmark(pods: int = 10_000, policies: int = 1_000, admin_policies: int = 100, seconds: float = 3.0, as_json: bool = False) -> int:
    rng = random.Random(42)
    namespaces = max(1, pods // 100)
    gc.collect()
    rss0 = _rss_bytes()
    state = ClusterState(ALL_FEATURES)
    t0 = time.perf_counter()
    for n in range(namespaces):
        state.apply(parse_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns-{n}", "labels": {"team": "abx"[n % 3]}}}))
    for i in range(pods):
        state.apply(parse_object(pod_object(i, namespaces, rng)))
    t_pods = time.perf_counter() - t0
    gc.collect()
    rss_pods = _rss_bytes()
    t0 = time.perf_counter()
    for i in range(policies):
        state.apply(parse_object(network_policy_object(i, namespaces, rng)))
    t_np = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(admin_policies):
        state.apply(parse_object(admin_policy_object(i, namespaces)))
    t_admin = time.perf_counter() - t0
    gc.collect()
    rss_all = _rss_bytes()

    # Decisions over random pod pairs and a few external peers, ports drawn from what policies use.
    ips = [pod_object(i, namespaces, rng)["status"]["podIP"] for i in range(pods)]
    ports = [(6, 8080), (6, 80), (17, 53), (6, 9050), (6, 8500), (132, 3868)]
    flows = []
    for _ in range(50_000):
        proto, port = rng.choice(ports)
        src = rng.choice(ips) if rng.random() > 0.05 else "192.168.7.7"
        dst = rng.choice(ips) if rng.random() > 0.05 else "203.0.113.9"
        flows.append(Flow.of(src, dst, proto, port, 40000))
    evaluate = state.evaluate
    for f in flows[:2000]:
        evaluate(f)  # warm-up
    count = 0
    allowed = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        for f in flows:
            if evaluate(f).allowed:
                allowed += 1
        count += len(flows)
    elapsed = time.perf_counter() - t0
    per_second = count / elapsed

    # Per-decision latency distribution, measured one call at a time.
    samples = []
    clock = time.perf_counter_ns
    for f in flows[:20_000]:
        a = clock()
        evaluate(f)
        samples.append(clock() - a)
    samples.sort()
    p50 = samples[len(samples) // 2] / 1000
    p99 = samples[int(len(samples) * 0.99)] / 1000

    # Update costs.
    t0 = time.perf_counter()
    n_pod_updates = 2000
    for _ in range(n_pod_updates):
        obj = pod_object(rng.randrange(pods), namespaces, rng)
        obj["metadata"]["labels"]["app"] = rng.choice(APPS)
        state.apply(parse_object(obj))
    pod_update_us = (time.perf_counter() - t0) / n_pod_updates * 1e6
    t0 = time.perf_counter()
    n_np_updates = 200
    for _ in range(n_np_updates):
        obj = network_policy_object(rng.randrange(policies), namespaces, rng)
        obj["spec"]["podSelector"] = {"matchLabels": {"app": rng.choice(APPS)}}
        state.apply(parse_object(obj))
    np_update_us = (time.perf_counter() - t0) / n_np_updates * 1e6
    t0 = time.perf_counter()
    n_admin_updates = 20
    for _ in range(n_admin_updates):
        state.apply(parse_object(admin_policy_object(rng.randrange(admin_policies), namespaces)))
    admin_update_us = (time.perf_counter() - t0) / n_admin_updates * 1e6

    figures = {
        "pods": pods,
        "network_policies": policies,
        "admin_policies": admin_policies,
        "decisions_per_s": round(per_second),
        "decision_p50_us": round(p50, 2),
        "decision_p99_us": round(p99, 2),
        "allowed_fraction": round(allowed / count, 3),
        "pod_update_us": round(pod_update_us, 1),
        "network_policy_update_us": round(np_update_us, 1),
        "admin_policy_update_us": round(admin_update_us, 1),
        "initial_load_s": round(t_pods + t_np + t_admin, 2),
        "rss_mib": round(rss_all / 2**20, 1),
        "bytes_per_pod": round((rss_pods - rss0) / pods),
        "managed_ips_node_0": len(state.managed_ips("node-0")),
    }
    print(f"cluster: {pods} pods in {namespaces} namespaces, {policies} NetworkPolicies, {admin_policies} admin/baseline policies")
    print(f"load: pods {t_pods:.2f} s, NetworkPolicies {t_np:.2f} s, admin policies {t_admin:.2f} s")
    print(f"decisions: {per_second:,.0f}/s on one core (uncached), p50 {p50:.2f} µs, p99 {p99:.2f} µs, {allowed / count:.1%} allowed")
    print(f"updates: pod {pod_update_us:.0f} µs, NetworkPolicy {np_update_us:.0f} µs, admin policy {admin_update_us:.0f} µs")
    print(f"memory: RSS {rss_all / 2**20:.1f} MiB, {figures['bytes_per_pod']} bytes per pod (pods only)")
    if as_json:
        print(json.dumps(figures))
    return 0
