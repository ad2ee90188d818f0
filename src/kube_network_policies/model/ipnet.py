"""CIDRs and IP blocks as integers, so that matching a packet costs two integer operations."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

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
    """Parse a CIDR as Go's net.ParseCIDR would, then canonicalise it (host bits cleared).

    Host bits are accepted (10.0.0.5/24 means 10.0.0.0/24), as the API server does for ipBlock;
    an IPv4-mapped IPv6 address is refused because the admin APIs forbid mixing notations.
    """
    if not isinstance(text, str):
        fields.error(path, f"must be a CIDR string, got {text!r}")
        return None
    if "/" not in text:
        fields.error(path, f"invalid CIDR {text!r}: missing /prefix-length")
        return None
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        fields.error(path, f"invalid CIDR {text!r}: {exc}")
        return None
    if net.version == 6 and isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None and "." in text:
        fields.error(path, f"invalid CIDR {text!r}: IPv4-mapped IPv6 notation is not supported")
        return None
    return cidr_from_network(net)


@dataclass(frozen=True, slots=True)
class IPBlock:
    """networking.k8s.io/v1 IPBlock: a CIDR minus the excepted CIDRs."""

    cidr: Cidr
    excepts: tuple[Cidr, ...]

    def contains(self, family: int, address: int) -> bool:
        if not self.cidr.contains(family, address):
            return False
        for e in self.excepts:
            if address & e.mask == e.network:
                return False
        return True

    def describe(self) -> str:
        if self.excepts:
            return f"{self.cidr} except {', '.join(map(str, self.excepts))}"
        return str(self.cidr)


def parse_address(text: str) -> tuple[int, int, bytes]:
    """(family, integer, packed) of an IP address; raises ValueError with a clear message."""
    try:
        a = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}") from None
    return a.version, int(a), a.packed


def canonical_address(text: str) -> str:
    return str(ipaddress.ip_address(text.strip()))
