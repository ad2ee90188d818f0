"""What the engine is asked (a Flow) and what it answers (a Decision).

A Flow carries packed addresses (4 or 16 bytes) and IANA protocol numbers because that is what the
packet parser reads off the wire: the hot path never formats or parses address strings.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

TCP = 6
UDP = 17
SCTP = 132
ICMP = 1
ICMPV6 = 58

PROTOCOL_NUMBERS: dict[str, int] = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP, "ICMP": ICMP, "ICMPV6": ICMPV6}
PROTOCOL_NAMES: dict[int, str] = {v: k for k, v in PROTOCOL_NUMBERS.items()}
PROTOCOL_NAMES[ICMPV6] = "ICMPv6"


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


class Flow(NamedTuple):
    """The first packet of a connection, as far as policy is concerned."""

    src_ip: bytes  # packed, 4 bytes (IPv4) or 16 bytes (IPv6)
    dst_ip: bytes
    protocol: int  # IANA number: 6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6
    src_port: int = 0  # 0 for protocols without ports
    dst_port: int = 0

    @classmethod
    def of(cls, src: str, dst: str, protocol: str | int = "TCP", dst_port: int = 0, src_port: int = 0) -> Flow:
        """Build a Flow from text addresses (for tools and tests, not the packet path)."""
        if isinstance(protocol, str):
            try:
                protocol = PROTOCOL_NUMBERS[protocol.upper()]
            except KeyError:
                raise ValueError(f"unknown protocol {protocol!r}: expected TCP, UDP, SCTP, ICMP or ICMPv6") from None
        s = ipaddress.ip_address(src)
        d = ipaddress.ip_address(dst)
        if s.version != d.version:
            raise ValueError(f"source {src} and destination {dst} are of different address families")
        return cls(s.packed, d.packed, protocol, src_port, dst_port)

    def describe(self) -> str:
        s = ipaddress.ip_address(self.src_ip)
        d = ipaddress.ip_address(self.dst_ip)
        name = protocol_name(self.protocol)
        if self.protocol in (TCP, UDP, SCTP):
            return f"{name} {s}:{self.src_port} -> {d}:{self.dst_port}"
        return f"{name} {s} -> {d}"


class Tier(str, Enum):
    ADMIN = "admin tier"
    NETWORK_POLICY = "NetworkPolicy"
    BASELINE = "baseline tier"
    DEFAULT = "default"


class Action(str, Enum):
    ALLOW = "Allow"
    DENY = "Deny"
    PASS = "Pass"  # noqa: S105 (an action, not a password)


@dataclass(frozen=True, slots=True)
class Reason:
    """One step of a direction's chain: which tier acted, how, and because of which rule.

    Reasons are built when policies change and shared by every decision they explain, so a
    decision costs no allocation beyond its chain tuple.
    """

    tier: Tier
    action: Action
    policy: str = ""  # "kind/name" for cluster policies, "namespace/name" for NetworkPolicies
    rule: str = ""  # e.g. "ingress rule 0" or "egress rule 2 (allow-dns)"
    detail: str = ""  # free text for defaults, e.g. "no policy selects x/a"

    def describe(self) -> str:
        # Tiers speak the API's words (Allow, Deny, Pass); NetworkPolicy and the default just allow or deny.
        verb = self.action.value if self.tier in (Tier.ADMIN, Tier.BASELINE) else self.action.value.lower()
        if self.policy:
            where = f"{self.policy} {self.rule}".rstrip()
            return f"{self.tier.value}: {verb} ({where})"
        return f"{self.tier.value}: {verb} ({self.detail})" if self.detail else f"{self.tier.value}: {verb}"

    def to_json(self) -> dict[str, str]:
        out = {"tier": self.tier.name.lower(), "action": self.action.value}
        if self.policy:
            out["policy"] = self.policy
        if self.rule:
            out["rule"] = self.rule
        if self.detail:
            out["detail"] = self.detail
        return out


class DirectionResult(NamedTuple):
    allowed: bool
    chain: tuple[Reason, ...]  # empty when the direction was not evaluated (no pod on that side)

    def describe(self) -> str:
        return " -> ".join(r.describe() for r in self.chain) if self.chain else "not subject to policy"


class Decision(NamedTuple):
    """The verdict for a Flow and, per direction, the chain of tiers that decided it."""

    allowed: bool
    egress: DirectionResult  # egress of the source pod
    ingress: DirectionResult  # ingress of the destination pod
