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
from kube_network_policies.model.errors import FieldError, ValidationError
from kube_network_policies.model.networkpolicy import NetworkPolicy, parse_network_policy

ApiObject = Pod | Namespace | Node | NetworkPolicy | AdminNetworkPolicy | BaselineAdminNetworkPolicy | ClusterNetworkPolicy

# (kind) -> (accepted apiVersions, parser)
PARSERS: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, Any]], Any]]] = {
    "Pod": (("v1",), parse_pod),
    "Namespace": (("v1",), parse_namespace),
    "Node": (("v1",), parse_node),
    "NetworkPolicy": (("networking.k8s.io/v1",), parse_network_policy),
    "AdminNetworkPolicy": (("policy.networking.k8s.io/v1alpha1",), parse_admin_network_policy),
    "BaselineAdminNetworkPolicy": (("policy.networking.k8s.io/v1alpha1",), parse_baseline_admin_network_policy),
    "ClusterNetworkPolicy": (("policy.networking.k8s.io/v1alpha2",), parse_cluster_network_policy),
}

NAMESPACED_KINDS = frozenset({"Pod", "NetworkPolicy"})


def parse_object(obj: object) -> ApiObject:
    """Parse a Kubernetes object of a supported kind; raises ValidationError naming what is wrong."""
    if not isinstance(obj, Mapping):
        raise ValidationError("object", [FieldError("", f"must be a mapping (a Kubernetes object), got {type(obj).__name__}")])
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ValidationError(object_subject("object", obj), [FieldError("kind", "required field is missing")])
    entry = PARSERS.get(kind)
    if entry is None:
        raise ValidationError(object_subject(kind, obj), [FieldError("kind", f"unsupported kind {kind!r} (supported: {', '.join(PARSERS)})")])
    versions, parser = entry
    api_version = obj.get("apiVersion")
    if api_version not in versions:
        raise ValidationError(
            object_subject(kind, obj),
            [FieldError("apiVersion", f"{api_version!r} is not supported for {kind} (expected {' or '.join(versions)})")],
        )
    result: ApiObject = parser(obj)
    return result


def object_key(obj: ApiObject) -> tuple[str, str, str]:
    """(kind, namespace, name): the identity of an object in the cluster."""
    kind = type(obj).__name__
    return kind, getattr(obj, "namespace", ""), obj.name
