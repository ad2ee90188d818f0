"""ClusterState.allowed_some_port: "is some port (of some protocol) allowed between these two
addresses?", checked against brute force over every port on generated clusters and policies."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import builders  # tests/builders.py
from kube_network_policies.engine import ALL_FEATURES, ClusterState, Flow
from kube_network_policies.model import parse_object

TCP, UDP, SCTP, ICMP, UDPLITE = 6, 17, 132, 1, 136
PROTOCOLS = ("TCP", "UDP", "SCTP")
NUMBER = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}
# Pods on this node ("n1") and another ("n2"), and an address outside the cluster.
A, B, C, OUTSIDE = "10.0.0.1", "10.0.0.2", "10.0.1.1", "192.0.2.1"
ADDRESSES = (A, B, C, OUTSIDE)


def packed(ip: str) -> bytes:
    return bytes(int(x) for x in ip.split("."))


def pod(namespace: str, name: str, ip: str, node: str, ports: list[dict[str, Any]], **labels: str) -> dict[str, Any]:
    return builders.pod(namespace, name, ip, node=node, ports=ports, labels=labels)


def namespace(name: str) -> dict[str, Any]:
    return builders.namespace(name, {"team": name})


def brute_force(state: ClusterState, src: str, dst: str, protocols: tuple[int, ...], node: str | None) -> bool:
    s, d = packed(src), packed(dst)
    evaluate = state.evaluate
    return any(evaluate(Flow(s, d, proto, 0, port), node).allowed for proto in protocols for port in range(65536))


# --- strategies ---------------------------------------------------------------------------------

NAMES = ("http", "dns", "metrics")
# Ports near the edges of the range and of each other, where off-by-one errors live.
PORT = st.one_of(st.sampled_from([1, 2, 79, 80, 81, 443, 8080, 65534, 65535]), st.integers(1, 65535))


@st.composite
def container_ports(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3)):
        out.append({"name": name, "containerPort": draw(PORT), "protocol": draw(st.sampled_from(PROTOCOLS))})
    return out


@st.composite
def np_ports(draw: st.DrawFn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 3))):
        proto = draw(st.sampled_from(PROTOCOLS))
        kind = draw(st.sampled_from(["number", "range", "name", "any"]))
        if kind == "number":
            out.append({"protocol": proto, "port": draw(PORT)})
        elif kind == "range":
            lo = draw(PORT)
            out.append({"protocol": proto, "port": lo, "endPort": draw(st.integers(lo, 65535))})
        elif kind == "name":
            out.append({"protocol": proto, "port": draw(st.sampled_from(NAMES))})
        else:
            out.append({"protocol": proto})
    return out


@st.composite
def admin_ports(draw: st.DrawFn) -> list[dict[str, Any]] | None:
    if draw(st.booleans()):
        return None
    out: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["number", "range", "name"]))
        proto = draw(st.sampled_from(PROTOCOLS))
        if kind == "number":
            out.append({"portNumber": {"protocol": proto, "port": draw(PORT)}})
        elif kind == "range":
            lo = min(draw(PORT), 65534)
            out.append({"portRange": {"protocol": proto, "start": lo, "end": draw(st.integers(lo + 1, 65535))}})
        else:
            out.append({"namedPort": draw(st.sampled_from(NAMES))})
    return out


SELECTOR = st.sampled_from([{}, {"matchLabels": {"app": "a"}}, {"matchLabels": {"app": "b"}}])


@st.composite
def network_policy(draw: st.DrawFn, i: int) -> dict[str, Any]:
    def rules(direction: str) -> list[dict[str, Any]]:
        out = []
        for _ in range(draw(st.integers(0, 2))):
            peers = draw(
                st.sampled_from(
                    [
                        [],
                        [{"podSelector": draw(SELECTOR)}],
                        [{"namespaceSelector": {}, "podSelector": draw(SELECTOR)}],
                        [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                        [{"ipBlock": {"cidr": "192.0.2.0/24"}}],
                    ]
                )
            )
            rule: dict[str, Any] = {"from" if direction == "ingress" else "to": peers}
            ports = draw(np_ports())
            if ports:
                rule["ports"] = ports
            out.append(rule)
        return out

    types = draw(st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    spec: dict[str, Any] = {"podSelector": draw(SELECTOR), "policyTypes": types}
    if "Ingress" in types:
        spec["ingress"] = rules("ingress")
    if "Egress" in types:
        spec["egress"] = rules("egress")
    return builders.network_policy("x", f"np{i}", spec)


@st.composite
def tiered_policy(draw: st.DrawFn, i: int, baseline: bool) -> dict[str, Any]:
    actions = ["Allow", "Deny"] if baseline else ["Allow", "Deny", "Pass"]

    def rules(direction: str) -> list[dict[str, Any]]:
        out = []
        for j in range(draw(st.integers(0, 3))):
            peers = [
                draw(
                    st.sampled_from(
                        [
                            {"namespaces": {}},
                            {"pods": {"namespaceSelector": {}, "podSelector": draw(SELECTOR)}},
                        ]
                        + ([{"networks": ["10.0.0.0/16"]}, {"networks": ["0.0.0.0/0"]}] if direction == "egress" else [])
                    )
                )
            ]
            rule: dict[str, Any] = {"name": f"r{j}", "action": draw(st.sampled_from(actions)), "from" if direction == "ingress" else "to": peers}
            ports = draw(admin_ports())
            if ports is not None and "networks" in peers[0]:
                ports = [p for p in ports if "namedPort" not in p]  # not allowed with networks peers
            if ports:
                rule["ports"] = ports
            out.append(rule)
        return out

    spec: dict[str, Any] = {
        "subject": {"pods": {"namespaceSelector": {}, "podSelector": draw(SELECTOR)}},
        "ingress": rules("ingress"),
        "egress": rules("egress"),
    }
    if baseline:
        return builders.baseline_admin_network_policy(spec)
    return builders.admin_network_policy(f"anp{i}", draw(st.integers(0, 3)), spec)


@st.composite
def clusters(draw: st.DrawFn) -> ClusterState:
    objects: list[dict[str, Any]] = [
        namespace("x"),
        namespace("y"),
        pod("x", "a", A, "n1", draw(container_ports()), app="a"),
        pod("x", "b", B, "n1", draw(container_ports()), app="b"),
        pod("y", "c", C, "n2", draw(container_ports()), app="a"),
    ]
    objects += [draw(network_policy(i)) for i in range(draw(st.integers(0, 3)))]
    objects += [draw(tiered_policy(i, False)) for i in range(draw(st.integers(0, 2)))]
    if draw(st.booleans()):
        objects.append(draw(tiered_policy(0, True)))
    state = ClusterState(ALL_FEATURES)
    for o in objects:
        state.apply(parse_object(o))
    return state


# --- tests --------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    clusters(),
    st.sampled_from(ADDRESSES),
    st.sampled_from(ADDRESSES),
    st.sampled_from([TCP, UDP, SCTP, ICMP]),
    st.sampled_from(["n1", None]),
)
def test_equals_brute_force_for_a_known_protocol(state: ClusterState, src: str, dst: str, protocol: int, node: str | None) -> None:
    assert state.allowed_some_port(packed(src), packed(dst), protocol, node) == brute_force(state, src, dst, (protocol,), node)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(clusters(), st.sampled_from(ADDRESSES), st.sampled_from(ADDRESSES), st.sampled_from(["n1", None]))
def test_equals_brute_force_for_any_protocol(state: ClusterState, src: str, dst: str, node: str | None) -> None:
    expected = brute_force(state, src, dst, (TCP, UDP, SCTP), node) or brute_force(state, src, dst, (ICMP, UDPLITE), node)
    assert state.allowed_some_port(packed(src), packed(dst), None, node) == expected


def build(*objects: dict[str, Any]) -> ClusterState:
    state = ClusterState(ALL_FEATURES)
    for o in (namespace("x"), *objects):
        state.apply(parse_object(o))
    return state


def deny_b_except(ports: list[dict[str, Any]]) -> dict[str, Any]:
    return builders.network_policy("x", "b", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [{"ports": ports}] if ports else []})


@pytest.mark.parametrize(
    ("ports", "tcp", "udp"),
    [
        ([], False, False),  # default deny: nothing between the two
        ([{"port": 65535}], True, False),  # the very last port
        ([{"protocol": "UDP", "port": 1, "endPort": 1}], False, True),
        ([{"port": "http"}], True, False),  # a named port: only the destination's number
        ([{"protocol": "UDP", "port": "http"}], False, False),  # the name exists, for TCP only
    ],
)
def test_single_points(ports: list[dict[str, Any]], tcp: bool, udp: bool) -> None:
    state = build(
        pod("x", "a", A, "n1", [], app="a"), pod("x", "b", B, "n1", [{"name": "http", "containerPort": 31337}], app="b"), deny_b_except(ports)
    )
    assert state.allowed_some_port(packed(A), packed(B), TCP, "n1") is tcp
    assert state.allowed_some_port(packed(A), packed(B), UDP, "n1") is udp
    assert state.allowed_some_port(packed(A), packed(B), None, "n1") is (tcp or udp)
    assert state.allowed_some_port(packed(A), packed(B), ICMP, "n1") is False
    # B's egress is not restricted: anything from B is allowed.
    assert state.allowed_some_port(packed(B), packed(A), None, "n1")


def test_port_zero_and_protocols_without_ports() -> None:
    # An admin Deny of every port (1-65535) of TCP, UDP and SCTP, then Allow all. Ports in the
    # API start at 1, so port 0 is never denied by a rule with ports: it behaves like ICMP.
    ranges = [{"portRange": {"protocol": p, "start": 1, "end": 65535}} for p in PROTOCOLS]
    anp = builders.admin_network_policy(
        "p",
        1,
        {
            "subject": {"namespaces": {}},
            "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "ports": ranges}, {"action": "Allow", "from": [{"namespaces": {}}]}],
        },
    )
    state = build(pod("x", "a", A, "n1", [], app="a"), pod("x", "b", B, "n1", [], app="b"), anp)
    a, b = packed(A), packed(B)
    assert not state.evaluate(Flow(a, b, TCP, 0, 1), "n1").allowed
    assert state.evaluate(Flow(a, b, TCP, 0, 0), "n1").allowed
    for protocol in (TCP, UDP, SCTP, ICMP, None):
        assert state.allowed_some_port(a, b, protocol, "n1")
    # Deny everything (no ports): nothing of any protocol.
    anp["spec"]["ingress"] = [{"action": "Deny", "from": [{"namespaces": {}}]}]
    state.apply(parse_object(anp))
    for protocol in (TCP, UDP, SCTP, ICMP, None):
        assert not state.allowed_some_port(a, b, protocol, "n1")
