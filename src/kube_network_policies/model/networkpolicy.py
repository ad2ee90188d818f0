"""networking.k8s.io/v1 NetworkPolicy, with the API server's defaulting applied."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kube_network_policies.model.core import PROTOCOLS, metadata, object_subject
from kube_network_policies.model.errors import ValidationError, shown
from kube_network_policies.model.fields import Fields
from kube_network_policies.model.ipnet import IPBlock, parse_cidr
from kube_network_policies.model.names import port_name_problem
from kube_network_policies.model.selectors import LabelSelector, parse_selector

INGRESS = "Ingress"
EGRESS = "Egress"


@dataclass(frozen=True, slots=True)
class PodPeer:
    """podSelector and/or namespaceSelector. None means the field was absent.

    podSelector alone: pods of the policy's own namespace; namespaceSelector alone: every pod of the
    selected namespaces; both: the selected pods of the selected namespaces.
    """

    pod_selector: LabelSelector | None
    namespace_selector: LabelSelector | None


@dataclass(frozen=True, slots=True)
class IPBlockPeer:
    block: IPBlock


NetworkPolicyPeer = PodPeer | IPBlockPeer


@dataclass(frozen=True, slots=True)
class NetworkPolicyPort:
    protocol: str  # TCP (the default), UDP or SCTP
    port: int | None  # None: every port of the protocol
    name: str | None  # a named port, resolved on the destination pod
    end_port: int | None  # inclusive, only with a numeric port


@dataclass(frozen=True, slots=True)
class NetworkPolicyRule:
    peers: tuple[NetworkPolicyPeer, ...]  # empty: every peer
    ports: tuple[NetworkPolicyPort, ...]  # empty: every port and protocol


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    policy_types: frozenset[str]
    ingress: tuple[NetworkPolicyRule, ...]
    egress: tuple[NetworkPolicyRule, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


SPEC_FIELDS = ("podSelector", "policyTypes", "ingress", "egress")


def parse_network_policy(obj: Mapping[str, Any], *, strict: bool = False) -> NetworkPolicy:
    f = Fields(strict)
    namespace, name, _ = metadata(f, obj, namespaced=True, top=("apiVersion", "kind", "metadata", "spec"))
    spec = f.mapping(obj, "spec", "", required=True) or {}
    f.unknown(spec, "spec", SPEC_FIELDS)
    pod_selector = parse_selector(f, f.mapping(spec, "podSelector", "spec"), "spec.podSelector", label_syntax=True)
    ingress = _rules(f, spec, "ingress", "from")
    egress = _rules(f, spec, "egress", "to")
    raw_types = f.sequence(spec, "policyTypes", "spec")
    if raw_types is None or not raw_types:
        # API defaulting: Ingress always; Egress only when egress rules are present.
        types = {INGRESS}
        if spec.get("egress"):
            types.add(EGRESS)
    else:
        types = set()
        for i, t in enumerate(raw_types):
            if t not in (INGRESS, EGRESS):
                f.error(f"spec.policyTypes[{i}]", f"unsupported value {shown(t)} (expected Ingress or Egress)")
            else:
                types.add(t)
        if f.strict and len(raw_types) > 2:
            f.error("spec.policyTypes", f"may not hold more than 2 entries, got {len(raw_types)}")
    if f.errors:
        raise ValidationError(object_subject("NetworkPolicy", obj), f.errors)
    return NetworkPolicy(namespace, name, pod_selector, frozenset(types), ingress, egress)


def _rules(f: Fields, spec: Mapping[str, Any], key: str, peers_key: str) -> tuple[NetworkPolicyRule, ...]:
    raw = f.sequence(spec, key, "spec") or []
    rules = []
    for i, item in enumerate(raw):
        path = f"spec.{key}[{i}]"
        r = {} if item is None else item
        if not isinstance(r, Mapping):
            f.error(path, "must be an object")
            continue
        for k in r:
            if k not in (peers_key, "ports"):
                f.error(Fields.key(path, k), f"unknown field (expected {peers_key} or ports)")
        peers = tuple(
            p for j, raw_peer in enumerate(f.sequence(r, peers_key, path) or []) if (p := _peer(f, raw_peer, f"{path}.{peers_key}[{j}]")) is not None
        )
        ports = tuple(
            port for j, raw_port in enumerate(f.sequence(r, "ports", path) or []) if (port := _port(f, raw_port, f"{path}.ports[{j}]")) is not None
        )
        rules.append(NetworkPolicyRule(peers, ports))
    return tuple(rules)


def _peer(f: Fields, raw: object, path: str) -> NetworkPolicyPeer | None:
    if not isinstance(raw, Mapping):
        f.error(path, "must be an object")
        return None
    unknown = [k for k in raw if k not in ("podSelector", "namespaceSelector", "ipBlock")]
    for k in unknown:
        f.error(Fields.key(path, k), "unknown field (expected podSelector, namespaceSelector or ipBlock)")
    has_pod = raw.get("podSelector") is not None
    has_ns = raw.get("namespaceSelector") is not None
    block = f.mapping(raw, "ipBlock", path)
    if block is not None:
        if has_pod or has_ns:
            f.error(path, "ipBlock cannot be combined with podSelector or namespaceSelector")
            return None
        bpath = f"{path}.ipBlock"
        f.unknown(block, bpath, ("cidr", "except"))
        cidr = parse_cidr(f, block.get("cidr"), f"{bpath}.cidr") if "cidr" in block else None
        if "cidr" not in block:
            f.error(f"{bpath}.cidr", "required field is missing")
        excepts = []
        for j, e in enumerate(f.sequence(block, "except", bpath) or []):
            epath = f"{bpath}.except[{j}]"
            c = parse_cidr(f, e, epath)
            if c is None or cidr is None:
                continue
            if not cidr.covers(c) or c.prefix == cidr.prefix:
                f.error(epath, f"{shown(e, quote=False)} must be a strict subset of {cidr}")
                continue
            excepts.append(c)
        if cidr is None:
            return None
        return IPBlockPeer(IPBlock(cidr, tuple(excepts)))
    if not has_pod and not has_ns:
        if not unknown:
            f.error(path, "must specify podSelector, namespaceSelector or ipBlock")
        return None
    pod = parse_selector(f, f.mapping(raw, "podSelector", path), f"{path}.podSelector", label_syntax=True) if has_pod else None
    ns = parse_selector(f, f.mapping(raw, "namespaceSelector", path), f"{path}.namespaceSelector", label_syntax=True) if has_ns else None
    return PodPeer(pod, ns)


def _port(f: Fields, raw: object, path: str) -> NetworkPolicyPort | None:
    if not isinstance(raw, Mapping):
        f.error(path, "must be an object")
        return None
    for k in raw:
        if k not in ("protocol", "port", "endPort"):
            f.error(Fields.key(path, k), "unknown field (expected protocol, port or endPort)")
    protocol = f.string(raw, "protocol", path, default="TCP")
    if protocol not in PROTOCOLS:
        f.error(f"{path}.protocol", f"unsupported protocol {shown(protocol)} (expected TCP, UDP or SCTP)")
        return None
    port_value = raw.get("port")
    number: int | None = None
    name: str | None = None
    if isinstance(port_value, bool):
        f.error(f"{path}.port", f"must be a port number or name, got {shown(port_value)}")
        return None
    if isinstance(port_value, int):
        if not 1 <= port_value <= 65535:
            f.error(f"{path}.port", f"must be between 1 and 65535, got {shown(port_value)}")
            return None
        number = port_value
    elif isinstance(port_value, str):
        if port_value.isascii() and port_value.isdigit():
            # an IntOrString written as a string of digits (at most 5 are a port: no huge int())
            number = int(port_value) if len(port_value) <= 5 else 0
            if not 1 <= number <= 65535:
                f.error(f"{path}.port", f"must be between 1 and 65535, got {shown(port_value, quote=False)}")
                return None
        elif (problem := port_name_problem(port_value)) is not None:
            f.error(f"{path}.port", problem)
            return None
        else:
            name = sys.intern(port_value)
    elif port_value is not None:
        f.error(f"{path}.port", f"must be a port number or name, got {shown(port_value)}")
        return None
    end = f.integer(raw, "endPort", path, minimum=1, maximum=65535)
    if end is not None:
        if number is None:
            f.error(f"{path}.endPort", "endPort may only be set with a numeric port")
            return None
        if end < number:
            f.error(f"{path}.endPort", f"must be greater than or equal to port ({number}), got {end}")
            return None
    return NetworkPolicyPort(sys.intern(protocol or "TCP"), number, name, end)
