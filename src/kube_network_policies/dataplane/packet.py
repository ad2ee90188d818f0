"""Packet parser for the NFQUEUE hot path: IP header onward -> Flow, or an int error code.

`parse_packet` reads only what policy needs (addresses, protocol, ports) from the bytes the
kernel copied into userspace (the whole packet up to 65,531 bytes: see nfqueue.DEFAULT_COPY_RANGE).
It never raises: anything it cannot turn into a trustworthy Flow comes back as one of the error
codes below, so the caller can count it (`ERROR_NAMES`) and judge it on what is known
(`parse_addresses`).

Which IPv6 headers are extension headers follows the kernel (ipv6_ext_hdr(), as used by
ipv6_find_hdr() for nft's `meta l4proto` / `th dport` and by conntrack): hop-by-hop, routing,
fragment, destination options and AH are walked; "no next header" (59) ends the chain as a
protocol without ports. Anything else is the transport protocol, including the Mobility Header
(135): judging its bytes as TCP ports would judge a connection the kernel does not see. The
walk is bounded by the packet's length (every extension header is at least 8 bytes), not by a
count of headers that a sender could exceed on purpose.

Speed matters more than elegance here (one call per queued packet): one precompiled
`struct.unpack_from` for the fixed header, one for the ports, no slicing of the input, and the
Flow is built with `tuple.__new__` to skip the NamedTuple's Python-level `__new__`.

`python -m kube_network_policies.lab.bench_packet` times it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from kube_network_policies.engine.flow import Flow

__all__ = [
    "BAD_INPUT",
    "ERROR_NAMES",
    "FRAGMENT",
    "MALFORMED_IPV4",
    "MALFORMED_IPV6",
    "TRUNCATED",
    "UNKNOWN_VERSION",
    "parse_addresses",
    "parse_packet",
]

# Error codes. Never 0, so that `if isinstance(r, int)` and truthiness both work for callers.
# (6 and 7, "no next header" and "too many extension headers", are no longer errors.)
TRUNCATED: Final = 1  # the bytes we were given end before a header we need (packet > copy range)
UNKNOWN_VERSION: Final = 2  # first nibble is neither 4 nor 6
MALFORMED_IPV4: Final = 3  # IHL < 5, or total length shorter than the headers it must hold
MALFORMED_IPV6: Final = 4  # an extension or transport header runs past the payload length
FRAGMENT: Final = 5  # a non-first fragment: no transport header, so no ports to judge
BAD_INPUT: Final = 8  # not a byte buffer (e.g. a memoryview of another format); a caller bug

ERROR_NAMES: Final[dict[int, str]] = {
    TRUNCATED: "truncated",
    UNKNOWN_VERSION: "unknown_version",
    MALFORMED_IPV4: "malformed_ipv4",
    MALFORMED_IPV6: "malformed_ipv6",
    FRAGMENT: "fragment",
    BAD_INPUT: "bad_input",
}

# IANA protocol numbers.
_HOPOPTS: Final = 0
_TCP: Final = 6
_UDP: Final = 17
_ROUTING: Final = 43
_FRAGMENT: Final = 44
_AH: Final = 51
_NONE: Final = 59
_DSTOPTS: Final = 60
_SCTP: Final = 132
_UDPLITE: Final = 136

# Transport protocols whose first four bytes are source port, destination port.
_PORT_PROTOS: Final = frozenset((_TCP, _UDP, _SCTP, _UDPLITE))
# Extension headers in the generic format: next header, length in 8-octet units not counting
# the first 8 (RFC 8200 4.3-4.6).
_GENERIC_EXT: Final = frozenset((_HOPOPTS, _ROUTING, _DSTOPTS))
# The kernel's ipv6_ext_hdr() minus NONE, which ends the chain.
_EXT: Final = frozenset((_HOPOPTS, _ROUTING, _FRAGMENT, _AH, _DSTOPTS))

# Length fields of 0 mean "larger than 64 KiB, see the skb" for BIG TCP / GSO packets (IPv4
# tot_len, IPv6 payload_len, or an IPv6 jumbogram); then only the captured length bounds us.
_UNBOUNDED: Final = 1 << 32

# ver_ihl, total length, flags+fragment offset, protocol, src, dst
_unpack_v4 = struct.Struct("!BxH2xHxB2x4s4s").unpack_from
# payload length, next header, src, dst
_unpack_v6 = struct.Struct("!4xHBx16s16s").unpack_from
_unpack_ports = struct.Struct("!HH").unpack_from
_unpack_u16 = struct.Struct("!H").unpack_from
# tuple.__new__(Flow, (...)) builds the NamedTuple without running its Python-level __new__.
_new_flow: Final[Callable[..., Flow]] = tuple.__new__


def parse_packet(data: bytes | bytearray | memoryview) -> Flow | int:
    """Parse an IPv4/IPv6 packet (network header first) into a Flow, or return an error code.

    Ports are read for TCP, UDP, UDP-Lite and SCTP; every other protocol (ICMP, ICMPv6, ESP,
    Mobility Header, "no next header", ...) gives a Flow with ports 0. Non-first fragments give
    FRAGMENT: they carry no transport header, and a Flow with ports 0 would be judged as if it
    were a different connection. Never raises.
    """
    try:
        n = len(data)
        if n == 0:
            return TRUNCATED
        version = data[0] >> 4
        if version == 4:
            if n < 20:
                return TRUNCATED
            ver_ihl, total, frag, proto, src, dst = _unpack_v4(data)
            hl = (ver_ihl & 0x0F) << 2
            if hl < 20:
                return MALFORMED_IPV4
            if total == 0:
                end = _UNBOUNDED
            elif total < hl:
                return MALFORMED_IPV4
            else:
                end = total  # may exceed n: the copy range cut the packet short
            if frag & 0x1FFF:  # fragment offset != 0 (a first fragment has offset 0, MF set)
                return FRAGMENT
            if proto in _PORT_PROTOS:
                if hl + 4 > end:
                    return MALFORMED_IPV4
                if hl + 4 > n:
                    return TRUNCATED
                sport, dport = _unpack_ports(data, hl)
                return _new_flow(Flow, (src, dst, proto, sport, dport))
            return _new_flow(Flow, (src, dst, proto, 0, 0))

        if version == 6:
            if n < 40:
                return TRUNCATED
            plen, nh, src, dst = _unpack_v6(data)
            end = 40 + plen if plen else _UNBOUNDED
            off = 40
            # Terminates: every extension header moves `off` on by at least 8 bytes, and
            # reading past the buffer returns TRUNCATED.
            while True:
                if nh in _PORT_PROTOS:
                    if off + 4 > end:
                        return MALFORMED_IPV6
                    if off + 4 > n:
                        return TRUNCATED
                    sport, dport = _unpack_ports(data, off)
                    return _new_flow(Flow, (src, dst, nh, sport, dport))
                if nh in _GENERIC_EXT:
                    if off + 2 > end:
                        return MALFORMED_IPV6
                    if off + 2 > n:
                        return TRUNCATED
                    next_nh = data[off]
                    off += (data[off + 1] + 1) << 3
                elif nh == _FRAGMENT:
                    if off + 8 > end:
                        return MALFORMED_IPV6
                    if off + 4 > n:
                        return TRUNCATED
                    if _unpack_u16(data, off + 2)[0] & 0xFFF8:  # 13-bit offset != 0
                        return FRAGMENT
                    next_nh = data[off]
                    off += 8
                elif nh == _AH:
                    if off + 2 > end:
                        return MALFORMED_IPV6
                    if off + 2 > n:
                        return TRUNCATED
                    next_nh = data[off]
                    off += (data[off + 1] + 2) << 2  # RFC 4302: 4-octet units, minus 2
                else:
                    # ICMPv6, ESP (encrypted from here on), no next header, Mobility, anything
                    # else: the kernel's transport protocol, without ports.
                    return _new_flow(Flow, (src, dst, nh, 0, 0))
                if off > end:
                    return MALFORMED_IPV6
                nh = next_nh

        return UNKNOWN_VERSION
    except Exception:  # noqa: BLE001 - zero-cost in 3.11 unless raised; only non-byte buffers get here
        return BAD_INPUT


def parse_addresses(data: bytes | bytearray | memoryview) -> tuple[bytes, bytes, int | None] | None:
    """What is known of a packet that parse_packet could not turn into a Flow (the slow path).

    (source, destination, protocol): the protocol as the kernel names it (the IPv4 header's
    field; for IPv6 the first header after the extension headers, also for a non-first fragment
    whose fragment header names it), or None when the transport header cannot be found (the
    chain is cut short, runs past the payload, or a non-first fragment continues it). None when
    not even the addresses are known (not IPv4 or IPv6, or shorter than its fixed header).
    Never raises.
    """
    try:
        n = len(data)
        if n == 0:
            return None
        version = data[0] >> 4
        if version == 4:
            if n < 20:
                return None
            _, _, _, proto, src, dst = _unpack_v4(data)
            return (src, dst, proto)
        if version != 6 or n < 40:
            return None
        plen, nh, src, dst = _unpack_v6(data)
        end = min(n, 40 + plen) if plen else n
        off = 40
        while nh in _EXT:
            if off + (4 if nh == _FRAGMENT else 2) > end:
                return (src, dst, None)
            next_nh = data[off]
            if nh == _FRAGMENT:
                if _unpack_u16(data, off + 2)[0] & 0xFFF8:
                    # ipv6_find_hdr(): a non-first fragment names its protocol unless the chain
                    # goes on (then the transport header is in another fragment).
                    return (src, dst, None if next_nh in _EXT else next_nh)
                off += 8
            elif nh == _AH:
                off += (data[off + 1] + 2) << 2
            else:
                off += (data[off + 1] + 1) << 3
            nh = next_nh
        return (src, dst, nh)
    except Exception:  # noqa: BLE001 - as parse_packet
        return None
