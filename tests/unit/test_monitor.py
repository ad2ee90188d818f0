"""nf_tables notifications: which transactions touched what the agent owns, and whose they were.

The byte layouts are the kernel's (nlmsghdr, nfgenmsg, attributes), as seen on this machine with
`nft` and `iptables-nft`; tests/kernel/test_agent_hardening.py runs the real socket.
"""

from __future__ import annotations

import struct

from kube_network_policies.dataplane import monitor as m
from kube_network_policies.dataplane.nftables import CACHE_V4, SET_V4, TABLE


def attr(atype: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), atype) + value + bytes(-len(value) % 4)


def message(msg: int, family: int, portid: int, *attrs: bytes) -> bytes:
    body = struct.pack("!BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (m.NFNL_SUBSYS_NFTABLES << 8) | msg, 0, 1, portid) + body


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def gen(portid: int) -> bytes:
    return message(m.NFT_MSG_NEWGEN, 0, portid, attr(1, struct.pack("!I", 7)), attr(2, struct.pack("!I", portid)), attr(3, s("nft")))


INET, IP, IP6 = 1, 2, 10


def test_a_transaction_on_our_table_is_reported_with_its_port_id() -> None:
    data = message(m.NFT_MSG_DELTABLE, INET, 4242, attr(1, s(TABLE))) + gen(4242)
    assert m.parse_events(data, watch_xt=False, pending={}) == [4242]


def test_other_tables_are_not_news() -> None:
    data = (
        message(m.NFT_MSG_NEWRULE, IP, 77, attr(1, s("nat")), attr(2, s("KUBE-SERVICES")))
        + message(m.NFT_MSG_DELTABLE, INET, 77, attr(1, s("kube-proxy")))
        + gen(77)
    )
    assert m.parse_events(data, watch_xt=True, pending={}) == []


def test_accept_cache_elements_are_not_news_but_pod_ip_elements_are() -> None:
    cache = message(m.NFT_MSG_DELSETELEM, INET, 5, attr(1, s(TABLE)), attr(2, s(CACHE_V4))) + gen(5)
    assert m.parse_events(cache, watch_xt=False, pending={}) == []
    pods = message(m.NFT_MSG_DELSETELEM, INET, 6, attr(1, s(TABLE)), attr(2, s(SET_V4))) + gen(6)
    assert m.parse_events(pods, watch_xt=False, pending={}) == [6]


def test_mangle_queue_chains_matter_only_for_xt_nfqueue() -> None:
    flush = message(m.NFT_MSG_DELRULE, IP6, 9, attr(1, s("mangle")), attr(2, s("POSTROUTING"))) + gen(9)
    assert m.parse_events(flush, watch_xt=True, pending={}) == [9]
    assert m.parse_events(flush, watch_xt=False, pending={}) == []
    canary = message(m.NFT_MSG_NEWCHAIN, IP, 10, attr(1, s("mangle")), attr(2, struct.pack("!Q", 3)), attr(3, s("KUBE-KUBELET-CANARY"))) + gen(10)
    assert m.parse_events(canary, watch_xt=True, pending={}) == []
    gone = message(m.NFT_MSG_DELTABLE, IP, 11, attr(1, s("mangle"))) + gen(11)
    assert m.parse_events(gone, watch_xt=True, pending={}) == [11]


def test_a_transaction_may_span_reads() -> None:
    pending: dict[int, bool] = {}
    assert m.parse_events(message(m.NFT_MSG_DELCHAIN, INET, 3, attr(1, s(TABLE))), watch_xt=False, pending=pending) == []
    assert m.parse_events(gen(3), watch_xt=False, pending=pending) == [3]
    assert pending == {}


def test_garbage_never_raises() -> None:
    for data in (b"", b"\x00" * 15, b"\xff" * 64, message(m.NFT_MSG_NEWRULE, INET, 1)[:-1], struct.pack("=IHHII", 8, 0, 0, 0, 0)):
        assert m.parse_events(data, watch_xt=True, pending={}) == []
    # An attribute whose length runs past its message.
    bad = struct.pack("=HH", 200, 1) + b"kube"
    data = message(m.NFT_MSG_DELTABLE, INET, 1, bad) + gen(1)
    assert m.parse_events(data, watch_xt=False, pending={}) == []
