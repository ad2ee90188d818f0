"""Decoding the Kubernetes API's JSON: list pages, watch events, objects, into model objects.

Pods are decoded with msgspec straight into small structs holding only the fields enforcement
needs, then into model.Pod (with parse_pod's defaults and checks); Nodes into a slim dict for the
model's parser; the other kinds are few and go through the model's dict parsers. An object that
fails validation comes back as its error, with its key when the metadata is readable, so that the
informer can keep a valid earlier version in force.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable

import msgspec

from kube_network_policies.model import (
    ApiObject,
    FieldError,
    Pod,
    ValidationError,
    kinds,
    object_key,
)
from kube_network_policies.model.core import PROTOCOLS, ContainerPort, object_subject, parse_node
from kube_network_policies.model.ipnet import canonical_address
from kube_network_policies.model.selectors import LabelSet
from kube_network_policies.sources.base import Key
from kube_network_policies.sources.resources import NODES, PODS, Resource

# gc=False: these structs are short-lived and never form cycles, so the collector need not track them.


class _Meta(msgspec.Struct, gc=False):
    name: str = ""
    namespace: str = ""
    resourceVersion: str = ""
    labels: dict[str, str] | None = None


class _Holder(msgspec.Struct, gc=False):
    metadata: _Meta = msgspec.field(default_factory=_Meta)


class _ListMeta(msgspec.Struct, gc=False):
    resourceVersion: str = ""
    continue_: str = msgspec.field(default="", name="continue")


class _RawList(msgspec.Struct, gc=False):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[msgspec.Raw] | None = None


class _Port(msgspec.Struct, gc=False):
    containerPort: int = 0
    name: str | None = None
    protocol: str | None = None


class _Container(msgspec.Struct, gc=False):
    ports: list[_Port] | None = None
    restartPolicy: str | None = None  # init containers: "Always" makes a sidecar


class _PodSpec(msgspec.Struct, gc=False):
    nodeName: str | None = None
    hostNetwork: bool | None = None
    containers: list[_Container] | None = None
    initContainers: list[_Container] | None = None


class _PodIP(msgspec.Struct, gc=False):
    ip: str | None = None


class _PodStatus(msgspec.Struct, gc=False):
    phase: str | None = None
    podIP: str | None = None
    podIPs: list[_PodIP] | None = None


class _Pod(msgspec.Struct, gc=False):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    spec: _PodSpec = msgspec.field(default_factory=_PodSpec)
    status: _PodStatus = msgspec.field(default_factory=_PodStatus)


class _PodList(msgspec.Struct, gc=False):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[_Pod] | None = None


class _Event(msgspec.Struct, gc=False):
    type: str = ""
    object: msgspec.Raw = msgspec.Raw(b"null")


class _Status(msgspec.Struct, gc=False):
    code: int = 0
    reason: str = ""
    message: str = ""


_intern = sys.intern
_PORT_TUPLES: dict[tuple[tuple[str, int, str], ...], tuple[ContainerPort, ...]] = {}
_PORT_TUPLES_MAX = 65536  # distinct port lists seen; past this, new ones are not shared


def _msgspec_error(subject: str, exc: msgspec.ValidationError) -> ValidationError:
    """'Expected `int`, got `str` - at `$.spec.containers[0].ports[0].containerPort`' as a field error."""
    text = str(exc)
    message, _, at = text.partition(" - at `$")
    path = at.rstrip("`").lstrip(".")
    return ValidationError(subject, [FieldError(path, message.replace("`", "").lower() if message else text)])


def _subject(kind: str, namespace: str, name: str) -> str:
    """'Pod ns/name' for messages, as the model's parsers name objects."""
    return object_subject(kind, {"metadata": {"name": name, "namespace": namespace}})


def _canonical_ip(text: str) -> str:
    """canonical_address, with a fast path: glibc's inet_pton takes only canonical dotted quads
    (no leading zeros, no spaces), which are then already in canonical form."""
    try:
        _inet_pton(_AF_INET, text)
        return text
    except OSError:
        return canonical_address(text)


_inet_pton = socket.inet_pton
_AF_INET = socket.AF_INET


def pod_from_struct(p: _Pod) -> Pod:
    """model.Pod from the decoded struct, with parse_pod's defaults and checks."""
    meta, spec, status = p.metadata, p.spec, p.status
    errors: list[FieldError] = []
    if not meta.name:
        errors.append(FieldError("metadata.name", "required field is missing"))
    ips: list[str] = []
    raw = [e.ip for e in status.podIPs] if status.podIPs else [status.podIP] if status.podIP else ()
    for i, text in enumerate(raw):
        try:
            if not text:
                raise ValueError
            ip = _canonical_ip(text)
        except ValueError:
            path = f"status.podIPs[{i}].ip" if status.podIPs else "status.podIP"
            errors.append(FieldError(path, f"must be an IP address, got {text!r}" if not text else f"invalid IP address {text!r}"))
            continue
        if ip not in ips:
            ips.append(ip)
    key: list[tuple[str, int, str]] = []
    for base, containers in (("spec.containers", spec.containers), ("spec.initContainers", spec.initContainers)):
        if not containers:
            continue
        init = base == "spec.initContainers"
        for i, c in enumerate(containers):
            if not c.ports or (init and c.restartPolicy != "Always"):
                continue  # sidecars (restartPolicy Always) serve ports; other init containers do not
            for j, port in enumerate(c.ports):
                number = port.containerPort
                proto = port.protocol or "TCP"
                if 1 <= number <= 65535 and proto in PROTOCOLS:
                    key.append((port.name or "", number, proto))
                elif not 1 <= number <= 65535:
                    errors.append(FieldError(f"{base}[{i}].ports[{j}].containerPort", f"must be between 1 and 65535, got {number}"))
                else:
                    errors.append(FieldError(f"{base}[{i}].ports[{j}].protocol", f"unsupported protocol {proto!r} (expected TCP, UDP or SCTP)"))
    namespace = meta.namespace or "default"
    if errors:
        raise ValidationError(_subject("Pod", namespace, meta.name), errors)
    ports: tuple[ContainerPort, ...] = ()
    if key:
        k = tuple(key)
        cached = _PORT_TUPLES.get(k)
        if cached is None:
            cached = tuple(ContainerPort(_intern(n), num, _intern(proto)) for n, num, proto in k)
            if len(_PORT_TUPLES) < _PORT_TUPLES_MAX:
                _PORT_TUPLES[k] = cached
        ports = cached
    return Pod(
        namespace=_intern(namespace),
        name=meta.name,
        labels=LabelSet(meta.labels),
        ips=tuple(ips),
        node=_intern(spec.nodeName or ""),
        phase=_intern(status.phase or "Running"),
        host_network=bool(spec.hostNetwork),
        ports=ports,
    )


# An item: its key, the model object (None if invalid), its resourceVersion, the error (if invalid).
Item = tuple[Key | None, ApiObject | None, str, ValidationError | None]


class Codec:
    """Decodes one resource's list pages and watch event objects."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        version = kinds.require(resource.kind).version(resource.api_version)
        if version is None:
            raise ValueError(f"{resource.kind} {resource.api_version} is not a registered version")
        self._parse = version.parse  # non-strict: the API server validated what it stored
        self._holder = msgspec.json.Decoder(_Holder)
        self._raw_list = msgspec.json.Decoder(_RawList)

    def key_of(self, raw: bytes | msgspec.Raw) -> tuple[Key | None, str]:
        """The object's key and resourceVersion; (None, "") when its metadata is unreadable."""
        try:
            meta = self._holder.decode(raw).metadata
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None, ""
        if not meta.name:
            return None, meta.resourceVersion
        ns = (meta.namespace or "default") if self.resource.namespaced else ""
        return (self.resource.kind, ns, meta.name), meta.resourceVersion

    def item(self, raw: bytes | msgspec.Raw) -> Item:
        r = self.resource
        try:
            obj = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            return None, None, "", ValidationError(r.kind, [FieldError("", f"invalid JSON: {exc}")])
        if not isinstance(obj, dict):
            return None, None, "", ValidationError(r.kind, [FieldError("", "must be an object")])
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        rv = meta.get("resourceVersion")
        rv = rv if isinstance(rv, str) else ""
        try:
            parsed: ApiObject = self._parse(obj)
        except ValidationError as exc:
            name, ns = meta.get("name"), meta.get("namespace")
            key = (
                (r.kind, (ns if isinstance(ns, str) and ns else "default") if r.namespaced else "", name) if isinstance(name, str) and name else None
            )
            return key, None, rv, exc
        return object_key(parsed), parsed, rv, None

    def page(self, data: bytes) -> tuple[str, str, Iterable[Item]]:
        """(resourceVersion, continue token, items) of one list page."""
        page = self._raw_list.decode(data)
        return page.metadata.resourceVersion, page.metadata.continue_, (self.item(raw) for raw in page.items or ())


class PodCodec(Codec):
    def __init__(self) -> None:
        super().__init__(PODS)
        self._pod = msgspec.json.Decoder(_Pod)
        self._pod_list = msgspec.json.Decoder(_PodList)

    def _convert(self, p: _Pod) -> Item:
        try:
            pod = pod_from_struct(p)
        except ValidationError as exc:
            key = ("Pod", p.metadata.namespace or "default", p.metadata.name) if p.metadata.name else None
            return key, None, p.metadata.resourceVersion, exc
        return ("Pod", pod.namespace, pod.name), pod, p.metadata.resourceVersion, None

    def item(self, raw: bytes | msgspec.Raw) -> Item:
        try:
            p = self._pod.decode(raw)
        except msgspec.ValidationError as exc:
            key, rv = self.key_of(raw)
            ns, name = (key[1], key[2]) if key else ("", "")
            return key, None, rv, _msgspec_error(_subject("Pod", ns, name), exc)
        return self._convert(p)

    def page(self, data: bytes) -> tuple[str, str, Iterable[Item]]:
        try:
            page = self._pod_list.decode(data)  # the fast path: the whole page at once
        except msgspec.ValidationError:
            return super().page(data)  # some item is malformed: item by item, to skip just that one
        return page.metadata.resourceVersion, page.metadata.continue_, (self._convert(p) for p in page.items or ())


class _NodeAddress(msgspec.Struct, gc=False):
    type: str | None = None
    address: str | None = None


class _NodeStatus(msgspec.Struct, gc=False):
    addresses: list[_NodeAddress] | None = None


class _Node(msgspec.Struct, gc=False):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    status: _NodeStatus = msgspec.field(default_factory=_NodeStatus)


class NodeCodec(Codec):
    """Nodes carry large statuses (images, conditions) and are updated often: decode only the
    name, labels and addresses, then let the model's parser check them."""

    def __init__(self) -> None:
        super().__init__(NODES)
        self._node = msgspec.json.Decoder(_Node)

    def item(self, raw: bytes | msgspec.Raw) -> Item:
        try:
            n = self._node.decode(raw)
        except msgspec.ValidationError as exc:
            key, rv = self.key_of(raw)
            return key, None, rv, _msgspec_error(_subject("Node", "", key[2] if key else ""), exc)
        slim = {
            "metadata": {"name": n.metadata.name, "labels": n.metadata.labels or {}},
            "status": {"addresses": [{"type": a.type, "address": a.address} for a in n.status.addresses or ()]},
        }
        try:
            node = parse_node(slim)
        except ValidationError as exc:
            return (("Node", "", n.metadata.name) if n.metadata.name else None), None, n.metadata.resourceVersion, exc
        return ("Node", "", node.name), node, n.metadata.resourceVersion, None


def codec_for(resource: Resource) -> Codec:
    if resource.kind == "Pod":
        return PodCodec()
    if resource.kind == "Node":
        return NodeCodec()
    return Codec(resource)


# ---- watch streams ---------------------------------------------------------------------------

_EVENT = msgspec.json.Decoder(_Event)
_HOLDER = msgspec.json.Decoder(_Holder)
_STATUS = msgspec.json.Decoder(_Status)


def decode_event(line: bytes) -> tuple[str, msgspec.Raw]:
    """(type, raw object) of one watch event line: ADDED, MODIFIED, DELETED, BOOKMARK or ERROR."""
    event = _EVENT.decode(line)
    return event.type, event.object


def resource_version_of(raw: bytes | msgspec.Raw) -> str:
    """metadata.resourceVersion of an object (a BOOKMARK's); raises on malformed JSON."""
    return _HOLDER.decode(raw).metadata.resourceVersion


def decode_status(raw: bytes | msgspec.Raw) -> tuple[int, str, str]:
    """(code, reason, message) of a Status object (an ERROR event's)."""
    status = _STATUS.decode(raw)
    return status.code, status.reason, status.message
