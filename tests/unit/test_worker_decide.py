"""The worker's per-packet decision (dataplane.worker.make_decide) on real packet bytes and a real
engine: what may be cached (ACCEPT_JUDGED), what fail-open accepts without a verdict on the
tuple (ACCEPT), and that a packet whose transport header cannot be read is judged on its
addresses, never accepted when they alone are denied."""

from __future__ import annotations

import struct
from typing import Any

import pytest

import builders  # tests/builders.py
import packets
from kube_network_policies.dataplane.nfqueue import ACCEPT, ACCEPT_JUDGED, DROP
from kube_network_policies.dataplane.worker import WorkerConfig, make_decide, observers_for
from kube_network_policies.engine import ClusterState, Features
from kube_network_policies.metrics import PacketMetrics
from kube_network_policies.model import parse_object

A4, B4, C4 = "10.0.0.1", "10.0.0.2", "10.0.0.3"
A6, B6, C6 = "fd00::1", "fd00::2", "fd00::3"
TCP, UDP, DSTOPTS, FRAG, MOBILITY = 6, 17, 60, 44, 135


def pod(name: str, ip4: str, ip6: str) -> dict[str, Any]:
    return builders.pod("t", name, [ip4, ip6], labels={"app": name})


# B accepts A on TCP 80 only; C accepts nobody.
OBJECTS = [
    builders.namespace("t"),
    pod("a", A4, A6),
    pod("b", B4, B6),
    pod("c", C4, C6),
    builders.network_policy(
        "t",
        "b",
        {
            "podSelector": {"matchLabels": {"app": "b"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 80}]}],
        },
    ),
    builders.network_policy("t", "c", {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Ingress"]}),
]


def v4(src: str, dst: str, dport: int, *, frag: int = 0x4000) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 0x50, 0x02, 64240, 0, 0)
    return (
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, frag, 64, TCP, 0, bytes(int(x) for x in src.split(".")), bytes(int(x) for x in dst.split(".")))
        + tcp
    )


def v6(src: str, dst: str, dport: int, *, options: int = 0, first: int | None = None) -> bytes:
    """A TCP SYN, behind a destination options header of `options` bytes if nonzero."""
    import ipaddress

    body = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 0x50, 0x02, 64240, 0, 0)
    nh = TCP
    if options:
        body = packets.destination_options(options, next_header=nh) + body
        nh = DSTOPTS
    if first is not None:
        nh = first
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), nh, 64, ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + body


def decider(fail_open: bool, ready: bool = True) -> tuple[Any, dict[str, int]]:
    state = ClusterState(Features())
    for o in OBJECTS:
        state.apply(parse_object(o))
    errors: dict[str, int] = {}
    return make_decide(state, "n1", fail_open, errors, [ready], (PacketMetrics().observe_verdict,)), errors


@pytest.mark.parametrize("fail_open", [False, True])
def test_engine_verdicts_are_judged(fail_open: bool) -> None:
    decide, errors = decider(fail_open)
    assert decide(memoryview(v4(A4, B4, 80))) == ACCEPT_JUDGED
    assert decide(memoryview(v4(A4, B4, 81))) == DROP
    assert decide(memoryview(v6(A6, B6, 80))) == ACCEPT_JUDGED
    assert decide(memoryview(v4(B4, A4, 22))) == ACCEPT_JUDGED  # A is not isolated
    # A long options header is parsed through, in both modes.
    assert decide(memoryview(v6(A6, B6, 80, options=200))) == ACCEPT_JUDGED
    assert decide(memoryview(v6(A6, B6, 81, options=2048))) == DROP
    assert errors == {}


def test_not_ready_is_the_default_and_never_judged() -> None:
    assert decider(True, ready=False)[0](memoryview(v4(A4, B4, 80))) == ACCEPT
    assert decider(False, ready=False)[0](memoryview(v4(A4, B4, 80))) == DROP


@pytest.mark.parametrize(
    ("packet", "error"),
    [
        (v6(A6, B6, 81, options=200)[:128], "truncated"),  # what a 128-byte copy range gave
        (v4(A4, B4, 81, frag=0x0010), "fragment"),  # non-first fragment: no ports
        (v6(A6, B6, 81, options=200)[:-20] + b"\0\0", "truncated"),
    ],
)
def test_fail_closed_drops_what_it_cannot_read(packet: bytes, error: str) -> None:
    decide, errors = decider(False)
    assert decide(memoryview(packet)) == DROP
    assert errors == {error: 1}


def test_fail_open_judges_unreadable_packets_on_their_addresses() -> None:
    decide, errors = decider(True)
    # A may reach B on some port (80): a packet to B whose port cannot be read is let through,
    # but never as judged (it must not be cached).
    assert decide(memoryview(v6(A6, B6, 81, options=200)[:128])) == ACCEPT
    assert decide(memoryview(v4(A4, B4, 81, frag=0x0010))) == ACCEPT
    # C accepts nobody, B accepts only A: nothing between these addresses is allowed.
    assert decide(memoryview(v6(A6, C6, 80, options=200)[:128])) == DROP
    assert decide(memoryview(v6(C6, B6, 80, options=200)[:128])) == DROP
    assert decide(memoryview(v4(C4, B4, 80, frag=0x0010))) == DROP
    # Not even addresses: nothing to judge, nothing any stack would deliver.
    assert decide(memoryview(b"\x45" + bytes(10))) == DROP
    assert decide(memoryview(b"\x75" + bytes(60))) == DROP
    assert errors == {"truncated": 4, "fragment": 2, "unknown_version": 1}


def test_mobility_header_is_judged_as_its_own_protocol() -> None:
    # Protocol 135, as the kernel sees it: B's policy allows only TCP 80, so not this; the bytes
    # after the header (which look like a TCP SYN to port 80) do not matter.
    decide, _ = decider(False)
    pkt = bytearray(v6(A6, B6, 80, options=8))
    pkt[6] = MOBILITY
    assert decide(memoryview(bytes(pkt))) == DROP
    assert decide(memoryview(v6(B6, A6, 80, options=8, first=MOBILITY))) == ACCEPT_JUDGED  # A: not isolated


def test_observers_see_each_engine_verdict_with_its_full_decision() -> None:
    """The verdict-observer seam: every packet the engine judged, and only those, is shown to
    each observer in order, with its flow, the full Decision (verdict and per-direction reasons)
    and the time spent."""
    state = ClusterState(Features())
    for o in OBJECTS:
        state.apply(parse_object(o))
    seen: list[tuple[str, Any, Any, float]] = []
    first = lambda flow, decision, micros: seen.append(("first", flow, decision, micros))  # noqa: E731
    second = lambda flow, decision, micros: seen.append(("second", flow, decision, micros))  # noqa: E731
    errors: dict[str, int] = {}
    decide = make_decide(state, "n1", True, errors, [True], (first, second))
    assert decide(memoryview(v4(A4, B4, 80))) == ACCEPT_JUDGED
    assert decide(memoryview(v6(A6, C6, 80))) == DROP
    assert decide(memoryview(v6(A6, B6, 81, options=200)[:128])) == ACCEPT  # unreadable: no verdict to observe
    assert [(who, flow.describe()) for who, flow, _, _ in seen] == [
        ("first", "TCP 10.0.0.1:40000 -> 10.0.0.2:80"),
        ("second", "TCP 10.0.0.1:40000 -> 10.0.0.2:80"),
        ("first", "TCP fd00::1:40000 -> fd00::3:80"),
        ("second", "TCP fd00::1:40000 -> fd00::3:80"),
    ]
    allowed, denied = seen[0][2], seen[2][2]
    assert seen[1][2] is allowed and all(micros > 0 for _, _, _, micros in seen)
    assert allowed.allowed and allowed.ingress.chain[-1].policy == "t/b" and allowed.ingress.chain[-1].rule.startswith("ingress rule 0")
    assert not denied.allowed and denied.ingress.chain[-1].detail == "selected by t/c; no ingress rule matches"
    assert errors == {"truncated": 1}


def test_the_worker_observes_its_packet_metrics_first() -> None:
    metrics = PacketMetrics()
    config = WorkerConfig(queue_num=100, node="n1", features=Features(), fail_open=False)
    observers = observers_for(config, metrics)
    assert observers[0] == metrics.observe_verdict
    state = ClusterState(Features())
    for o in OBJECTS:
        state.apply(parse_object(o))
    decide = make_decide(state, "n1", False, {}, [True], observers)
    decide(memoryview(v4(A4, B4, 80)))
    decide(memoryview(v4(A4, B4, 81)))
    decide(memoryview(v6(A6, B6, 80)))
    decide(memoryview(b"\x45" + bytes(10)))  # not judged: not observed
    counts = {labels: sum(buckets) for labels, buckets, _ in metrics.take_delta().series}
    assert counts == {("TCP", "IPv4", "accept"): 1, ("TCP", "IPv4", "drop"): 1, ("TCP", "IPv6", "accept"): 1}
