"""Packet pieces shared by the unit and kernel tests (tests/conftest.py puts this directory on
sys.path: `import packets`)."""

from __future__ import annotations


def destination_options(size: int, next_header: int = 0) -> bytes:
    """An IPv6 destination options header of `size` bytes (a multiple of 8, at most 2048) holding
    unknown options of type 0x1e (RFC 3692 experiment; receivers skip them, accepting up to 8:
    net.ipv6.max_dst_opts_number). For the IPV6_DSTOPTS socket option leave `next_header` 0: the
    kernel fills it in."""
    assert size % 8 == 0 and 8 <= size <= 2048, size
    body = b""
    left = size - 2
    while left:
        n = min(255, left - 2)
        body += bytes([0x1E, n]) + bytes(n)
        left -= n + 2
    return bytes([next_header, size // 8 - 1]) + body
