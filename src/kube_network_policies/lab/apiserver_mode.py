"""Lab mode with a real API server: scenarios go through kube-apiserver as a user's would.

One control plane (etcd + kube-apiserver, lab/controlplane.py) serves the whole run. Per
scenario: the lab network (lab/topology.py), then Nodes, Namespaces and Pods created over the API
(pod IPs written through the status subresource, as a kubelet would), one real agent per node in
Kubernetes mode (`run --kubeconfig`) reaching the API server through a relay in its namespace,
and every step's changes applied over the API: server-side apply for objects (what `kubectl
apply --server-side` sends), label replacement through apply as well, deletes with grace period 0
(there is no kubelet to confirm). After each step the lab waits until every agent reports, per
resource, an applied resourceVersion at least that of the lab's last write of that resource.
Between scenarios the API is emptied again (there is no namespace controller: the lab removes the
contents and finalizes namespaces itself).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from kube_network_policies.lab.apiproxy import ApiProxy
from kube_network_policies.lab.controlplane import ControlPlane, ControlPlaneError
from kube_network_policies.lab.netns_mode import (
    FEATURE_FLAGS,
    AgentProcess,
    LabError,
    LabSession,
    _external_ips,
    _probed_servers,
)
from kube_network_policies.lab.probe import Prober
from kube_network_policies.lab.runner import ScenarioCluster, StepChanges
from kube_network_policies.lab.scenario import Scenario
from kube_network_policies.lab.topology import Topology
from kube_network_policies.model import kinds
from kube_network_policies.sources.resources import resource

REPO = Path(__file__).resolve().parents[3]
FIELD_MANAGER = "knp-lab"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
SYNC_TIMEOUT_S = 30.0
SYSTEM_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})


# What a scenario may leave behind, from the kind registry: namespaced objects go with their
# namespace (emptied first: no namespace controller runs here); namespaces are removed last.
NAMESPACED_KINDS = tuple(k.name for k in kinds.all_kinds() if k.namespaced)
CLUSTER_SCOPED_KINDS = tuple(k.name for k in kinds.all_kinds() if not k.namespaced and k.name != "Namespace")


def crds_dir() -> Path:
    """The network-policy-api CRDs: $KNP_CRDS_DIR, else ../shared/crds beside the repository."""
    return Path(os.environ.get("KNP_CRDS_DIR") or REPO.parent / "shared" / "crds")


def resource_path(kind: str, namespace: str = "", name: str = "", api_version: str | None = None) -> str:
    """The API path of a kind (all namespaces when `namespace` is empty), or of one object: at
    the object's `api_version` when given (an apply must name the version its body is in), else
    at the version the agents watch (model.kinds)."""
    version = api_version.rpartition("/")[2] if api_version else None
    return resource(kind, version).object_path(namespace, name)


class ApiClient:
    """The lab's writes, each remembering the resourceVersion it produced per resource."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.written: dict[str, int] = {}  # plural -> resourceVersion of the lab's last write
        self.deleted: set[str] = set()  # kinds deleted since the last barrier

    def _note(self, kind: str, body: Any) -> None:
        rv = body.get("metadata", {}).get("resourceVersion") if isinstance(body, dict) else None
        if rv and str(rv).isdigit():
            plural = resource(kind).plural
            self.written[plural] = max(self.written.get(plural, 0), int(rv))

    def _check(self, what: str, status: int, body: Any, ok: tuple[int, ...] = (200, 201)) -> Any:
        if status not in ok:
            message = body.get("message") if isinstance(body, dict) else body
            raise LabError(f"{what}: HTTP {status}: {message}")
        return body

    def apply(self, obj: dict[str, Any]) -> None:
        """Server-side apply: create or update, owning every field given (labels included, so
        an apply with fewer labels removes the others, as `relabel` needs)."""
        kind = obj["kind"]
        meta = obj.get("metadata") or {}
        path = resource_path(kind, meta.get("namespace", "default"), meta["name"], obj.get("apiVersion"))
        body = {k: v for k, v in obj.items() if k != "status"}
        status, out = self.cp.request("PATCH", f"{path}?fieldManager={FIELD_MANAGER}&force=true", body, content_type="application/apply-patch+yaml")
        self._note(kind, self._check(f"apply {kind} {meta.get('namespace', '')}/{meta['name']}", status, out))
        if kind in ("Pod", "Node") and obj.get("status"):
            status, out = self.cp.request("PATCH", f"{path}/status", {"status": obj["status"]}, content_type="application/merge-patch+json")
            self._note(kind, self._check(f"status of {kind} {meta['name']}", status, out))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        path = resource_path(kind, namespace or "default", name)
        status, out = self.cp.request(
            "DELETE", path + "?gracePeriodSeconds=0", {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0}
        )
        if status == 404:
            return
        self._check(f"delete {kind} {namespace}/{name}", status, out, (200, 202))
        # A delete answers with a Status, no resourceVersion: waiting for it uses object counts.
        self.deleted.add(kind)
        if kind == "Namespace":
            self._finalize_namespace(name)

    def _finalize_namespace(self, name: str) -> None:
        """No namespace controller runs here: empty the namespace and drop its finalizer."""
        for kind in NAMESPACED_KINDS:
            status, listing = self.cp.request("GET", resource_path(kind, name))
            for item in listing.get("items", []) if status == 200 else []:
                self.delete(kind, name, item["metadata"]["name"])
        status, ns = self.cp.request("GET", resource_path("Namespace", "", name))
        if status != 200:
            return
        ns.setdefault("spec", {})["finalizers"] = []
        status, out = self.cp.request("PUT", resource_path("Namespace", "", name) + "/finalize", ns)
        self._check(f"finalize namespace {name}", status, out)
        self.cp.request("DELETE", resource_path("Namespace", "", name))

    def counts(self, kinds: set[str]) -> dict[str, int]:
        """How many objects of each kind the API holds now."""
        out = {}
        for kind in kinds:
            status, listing = self.cp.request("GET", resource_path(kind))
            out[kind] = len(listing.get("items", [])) if status == 200 else 0
        return out

    def rejects(self, obj: dict[str, Any]) -> str | None:
        """Why the API server's validation refuses an object (server-side dry run), or None."""
        kind = obj.get("kind")
        if not isinstance(kind, str) or kinds.get(kind) is None:
            return None
        meta = obj.get("metadata") or {}
        path = resource_path(kind, meta.get("namespace", "default"), meta.get("name", ""), obj.get("apiVersion"))
        status, out = self.cp.request(
            "PATCH", f"{path}?dryRun=All&fieldManager={FIELD_MANAGER}&force=true", obj, content_type="application/apply-patch+yaml"
        )
        if status == 422:
            return str(out.get("message") if isinstance(out, dict) else out)
        return None

    def clear(self) -> None:
        """Remove what a scenario created: policies, pods, nodes, non-system namespaces."""
        for kind in CLUSTER_SCOPED_KINDS:
            status, listing = self.cp.request("GET", resource_path(kind))
            for item in listing.get("items", []) if status == 200 else []:
                self.delete(kind, "", item["metadata"]["name"])
        status, listing = self.cp.request("GET", resource_path("Namespace"))
        for item in listing.get("items", []) if status == 200 else []:
            name = item["metadata"]["name"]
            if name in SYSTEM_NAMESPACES:
                for kind in NAMESPACED_KINDS:
                    s, inner = self.cp.request("GET", resource_path(kind, name))
                    for obj in inner.get("items", []) if s == 200 else []:
                        self.delete(kind, name, obj["metadata"]["name"])
            else:
                self.delete("Namespace", "", name)


def _pod_object(obj: dict[str, Any]) -> dict[str, Any]:
    """A scenario pod as a user's manifest: a container image is required by the API."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in obj.items()}
    spec = dict(out.get("spec") or {})
    spec["containers"] = [dict(c, image=PAUSE_IMAGE) for c in spec.get("containers", [])]
    out["spec"] = spec
    status = out.get("status") or {}
    out["status"] = {k: v for k, v in status.items() if v is not None}
    return out


class ApiLabSession(LabSession):
    """A lab session whose agents watch the API server instead of reading files."""

    def __init__(self, cluster: ScenarioCluster, timeout: float, cp: ControlPlane, proxy_port: int) -> None:
        self.cluster = cluster
        scenario = cluster.scenario
        self.apply_seconds: list[float] = []
        self._workdir = Path(tempfile.mkdtemp(prefix="knp-lab-"))
        self._objects = {}
        self.agents: list[AgentProcess] = []
        self.topology: Topology | None = None
        self.api = ApiClient(cp)
        self.proxy: ApiProxy | None = None
        try:
            self.api.clear()
            self.topology = Topology.build(
                nodes=[(n.name, n.ips) for n in scenario.nodes],
                pods=[(p.key, p.node, p.ips, p.host_network) for p in scenario.pods],
                external_ips=_external_ips(scenario),
            )
            self.prober = Prober(self.topology, timeout=timeout)
            by_netns: dict[str, set[tuple[str, int]]] = {}
            for endpoint, ports in _probed_servers(scenario, cluster).items():
                by_netns.setdefault(self.topology.netns_of(endpoint), set()).update(ports)
            used = {port for ports in by_netns.values() for _, port in ports} | {proxy_port}
            metrics_port = next(p for p in range(9080, 65535) if p not in used)
            for netns, ports in by_netns.items():
                self.prober.serve(netns, ports)
            for obj in cluster.initial_objects():
                self.api.apply(_pod_object(obj) if obj["kind"] == "Pod" else obj)
            self.proxy = ApiProxy("127.0.0.1", proxy_port)
            for node in scenario.nodes:
                self.proxy.listen_in(self.topology.node_netns(node.name))
            flags = [FEATURE_FLAGS[r] for r in scenario.requires if r in FEATURE_FLAGS]
            for node in scenario.nodes:
                self.agents.append(
                    AgentProcess(
                        self.topology, node.name, None, flags, metrics_port, self._workdir / f"agent-{node.name}.log", kubeconfig=cp.kubeconfig_path
                    )
                )
            self._wait_written("start")
        except BaseException:
            self.close()
            raise

    def _wait_written(self, what: str) -> float:
        """Until every agent is ready and applied, per resource, the lab's last write."""
        expected = self.api.counts(self.api.deleted)
        self.api.deleted = set()
        return self._wait_agents(lambda st: self._caught_up(st, expected), SYNC_TIMEOUT_S, what)

    def _caught_up(self, status: dict[str, Any], expected: dict[str, int]) -> bool:
        """Every write applied (resourceVersions compared as numbers: etcd revisions, which is
        what this test API server gives; clients must not rely on that, the lab owns its server)
        and, for kinds with deletions, as many objects applied as the API holds."""
        counts = status.get("appliedObjects") or {}
        if any(counts.get(kind, 0) != n for kind, n in expected.items()):
            return False
        sources = status.get("sources") or {}
        applied: dict[str, int] = {}
        for name, st in sources.items():
            rv = st.get("appliedResourceVersion") if isinstance(st, dict) else None
            applied[name.split(".")[0]] = int(rv) if rv is not None and str(rv).isdigit() else -1
        return all(applied[plural] >= rv for plural, rv in self.api.written.items() if plural in applied)

    def apply(self, changes: StepChanges) -> None:
        if not changes.apply and not changes.delete:
            return
        started = time.monotonic()
        for obj in changes.apply:
            self.api.apply(_pod_object(obj) if obj["kind"] == "Pod" else obj)
        for ref in changes.delete:
            self.api.delete(ref.kind, ref.namespace, ref.name)
        self._wait_written("apply the step")
        self.apply_seconds.append(time.monotonic() - started)

    def close(self) -> None:
        # Agents first (they hold connections through the relay), then the relay, then the lab.
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop()
        if self.proxy is not None:
            self.proxy.close()
        super().close()


def controlplane_bin_dir() -> Path:
    """Build (or reuse the cached) kube-apiserver and etcd: hack/controlplane/build.sh."""
    env_dir = os.environ.get("KNP_CONTROLPLANE_BIN_DIR")
    if env_dir:
        return Path(env_dir)
    script = REPO / "hack" / "controlplane" / "build.sh"
    if not script.exists():
        raise LabError(f"{script} is missing: --apiserver needs the repository's control-plane build script")
    proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, stderr=None, text=True, check=False)
    if proc.returncode != 0:
        raise LabError("building the control plane failed (see the output above)")
    return Path(proc.stdout.strip().splitlines()[-1])


class ApiLabMode:
    name = "lab (API server)"

    def __init__(self, timeout: float = 1.0) -> None:
        self.timeout = timeout
        Topology.cleanup_stale()
        try:
            self.cp = ControlPlane.start(controlplane_bin_dir())
        except ControlPlaneError as exc:
            raise LabError(f"starting the control plane: {exc}") from None
        try:
            self.cp.install_crds([crds_dir()])
        except (ControlPlaneError, OSError) as exc:
            self.cp.stop()
            raise LabError(f"installing the policy CRDs from {crds_dir()}: {exc}") from None
        self.port = int(urllib.parse.urlsplit(self.cp.url).port or 443)

    def unsupported(self, scenario: Scenario) -> str | None:
        """Scenarios that apply objects the API server refuses (e.g. admin peers with no field,
        which only files can carry) cannot go through the API."""
        client = ApiClient(self.cp)
        for step in scenario.steps:
            for obj in step.apply:
                if client.rejects(obj):
                    return "applies objects the API server's validation rejects"
        return None

    def open(self, cluster: ScenarioCluster) -> ApiLabSession:
        return ApiLabSession(cluster, self.timeout, self.cp, self.port)

    def close(self) -> None:
        self.cp.stop()
