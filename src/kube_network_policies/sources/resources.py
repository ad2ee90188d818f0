"""The resources the Kubernetes source lists and watches: API paths, scope, the flag that enables them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    group: str  # "" for the core API
    version: str
    plural: str
    flag: str = ""  # the agent flag that enables it (admin policy APIs)

    @property
    def path(self) -> str:
        if not self.group:
            return f"/api/{self.version}/{self.plural}"
        return f"/apis/{self.group}/{self.version}/{self.plural}"

    @property
    def name(self) -> str:
        """'pods', 'adminnetworkpolicies.policy.networking.k8s.io': also the CRD's name."""
        return f"{self.plural}.{self.group}" if self.group and self.flag else self.plural

    @property
    def namespaced(self) -> bool:
        return self.kind in ("Pod", "NetworkPolicy")


POLICY_GROUP = "policy.networking.k8s.io"
PODS = Resource("Pod", "", "v1", "pods")
NAMESPACES = Resource("Namespace", "", "v1", "namespaces")
NODES = Resource("Node", "", "v1", "nodes")
NETWORK_POLICIES = Resource("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies")
ADMIN_NETWORK_POLICIES = Resource("AdminNetworkPolicy", POLICY_GROUP, "v1alpha1", "adminnetworkpolicies", "admin-network-policy")
BASELINE_ADMIN_NETWORK_POLICIES = Resource(
    "BaselineAdminNetworkPolicy", POLICY_GROUP, "v1alpha1", "baselineadminnetworkpolicies", "baseline-admin-network-policy"
)
CLUSTER_NETWORK_POLICIES = Resource("ClusterNetworkPolicy", POLICY_GROUP, "v1alpha2", "clusternetworkpolicies", "cluster-network-policy")


def resources_for(
    admin_network_policy: bool = False, baseline_admin_network_policy: bool = False, cluster_network_policy: bool = False
) -> list[Resource]:
    out = [NAMESPACES, NODES, PODS, NETWORK_POLICIES]
    if admin_network_policy:
        out.append(ADMIN_NETWORK_POLICIES)
    if baseline_admin_network_policy:
        out.append(BASELINE_ADMIN_NETWORK_POLICIES)
    if cluster_network_policy:
        out.append(CLUSTER_NETWORK_POLICIES)
    return out
