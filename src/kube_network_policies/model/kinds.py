"""The kinds of object the agent reads, one entry each: the only place that says what a kind is.

Everything that differs per kind is derived from this table:
- which `apiVersion`s `parse_object` accepts for a kind, and the parser of each (model.parse);
- what the Kubernetes source lists and watches: group, version, plural, scope, whether it is a
  CRD (sources/resources.py);
- the agent flag that switches a policy kind on (the Go agent's flag names, cli.py), and so the
  engine's `Features`, explain's feature detection and the lab's flags;
- how the engine treats it (`role`), its short name in reasons (`anp/deny-all`), its place among
  the policies of its tier at equal priority (`rank`), and the order in which changes are
  applied (`apply_order`: namespaces and nodes before the pods that need their labels, pods
  before the policies that select them).

A new served version of a kind is one more `ApiVersion` in its entry (and a parser in the model
when its schema differs); `add_version` does it at run time, for tests.

Imports the model only (stdlib below it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from kube_network_policies.model.adminpolicy import (
    ADMIN_TIER,
    BASELINE_TIER,
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
    parse_admin_network_policy,
    parse_baseline_admin_network_policy,
    parse_cluster_network_policy,
)
from kube_network_policies.model.core import Namespace, Node, Pod, parse_namespace, parse_node, parse_pod
from kube_network_policies.model.networkpolicy import NetworkPolicy, parse_network_policy

# Every model object type. A kind whose new version needs a new model type adds it here.
ApiObject = Pod | Namespace | Node | NetworkPolicy | AdminNetworkPolicy | BaselineAdminNetworkPolicy | ClusterNetworkPolicy

# parser(obj, strict=False): non-strict for objects the API server stored, strict for files.
Parser = Callable[..., Any]

POLICY_GROUP = "policy.networking.k8s.io"


class Role(Enum):
    """How the engine treats a kind."""

    CLUSTER = "cluster object"  # what policies select and match: namespaces, nodes, pods
    NETWORK_POLICY = "NetworkPolicy"  # the namespaced tier between Admin and Baseline
    TIERED = "tiered policy"  # cluster-scoped Admin/Baseline-tier policies, ordered by priority


@dataclass(frozen=True, slots=True)
class ApiVersion:
    """One served version of a kind."""

    version: str  # "v1alpha2"; the group is the kind's
    parse: Parser
    model: type  # the type `parse` returns
    release: str = ""  # where its schema comes from, for help texts


@dataclass(frozen=True, slots=True)
class Kind:
    name: str  # "ClusterNetworkPolicy"
    group: str  # "" for the core API
    plural: str  # "clusternetworkpolicies"
    namespaced: bool
    role: Role
    versions: tuple[ApiVersion, ...]  # served versions; the first is the one the Kubernetes source watches
    apply_order: int  # lower first when a batch of changes is applied
    flag: str = ""  # the agent flag that enables the kind ("" : always on)
    short: str = ""  # in reasons: "anp/deny-all"
    tier: str = ""  # TIERED kinds: ADMIN_TIER or BASELINE_TIER, or "" when each object names its own (spec.tier)
    crd: bool = False  # a CustomResourceDefinition: its resource is named plural.group

    @property
    def api_versions(self) -> tuple[str, ...]:
        """The `apiVersion` values objects of this kind may carry ("v1", "networking.k8s.io/v1")."""
        return tuple(self.api_version(v.version) for v in self.versions)

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    def version(self, api_version: str) -> ApiVersion | None:
        """The served version an `apiVersion` names, or None."""
        group, _, version = api_version.rpartition("/")
        if group != self.group:
            return None
        return next((v for v in self.versions if v.version == version), None)

    @property
    def watched(self) -> ApiVersion:
        return self.versions[0]

    @property
    def is_policy(self) -> bool:
        return self.role is not Role.CLUSTER


# Registry order is apply order within equal `apply_order`, the order of `flags()` (and so of
# the command's help), and `rank` among tiered kinds (AdminNetworkPolicy before
# ClusterNetworkPolicy at equal priority and name).
_REGISTRY: dict[str, Kind] = {}
_BY_MODEL: dict[type, Kind] = {}


def _index() -> None:
    _BY_MODEL.clear()
    for k in _REGISTRY.values():
        for v in k.versions:
            _BY_MODEL.setdefault(v.model, k)


def _register(kind: Kind) -> None:
    if not kind.versions:
        raise ValueError(f"{kind.name}: a kind needs at least one version")
    if kind.role is Role.TIERED and not kind.short:
        raise ValueError(f"{kind.name}: a tiered kind needs a short name for its reasons")
    _REGISTRY[kind.name] = kind
    _index()


_register(Kind("Namespace", "", "namespaces", False, Role.CLUSTER, (ApiVersion("v1", parse_namespace, Namespace),), 0, short="ns"))
_register(Kind("Node", "", "nodes", False, Role.CLUSTER, (ApiVersion("v1", parse_node, Node),), 1, short="node"))
_register(Kind("Pod", "", "pods", True, Role.CLUSTER, (ApiVersion("v1", parse_pod, Pod),), 2, short="pod"))
_register(
    Kind(
        "NetworkPolicy",
        "networking.k8s.io",
        "networkpolicies",
        True,
        Role.NETWORK_POLICY,
        (ApiVersion("v1", parse_network_policy, NetworkPolicy),),
        3,
        short="np",
    )
)
_register(
    Kind(
        "AdminNetworkPolicy",
        POLICY_GROUP,
        "adminnetworkpolicies",
        False,
        Role.TIERED,
        (ApiVersion("v1alpha1", parse_admin_network_policy, AdminNetworkPolicy, "network-policy-api v0.1.5"),),
        3,
        flag="admin-network-policy",
        short="anp",
        tier=ADMIN_TIER,
        crd=True,
    )
)
_register(
    Kind(
        "BaselineAdminNetworkPolicy",
        POLICY_GROUP,
        "baselineadminnetworkpolicies",
        False,
        Role.TIERED,
        (ApiVersion("v1alpha1", parse_baseline_admin_network_policy, BaselineAdminNetworkPolicy, "network-policy-api v0.1.5"),),
        3,
        flag="baseline-admin-network-policy",
        short="banp",
        tier=BASELINE_TIER,
        crd=True,
    )
)
_register(
    Kind(
        "ClusterNetworkPolicy",
        POLICY_GROUP,
        "clusternetworkpolicies",
        False,
        Role.TIERED,
        (ApiVersion("v1alpha2", parse_cluster_network_policy, ClusterNetworkPolicy, "network-policy-api v0.2.0"),),
        3,
        flag="cluster-network-policy",
        short="cnp",
        crd=True,
    )
)


# ---- reading ---------------------------------------------------------------------------------


def all_kinds() -> tuple[Kind, ...]:
    """Every kind, in registry order."""
    return tuple(_REGISTRY.values())


def get(name: str) -> Kind | None:
    return _REGISTRY.get(name)


def require(name: str) -> Kind:
    """The kind of that name; ValueError naming the supported ones if there is none."""
    k = _REGISTRY.get(name)
    if k is None:
        raise ValueError(f"unsupported kind {name!r} (supported: {', '.join(_REGISTRY)})")
    return k


def of(obj: object) -> Kind:
    """The kind of a model object."""
    k = _BY_MODEL.get(type(obj))
    if k is None:
        raise ValueError(f"{type(obj).__name__} is not a model object of any registered kind")
    return k


def key(obj: ApiObject) -> tuple[str, str, str]:
    """(kind, namespace, name): the identity of an object in the cluster."""
    return _BY_MODEL[type(obj)].name, getattr(obj, "namespace", ""), obj.name


def namespaced(name: str) -> bool:
    """Whether objects of that kind live in a namespace (unknown kinds: False)."""
    k = _REGISTRY.get(name)
    return k is not None and k.namespaced


def apply_order(name: str) -> int:
    """Sort key of a kind when a batch of changes is applied: Namespace 0, Node 1, Pod 2, the
    policies 3 (after the objects whose labels they select); unknown kinds last."""
    k = _REGISTRY.get(name)
    return k.apply_order if k is not None else max((x.apply_order for x in _REGISTRY.values()), default=0) + 1


def rank(name: str) -> int:
    """Position in the registry: the tie-break between kinds of one tier at equal priority and name."""
    for i, k in enumerate(_REGISTRY):
        if k == name:
            return i
    return len(_REGISTRY)


def flags() -> tuple[str, ...]:
    """The agent flags that enable kinds, each once, in registry order."""
    return tuple(dict.fromkeys(k.flag for k in _REGISTRY.values() if k.flag))


def kinds_of_flag(flag: str) -> tuple[Kind, ...]:
    return tuple(k for k in _REGISTRY.values() if k.flag == flag)


def enabled(kind: Kind, on: Collection[str]) -> bool:
    """Whether a kind is in force given the flags that are on: kinds without a flag always are."""
    return not kind.flag or kind.flag in on


def enabled_kinds(on: Collection[str]) -> tuple[Kind, ...]:
    return tuple(k for k in _REGISTRY.values() if enabled(k, on))


def flag_help(flag: str) -> str:
    """'enforce AdminNetworkPolicy (policy.networking.k8s.io/v1alpha1)', from the registry."""
    parts = [f"{k.name} ({', '.join(k.api_versions)})" for k in kinds_of_flag(flag)]
    return "enforce " + " and ".join(parts)


def parsers() -> Mapping[str, tuple[tuple[str, ...], tuple[Parser, ...]]]:
    """kind -> (accepted apiVersions, their parsers), for tools and tests."""
    return {k.name: (k.api_versions, tuple(v.parse for v in k.versions)) for k in _REGISTRY.values()}


# ---- extending -------------------------------------------------------------------------------


def add_version(kind: str, version: ApiVersion, *, watched: bool = False) -> None:
    """Serve one more version of a kind: parse_object accepts it, and with `watched` the
    Kubernetes source lists and watches it instead of the current first version (one CRD serves
    every version of a kind from one store, so watching two would see each object twice)."""
    k = require(kind)
    if any(v.version == version.version for v in k.versions):
        raise ValueError(f"{kind} {version.version} is already registered")
    versions = (version, *k.versions) if watched else (*k.versions, version)
    _register(dataclasses.replace(k, versions=versions))


def remove_version(kind: str, version: str) -> None:
    """Undo add_version (tests)."""
    k = require(kind)
    versions = tuple(v for v in k.versions if v.version != version)
    if len(versions) == len(k.versions):
        raise ValueError(f"{kind} {version} is not registered")
    _register(dataclasses.replace(k, versions=versions))
