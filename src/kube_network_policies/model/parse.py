"""One entry point from a plain dict to a typed API object."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kube_network_policies.model.adminpolicy import (
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
    parse_admin_network_policy,
    parse_baseline_admin_network_policy,
    parse_cluster_network_policy,
)
from kube_network_policies.model.core import Namespace, Node, Pod, object_subject, parse_namespace, parse_node, parse_pod
from kube_network_policies.model.errors import FieldError, ValidationError, shown
from kube_network_policies.model.networkpolicy import NetworkPolicy, parse_network_policy

ApiObject = Pod | Namespace | Node | NetworkPolicy | AdminNetworkPolicy | BaselineAdminNetworkPolicy | ClusterNetworkPolicy

# (kind) -> (accepted apiVersions, parser). A parser reads non-strict by default (objects from
# the API server: sources.codecs calls these directly); parse_object(strict=True) for files.
PARSERS: dict[str, tuple[tuple[str, ...], Callable[..., Any]]] = {
    "Pod": (("v1",), parse_pod),
    "Namespace": (("v1",), parse_namespace),
    "Node": (("v1",), parse_node),
    "NetworkPolicy": (("networking.k8s.io/v1",), parse_network_policy),
    "AdminNetworkPolicy": (("policy.networking.k8s.io/v1alpha1",), parse_admin_network_policy),
    "BaselineAdminNetworkPolicy": (("policy.networking.k8s.io/v1alpha1",), parse_baseline_admin_network_policy),
    "ClusterNetworkPolicy": (("policy.networking.k8s.io/v1alpha2",), parse_cluster_network_policy),
}

NAMESPACED_KINDS = frozenset({"Pod", "NetworkPolicy"})


def parse_object(obj: object, *, strict: bool = False) -> ApiObject:
    """Parse a Kubernetes object of a supported kind; raises ValidationError naming what is wrong.

    `strict` (files): unknown fields are errors and names, labels and list sizes are checked as
    the API server checks them (see model.fields). Non-strict: objects the API server stored.
    """
    if not isinstance(obj, Mapping):
        raise ValidationError("object", [FieldError("", f"must be a mapping (a Kubernetes object), got {type(obj).__name__}")])
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ValidationError(object_subject("object", obj), [FieldError("kind", "required field is missing")])
    entry = PARSERS.get(kind)
    if entry is None:
        raise ValidationError(
            object_subject(shown(kind, quote=False), obj), [FieldError("kind", f"unsupported kind {shown(kind)} (supported: {', '.join(PARSERS)})")]
        )
    versions, parser = entry
    api_version = obj.get("apiVersion")
    if api_version not in versions:
        raise ValidationError(
            object_subject(kind, obj),
            [FieldError("apiVersion", f"{shown(api_version)} is not supported for {kind} (expected {' or '.join(versions)})")],
        )
    result: ApiObject = parser(obj, strict=strict)
    return result


def object_key(obj: ApiObject) -> tuple[str, str, str]:
    """(kind, namespace, name): the identity of an object in the cluster."""
    kind = type(obj).__name__
    return kind, getattr(obj, "namespace", ""), obj.name
