"""Scenario files (format v1, ../shared/SCENARIOS.md): loading and validation.

A scenario is loaded completely before anything runs, and every object it applies is parsed with
the same model the agent uses, so a malformed file fails with its file name and field path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kube_network_policies.errors import InputError
from kube_network_policies.model import ValidationError, kinds, parse_object
from kube_network_policies.model.core import HOSTNAME_LABEL
from kube_network_policies.model.errors import FieldError
from kube_network_policies.model.fields import Fields
from kube_network_policies.sources.decode import DecodeError, load_yaml
from kube_network_policies.sources.files import ManifestError, manifest_files, read_file

# The agent flags that enable kinds (model.kinds), then what the scenario format names besides.
FEATURES = (
    *kinds.flags(),
    "sctp",
    "ipv6",
    "named-ports",
    "end-port",
    "node-peers",
    "host-network",
)
PROBE_PROTOCOLS = ("TCP", "UDP", "SCTP")
DEFAULT_NODE = {"name": "node-1", "ip": "172.18.0.2"}
RELABEL_KINDS = ("Pod", "Namespace", "Node")


class ScenarioError(InputError):
    """A scenario file that cannot be run: names the file and the field."""

    def __init__(self, path: str, errors: list[FieldError] | tuple[FieldError, ...]) -> None:
        self.path = path
        self.errors = tuple(errors)
        super().__init__(self.describe())

    def describe(self) -> str:
        if len(self.errors) == 1:
            return f"{self.path}: {self.errors[0]}"
        return f"{self.path}: {len(self.errors)} problems\n" + "\n".join(f"  - {e}" for e in self.errors)


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    labels: dict[str, str]
    ips: tuple[str, ...]

    def to_object(self) -> dict[str, Any]:
        labels = {HOSTNAME_LABEL: self.name, **self.labels}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels},
            "status": {"addresses": [{"type": "InternalIP", "address": ip} for ip in self.ips]},
        }


@dataclass(frozen=True, slots=True)
class PortSpec:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class PodSpec:
    namespace: str
    name: str
    labels: dict[str, str]
    ips: tuple[str, ...]
    node: str
    host_network: bool
    ports: tuple[PortSpec, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_object(self, labels: dict[str, str] | None = None) -> dict[str, Any]:
        ports = [{"containerPort": p.port, "protocol": p.protocol, **({"name": p.name} if p.name else {})} for p in self.ports]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": dict(self.labels if labels is None else labels)},
            "spec": {"nodeName": self.node, "hostNetwork": self.host_network, "containers": [{"name": "serve", "ports": ports}]},
            "status": {"phase": "Running", "podIP": self.ips[0] if self.ips else None, "podIPs": [{"ip": ip} for ip in self.ips]},
        }


@dataclass(frozen=True, slots=True)
class NamespaceSpec:
    name: str
    labels: dict[str, str]

    def to_object(self, labels: dict[str, str] | None = None) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.name, "labels": dict(self.labels if labels is None else labels)}}


@dataclass(frozen=True, slots=True)
class ObjectRef:
    kind: str
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Relabel:
    ref: ObjectRef
    labels: dict[str, str]


@dataclass(frozen=True, slots=True)
class Probe:
    protocol: str
    port: int
    default_allow: bool
    exceptions: frozenset[tuple[str, str]]
    clients: tuple[str, ...] | None  # None: every pod
    servers: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class Step:
    description: str
    apply: tuple[dict[str, Any], ...]  # objects as written (validated at load)
    delete: tuple[ObjectRef, ...]
    relabel: tuple[Relabel, ...]
    probes: tuple[Probe, ...]


@dataclass(frozen=True, slots=True)
class Scenario:
    path: str
    name: str
    source: str
    requires: tuple[str, ...]
    nodes: tuple[NodeSpec, ...]
    namespaces: tuple[NamespaceSpec, ...]
    pods: tuple[PodSpec, ...]
    steps: tuple[Step, ...]

    def initial_objects(self) -> list[dict[str, Any]]:
        """Nodes, namespaces and pods as API objects, in the order a cluster would create them."""
        return [n.to_object() for n in self.nodes] + [n.to_object() for n in self.namespaces] + [p.to_object() for p in self.pods]


def find_scenario_files(paths: list[str]) -> list[Path]:
    """Files named directly, and every *.yaml under a directory (recursively), sorted. A path
    that cannot be listed or read is a ScenarioError: a suite must not pass by leaving a
    directory out."""
    try:
        return manifest_files(paths, (".yaml",))
    except ManifestError as exc:
        raise ScenarioError(str(exc).split(":", 1)[0], [FieldError("", str(exc).split(": ", 1)[-1])]) from None


def load_scenario(path: Path) -> Scenario:
    where = str(path)
    try:
        text = read_file(path).decode("utf-8")  # bounded in size, like a manifest
    except ManifestError as exc:
        raise ScenarioError(where, [FieldError("", str(exc).removeprefix(f"{path}: "))]) from None
    except UnicodeDecodeError:
        raise ScenarioError(where, [FieldError("", "not UTF-8 text")]) from None
    try:
        docs = [d for d in load_yaml(text) if d is not None]  # bounded depth, aliases, numbers
    except DecodeError as exc:
        at = f"line {exc.line}, column {exc.column}: " if exc.line and exc.column else ""
        raise ScenarioError(where, [FieldError("", f"{'invalid YAML' if exc.syntax else 'refused'}: {at}{exc.problem}")]) from None
    if len(docs) != 1 or not isinstance(docs[0], Mapping):
        raise ScenarioError(where, [FieldError("", "a scenario file holds exactly one YAML mapping")])
    return parse_scenario(docs[0], where)


def parse_scenario(raw: Mapping[str, Any], where: str) -> Scenario:
    f = Fields()
    for key in raw:
        if key not in ("name", "source", "requires", "cluster", "steps"):
            f.error(str(key), "unknown field (expected name, source, requires, cluster, steps)")
    name = f.string(raw, "name", "", required=True) or "?"
    source = f.string(raw, "source", "", required=True) or ""
    requires: list[str] = []
    for i, r in enumerate(f.sequence(raw, "requires", "") or []):
        if r not in FEATURES:
            f.error(f"requires[{i}]", f"unknown feature {r!r} (expected one of {', '.join(FEATURES)})")
        else:
            requires.append(r)
    cluster = f.mapping(raw, "cluster", "", required=True) or {}
    nodes = _nodes(f, cluster)
    node_by_name = {n.name: n for n in nodes}
    pods = _pods(f, cluster, nodes, node_by_name)
    namespaces = _namespaces(f, cluster, pods)
    endpoints = {p.key for p in pods}
    steps = _steps(f, raw, endpoints, {p.key for p in pods}, {n.name for n in namespaces}, set(node_by_name))
    _check_addresses(f, nodes, pods)
    if f.errors:
        raise ScenarioError(where, f.errors)
    return Scenario(where, name, source, tuple(requires), nodes, namespaces, pods, steps)


def _labels(f: Fields, raw: Mapping[str, Any], path: str) -> dict[str, str]:
    return f.string_map(raw, "labels", path)


def _ip_list(f: Fields, raw: Mapping[str, Any], path: str) -> tuple[str, ...]:
    ips = []
    for key in ("ip", "ipv6"):
        v = raw.get(key)
        if v is None:
            continue
        try:
            a = ipaddress.ip_address(str(v))
        except ValueError:
            f.error(f"{path}.{key}", f"invalid IP address {v!r}")
            continue
        if (key == "ip") != (a.version == 4):
            f.error(f"{path}.{key}", f"{v} is not an IPv{'4' if key == 'ip' else '6'} address")
            continue
        ips.append(str(a))
    return tuple(ips)


def _nodes(f: Fields, cluster: Mapping[str, Any]) -> tuple[NodeSpec, ...]:
    raw = f.sequence(cluster, "nodes", "cluster")
    if not raw:
        raw = [DEFAULT_NODE]
    out = []
    for i, n in enumerate(raw):
        path = f"cluster.nodes[{i}]"
        if not isinstance(n, Mapping):
            f.error(path, "must be a mapping")
            continue
        name = f.string(n, "name", path, required=True) or f"node-{i + 1}"
        ips = _ip_list(f, n, path)
        if not ips:
            f.error(f"{path}.ip", "a node needs an ip (or ipv6)")
        out.append(NodeSpec(name, _labels(f, n, path), ips))
    return tuple(out)


def _pods(f: Fields, cluster: Mapping[str, Any], nodes: tuple[NodeSpec, ...], node_by_name: dict[str, NodeSpec]) -> tuple[PodSpec, ...]:
    out = []
    seen: set[str] = set()
    for i, p in enumerate(f.sequence(cluster, "pods", "cluster", required=True) or []):
        path = f"cluster.pods[{i}]"
        if not isinstance(p, Mapping):
            f.error(path, "must be a mapping")
            continue
        ns = f.string(p, "namespace", path, required=True) or "default"
        name = f.string(p, "name", path, required=True) or f"pod-{i}"
        node_name = f.string(p, "node", path) or (nodes[0].name if nodes else "node-1")
        node = node_by_name.get(node_name)
        if node is None:
            f.error(f"{path}.node", f"unknown node {node_name!r}")
        host_network = f.boolean(p, "hostNetwork", path)
        ips = _ip_list(f, p, path)
        if host_network:
            if node is not None and ips and not set(ips) <= set(node.ips):
                f.error(f"{path}.ip", f"a hostNetwork pod has its node's IP ({', '.join(node.ips)})")
            ips = node.ips if node is not None else ips
        elif not ips:
            f.error(f"{path}.ip", "required field is missing")
        ports = []
        for j, port in enumerate(f.sequence(p, "ports", path) or []):
            ppath = f"{path}.ports[{j}]"
            if not isinstance(port, Mapping):
                f.error(ppath, "must be a mapping")
                continue
            number = f.integer(port, "port", ppath, required=True, minimum=1, maximum=65535)
            proto = f.string(port, "protocol", ppath, default="TCP") or "TCP"
            if proto not in PROBE_PROTOCOLS:
                f.error(f"{ppath}.protocol", f"unsupported protocol {proto!r}")
            pname = f.string(port, "name", ppath) or ""
            if number is not None:
                ports.append(PortSpec(pname, number, proto))
        key = f"{ns}/{name}"
        if key in seen:
            f.error(path, f"duplicate pod {key}")
        seen.add(key)
        out.append(PodSpec(ns, name, _labels(f, p, path), ips, node_name, host_network, tuple(ports)))
    return tuple(out)


def _namespaces(f: Fields, cluster: Mapping[str, Any], pods: tuple[PodSpec, ...]) -> tuple[NamespaceSpec, ...]:
    out: dict[str, NamespaceSpec] = {}
    for i, n in enumerate(f.sequence(cluster, "namespaces", "cluster") or []):
        path = f"cluster.namespaces[{i}]"
        if not isinstance(n, Mapping):
            f.error(path, "must be a mapping")
            continue
        name = f.string(n, "name", path, required=True)
        if name:
            out[name] = NamespaceSpec(name, _labels(f, n, path))
    for p in pods:
        # A pod's namespace exists even when the file does not list it, as in a cluster.
        out.setdefault(p.namespace, NamespaceSpec(p.namespace, {}))
    return tuple(out.values())


def _ref(f: Fields, raw: object, path: str) -> ObjectRef | None:
    if not isinstance(raw, Mapping):
        f.error(path, "must be a mapping with kind, namespace and name")
        return None
    kind = f.string(raw, "kind", path, required=True)
    name = f.string(raw, "name", path, required=True)
    namespace = f.string(raw, "namespace", path) or ""
    if kind is None or name is None:
        return None
    if kinds.get(kind) is None:
        f.error(f"{path}.kind", f"unsupported kind {kind!r} (expected one of {', '.join(k.name for k in kinds.all_kinds())})")
        return None
    if kinds.namespaced(kind) and not namespace:
        f.error(f"{path}.namespace", f"required for a {kind}")
    return ObjectRef(kind, namespace, name)


def _endpoint_list(f: Fields, raw: Mapping[str, Any], key: str, path: str, pods: set[str]) -> tuple[str, ...] | None:
    items = f.sequence(raw, key, path)
    if items is None:
        return None
    out = []
    for i, e in enumerate(items):
        ep = _endpoint(f, e, f"{path}.{key}[{i}]", pods)
        if ep is not None:
            out.append(ep)
    return tuple(out)


def _endpoint(f: Fields, e: object, path: str, pods: set[str]) -> str | None:
    if not isinstance(e, str):
        f.error(path, f"must be ns/pod or an IP address, got {e!r}")
        return None
    if "/" in e:
        if e not in pods:
            f.error(path, f"unknown pod {e!r}")
            return None
        return e
    try:
        return str(ipaddress.ip_address(e))
    except ValueError:
        f.error(path, f"{e!r} is neither ns/pod nor an IP address")
        return None


def _steps(f: Fields, raw: Mapping[str, Any], endpoints: set[str], pods: set[str], namespaces: set[str], nodes: set[str]) -> tuple[Step, ...]:
    out = []
    steps = f.sequence(raw, "steps", "", required=True) or []
    if not steps and "steps" in raw:
        f.error("steps", "at least one step is needed")
    for i, s in enumerate(steps):
        path = f"steps[{i}]"
        if not isinstance(s, Mapping):
            f.error(path, "must be a mapping")
            continue
        for key in s:
            if key not in ("description", "apply", "delete", "relabel", "probes"):
                f.error(f"{path}.{key}", "unknown field (expected description, apply, delete, relabel, probes)")
        description = f.string(s, "description", path) or ""
        applied = []
        for j, obj in enumerate(f.sequence(s, "apply", path) or []):
            try:
                parsed = parse_object(obj, strict=True)  # as the agents read it from their manifests
            except ValidationError as exc:
                for e in exc.errors:
                    f.error(f"{path}.apply[{j}]", f"{exc.subject}: {e}")
                continue
            kind = type(parsed).__name__
            if kind in ("Pod", "Node"):
                f.error(f"{path}.apply[{j}]", f"a {kind} cannot be applied in a step: declare it under cluster and change it with relabel or delete")
                continue
            applied.append(dict(obj))
        deletes = tuple(r for j, d in enumerate(f.sequence(s, "delete", path) or []) if (r := _ref(f, d, f"{path}.delete[{j}]")) is not None)
        relabels = []
        for j, r in enumerate(f.sequence(s, "relabel", path) or []):
            rpath = f"{path}.relabel[{j}]"
            ref = _ref(f, r, rpath)
            if ref is None:
                continue
            if ref.kind not in RELABEL_KINDS:
                f.error(f"{rpath}.kind", f"cannot relabel a {ref.kind} (expected one of {', '.join(RELABEL_KINDS)})")
                continue
            known = {"Pod": pods, "Namespace": namespaces, "Node": nodes}[ref.kind]
            ident = f"{ref.namespace}/{ref.name}" if ref.kind == "Pod" else ref.name
            if ident not in known:
                f.error(rpath, f"unknown {ref.kind} {ident!r}")
                continue
            relabels.append(Relabel(ref, f.string_map(r, "labels", rpath)))
        probes = []
        for j, p in enumerate(f.sequence(s, "probes", path) or []):
            probe = _probe(f, p, f"{path}.probes[{j}]", pods)
            if probe is not None:
                probes.append(probe)
        out.append(Step(description, tuple(applied), deletes, tuple(relabels), tuple(probes)))
    return tuple(out)


def _probe(f: Fields, p: object, path: str, pods: set[str]) -> Probe | None:
    if not isinstance(p, Mapping):
        f.error(path, "must be a mapping")
        return None
    for key in p:
        if key not in ("protocol", "port", "default", "except", "from", "to"):
            f.error(f"{path}.{key}", "unknown field (expected protocol, port, default, except, from, to)")
    protocol = f.string(p, "protocol", path, default="TCP") or "TCP"
    if protocol not in PROBE_PROTOCOLS:
        f.error(f"{path}.protocol", f"unsupported protocol {protocol!r} (expected TCP, UDP or SCTP)")
    port = f.integer(p, "port", path, required=True, minimum=1, maximum=65535)
    default = f.string(p, "default", path, required=True)
    if default is not None and default not in ("allow", "deny"):
        f.error(f"{path}.default", f"must be allow or deny, got {default!r}")
    exceptions: set[tuple[str, str]] = set()
    for k, pair in enumerate(f.sequence(p, "except", path) or []):
        ppath = f"{path}.except[{k}]"
        if not isinstance(pair, list) or len(pair) != 2:
            f.error(ppath, "must be a pair [client, server]")
            continue
        a = _endpoint(f, pair[0], f"{ppath}[0]", pods)
        b = _endpoint(f, pair[1], f"{ppath}[1]", pods)
        if a is not None and b is not None:
            exceptions.add((a, b))
    clients = _endpoint_list(f, p, "from", path, pods)
    servers = _endpoint_list(f, p, "to", path, pods)
    if port is None or default not in ("allow", "deny"):
        return None
    return Probe(protocol, port, default == "allow", frozenset(exceptions), clients, servers)


def _check_addresses(f: Fields, nodes: tuple[NodeSpec, ...], pods: tuple[PodSpec, ...]) -> None:
    owner: dict[str, str] = {}
    for n in nodes:
        for ip in n.ips:
            if ip in owner:
                f.error("cluster.nodes", f"address {ip} is used by {owner[ip]} and node {n.name}")
            owner[ip] = f"node {n.name}"
    for p in pods:
        if p.host_network:
            continue
        for ip in p.ips:
            if ip in owner:
                f.error("cluster.pods", f"address {ip} of pod {p.key} is already used by {owner[ip]}")
            owner[ip] = f"pod {p.key}"
