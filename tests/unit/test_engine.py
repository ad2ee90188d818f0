"""The engine: tier pipeline, indexes, managed IPs, and incremental updates equal to a rebuild."""

from __future__ import annotations

import random
from typing import Any

import pytest

import builders  # tests/builders.py
from builders import admin_network_policy as anp
from builders import baseline_admin_network_policy as banp
from builders import cluster_network_policy as cnp
from builders import network_policy as np
from kube_network_policies.engine import ALL_FEATURES, Action, ClusterState, Features, Flow, Tier
from kube_network_policies.model import parse_object


def ns(name: str, **labels: str) -> dict[str, Any]:
    return builders.namespace(name, labels)


def pod(
    namespace: str,
    name: str,
    ip: str | list[str],
    node: str = "n1",
    phase: str = "Running",
    host_network: bool = False,
    ports: list[dict[str, Any]] | None = None,
    **labels: str,
) -> dict[str, Any]:
    return builders.pod(namespace, name, ip, node=node, phase=phase, host_network=host_network, ports=ports or [], labels=labels)


def build(*objects: dict[str, Any], features: Features = ALL_FEATURES) -> ClusterState:
    state = ClusterState(features)
    for o in objects:
        state.apply(parse_object(o))
    return state


BASE = [
    ns("x", team="x"),
    ns("y", team="y"),
    pod("x", "a", "10.0.0.1", app="a", ports=[{"name": "http", "containerPort": 8080}]),
    pod("x", "b", "10.0.0.2", app="b", ports=[{"name": "http", "containerPort": 80}, {"name": "dns", "containerPort": 53, "protocol": "UDP"}]),
    pod("y", "a", "10.0.1.1", node="n2", app="a"),
]


def allowed(state: ClusterState, src: str, dst: str, port: int = 80, proto: str = "TCP") -> bool:
    return state.evaluate(Flow.of(src, dst, proto, port, 40000)).allowed


def test_no_policy_allows_and_says_why() -> None:
    s = build(*BASE)
    d = s.evaluate(Flow.of("10.0.0.1", "10.0.0.2", "TCP", 80))
    assert d.allowed
    assert d.ingress.chain[0].tier is Tier.DEFAULT
    assert s.managed_ips("n1") == frozenset()


def test_networkpolicy_isolates_and_rule_allows() -> None:
    s = build(
        *BASE,
        np(
            "x",
            "allow-a",
            {
                "podSelector": {"matchLabels": {"app": "b"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 80}]}],
            },
        ),
    )
    assert allowed(s, "10.0.0.1", "10.0.0.2", 80)
    assert not allowed(s, "10.0.0.1", "10.0.0.2", 81)
    assert not allowed(s, "10.0.0.1", "10.0.0.2", 80, "UDP")  # protocol defaults to TCP
    assert not allowed(s, "10.0.1.1", "10.0.0.2", 80)  # podSelector alone: own namespace only
    assert not allowed(s, "192.0.2.1", "10.0.0.2", 80)  # selectors never match outside addresses
    d = s.evaluate(Flow.of("10.0.0.1", "10.0.0.2", "TCP", 80))
    assert d.ingress.chain[-1].policy == "x/allow-a" and d.ingress.chain[-1].rule == "ingress rule 0"
    denied = s.evaluate(Flow.of("10.0.1.1", "10.0.0.2", "TCP", 80))
    assert denied.ingress.chain[-1].action is Action.DENY and "x/allow-a" in denied.ingress.chain[-1].detail


def test_named_port_resolves_on_destination_by_name_and_protocol() -> None:
    s = build(*BASE, np("x", "named", {"podSelector": {}, "ingress": [{"ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}]}))
    assert allowed(s, "10.0.1.1", "10.0.0.2", 80)  # x/b serves http on 80
    assert not allowed(s, "10.0.1.1", "10.0.0.2", 8080)  # 8080 is a's http, not b's
    assert allowed(s, "10.0.1.1", "10.0.0.1", 8080)
    assert allowed(s, "10.0.1.1", "10.0.0.2", 53, "UDP")
    assert not allowed(s, "10.0.1.1", "10.0.0.2", 53, "TCP")


def test_end_port_inclusive_and_ipblock_except() -> None:
    s = build(
        *BASE,
        np(
            "x",
            "range",
            {
                "podSelector": {},
                "ingress": [
                    {"from": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}], "ports": [{"port": 9000, "endPort": 9005}]}
                ],
            },
        ),
    )
    assert allowed(s, "192.0.2.1", "10.0.0.1", 9000)
    assert allowed(s, "192.0.2.1", "10.0.0.1", 9005)
    assert not allowed(s, "192.0.2.1", "10.0.0.1", 9006)
    assert not allowed(s, "192.0.2.200", "10.0.0.1", 9001)


def test_admin_pass_then_networkpolicy_then_baseline() -> None:
    deny_all_np = np("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]})
    s = build(
        *BASE,
        anp("pass-x", 10, {"subject": {"namespaces": {"matchLabels": {"team": "x"}}}, "ingress": [{"action": "Pass", "from": [{"namespaces": {}}]}]}),
        banp({"subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": "y"}}}]}]}),
    )
    # Pass, no NetworkPolicy: the baseline denies y -> x.
    d = s.evaluate(Flow.of("10.0.1.1", "10.0.0.1", "TCP", 80))
    assert not d.allowed
    assert [r.tier for r in d.ingress.chain] == [Tier.ADMIN, Tier.BASELINE]
    assert d.ingress.chain[0].action is Action.PASS
    # A NetworkPolicy that selects the pod takes over from the baseline.
    s.apply(parse_object(np("x", "allow-y", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}]}]})))
    assert allowed(s, "10.0.1.1", "10.0.0.1")
    s.apply(parse_object(deny_all_np))
    assert allowed(s, "10.0.1.1", "10.0.0.1")  # union: one rule is enough
    s.delete("NetworkPolicy", "x", "allow-y")
    d = s.evaluate(Flow.of("10.0.1.1", "10.0.0.1", "TCP", 80))
    assert not d.allowed and d.ingress.chain[-1].tier is Tier.NETWORK_POLICY


def test_admin_priority_and_rule_order_and_deny_beats_np() -> None:
    s = build(
        *BASE,
        np("x", "allow-all", {"podSelector": {}, "ingress": [{}]}),
        anp("b-deny", 20, {"subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
        anp(
            "a-allow",
            10,
            {
                "subject": {"namespaces": {}},
                "ingress": [{"action": "Allow", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}}]}],
            },
        ),
    )
    assert allowed(s, "10.0.1.1", "10.0.0.2")  # a-allow (priority 10) first
    assert not allowed(s, "10.0.0.2", "10.0.0.1")  # b is not app=a: b-deny
    s.apply(parse_object(anp("a-allow", 30, {"subject": {"namespaces": {}}, "ingress": [{"action": "Allow", "from": [{"namespaces": {}}]}]})))
    assert not allowed(s, "10.0.1.1", "10.0.0.2")  # priorities swapped


def test_egress_deny_at_source_wins_and_both_directions_reported() -> None:
    s = build(
        *BASE,
        anp(
            "deny-out",
            1,
            {
                "subject": {"pods": {"namespaceSelector": {"matchLabels": {"team": "y"}}, "podSelector": {}}},
                "egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/24"]}]}],
            },
        ),
    )
    d = s.evaluate(Flow.of("10.0.1.1", "10.0.0.1", "TCP", 80))
    assert not d.allowed and not d.egress.allowed and d.ingress.allowed
    assert d.egress.chain[0].policy == "anp/deny-out"


def test_node_local_evaluation_skips_remote_directions() -> None:
    s = build(*BASE, np("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    f = Flow.of("10.0.1.1", "10.0.0.1", "TCP", 80)
    assert not s.evaluate(f).allowed
    assert s.evaluate(f, node="n2").allowed  # ingress of x/a is judged on n1, not n2
    assert not s.evaluate(f, node="n1").allowed


def test_cnp_baseline_pass_is_allow_and_fail_closed_peers() -> None:
    s = build(
        *BASE,
        cnp(
            "base",
            "Baseline",
            5,
            {
                "subject": {"namespaces": {}},
                "ingress": [{"action": "Pass", "from": [{"namespaces": {}}]}, {"action": "Deny", "from": [{"namespaces": {}}]}],
            },
        ),
    )
    assert allowed(s, "10.0.0.1", "10.0.0.2")
    s = build(
        *BASE,
        cnp(
            "unknown",
            "Admin",
            5,
            {"subject": {"namespaces": {}}, "ingress": [{"action": "Accept", "from": [{"future": {}}]}, {"action": "Pass", "from": [{}]}]},
        ),
    )
    d = s.evaluate(Flow.of("10.0.0.1", "10.0.0.2", "TCP", 80))
    assert not d.allowed and "fail closed" in d.ingress.chain[0].rule


def test_nodes_peer_and_networks() -> None:
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "n1", "labels": {"role": "worker"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]},
    }
    s = build(
        *BASE,
        node,
        anp("nodes", 1, {"subject": {"namespaces": {}}, "egress": [{"action": "Deny", "to": [{"nodes": {"matchLabels": {"role": "worker"}}}]}]}),
    )
    assert not allowed(s, "10.0.0.1", "172.18.0.2")
    assert allowed(s, "10.0.0.1", "172.18.0.3")
    node["metadata"]["labels"] = {"role": "control-plane"}
    s.apply(parse_object(node))
    assert allowed(s, "10.0.0.1", "172.18.0.2")


def test_features_off_ignore_admin_policies() -> None:
    deny = anp("deny", 1, {"subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]})
    s = build(*BASE, deny, features=Features())
    assert allowed(s, "10.0.0.1", "10.0.0.2")
    assert ("AdminNetworkPolicy", "", "deny") in s.ignored
    s = build(*BASE, deny, features=Features.of("admin-network-policy"))
    assert not allowed(s, "10.0.0.1", "10.0.0.2")


def test_ip_owner_preference_and_terminal_and_host_network() -> None:
    s = build(
        ns("x"),
        pod("x", "old-job", "10.0.0.9", phase="Succeeded", app="job"),
        pod("x", "new", "10.0.0.9", phase="Running", app="new"),
        pod("x", "pending", "10.0.0.9", phase="Pending", app="pending"),
        pod("x", "host", "172.18.0.2", host_network=True, app="host"),
        np("x", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]}),
    )
    assert s.pod_by_ip("10.0.0.9").name == "new"  # Running preferred; Succeeded ignored
    assert s.pod_by_ip("172.18.0.2") is None  # hostNetwork pods are not pods for IP lookup
    assert s.managed_ips("n1") == frozenset({"10.0.0.9"})
    assert allowed(s, "10.0.0.1", "172.18.0.2")  # never a subject
    s.delete("Pod", "x", "new")
    assert s.pod_by_ip("10.0.0.9").name == "pending"


def test_managed_ips_and_notifications() -> None:
    s = build(*BASE)
    seen: list[tuple[str, frozenset[str]]] = []
    s.add_listener(lambda node: seen.append((node, s.managed_ips(node))))
    s.apply(parse_object(np("x", "a-only", {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]})))
    assert seen == [("n1", frozenset({"10.0.0.1"}))]
    s.apply(parse_object(pod("x", "a", "10.0.0.1", app="a")))  # an update that changes nothing selected
    assert len(seen) == 1
    s.apply(parse_object(pod("x", "b", "10.0.0.2", app="a")))  # b becomes selected
    assert seen[-1] == ("n1", frozenset({"10.0.0.1", "10.0.0.2"}))
    s.delete("NetworkPolicy", "x", "a-only")
    assert seen[-1] == ("n1", frozenset())
    # Admin policies are computed per pod too: only the pods they select are diverted.
    s.apply(
        parse_object(
            anp(
                "y-only",
                1,
                {"subject": {"namespaces": {"matchLabels": {"team": "y"}}}, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]},
            )
        )
    )
    assert s.managed_ips("n1") == frozenset() and s.managed_ips("n2") == frozenset({"10.0.1.1"})


def test_namespace_relabel_moves_peers_and_subjects() -> None:
    s = build(*BASE, np("x", "from-team-z", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "z"}}}]}]}))
    assert not allowed(s, "10.0.1.1", "10.0.0.1")
    s.apply(parse_object(ns("y", team="z")))
    assert allowed(s, "10.0.1.1", "10.0.0.1")
    s.delete("Namespace", "", "y")  # labels fall back to the implied name label
    assert not allowed(s, "10.0.1.1", "10.0.0.1")


# ---- incremental updates give the same answers as building from scratch ------------------------

LABELS = [{"app": "a"}, {"app": "b"}, {"app": "a", "tier": "db"}, {}]


def random_object(rng: random.Random, i: int) -> dict[str, Any]:
    kind = rng.choice(["pod", "pod", "ns", "np", "anp", "cnp", "banp"])
    if kind == "pod":
        n = rng.randrange(6)
        namespace = rng.choice("xy")
        # Addresses are unique per pod name: two Running pods claiming one address is resolved
        # by arrival order, which a rebuild cannot reproduce.
        return pod(
            namespace,
            f"p{n}",
            f"10.0.{'xy'.index(namespace)}.{n + 1}",
            node=rng.choice(["n1", "n2"]),
            phase=rng.choice(["Running", "Running", "Succeeded"]),
            **rng.choice(LABELS),
        )
    if kind == "ns":
        return ns(rng.choice("xy"), **rng.choice([{"team": "x"}, {"team": "y"}, {}]))
    sel = rng.choice([{}, {"matchLabels": {"app": "a"}}, {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}])
    if kind == "np":
        peer = rng.choice([{"podSelector": sel}, {"namespaceSelector": {"matchLabels": {"team": "y"}}}, {"ipBlock": {"cidr": "10.0.0.0/30"}}])
        return np(
            rng.choice("xy"),
            f"np{rng.randrange(3)}",
            {
                "podSelector": sel,
                "policyTypes": rng.choice([["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
                "ingress": [{"from": [peer], "ports": [{"port": 80}]}],
                "egress": [{"to": [peer]}],
            },
        )
    rules = [{"action": rng.choice(["Allow", "Deny", "Pass"]), "from": [{"pods": {"namespaceSelector": {}, "podSelector": sel}}]}]
    if kind == "anp":
        return anp(f"anp{rng.randrange(3)}", rng.randrange(5), {"subject": {"namespaces": {}}, "ingress": rules})
    if kind == "banp":
        return banp(
            {
                "subject": {"pods": {"namespaceSelector": {}, "podSelector": sel}},
                "ingress": [{"action": rng.choice(["Allow", "Deny"]), "from": [{"namespaces": {}}]}],
            }
        )
    v2 = [{"action": rng.choice(["Accept", "Deny", "Pass"]), "from": [{"pods": {"namespaceSelector": {}, "podSelector": sel}}]}]
    return cnp(
        f"cnp{rng.randrange(3)}",
        rng.choice(["Admin", "Baseline"]),
        rng.randrange(5),
        {"subject": {"namespaces": {}}, "ingress": v2, "egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.4/30"]}]}]},
    )


def key_of(o: dict[str, Any]) -> tuple[str, str, str]:
    return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])


@pytest.mark.parametrize("seed", range(30))
def test_incremental_equals_rebuild(seed: int) -> None:
    rng = random.Random(seed)
    live = ClusterState(ALL_FEATURES)
    current: dict[tuple[str, str, str], dict[str, Any]] = {}
    for i in range(60):
        if current and rng.random() < 0.2:
            k = rng.choice(sorted(current))
            live.delete(k[0], k[1], k[2])
            del current[k]
        else:
            o = random_object(rng, i)
            live.apply(parse_object(o))
            current[key_of(o)] = o
    # Namespaces first, as a fresh informer list would deliver them in any order; try two orders.
    for order in (sorted(current), sorted(current, reverse=True)):
        fresh = ClusterState(ALL_FEATURES)
        for k in order:
            fresh.apply(parse_object(current[k]))
        for node in ("n1", "n2"):
            assert live.managed_ips(node) == fresh.managed_ips(node)
        addresses = [f"10.0.{net}.{host}" for net in (0, 1) for host in range(1, 8)]
        for src in addresses:
            for dst in addresses:
                for port in (80, 81):
                    f = Flow.of(src, dst, "TCP", port)
                    assert live.evaluate(f) == fresh.evaluate(f), (seed, f.describe())
