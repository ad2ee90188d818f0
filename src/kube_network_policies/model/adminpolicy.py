"""Cluster-scoped tiered policies: AdminNetworkPolicy and BaselineAdminNetworkPolicy
(policy.networking.k8s.io/v1alpha1, network-policy-api v0.1.5) and ClusterNetworkPolicy
(policy.networking.k8s.io/v1alpha2, network-policy-api v0.2.0).

The two API generations are front ends of one mechanism, so they parse into the same rule, peer and
port types; only the policy objects (which carry tier and priority) differ.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kube_network_policies.model.core import PROTOCOLS, metadata, object_subject
from kube_network_policies.model.errors import ValidationError, shown
from kube_network_policies.model.fields import Fields
from kube_network_policies.model.ipnet import Cidr, parse_cidr
from kube_network_policies.model.selectors import MATCH_ALL, LabelSelector, parse_selector

ALLOW = "Allow"  # v1alpha2 calls it Accept; both parse to ALLOW, `action_name` keeps the spelling
DENY = "Deny"
PASS = "Pass"  # noqa: S105 (an action, not a password)

ADMIN_TIER = "Admin"
BASELINE_TIER = "Baseline"


@dataclass(frozen=True, slots=True)
class PodsPeer:
    """`pods` (namespace AND pod selector) or `namespaces` (pod selector = everything)."""

    namespace_selector: LabelSelector
    pod_selector: LabelSelector


@dataclass(frozen=True, slots=True)
class NodesPeer:
    node_selector: LabelSelector


@dataclass(frozen=True, slots=True)
class NetworksPeer:
    cidrs: tuple[Cidr, ...]


@dataclass(frozen=True, slots=True)
class DomainNamesPeer:
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnknownPeer:
    """A peer with no field this implementation knows: the API says to fail closed."""

    reason: str


AdminPeer = PodsPeer | NodesPeer | NetworksPeer | DomainNamesPeer | UnknownPeer


@dataclass(frozen=True, slots=True)
class PortRange:
    protocol: str
    start: int
    end: int  # inclusive; equal to start for a single port


@dataclass(frozen=True, slots=True)
class NamedPort:
    name: str


AdminPort = PortRange | NamedPort


@dataclass(frozen=True, slots=True)
class AdminRule:
    name: str
    action: str  # ALLOW, DENY or PASS
    action_name: str  # as written: Allow/Accept, Deny, Pass
    peers: tuple[AdminPeer, ...]
    ports: tuple[AdminPort, ...] | None  # None: every protocol and port


@dataclass(frozen=True, slots=True)
class Subject:
    namespace_selector: LabelSelector
    pod_selector: LabelSelector


@dataclass(frozen=True, slots=True)
class AdminNetworkPolicy:
    name: str
    priority: int
    subject: Subject
    ingress: tuple[AdminRule, ...]
    egress: tuple[AdminRule, ...]

    kind = "AdminNetworkPolicy"
    tier = ADMIN_TIER


@dataclass(frozen=True, slots=True)
class BaselineAdminNetworkPolicy:
    name: str
    subject: Subject
    ingress: tuple[AdminRule, ...]
    egress: tuple[AdminRule, ...]

    kind = "BaselineAdminNetworkPolicy"
    tier = BASELINE_TIER


@dataclass(frozen=True, slots=True)
class ClusterNetworkPolicy:
    name: str
    tier: str  # ADMIN_TIER or BASELINE_TIER
    priority: int
    subject: Subject
    ingress: tuple[AdminRule, ...]
    egress: tuple[AdminRule, ...]

    kind = "ClusterNetworkPolicy"


TieredPolicy = AdminNetworkPolicy | BaselineAdminNetworkPolicy | ClusterNetworkPolicy


SPEC_V1 = ("priority", "subject", "ingress", "egress")
SPEC_BANP = ("subject", "ingress", "egress")
SPEC_V2 = ("tier", "priority", "subject", "ingress", "egress")
# maxItems of the CRDs (v0.1.5 and v0.2.0): rules per direction, peers per rule, ports per rule
LIMITS_V1 = (100, 100, 100)
LIMITS_V2 = (25, 25, 25)
MAX_NETWORKS = 25
MAX_NETWORK_CHARS = 43  # maxLength of a networks entry
# The v1alpha2 CRD's pattern for domainNames entries, as written there (A-z included).
_DOMAIN_NAME = re.compile(r"(\*\.)?([a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?")


def parse_admin_network_policy(obj: Mapping[str, Any], *, strict: bool = False) -> AdminNetworkPolicy:
    f = Fields(strict)
    _, name, _ = metadata(f, obj, namespaced=False)
    spec = f.mapping(obj, "spec", "", required=True) or {}
    f.unknown(spec, "spec", SPEC_V1)
    priority = f.integer(spec, "priority", "spec", required=True, minimum=0, maximum=1000)
    subject = _subject(f, spec, v2=False)
    ingress = _rules(f, spec, "ingress", v2=False, actions=(ALLOW, DENY, PASS))
    egress = _rules(f, spec, "egress", v2=False, actions=(ALLOW, DENY, PASS))
    if f.errors:
        raise ValidationError(object_subject("AdminNetworkPolicy", obj), f.errors)
    return AdminNetworkPolicy(name, priority or 0, subject, ingress, egress)


def parse_baseline_admin_network_policy(obj: Mapping[str, Any], *, strict: bool = False) -> BaselineAdminNetworkPolicy:
    f = Fields(strict)
    _, name, _ = metadata(f, obj, namespaced=False)
    if name and name != "default":
        f.error("metadata.name", 'only one BaselineAdminNetworkPolicy, named "default", may exist')
    spec = f.mapping(obj, "spec", "", required=True) or {}
    f.unknown(spec, "spec", SPEC_BANP)
    subject = _subject(f, spec, v2=False)
    ingress = _rules(f, spec, "ingress", v2=False, actions=(ALLOW, DENY))
    egress = _rules(f, spec, "egress", v2=False, actions=(ALLOW, DENY))
    if f.errors:
        raise ValidationError(object_subject("BaselineAdminNetworkPolicy", obj), f.errors)
    return BaselineAdminNetworkPolicy(name, subject, ingress, egress)


def parse_cluster_network_policy(obj: Mapping[str, Any], *, strict: bool = False) -> ClusterNetworkPolicy:
    f = Fields(strict)
    _, name, _ = metadata(f, obj, namespaced=False)
    spec = f.mapping(obj, "spec", "", required=True) or {}
    f.unknown(spec, "spec", SPEC_V2)
    tier = f.string(spec, "tier", "spec", required=True)
    if tier is not None and tier not in (ADMIN_TIER, BASELINE_TIER):
        f.error("spec.tier", f"unsupported value {shown(tier)} (expected Admin or Baseline)")
    priority = f.integer(spec, "priority", "spec", required=True, minimum=0, maximum=1000)
    subject = _subject(f, spec, v2=True)
    ingress = _rules(f, spec, "ingress", v2=True, actions=(ALLOW, DENY, PASS))
    egress = _rules(f, spec, "egress", v2=True, actions=(ALLOW, DENY, PASS))
    if f.errors:
        raise ValidationError(object_subject("ClusterNetworkPolicy", obj), f.errors)
    return ClusterNetworkPolicy(name, tier or ADMIN_TIER, priority or 0, subject, ingress, egress)


def _at_most(f: Fields, items: list[Any], limit: int, path: str) -> None:
    """The CRDs' maxItems, checked for files only: a newer CRD may allow more, and an object
    the API server accepted must not be dropped."""
    if f.strict and len(items) > limit:
        f.error(path, f"must have at most {limit} entries, got {len(items)}")


def _subject(f: Fields, spec: Mapping[str, Any], *, v2: bool) -> Subject:
    raw = f.mapping(spec, "subject", "spec", required=True)
    if raw is None:
        return Subject(MATCH_ALL, MATCH_ALL)
    f.unknown(raw, "spec.subject", ("namespaces", "pods"))
    known = [k for k in ("namespaces", "pods") if raw.get(k) is not None]
    if len(known) != 1:
        f.error("spec.subject", "exactly one of namespaces or pods must be set")
        return Subject(MATCH_ALL, MATCH_ALL)
    if known[0] == "namespaces":
        return Subject(parse_selector(f, f.mapping(raw, "namespaces", "spec.subject"), "spec.subject.namespaces"), MATCH_ALL)
    namespaces, pods = _pods_selectors(f, f.mapping(raw, "pods", "spec.subject"), "spec.subject.pods", v2=v2)
    return Subject(namespaces, pods)


def _pods_selectors(f: Fields, pods: Mapping[str, Any] | None, path: str, *, v2: bool) -> tuple[LabelSelector, LabelSelector]:
    """(namespace selector, pod selector) of a `pods` subject or peer. v1alpha1 requires both
    selectors; in v1alpha2 namespaceSelector is optional and absent means every namespace."""
    if pods is None:
        return MATCH_ALL, MATCH_ALL
    f.unknown(pods, path, ("namespaceSelector", "podSelector"))
    for key in ("podSelector",) if v2 else ("namespaceSelector", "podSelector"):
        if pods.get(key) is None:
            f.error(f"{path}.{key}", "required field is missing (use {} to select everything)")
    return (
        parse_selector(f, f.mapping(pods, "namespaceSelector", path), f"{path}.namespaceSelector"),
        parse_selector(f, f.mapping(pods, "podSelector", path), f"{path}.podSelector"),
    )


def _rules(f: Fields, spec: Mapping[str, Any], direction: str, *, v2: bool, actions: tuple[str, ...]) -> tuple[AdminRule, ...]:
    peers_key = "from" if direction == "ingress" else "to"
    max_rules, max_peers, max_ports = LIMITS_V2 if v2 else LIMITS_V1
    ports_key = "protocols" if v2 else "ports"
    out = []
    raw_rules = f.sequence(spec, direction, "spec") or []
    _at_most(f, raw_rules, max_rules, f"spec.{direction}")
    for i, raw in enumerate(raw_rules):
        path = f"spec.{direction}[{i}]"
        if not isinstance(raw, Mapping):
            f.error(path, "must be an object")
            continue
        f.unknown(raw, path, ("name", "action", peers_key, ports_key))
        action_name = f.string(raw, "action", path, required=True)
        allowed_names = [("Accept" if v2 and a == ALLOW else a) for a in actions]
        if action_name is not None and action_name not in allowed_names:
            f.error(f"{path}.action", f"unsupported action {shown(action_name)} (expected one of {', '.join(allowed_names)})")
        # An invalid action still lets the rest of the rule be checked, so all problems show at once.
        action = ALLOW if action_name == ("Accept" if v2 else "Allow") else (action_name if action_name in allowed_names else DENY)
        action_name = action_name or ""
        rule_name = f.string(raw, "name", path) or ""
        if len(rule_name) > 100:
            f.error(f"{path}.name", "must be no more than 100 characters")
        raw_peers = f.sequence(raw, peers_key, path, required=True)
        if raw_peers is not None and not raw_peers:
            f.error(f"{path}.{peers_key}", "must contain at least one peer")
        _at_most(f, raw_peers or [], max_peers, f"{path}.{peers_key}")
        peers = tuple(_peer(f, p, f"{path}.{peers_key}[{j}]", egress=direction == "egress", v2=v2) for j, p in enumerate(raw_peers or []))
        ports = _protocols(f, raw, path, max_ports) if v2 else _ports(f, raw, path, max_ports)
        if ports and any(isinstance(p, NamedPort) for p in ports) and any(isinstance(p, (NodesPeer, NetworksPeer, DomainNamesPeer)) for p in peers):
            f.error(path, "named ports cannot be used with networks, nodes or domainNames peers (they have no named ports)")
        if any(isinstance(p, DomainNamesPeer) for p in peers) and action != ALLOW:
            f.error(f"{path}.{peers_key}", "domainNames peers are only supported in Accept rules")
        out.append(AdminRule(rule_name, action, action_name, peers, ports))
    return tuple(out)


def _peer(f: Fields, raw: object, path: str, *, egress: bool, v2: bool) -> AdminPeer:
    if not isinstance(raw, Mapping):
        f.error(path, "must be an object")
        return UnknownPeer("not an object")
    kinds = ["namespaces", "pods"] + (["nodes", "networks"] if egress else []) + (["domainNames"] if egress and v2 else [])
    present = [k for k in kinds if raw.get(k) is not None]
    if not present:
        # The API's instruction: a consumer that sees no field it knows must assume an unknown
        # option and fail closed. Not an error, even in files: a newer CRD may legitimately
        # carry such peers, and the behaviour is specified.
        other = ", ".join(sorted(str(k) for k in raw)) or "no field"
        return UnknownPeer(f"peer with {shown(other, quote=False)}: none of {', '.join(kinds)} set")
    f.unknown(raw, path, kinds)
    if len(present) > 1:
        f.error(path, f"exactly one of {', '.join(kinds)} must be set, got {', '.join(present)}")
        return UnknownPeer("several fields")
    kind = present[0]
    if kind == "namespaces":
        return PodsPeer(parse_selector(f, f.mapping(raw, "namespaces", path), f"{path}.namespaces"), MATCH_ALL)
    if kind == "pods":
        namespaces, pods = _pods_selectors(f, f.mapping(raw, "pods", path), f"{path}.pods", v2=v2)
        return PodsPeer(namespaces, pods)
    if kind == "nodes":
        return NodesPeer(parse_selector(f, f.mapping(raw, "nodes", path), f"{path}.nodes"))
    if kind == "networks":
        items = f.sequence(raw, "networks", path) or []
        if not items:
            f.error(f"{path}.networks", "must contain at least one CIDR")
        if len(items) > MAX_NETWORKS:
            f.error(f"{path}.networks", f"at most {MAX_NETWORKS} CIDRs, got {len(items)}")
        cidrs = []
        for j, n in enumerate(items):
            npath = f"{path}.networks[{j}]"
            if f.strict and isinstance(n, str) and len(n) > MAX_NETWORK_CHARS:
                f.error(npath, f"must be no more than {MAX_NETWORK_CHARS} characters, got {len(n)}")
            elif not v2 and isinstance(n, str) and ":" in n and "." in n:
                # The v1alpha1 CRD's rule (self.contains(':') != self.contains('.')): no IPv4-mapped notation.
                f.error(npath, f"invalid CIDR {shown(n)}: IPv4-mapped IPv6 notation is not allowed")
            elif (c := parse_cidr(f, n, npath)) is not None:
                cidrs.append(c)
        return NetworksPeer(tuple(cidrs))
    names = f.sequence(raw, "domainNames", path) or []
    if not names:
        f.error(f"{path}.domainNames", "must contain at least one domain name")
    _at_most(f, names, 25, f"{path}.domainNames")
    for j, n in enumerate(names):
        if not isinstance(n, str) or not n:
            f.error(f"{path}.domainNames[{j}]", f"must be a domain name, got {shown(n)}")
        elif f.strict and not _DOMAIN_NAME.fullmatch(n):
            f.error(f"{path}.domainNames[{j}]", f"invalid domain name {shown(n)}")
    return DomainNamesPeer(tuple(n for n in names if isinstance(n, str)))


def _protocol(f: Fields, raw: Mapping[str, Any], path: str) -> str:
    proto = f.string(raw, "protocol", path, default="TCP")
    if proto not in PROTOCOLS:
        f.error(f"{path}.protocol", f"unsupported protocol {shown(proto)} (expected TCP, UDP or SCTP)")
        return "TCP"
    return sys.intern(proto)


def _ports(f: Fields, rule: Mapping[str, Any], path: str, limit: int) -> tuple[AdminPort, ...] | None:
    """v1alpha1 `ports`: portNumber, portRange or namedPort, exactly one each."""
    raw = f.sequence(rule, "ports", path)
    if raw is None:
        return None
    _at_most(f, raw, limit, f"{path}.ports")
    out: list[AdminPort] = []
    for j, p in enumerate(raw):
        ppath = f"{path}.ports[{j}]"
        if not isinstance(p, Mapping):
            f.error(ppath, "must be an object")
            continue
        f.unknown(p, ppath, ("portNumber", "portRange", "namedPort"))
        present = [k for k in ("portNumber", "portRange", "namedPort") if p.get(k) is not None]
        if len(present) != 1:
            f.error(ppath, "exactly one of portNumber, portRange or namedPort must be set")
            continue
        if present[0] == "portNumber":
            pn = f.mapping(p, "portNumber", ppath) or {}
            f.unknown(pn, f"{ppath}.portNumber", ("port", "protocol"))
            number = f.integer(pn, "port", f"{ppath}.portNumber", required=True, minimum=1, maximum=65535)
            proto = _protocol(f, pn, f"{ppath}.portNumber")
            if number is not None:
                out.append(PortRange(proto, number, number))
        elif present[0] == "portRange":
            pr = f.mapping(p, "portRange", ppath) or {}
            f.unknown(pr, f"{ppath}.portRange", ("start", "end", "protocol"))
            start = f.integer(pr, "start", f"{ppath}.portRange", required=True, minimum=1, maximum=65535)
            end = f.integer(pr, "end", f"{ppath}.portRange", required=True, minimum=1, maximum=65535)
            proto = _protocol(f, pr, f"{ppath}.portRange")
            if start is not None and end is not None:
                if start >= end:
                    f.error(f"{ppath}.portRange", f"start ({start}) must be less than end ({end})")
                else:
                    out.append(PortRange(proto, start, end))
        else:
            name = f.string(p, "namedPort", ppath)
            if name:
                out.append(NamedPort(sys.intern(name)))
    return tuple(out)


def _protocols(f: Fields, rule: Mapping[str, Any], path: str, limit: int) -> tuple[AdminPort, ...] | None:
    """v1alpha2 `protocols`: tcp/udp/sctp with destinationPort number or range, or destinationNamedPort."""
    raw = f.sequence(rule, "protocols", path)
    if raw is None:
        return None
    if not raw:
        f.error(f"{path}.protocols", "must contain at least one entry when present")
    _at_most(f, raw, limit, f"{path}.protocols")
    out: list[AdminPort] = []
    for j, p in enumerate(raw):
        ppath = f"{path}.protocols[{j}]"
        if not isinstance(p, Mapping):
            f.error(ppath, "must be an object")
            continue
        f.unknown(p, ppath, ("tcp", "udp", "sctp", "destinationNamedPort"))
        present = [k for k in ("tcp", "udp", "sctp", "destinationNamedPort") if p.get(k) is not None]
        if len(present) != 1:
            f.error(ppath, "exactly one of tcp, udp, sctp or destinationNamedPort must be set")
            continue
        kind = present[0]
        if kind == "destinationNamedPort":
            name = f.string(p, "destinationNamedPort", ppath)
            if name:
                out.append(NamedPort(sys.intern(name)))
            continue
        proto = kind.upper()
        body = f.mapping(p, kind, ppath) or {}
        f.unknown(body, f"{ppath}.{kind}", ("destinationPort",))
        dport = f.mapping(body, "destinationPort", f"{ppath}.{kind}", required=True)
        if dport is None:
            continue
        dpath = f"{ppath}.{kind}.destinationPort"
        f.unknown(dport, dpath, ("number", "range"))
        has = [k for k in ("number", "range") if dport.get(k) is not None]
        if len(has) != 1:
            f.error(dpath, "exactly one of number or range must be set")
            continue
        if has[0] == "number":
            n = f.integer(dport, "number", dpath, required=True, minimum=1, maximum=65535)
            if n is not None:
                out.append(PortRange(proto, n, n))
        else:
            rng = f.mapping(dport, "range", dpath) or {}
            f.unknown(rng, f"{dpath}.range", ("start", "end"))
            start = f.integer(rng, "start", f"{dpath}.range", required=True, minimum=1, maximum=65535)
            end = f.integer(rng, "end", f"{dpath}.range", required=True, minimum=1, maximum=65535)
            if start is not None and end is not None:
                if start >= end:
                    f.error(f"{dpath}.range", f"start ({start}) must be less than end ({end})")
                else:
                    out.append(PortRange(proto, start, end))
    return tuple(out)
