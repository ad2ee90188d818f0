"""Tests for dataplane.packet.parse_packet: one hand-built packet per branch, plus fuzzing.

Packets are built with struct (no scapy): the builders below produce well-formed headers whose
length fields are right unless a test overrides them.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kube_network_policies.dataplane.packet import (
    BAD_INPUT,
    ERROR_NAMES,
    FRAGMENT,
    MALFORMED_IPV4,
    MALFORMED_IPV6,
    TRUNCATED,
    UNKNOWN_VERSION,
    parse_addresses,
    parse_packet,
)
from kube_network_policies.engine.flow import Flow

SRC4 = bytes((10, 1, 2, 3))
DST4 = bytes((10, 4, 5, 6))
SRC6 = bytes.fromhex("fd000000000000000000000000000001")
DST6 = bytes.fromhex("fd000000000000000000000000000002")

TCP, UDP, SCTP, UDPLITE, ICMP, ICMPV6, ESP, AH, GRE = 6, 17, 132, 136, 1, 58, 50, 51, 47
HOPOPTS, ROUTING, FRAG, NONE, DSTOPTS, MOBILITY = 0, 43, 44, 59, 60, 135


# --- builders ---------------------------------------------------------------------------------


def tcp(sport: int = 40000, dport: int = 80) -> bytes:
    # ports, seq, ack, data offset 5 words, flags SYN, window, checksum, urgent pointer
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 64240, 0, 0)


def udp(sport: int = 5353, dport: int = 53, payload: bytes = b"q") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def sctp(sport: int = 3868, dport: int = 3868) -> bytes:
    # common header: ports, verification tag, checksum; then an INIT chunk header
    return struct.pack("!HHII", sport, dport, 0, 0) + struct.pack("!BBH", 1, 0, 4)


def icmp_echo() -> bytes:
    return struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"ping"


def ipv4(
    proto: int,
    payload: bytes,
    *,
    options: bytes = b"",
    ihl: int | None = None,
    total: int | None = None,
    flags_frag: int = 0x4000,  # DF
    version: int = 4,
) -> bytes:
    assert len(options) % 4 == 0
    if ihl is None:
        ihl = 5 + len(options) // 4
    if total is None:
        total = 20 + len(options) + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, total, 0x1234, flags_frag, 64, proto, 0, SRC4, DST4)
    return hdr + options + payload


def ipv6(next_header: int, payload: bytes, *, plen: int | None = None) -> bytes:
    if plen is None:
        plen = len(payload)
    return struct.pack("!IHBB16s16s", 0x60000000, plen, next_header, 64, SRC6, DST6) + payload


def ext_generic(next_header: int, units: int = 0) -> bytes:
    """Hop-by-hop / routing / destination options: (units + 1) * 8 bytes."""
    return struct.pack("!BB", next_header, units) + b"\x01" * (6 + 8 * units)


def dstopts(next_header: int, size: int) -> bytes:
    """A destination options header of `size` bytes (a multiple of 8) holding unknown options
    to skip (type 0x1e, RFC 3692 experiment): what a sender uses to push the transport header
    deeper into the packet."""
    assert size % 8 == 0 and 8 <= size <= 2048
    body = b""
    left = size - 2
    while left:
        if left == 1:
            body += b"\x00"  # Pad1
            break
        n = min(255, left - 2)
        body += bytes([0x1E, n]) + b"\xab" * n
        left -= n + 2
    return struct.pack("!BB", next_header, size // 8 - 1) + body


def ext_fragment(next_header: int, offset: int = 0, more: bool = False) -> bytes:
    return struct.pack("!BBHI", next_header, 0, (offset << 3) | int(more), 0xCAFE)


def ext_ah(next_header: int, payload_len: int = 4) -> bytes:
    """AH: (payload_len + 2) * 4 bytes; 4 gives the usual 24 bytes (12-byte ICV)."""
    size = (payload_len + 2) * 4
    return struct.pack("!BBHII", next_header, payload_len, 0, 0x100, 1) + b"\x00" * (size - 12)


def ext(kind: int, next_header: int) -> bytes:
    if kind == FRAG:
        return ext_fragment(next_header)
    if kind == AH:
        return ext_ah(next_header)
    return ext_generic(next_header, 1)


def chain(kinds: list[int], final: int, payload: bytes, *, short: bool = False) -> tuple[int, bytes]:
    """Extension headers `kinds` in order, then `payload` of protocol `final`: (first nh, bytes).
    short: generic headers of 8 bytes (the least there is) instead of 16."""
    parts = []
    for i, kind in enumerate(kinds):
        nh = kinds[i + 1] if i + 1 < len(kinds) else final
        parts.append(ext_generic(nh) if short and kind in (HOPOPTS, ROUTING, DSTOPTS) else ext(kind, nh))
    return (kinds[0] if kinds else final), b"".join(parts) + payload


def flow4(proto: int, sport: int = 0, dport: int = 0) -> Flow:
    return Flow(SRC4, DST4, proto, sport, dport)


def flow6(proto: int, sport: int = 0, dport: int = 0) -> Flow:
    return Flow(SRC6, DST6, proto, sport, dport)


def parse_all_ways(data: bytes) -> Flow | int:
    """parse_packet on bytes, bytearray and a memoryview inside a larger buffer must agree."""
    result = parse_packet(data)
    big = bytearray(b"\xee" * 7) + bytearray(data) + bytearray(b"\xee" * 9)
    assert parse_packet(bytearray(data)) == result
    assert parse_packet(memoryview(big)[7 : 7 + len(data)]) == result
    return result


# --- IPv4 ---------------------------------------------------------------------------------------


class TestIPv4:
    def test_tcp_syn(self) -> None:
        result = parse_all_ways(ipv4(TCP, tcp(40000, 80)))
        assert result == flow4(TCP, 40000, 80)
        assert type(result) is Flow
        assert type(result.src_ip) is bytes and type(result.dst_ip) is bytes

    @pytest.mark.parametrize(
        ("proto", "payload", "ports"),
        [
            (UDP, udp(5353, 53), (5353, 53)),
            (UDPLITE, udp(1000, 2000), (1000, 2000)),
            (SCTP, sctp(3868, 3869), (3868, 3869)),
            (TCP, tcp(0, 65535), (0, 65535)),
        ],
    )
    def test_port_protocols(self, proto: int, payload: bytes, ports: tuple[int, int]) -> None:
        assert parse_all_ways(ipv4(proto, payload)) == flow4(proto, *ports)

    @pytest.mark.parametrize("proto", [ICMP, GRE, ESP, AH, 255])
    def test_protocols_without_ports(self, proto: int) -> None:
        assert parse_all_ways(ipv4(proto, icmp_echo())) == flow4(proto)

    def test_icmp_needs_no_payload(self) -> None:
        assert parse_all_ways(ipv4(ICMP, b"")) == flow4(ICMP)

    @pytest.mark.parametrize("words", [1, 2, 10])
    def test_options_are_skipped(self, words: int) -> None:
        options = b"\x01" * (4 * words - 1) + b"\x00"  # NOPs then end of options
        assert parse_all_ways(ipv4(TCP, tcp(1234, 443), options=options)) == flow4(TCP, 1234, 443)

    @pytest.mark.parametrize("ihl", [0, 1, 4])
    def test_ihl_too_small(self, ihl: int) -> None:
        assert parse_all_ways(ipv4(TCP, tcp(), ihl=ihl)) == MALFORMED_IPV4

    def test_total_length_shorter_than_header(self) -> None:
        assert parse_all_ways(ipv4(TCP, tcp(), options=bytes(8), total=24)) == MALFORMED_IPV4
        assert parse_all_ways(ipv4(TCP, tcp(), total=19)) == MALFORMED_IPV4

    def test_total_length_shorter_than_ports(self) -> None:
        # The buffer holds the ports, but the packet says it ends before them.
        assert parse_all_ways(ipv4(TCP, tcp(), total=22)) == MALFORMED_IPV4
        assert parse_all_ways(ipv4(UDP, udp(), total=20)) == MALFORMED_IPV4

    def test_total_length_ok_for_ports_only(self) -> None:
        assert parse_all_ways(ipv4(UDP, udp(1, 2), total=24)) == flow4(UDP, 1, 2)

    def test_total_length_zero_is_big_tcp(self) -> None:
        # BIG TCP IPv4 GSO packets carry tot_len 0: the length lives in the skb.
        assert parse_all_ways(ipv4(TCP, tcp(1, 2), total=0)) == flow4(TCP, 1, 2)

    def test_copy_range_cut(self) -> None:
        # The kernel copied 24 of 1500 bytes: enough for the ports.
        pkt = ipv4(TCP, tcp(7, 8) + bytes(1440))
        assert parse_all_ways(pkt[:24]) == flow4(TCP, 7, 8)

    @pytest.mark.parametrize("cut", [0, 1, 19, 20, 23])
    def test_truncated(self, cut: int) -> None:
        assert parse_all_ways(ipv4(TCP, tcp())[:cut]) == TRUNCATED

    def test_truncated_inside_options(self) -> None:
        pkt = ipv4(UDP, udp(), options=bytes(40))
        assert parse_all_ways(pkt[:50]) == TRUNCATED
        assert parse_all_ways(pkt[:63]) == TRUNCATED
        assert parse_all_ways(pkt[:64]) == flow4(UDP, 5353, 53)

    def test_first_fragment_has_ports(self) -> None:
        assert parse_all_ways(ipv4(UDP, udp(1, 2), flags_frag=0x2000)) == flow4(UDP, 1, 2)  # MF

    @pytest.mark.parametrize("flags_frag", [0x2001, 0x0001, 0x1FFF, 0x3FFF, 0x0100])
    def test_non_first_fragment(self, flags_frag: int) -> None:
        assert parse_all_ways(ipv4(UDP, udp(), flags_frag=flags_frag)) == FRAGMENT

    def test_non_first_fragment_of_icmp(self) -> None:
        assert parse_all_ways(ipv4(ICMP, icmp_echo(), flags_frag=0x0002)) == FRAGMENT

    def test_reserved_and_df_flags_ignored(self) -> None:
        assert parse_all_ways(ipv4(TCP, tcp(1, 2), flags_frag=0xC000)) == flow4(TCP, 1, 2)


# --- IPv6 ---------------------------------------------------------------------------------------


class TestIPv6:
    @pytest.mark.parametrize(
        ("proto", "payload", "ports"),
        [
            (TCP, tcp(40000, 8080), (40000, 8080)),
            (UDP, udp(5353, 53), (5353, 53)),
            (UDPLITE, udp(1000, 2000), (1000, 2000)),
            (SCTP, sctp(3868, 3869), (3868, 3869)),
        ],
    )
    def test_port_protocols(self, proto: int, payload: bytes, ports: tuple[int, int]) -> None:
        result = parse_all_ways(ipv6(proto, payload))
        assert result == flow6(proto, *ports)
        assert type(result) is Flow and len(result.src_ip) == 16

    def test_icmpv6(self) -> None:
        assert parse_all_ways(ipv6(ICMPV6, struct.pack("!BBH", 128, 0, 0))) == flow6(ICMPV6)

    def test_esp_has_no_ports(self) -> None:
        assert parse_all_ways(ipv6(ESP, struct.pack("!II", 0x100, 1) + bytes(32))) == flow6(ESP)

    def test_other_protocol(self) -> None:
        assert parse_all_ways(ipv6(GRE, bytes(8))) == flow6(GRE)

    @pytest.mark.parametrize("kind", [HOPOPTS, ROUTING, DSTOPTS])
    @pytest.mark.parametrize("units", [0, 1, 5, 255])
    def test_generic_extension_headers(self, kind: int, units: int) -> None:
        pkt = ipv6(kind, ext_generic(TCP, units) + tcp(1, 2))
        assert parse_all_ways(pkt) == flow6(TCP, 1, 2)

    @pytest.mark.parametrize("units", [0, 1, 5])
    def test_mobility_header_is_the_transport(self, units: int) -> None:
        # Linux's ipv6_ext_hdr() does not list it: nft's `meta l4proto` and conntrack see
        # protocol 135 with no ports. Its bytes must not be read as a TCP header behind it.
        pkt = ipv6(MOBILITY, ext_generic(TCP, units) + tcp(1, 2))
        assert parse_all_ways(pkt) == flow6(MOBILITY)
        pkt = ipv6(DSTOPTS, ext_generic(MOBILITY) + ext_generic(UDP, units) + udp(3, 4))
        assert parse_all_ways(pkt) == flow6(MOBILITY)

    @pytest.mark.parametrize("size", [200, 256, 1024, 2048])
    def test_long_destination_options(self, size: int) -> None:
        pkt = ipv6(DSTOPTS, dstopts(TCP, size) + tcp(40000, 22))
        assert parse_all_ways(pkt) == flow6(TCP, 40000, 22)
        # What the old 128-byte copy range handed us: the transport header is not there.
        assert parse_all_ways(pkt[:128]) == TRUNCATED

    def test_hop_by_hop_then_icmpv6(self) -> None:
        pkt = ipv6(HOPOPTS, ext_generic(ICMPV6) + struct.pack("!BBH", 143, 0, 0))  # MLDv2 report
        assert parse_all_ways(pkt) == flow6(ICMPV6)

    @pytest.mark.parametrize("payload_len", [1, 4, 7])
    def test_ah_length_in_4_byte_units_plus_2(self, payload_len: int) -> None:
        pkt = ipv6(AH, ext_ah(UDP, payload_len) + udp(11, 22))
        assert parse_all_ways(pkt) == flow6(UDP, 11, 22)

    def test_ah_then_esp(self) -> None:
        assert parse_all_ways(ipv6(AH, ext_ah(ESP) + bytes(16))) == flow6(ESP)

    def test_first_fragment_has_ports(self) -> None:
        pkt = ipv6(FRAG, ext_fragment(UDP, offset=0, more=True) + udp(5, 6))
        assert parse_all_ways(pkt) == flow6(UDP, 5, 6)

    def test_atomic_fragment(self) -> None:
        pkt = ipv6(FRAG, ext_fragment(TCP, offset=0, more=False) + tcp(5, 6))
        assert parse_all_ways(pkt) == flow6(TCP, 5, 6)

    @pytest.mark.parametrize(("offset", "more"), [(1, True), (1, False), (8191, False), (185, True)])
    def test_non_first_fragment(self, offset: int, more: bool) -> None:
        pkt = ipv6(FRAG, ext_fragment(UDP, offset=offset, more=more) + bytes(16))
        assert parse_all_ways(pkt) == FRAGMENT

    def test_fragment_after_other_headers(self) -> None:
        pkt = ipv6(HOPOPTS, ext_generic(FRAG) + ext_fragment(TCP, offset=3) + bytes(8))
        assert parse_all_ways(pkt) == FRAGMENT

    def test_no_next_header(self) -> None:
        # Protocol 59 for the kernel too (ipv6_find_hdr() stops there): a protocol without ports.
        assert parse_all_ways(ipv6(NONE, b"")) == flow6(NONE)
        assert parse_all_ways(ipv6(DSTOPTS, ext_generic(NONE))) == flow6(NONE)
        assert parse_all_ways(ipv6(HOPOPTS, ext_generic(NONE, 2) + bytes(8))) == flow6(NONE)

    def test_full_chain(self) -> None:
        nh, body = chain([HOPOPTS, DSTOPTS, ROUTING, FRAG, AH, DSTOPTS], TCP, tcp(1111, 2222))
        assert parse_all_ways(ipv6(nh, body)) == flow6(TCP, 1111, 2222)

    @pytest.mark.parametrize("count", [8, 9, 100, 8000])
    def test_no_limit_on_the_number_of_extension_headers(self, count: int) -> None:
        # The kernel walks any number; so do we (bounded by the packet: 8 bytes each at least).
        nh, body = chain([DSTOPTS] * count, UDP, udp(1, 2), short=True)
        assert parse_all_ways(ipv6(nh, body)) == flow6(UDP, 1, 2)

    def test_largest_chain_ends_within_the_buffer(self) -> None:
        # 8-byte headers up to the end of a 64 KiB packet, and no transport header: the walk ends.
        nh, body = chain([HOPOPTS] * 8186, TCP, b"", short=True)
        pkt = ipv6(nh, body, plen=0)
        assert len(pkt) == 65528
        assert parse_all_ways(pkt) == TRUNCATED
        assert parse_all_ways(ipv6(nh, body)) == MALFORMED_IPV6

    def test_payload_length_zero_is_jumbo_or_big_tcp(self) -> None:
        assert parse_all_ways(ipv6(TCP, tcp(1, 2), plen=0)) == flow6(TCP, 1, 2)
        assert parse_all_ways(ipv6(HOPOPTS, ext_generic(TCP) + tcp(1, 2), plen=0)) == flow6(TCP, 1, 2)

    def test_ports_beyond_payload_length(self) -> None:
        assert parse_all_ways(ipv6(TCP, tcp(), plen=3)) == MALFORMED_IPV6

    def test_extension_header_beyond_payload_length(self) -> None:
        # The hop-by-hop header claims 48 bytes but the payload is 16: no next header to trust.
        pkt = ipv6(HOPOPTS, ext_generic(ICMPV6, 5)[:8] + bytes(8), plen=16)
        assert parse_all_ways(pkt) == MALFORMED_IPV6
        assert parse_all_ways(ipv6(HOPOPTS, b"", plen=1) + bytes(8)) == MALFORMED_IPV6
        assert parse_all_ways(ipv6(FRAG, bytes(8), plen=4)) == MALFORMED_IPV6
        assert parse_all_ways(ipv6(AH, ext_ah(ICMPV6, 10)[:8], plen=8)) == MALFORMED_IPV6

    @pytest.mark.parametrize("cut", [0, 1, 39])
    def test_truncated_fixed_header(self, cut: int) -> None:
        assert parse_all_ways(ipv6(TCP, tcp())[:cut]) == TRUNCATED

    def test_truncated_ports(self) -> None:
        assert parse_all_ways(ipv6(UDP, udp())[:43]) == TRUNCATED
        assert parse_all_ways(ipv6(UDP, udp(1, 2))[:44]) == flow6(UDP, 1, 2)

    @pytest.mark.parametrize("kind", [HOPOPTS, ROUTING, DSTOPTS, FRAG, AH])
    def test_truncated_extension_header(self, kind: int) -> None:
        pkt = ipv6(kind, ext(kind, TCP) + tcp(1, 2))
        assert parse_all_ways(pkt[:41]) == TRUNCATED
        assert parse_all_ways(pkt[: len(pkt) - 20 + 3]) == TRUNCATED
        assert parse_all_ways(pkt[: len(pkt) - 20 + 4]) == flow6(TCP, 1, 2)

    def test_copy_range_cut_deep_chain(self) -> None:
        # 128 bytes (the default copy range) hold 40 + 80 bytes of options + ports.
        nh, body = chain([HOPOPTS, DSTOPTS, ROUTING, DSTOPTS, ROUTING], TCP, tcp(9, 10) + bytes(100))
        pkt = ipv6(nh, body)
        assert parse_all_ways(pkt[:128]) == flow6(TCP, 9, 10)
        nh, body = chain([HOPOPTS] * 6, TCP, tcp(9, 10) + bytes(100))
        assert parse_all_ways(ipv6(nh, body)[:128]) == TRUNCATED


# --- anything else --------------------------------------------------------------------------


class TestOther:
    @pytest.mark.parametrize("first", [0x00, 0x15, 0x55, 0x75, 0xF0])
    def test_unknown_version(self, first: int) -> None:
        assert parse_all_ways(bytes([first]) + bytes(59)) == UNKNOWN_VERSION
        assert parse_all_ways(bytes([first])) == UNKNOWN_VERSION

    def test_empty(self) -> None:
        assert parse_all_ways(b"") == TRUNCATED

    def test_version_6_packet_with_version_4_nibble(self) -> None:
        pkt = bytearray(ipv6(TCP, tcp()))
        pkt[0] = 0x45
        assert isinstance(parse_packet(bytes(pkt)), Flow | int)

    def test_bad_input_never_raises(self) -> None:
        assert parse_packet(memoryview(ipv4(TCP, tcp())).cast("c")) == BAD_INPUT  # type: ignore[arg-type]
        assert parse_packet(None) == BAD_INPUT  # type: ignore[arg-type]
        released = memoryview(ipv4(TCP, tcp()))
        released.release()
        assert parse_packet(released) == BAD_INPUT

    def test_error_codes_are_distinct_named_and_truthy(self) -> None:
        codes = [TRUNCATED, UNKNOWN_VERSION, MALFORMED_IPV4, MALFORMED_IPV6, FRAGMENT, BAD_INPUT]
        assert len(set(codes)) == len(codes)
        assert set(ERROR_NAMES) == set(codes)
        assert all(code > 0 for code in codes)


# --- fuzzing ----------------------------------------------------------------------------------

VALID_PACKETS: list[tuple[bytes, Flow]] = [
    (ipv4(TCP, tcp(40000, 80)), flow4(TCP, 40000, 80)),
    (ipv4(UDP, udp(1, 2), options=bytes(12)), flow4(UDP, 1, 2)),
    (ipv4(SCTP, sctp(5, 6)), flow4(SCTP, 5, 6)),
    (ipv4(ICMP, icmp_echo()), flow4(ICMP)),
    (ipv6(TCP, tcp(3, 4)), flow6(TCP, 3, 4)),
    (ipv6(ICMPV6, struct.pack("!BBH", 128, 0, 0)), flow6(ICMPV6)),
    (ipv6(*chain([HOPOPTS, DSTOPTS, ROUTING, FRAG, AH, DSTOPTS], UDP, udp(7, 8))), flow6(UDP, 7, 8)),
    (ipv6(DSTOPTS, dstopts(TCP, 200) + tcp(9, 10)), flow6(TCP, 9, 10)),
    (ipv6(MOBILITY, ext_generic(TCP) + tcp(11, 12)), flow6(MOBILITY)),
    (ipv6(*chain([HOPOPTS, AH], ESP, bytes(24))), flow6(ESP)),
]


def _check(result: Flow | int) -> None:
    if isinstance(result, int):
        assert result in ERROR_NAMES
        assert result != BAD_INPUT  # byte input must never fall through to the safety net
    else:
        assert type(result) is Flow
        assert len(result.src_ip) in (4, 16) and len(result.dst_ip) == len(result.src_ip)
        assert 0 <= result.protocol <= 255
        assert 0 <= result.src_port <= 65535 and 0 <= result.dst_port <= 65535


fuzz = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check(parse_all_ways(data))


@fuzz
@given(st.integers(min_value=0, max_value=15), st.binary(max_size=120))
def test_fuzz_random_bytes_with_ip_version(version_nibble: int, rest: bytes) -> None:
    data = bytes([(version_nibble << 4) | (rest[0] & 0x0F if rest else 5)]) + rest
    _check(parse_all_ways(data))


@fuzz
@given(
    st.sampled_from(VALID_PACKETS),
    st.lists(st.tuples(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255)), min_size=1, max_size=6),
)
def test_fuzz_mutated_valid_packets(sample: tuple[bytes, Flow], edits: list[tuple[int, int]]) -> None:
    pkt = bytearray(sample[0])
    for pos, value in edits:
        pkt[pos % len(pkt)] = value
    _check(parse_all_ways(bytes(pkt)))


@fuzz
@given(st.sampled_from(VALID_PACKETS), st.binary(max_size=64))
def test_fuzz_trailing_bytes_do_not_change_the_flow(sample: tuple[bytes, Flow], extra: bytes) -> None:
    assert parse_all_ways(sample[0] + extra) == sample[1]


@pytest.mark.parametrize(("pkt", "expected"), VALID_PACKETS)
def test_every_truncation_is_flow_or_truncated(pkt: bytes, expected: Flow) -> None:
    assert parse_all_ways(pkt) == expected
    for cut in range(len(pkt)):
        assert parse_all_ways(pkt[:cut]) in (expected, TRUNCATED), cut


EXT_KINDS = st.sampled_from([HOPOPTS, ROUTING, DSTOPTS, FRAG, AH])


@fuzz
@given(
    st.lists(EXT_KINDS, max_size=40),
    st.sampled_from([TCP, UDP, SCTP, UDPLITE, ICMPV6, ESP, NONE, MOBILITY]),
    st.integers(min_value=0, max_value=65535),
    st.integers(min_value=0, max_value=65535),
)
def test_fuzz_generated_extension_chains(kinds: list[int], final: int, sport: int, dport: int) -> None:
    payload = {TCP: tcp(sport, dport), UDP: udp(sport, dport), UDPLITE: udp(sport, dport), SCTP: sctp(sport, dport)}.get(final, bytes(8))
    nh, body = chain(kinds, final, payload)
    result = parse_all_ways(ipv6(nh, body))
    if final in (TCP, UDP, UDPLITE, SCTP):
        assert result == flow6(final, sport, dport)
    else:
        assert result == flow6(final)
    assert parse_addresses(ipv6(nh, body)) == (SRC6, DST6, final)


# --- what is known when there is no Flow --------------------------------------------------


class TestParseAddresses:
    def test_nothing_known(self) -> None:
        for data in (b"", bytes([0x45]) + bytes(18), bytes([0x60]) + bytes(38), bytes([0x55]) + bytes(59)):
            assert parse_addresses(data) is None
        assert parse_addresses(None) is None  # type: ignore[arg-type]

    def test_ipv4_protocol_is_always_known(self) -> None:
        assert parse_addresses(ipv4(TCP, tcp())[:22]) == (SRC4, DST4, TCP)
        assert parse_addresses(ipv4(UDP, udp(), flags_frag=0x0010)) == (SRC4, DST4, UDP)  # fragment
        assert parse_addresses(ipv4(TCP, tcp(), ihl=4)) == (SRC4, DST4, TCP)  # malformed

    def test_ipv6_chain_cut_short(self) -> None:
        pkt = ipv6(DSTOPTS, dstopts(TCP, 200) + tcp(1, 22))
        assert parse_addresses(pkt[:41]) == (SRC6, DST6, None)  # cut inside the first header
        # The options header was cut, not its next-header field: the kernel will find TCP.
        assert parse_addresses(pkt[:128]) == (SRC6, DST6, TCP)
        assert parse_addresses(pkt[:241]) == (SRC6, DST6, TCP)  # the ports are cut, not the protocol
        nh, body = chain([HOPOPTS, DSTOPTS, DSTOPTS], TCP, tcp(1, 22))
        assert parse_addresses(ipv6(nh, body)[:60]) == (SRC6, DST6, None)  # cut between headers
        assert parse_addresses(ipv6(HOPOPTS, ext_generic(TCP, 5), plen=8)) == (SRC6, DST6, TCP)

    def test_ipv6_header_beyond_payload_length(self) -> None:
        pkt = ipv6(HOPOPTS, ext_generic(DSTOPTS, 1) + ext_generic(TCP) + tcp(), plen=16)
        assert parse_all_ways(pkt) == MALFORMED_IPV6
        assert parse_addresses(pkt) == (SRC6, DST6, None)

    def test_ipv6_non_first_fragment(self) -> None:
        # As ipv6_find_hdr(): the fragment header names the protocol unless more headers follow.
        assert parse_addresses(ipv6(FRAG, ext_fragment(UDP, offset=3) + bytes(8))) == (SRC6, DST6, UDP)
        assert parse_addresses(ipv6(FRAG, ext_fragment(DSTOPTS, offset=3) + bytes(8))) == (SRC6, DST6, None)
        nh = HOPOPTS
        assert parse_all_ways(ipv6(nh, ext_generic(FRAG) + ext_fragment(TCP, offset=1))) == FRAGMENT
        assert parse_addresses(ipv6(nh, ext_generic(FRAG) + ext_fragment(TCP, offset=1))) == (SRC6, DST6, TCP)


@pytest.mark.parametrize(("pkt", "expected"), VALID_PACKETS)
def test_what_is_known_of_a_cut_packet_is_never_wrong(pkt: bytes, expected: Flow) -> None:
    assert parse_addresses(pkt) == (expected.src_ip, expected.dst_ip, expected.protocol)
    for cut in range(len(pkt)):
        known = parse_addresses(pkt[:cut])
        if known is not None:
            assert known[:2] == (expected.src_ip, expected.dst_ip), cut
            assert known[2] in (None, expected.protocol), cut
