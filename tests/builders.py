"""Kubernetes objects as plain dicts, the way a manifest or the API server holds them, for tests.

One place for the shapes, so that a test spells out only what matters to it (tests/conftest.py's
directory is on sys.path: `from builders import namespace, pod, network_policy`). Fields are
written only when given: `labels=None` leaves metadata.labels out, `labels={}` writes it empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "PAUSE_IMAGE",
    "admin_network_policy",
    "baseline_admin_network_policy",
    "cluster_network_policy",
    "namespace",
    "network_policy",
    "pod",
    "pod_status",
]

Obj = dict[str, Any]

NETWORKING_V1 = "networking.k8s.io/v1"
POLICY_V1ALPHA1 = "policy.networking.k8s.io/v1alpha1"
POLICY_V1ALPHA2 = "policy.networking.k8s.io/v1alpha2"
# For pods created through a real API server, which requires an image (no kubelet runs it).
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


def _metadata(name: str, namespace: str | None, labels: Any, extra: Mapping[str, Any]) -> Obj:
    meta: Obj = {"name": name}
    if namespace is not None:  # None: a namespaced object POSTed to its namespace's URL
        meta["namespace"] = namespace
    if labels is not None:
        meta["labels"] = labels  # as given: tests of bad input pass what the API would refuse
    meta.update(extra)
    return meta


def namespace(name: str, labels: Mapping[str, str] | None = None, **metadata: Any) -> Obj:
    """A Namespace; `metadata` adds fields such as resourceVersion."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _metadata(name, None, labels, metadata)}


def pod_status(ips: str | Sequence[str] = (), phase: str | None = "Running") -> Obj:
    """A pod's status as the kubelet writes it: phase, podIP (the first address) and podIPs."""
    addresses = [ips] if isinstance(ips, str) else list(ips)
    status: Obj = {} if phase is None else {"phase": phase}
    if addresses:
        status["podIP"] = addresses[0]
        status["podIPs"] = [{"ip": ip} for ip in addresses]
    return status


def pod(
    namespace: str | None,
    name: str,
    ips: str | Sequence[str] = (),
    *,
    node: str = "n1",
    labels: Any = None,
    ports: Any = None,
    phase: str | None = "Running",
    host_network: bool | None = None,
    image: str | None = None,
    spec: Obj | None = None,
    status: Obj | None = None,
    **metadata: Any,
) -> Obj:
    """A Pod on `node` with one container "c" (with `image` and `ports` when given).

    Its status comes from `phase` and `ips`; with phase=None and no ips it has none (a pod as
    created, before a kubelet reports). `spec` and `status` replace the built ones whole.
    """
    if spec is None:
        container: Obj = {"name": "c"}
        if image is not None:
            container["image"] = image
        if ports is not None:
            container["ports"] = ports
        spec = {"nodeName": node, "containers": [container]}
        if host_network is not None:
            spec["hostNetwork"] = host_network
    obj: Obj = {"apiVersion": "v1", "kind": "Pod", "metadata": _metadata(name, namespace, labels, metadata), "spec": spec}
    if status is None and (phase is not None or ips):
        status = pod_status(ips, phase)
    if status is not None:
        obj["status"] = status
    return obj


def network_policy(namespace: str | None, name: str, spec: Obj, **metadata: Any) -> Obj:
    """A NetworkPolicy (networking.k8s.io/v1)."""
    return {"apiVersion": NETWORKING_V1, "kind": "NetworkPolicy", "metadata": _metadata(name, namespace, None, metadata), "spec": spec}


def admin_network_policy(name: str, priority: int | None, spec: Obj) -> Obj:
    """An AdminNetworkPolicy (v1alpha1); `priority` goes into the spec unless None."""
    full = spec if priority is None else {"priority": priority, **spec}
    return {"apiVersion": POLICY_V1ALPHA1, "kind": "AdminNetworkPolicy", "metadata": {"name": name}, "spec": full}


def baseline_admin_network_policy(spec: Obj, name: str = "default") -> Obj:
    """A BaselineAdminNetworkPolicy (v1alpha1; the API admits only the name "default")."""
    return {"apiVersion": POLICY_V1ALPHA1, "kind": "BaselineAdminNetworkPolicy", "metadata": {"name": name}, "spec": spec}


def cluster_network_policy(name: str, tier: str | None, priority: int | None, spec: Obj) -> Obj:
    """A ClusterNetworkPolicy (v1alpha2); `tier` and `priority` go into the spec unless None."""
    head: Obj = {}
    if tier is not None:
        head["tier"] = tier
    if priority is not None:
        head["priority"] = priority
    return {"apiVersion": POLICY_V1ALPHA2, "kind": "ClusterNetworkPolicy", "metadata": {"name": name}, "spec": {**head, **spec}}
