"""The resources the Kubernetes source lists and watches, derived from the kind registry
(model.kinds): API paths, scope, the CRD name, the flag that enables them."""

from __future__ import annotations

import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass

from kube_network_policies.model import kinds


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    group: str  # "" for the core API
    version: str
    plural: str
    namespaced: bool
    flag: str = ""  # the agent flag that enables it ("": always watched)
    crd: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def path(self) -> str:
        """The collection across all namespaces."""
        return self.object_path()

    def object_path(self, namespace: str = "", name: str = "") -> str:
        """The collection (in `namespace` if namespaced and given), or one object of it."""
        prefix = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = prefix + (f"/namespaces/{namespace}" if self.namespaced and namespace else "") + f"/{self.plural}"
        return path + (f"/{urllib.parse.quote(name)}" if name else "")

    @property
    def name(self) -> str:
        """'pods', 'adminnetworkpolicies.policy.networking.k8s.io': also the CRD's name."""
        return f"{self.plural}.{self.group}" if self.crd else self.plural


def resource(kind: str, version: str | None = None) -> Resource:
    """The resource of a registered kind, at `version` (default: the version the source watches)."""
    k = kinds.require(kind)
    v = version or k.watched.version
    if not any(x.version == v for x in k.versions):
        raise ValueError(f"{kind} {v} is not a registered version (have: {', '.join(x.version for x in k.versions)})")
    return Resource(k.name, k.group, v, k.plural, k.namespaced, k.flag, k.crd)


def resources_for(flags: Collection[str] = ()) -> list[Resource]:
    """What the source watches with these agent flags on: every kind without a flag, and the
    kinds whose flag is on, each at its watched version, in registry order."""
    return [resource(k.name) for k in kinds.enabled_kinds(flags)]


# The kinds every agent watches, for the codecs and tools.
NAMESPACES = resource("Namespace")
NODES = resource("Node")
PODS = resource("Pod")
NETWORK_POLICIES = resource("NetworkPolicy")
