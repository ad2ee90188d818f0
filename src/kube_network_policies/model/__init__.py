"""Typed, immutable, validated Kubernetes objects: only what enforcement needs.

Imports the standard library only, so that every other layer can depend on it.
"""

from kube_network_policies.model import kinds
from kube_network_policies.model.adminpolicy import (
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
    TieredPolicy,
)
from kube_network_policies.model.core import ContainerPort, Namespace, Node, Pod
from kube_network_policies.model.errors import FieldError, ValidationError
from kube_network_policies.model.networkpolicy import NetworkPolicy
from kube_network_policies.model.parse import ApiObject, object_key, parse_object
from kube_network_policies.model.selectors import LabelSelector, LabelSet

__all__ = [
    "AdminNetworkPolicy",
    "ApiObject",
    "BaselineAdminNetworkPolicy",
    "ClusterNetworkPolicy",
    "ContainerPort",
    "FieldError",
    "LabelSelector",
    "LabelSet",
    "Namespace",
    "NetworkPolicy",
    "Node",
    "Pod",
    "TieredPolicy",
    "ValidationError",
    "kinds",
    "object_key",
    "parse_object",
]
