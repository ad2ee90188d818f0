"""Pods, Namespaces and Nodes: only what enforcement needs."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kube_network_policies.model.errors import ValidationError
from kube_network_policies.model.fields import Fields
from kube_network_policies.model.ipnet import canonical_address
from kube_network_policies.model.selectors import LabelSet

PROTOCOLS = ("TCP", "UDP", "SCTP")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
HOSTNAME_LABEL = "kubernetes.io/hostname"

# Pods that finished keep their IP in the API but no longer own it: the address may already
# belong to a new pod, so such pods are never looked up by IP nor selected.
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})

_intern = sys.intern


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str  # "" when unnamed
    port: int
    protocol: str  # TCP, UDP or SCTP


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    labels: LabelSet
    ips: tuple[str, ...]  # canonical text, primary first
    node: str
    phase: str
    host_network: bool
    ports: tuple[ContainerPort, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def terminated(self) -> bool:
        return self.phase in TERMINAL_PHASES


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: LabelSet  # includes kubernetes.io/metadata.name, as the API server sets it


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    labels: LabelSet
    addresses: tuple[str, ...]  # InternalIP/ExternalIP addresses, canonical text


def metadata(fields: Fields, obj: Mapping[str, Any], *, namespaced: bool) -> tuple[str, str, dict[str, str]]:
    meta = fields.mapping(obj, "metadata", "", required=True) or {}
    name = fields.string(meta, "name", "metadata", required=True) or ""
    namespace = ""
    if namespaced:
        namespace = fields.string(meta, "namespace", "metadata") or "default"
    labels = fields.string_map(meta, "labels", "metadata")
    return _intern(namespace), name, labels


def object_subject(kind: str, obj: Mapping[str, Any]) -> str:
    """'Kind ns/name' for messages, as well as a broken object allows."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    name = meta.get("name") if isinstance(meta, Mapping) else None
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    if not isinstance(name, str):
        return f"{kind} <unnamed>"
    return f"{kind} {ns}/{name}" if isinstance(ns, str) and ns else f"{kind} {name}"


def _addresses(fields: Fields, values: list[tuple[str, object]]) -> tuple[str, ...]:
    out: list[str] = []
    for path, v in values:
        if not isinstance(v, str) or not v:
            fields.error(path, f"must be an IP address, got {v!r}")
            continue
        try:
            ip = canonical_address(v)
        except ValueError:
            fields.error(path, f"invalid IP address {v!r}")
            continue
        if ip not in out:
            out.append(ip)
    return tuple(out)


def parse_pod(obj: Mapping[str, Any]) -> Pod:
    f = Fields()
    namespace, name, labels = metadata(f, obj, namespaced=True)
    spec = f.mapping(obj, "spec", "") or {}
    status = f.mapping(obj, "status", "") or {}
    host_network = f.boolean(spec, "hostNetwork", "spec")
    node = f.string(spec, "nodeName", "spec") or ""
    phase = f.string(status, "phase", "status") or "Running"
    raw_ips: list[tuple[str, object]] = []
    pod_ips = f.sequence(status, "podIPs", "status")
    if pod_ips:
        for i, entry in enumerate(pod_ips):
            p = f"status.podIPs[{i}]"
            if isinstance(entry, Mapping):
                raw_ips.append((f"{p}.ip", entry.get("ip")))
            else:
                f.error(p, "must be an object with an ip field")
    else:
        single = f.string(status, "podIP", "status")
        if single:
            raw_ips.append(("status.podIP", single))
    ips = _addresses(f, raw_ips)
    ports: list[ContainerPort] = []
    containers = f.sequence(spec, "containers", "spec") or []
    init = f.sequence(spec, "initContainers", "spec") or []
    # Sidecars (init containers that keep running) serve ports like ordinary containers.
    sources = [("spec.containers", c, i) for i, c in enumerate(containers)]
    sources += [("spec.initContainers", c, i) for i, c in enumerate(init) if isinstance(c, Mapping) and c.get("restartPolicy") == "Always"]
    for base, c, i in sources:
        cpath = f"{base}[{i}]"
        if not isinstance(c, Mapping):
            f.error(cpath, "must be an object")
            continue
        for j, p in enumerate(f.sequence(c, "ports", cpath) or []):
            ppath = f"{cpath}.ports[{j}]"
            if not isinstance(p, Mapping):
                f.error(ppath, "must be an object")
                continue
            number = f.integer(p, "containerPort", ppath, required=True, minimum=1, maximum=65535)
            proto = f.string(p, "protocol", ppath, default="TCP")
            if proto not in PROTOCOLS:
                f.error(f"{ppath}.protocol", f"unsupported protocol {proto!r} (expected TCP, UDP or SCTP)")
                continue
            pname = f.string(p, "name", ppath) or ""
            if number is not None:
                ports.append(ContainerPort(_intern(pname), number, _intern(proto)))
    if f.errors:
        raise ValidationError(object_subject("Pod", obj), f.errors)
    return Pod(
        namespace=namespace,
        name=name,
        labels=LabelSet(labels),
        ips=ips,
        node=_intern(node),
        phase=_intern(phase),
        host_network=host_network,
        ports=tuple(ports),
    )


def parse_namespace(obj: Mapping[str, Any]) -> Namespace:
    f = Fields()
    _, name, labels = metadata(f, obj, namespaced=False)
    if f.errors:
        raise ValidationError(object_subject("Namespace", obj), f.errors)
    labels[NAMESPACE_NAME_LABEL] = name
    return Namespace(_intern(name), LabelSet(labels))


def parse_node(obj: Mapping[str, Any]) -> Node:
    f = Fields()
    _, name, labels = metadata(f, obj, namespaced=False)
    status = f.mapping(obj, "status", "") or {}
    raw: list[tuple[str, object]] = []
    for i, a in enumerate(f.sequence(status, "addresses", "status") or []):
        if isinstance(a, Mapping) and a.get("type") in ("InternalIP", "ExternalIP"):
            raw.append((f"status.addresses[{i}].address", a.get("address")))
    addresses = _addresses(f, raw)
    if f.errors:
        raise ValidationError(object_subject("Node", obj), f.errors)
    labels.setdefault(HOSTNAME_LABEL, name)
    return Node(_intern(name), LabelSet(labels), addresses)
