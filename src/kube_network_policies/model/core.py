"""Pods, Namespaces and Nodes: only what enforcement needs."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kube_network_policies.model.errors import ValidationError, clip, shown
from kube_network_policies.model.fields import Fields
from kube_network_policies.model.ipnet import canonical_address
from kube_network_policies.model.names import (
    dns_label_problem,
    dns_subdomain_problem,
    label_key_problem,
    label_value_problem,
    port_name_problem,
)
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


OBJECT_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
METADATA_FIELDS = (
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
)
MAX_SHOWN_NAME = 260  # a valid name (<= 253) is shown whole


def metadata(
    fields: Fields, obj: Mapping[str, Any], *, namespaced: bool, name_rule: str = "subdomain", top: tuple[str, ...] = OBJECT_FIELDS
) -> tuple[str, str, dict[str, str]]:
    """(namespace, name, labels) of an object. `name_rule` is how the API server validates the
    kind's names: "subdomain" (most kinds) or "label" (Namespaces)."""
    fields.unknown(obj, "", top)
    meta = fields.mapping(obj, "metadata", "", required=True) or {}
    fields.unknown(meta, "metadata", METADATA_FIELDS)
    name = fields.string(meta, "name", "metadata", required=True) or ""
    if "name" in meta and meta.get("name") == "":
        fields.error("metadata.name", "must not be empty")
    elif name and fields.strict:
        problem = dns_label_problem(name) if name_rule == "label" else dns_subdomain_problem(name)
        if problem is not None:
            fields.error("metadata.name", problem)
    namespace = ""
    if namespaced:
        namespace = fields.string(meta, "namespace", "metadata") or "default"
        if fields.strict and (problem := dns_label_problem(namespace)) is not None:
            fields.error("metadata.namespace", problem)
    labels = fields.string_map(meta, "labels", "metadata")
    if fields.strict:
        check_labels(fields, labels, "metadata.labels")
    return _intern(namespace), name, labels


def check_labels(fields: Fields, labels: Mapping[str, str], path: str) -> None:
    for k, v in labels.items():
        problem = label_key_problem(k) or label_value_problem(v)
        if problem is not None:
            fields.error(Fields.key(path, k), problem)


def object_subject(kind: str, obj: Mapping[str, Any]) -> str:
    """'Kind ns/name' for messages, as well as a broken object allows."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    name = meta.get("name") if isinstance(meta, Mapping) else None
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        return f"{kind} <unnamed>"
    name = clip(name, MAX_SHOWN_NAME)
    return f"{kind} {clip(ns, MAX_SHOWN_NAME)}/{name}" if isinstance(ns, str) and ns else f"{kind} {name}"


def _addresses(fields: Fields, values: list[tuple[str, object]]) -> tuple[str, ...]:
    out: list[str] = []
    for path, v in values:
        if not isinstance(v, str) or not v:
            fields.error(path, f"must be an IP address, got {shown(v)}")
            continue
        try:
            ip = canonical_address(v, strict=fields.strict)
        except ValueError as exc:
            fields.error(path, str(exc))
            continue
        if ip not in out:
            out.append(ip)
    return tuple(out)


POD_SPEC_READ = ("nodeName", "hostNetwork", "containers", "initContainers")
POD_STATUS_READ = ("phase", "podIP", "podIPs")
CONTAINER_READ = ("ports", "restartPolicy")
CONTAINER_PORT_FIELDS = ("name", "hostPort", "containerPort", "protocol", "hostIP")


def parse_pod(obj: Mapping[str, Any], *, strict: bool = False) -> Pod:
    f = Fields(strict)
    namespace, name, labels = metadata(f, obj, namespaced=True)
    spec = f.mapping(obj, "spec", "") or {}
    status = f.mapping(obj, "status", "") or {}
    f.near_misses(spec, "spec", POD_SPEC_READ)
    f.near_misses(status, "status", POD_STATUS_READ)
    host_network = f.boolean(spec, "hostNetwork", "spec")
    node = f.string(spec, "nodeName", "spec") or ""
    phase = f.string(status, "phase", "status") or "Running"
    raw_ips: list[tuple[str, object]] = []
    pod_ips = f.sequence(status, "podIPs", "status")
    single = f.string(status, "podIP", "status")
    if pod_ips:
        for i, entry in enumerate(pod_ips):
            p = f"status.podIPs[{i}]"
            if isinstance(entry, Mapping):
                f.unknown(entry, p, ("ip",))
                raw_ips.append((f"{p}.ip", entry.get("ip")))
            else:
                f.error(p, "must be an object with an ip field")
    elif single:
        raw_ips.append(("status.podIP", single))
    ips = _addresses(f, raw_ips)
    if f.strict and pod_ips:
        _check_pod_ips(f, ips, single, len(pod_ips))
    ports: list[ContainerPort] = []
    containers = f.sequence(spec, "containers", "spec") or []
    init = f.sequence(spec, "initContainers", "spec") or []
    # Sidecars (init containers that keep running) serve ports like ordinary containers.
    sources = [("spec.containers", c, i) for i, c in enumerate(containers)]
    sources += [("spec.initContainers", c, i) for i, c in enumerate(init) if isinstance(c, Mapping) and c.get("restartPolicy") == "Always"]
    port_names: dict[str, str] = {}
    for base, c, i in sources:
        cpath = f"{base}[{i}]"
        if not isinstance(c, Mapping):
            f.error(cpath, "must be an object")
            continue
        f.near_misses(c, cpath, CONTAINER_READ)
        for j, p in enumerate(f.sequence(c, "ports", cpath) or []):
            ppath = f"{cpath}.ports[{j}]"
            if not isinstance(p, Mapping):
                f.error(ppath, "must be an object")
                continue
            f.unknown(p, ppath, CONTAINER_PORT_FIELDS)
            number = f.integer(p, "containerPort", ppath, required=True, minimum=1, maximum=65535)
            proto = f.string(p, "protocol", ppath, default="TCP")
            if proto not in PROTOCOLS:
                f.error(f"{ppath}.protocol", f"unsupported protocol {shown(proto)} (expected TCP, UDP or SCTP)")
                continue
            pname = f.string(p, "name", ppath) or ""
            if pname and f.strict:
                if (problem := port_name_problem(pname)) is not None:
                    f.error(f"{ppath}.name", problem)
                elif pname in port_names:
                    f.error(f"{ppath}.name", f"duplicate port name {shown(pname)} (also {port_names[pname]})")
                port_names.setdefault(pname, ppath)
            if number is not None:
                ports.append(ContainerPort(_intern(pname), number, _intern(proto or "TCP")))
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


def _check_pod_ips(f: Fields, ips: tuple[str, ...], single: str | None, count: int) -> None:
    """The API server's rules for status.podIPs: at most one address per family, the first
    equal to status.podIP."""
    if count > 2:
        f.error("status.podIPs", f"must have at most 2 entries (one per address family), got {count}")
    elif len(ips) == 2 and (":" in ips[0]) == (":" in ips[1]):
        f.error("status.podIPs", "must not hold two addresses of the same family")
    if single and ips:
        try:
            first_matches = canonical_address(single, strict=True) == ips[0]
        except ValueError as exc:
            f.error("status.podIP", str(exc))
            return
        if not first_matches:
            f.error("status.podIP", f"must equal status.podIPs[0].ip ({ips[0]}), got {shown(single)}")


def parse_namespace(obj: Mapping[str, Any], *, strict: bool = False) -> Namespace:
    f = Fields(strict)
    _, name, labels = metadata(f, obj, namespaced=False, name_rule="label")
    if f.errors:
        raise ValidationError(object_subject("Namespace", obj), f.errors)
    labels[NAMESPACE_NAME_LABEL] = name
    return Namespace(_intern(name), LabelSet(labels))


def parse_node(obj: Mapping[str, Any], *, strict: bool = False) -> Node:
    f = Fields(strict)
    _, name, labels = metadata(f, obj, namespaced=False)
    status = f.mapping(obj, "status", "") or {}
    f.near_misses(status, "status", ("addresses",))
    raw: list[tuple[str, object]] = []
    for i, a in enumerate(f.sequence(status, "addresses", "status") or []):
        if isinstance(a, Mapping):
            f.unknown(a, f"status.addresses[{i}]", ("type", "address"))
            if a.get("type") in ("InternalIP", "ExternalIP"):
                raw.append((f"status.addresses[{i}].address", a.get("address")))
        elif f.strict:
            f.error(f"status.addresses[{i}]", "must be an object with type and address")
    addresses = _addresses(f, raw)
    if f.errors:
        raise ValidationError(object_subject("Node", obj), f.errors)
    labels.setdefault(HOSTNAME_LABEL, name)
    return Node(_intern(name), LabelSet(labels), addresses)
