"""CIDRs and IP blocks as integers, so that matching a packet costs two integer operations."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from kube_network_policies.model.errors import shown
from kube_network_policies.model.fields import Fields


@dataclass(frozen=True, slots=True)
class Cidr:
    family: int  # 4 or 6
    network: int
    mask: int
    prefix: int

    def contains(self, family: int, address: int) -> bool:
        return family == self.family and address & self.mask == self.network

    def covers(self, other: Cidr) -> bool:
        return other.family == self.family and other.prefix >= self.prefix and other.network & self.mask == self.network

    def __str__(self) -> str:
        if self.family == 4:
            return f"{ipaddress.IPv4Address(self.network)}/{self.prefix}"
        return f"{ipaddress.IPv6Address(self.network)}/{self.prefix}"


def cidr_from_network(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Cidr:
    bits = 32 if net.version == 4 else 128
    mask = ((1 << net.prefixlen) - 1) << (bits - net.prefixlen)
    return Cidr(net.version, int(net.network_address), mask, net.prefixlen)


def parse_cidr(fields: Fields, text: object, path: str) -> Cidr | None:
    """Parse a CIDR as the API server does, then canonicalise it (host bits cleared).

    Host bits are accepted (10.0.0.5/24 means 10.0.0.0/24), as the API server does for ipBlock.
    Never accepted: zones (fd00::%eth0/64), whitespace. Strict (files): leading zeros and
    IPv4-mapped IPv6 addresses are refused, as the API server does with StrictIPCIDRValidation
    and in CEL's isCIDR: they read differently in different software. Non-strict (objects the
    API server stored, possibly without that gate): read the way the API server reads them,
    leading zeros as decimal and ::ffff:a.b.c.d/p (p >= 96) as the IPv4 network a.b.c.d/(p-96).
    """
    if not isinstance(text, str):
        fields.error(path, f"must be a CIDR string, got {shown(text)}")
        return None
    address, slash, prefix = text.partition("/")
    if not slash:
        fields.error(path, f"invalid CIDR {shown(text)}: missing /prefix-length")
        return None
    problem = _text_problem(text)
    if problem is None and (not prefix.isascii() or not prefix.isdigit()):
        problem = "the prefix length must be a decimal number"
    if problem is None and len(prefix) > 1 and prefix[0] == "0":
        if fields.strict:
            problem = "must not have leading 0s in the prefix length"
        else:
            prefix = prefix.lstrip("0") or "0"
    if problem is not None:
        fields.error(path, f"invalid CIDR {shown(text)}: {problem}")
        return None
    try:
        ip = _parse_ip(address, strict=fields.strict, unmap=False)
        net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    except ValueError as exc:
        fields.error(path, f"invalid CIDR {shown(text)}: {exc}")
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        if fields.strict:
            fields.error(path, f"invalid CIDR {shown(text)}: IPv4-mapped IPv6 addresses are not allowed (write it as an IPv4 CIDR)")
            return None
        if net.prefixlen >= 96:  # what Go's parser makes of it; shorter prefixes mask the ffff away
            net = ipaddress.ip_network(f"{ip.ipv4_mapped}/{net.prefixlen - 96}", strict=False)
    return cidr_from_network(net)


@dataclass(frozen=True, slots=True)
class IPBlock:
    """networking.k8s.io/v1 IPBlock: a CIDR minus the excepted CIDRs."""

    cidr: Cidr
    excepts: tuple[Cidr, ...]

    def contains(self, family: int, address: int) -> bool:
        if not self.cidr.contains(family, address):
            return False
        for e in self.excepts:  # noqa: SIM110 - a plain loop is cheaper than all() on the packet path
            if address & e.mask == e.network:
                return False
        return True

    def describe(self) -> str:
        if self.excepts:
            return f"{self.cidr} except {', '.join(map(str, self.excepts))}"
        return str(self.cidr)


_inet_pton = socket.inet_pton
_AF_INET = socket.AF_INET
_SLOPPY_IPV4 = re.compile(r"([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)")


def _text_problem(text: str) -> str | None:
    if not text:
        return "must not be empty"
    if "%" in text:
        return "zones (%...) are not allowed"
    if text != text.strip() or " " in text:
        return "must not contain spaces"
    return None


def _parse_ip(text: str, *, strict: bool, unmap: bool = True) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as the API server reads it; raises ValueError with the problem.

    Always refused: zones, spaces. Strict: leading zeros (010.1.1.1 is octal to libc and
    decimal to Go) and IPv4-mapped IPv6 addresses. Non-strict: leading zeros are read as
    decimal and ::ffff:a.b.c.d as a.b.c.d, as the API server's parser (ParseIPSloppy) and Go
    read them.
    """
    problem = _text_problem(text)
    if problem is not None:
        raise ValueError(problem)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        m = _SLOPPY_IPV4.fullmatch(text)
        if m is None or any(int(g) > 255 for g in m.groups()):
            raise ValueError("not an IP address") from None
        if strict:
            raise ValueError("must not have leading 0s") from None
        return ipaddress.IPv4Address(".".join(str(int(g)) for g in m.groups()))
    if unmap and isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        if strict:
            raise ValueError(f"must not be an IPv4-mapped IPv6 address (use {ip.ipv4_mapped})")
        return ip.ipv4_mapped
    return ip


def canonical_address(text: str, *, strict: bool = False) -> str:
    """The canonical text of an address (see _parse_ip); raises ValueError with the problem."""
    try:
        # Fast path: libc's inet_pton takes only canonical dotted quads (no leading zeros,
        # spaces or other forms), which are their own canonical text.
        _inet_pton(_AF_INET, text)
        return text
    except (OSError, ValueError):
        pass
    try:
        return str(_parse_ip(text, strict=strict))
    except ValueError as exc:
        raise ValueError(f"invalid IP address {shown(text)}: {exc}") from None
