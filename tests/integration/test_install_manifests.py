"""The install manifests (install.yaml, install-anp.yaml, install-cnp.yaml) and the image.

Against the real test API server: every object passes a server-side dry run with strict field
validation (a misspelt field fails), and the RBAC, created for a throw-away service account,
lets it read exactly what the agent reads and nothing else (SubjectAccessReview). Without it:
the DaemonSet's flags parse with our CLI and fit the file's purpose, the ClusterRole is
read-only on exactly the kinds the agent's sources watch (the kind registry, model.kinds, less
the kinds whose flags the file leaves off), compared with the Go agent's manifests; probes, capabilities,
tolerations and the image agree with the Dockerfile.
"""

from __future__ import annotations

import copy
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kube_network_policies.cli import build_parser, flag_dest
from kube_network_policies.lab.controlplane import ControlPlane
from kube_network_policies.model import kinds as registry

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "kube-system"
NAME = "kube-network-policies"
IMAGE = "registry.k8s.io/networking/kube-network-policies-python:v0.1.0"
READ_VERBS = frozenset({"get", "list", "watch"})
METRICS_PORT = 9080

# The switchable kinds, by the `run` flag (argparse dest) that enables them (model.kinds).
FLAG_KINDS = {flag_dest(f): frozenset(k.name for k in registry.kinds_of_flag(f)) for f in registry.flags()}
# What the agent always reads: the kinds without a flag.
BASE_KINDS = frozenset(k.name for k in registry.all_kinds() if not k.flag)

# file -> (the flags it turns on, the NFQUEUE number of the Go agent's manifest of that name)
MANIFESTS: dict[str, tuple[frozenset[str], int]] = {
    "install.yaml": (frozenset(), 98),
    "install-anp.yaml": (
        frozenset({"admin_network_policy", "baseline_admin_network_policy"}),
        89,
    ),
    "install-cnp.yaml": (frozenset({"cluster_network_policy"}), 89),
}

# The ClusterRole resources (apiGroup, resource) of the Go agent's manifests
# (kubernetes-sigs/kube-network-policies v1.1.1), all with verbs list and watch.
_GO_CORE = {("", "pods"), ("", "namespaces"), ("networking.k8s.io", "networkpolicies")}
GO_RESOURCES = {
    "install.yaml": _GO_CORE,
    "install-anp.yaml": _GO_CORE
    | {
        ("", "nodes"),
        ("policy.networking.k8s.io", "adminnetworkpolicies"),
        ("policy.networking.k8s.io", "baselineadminnetworkpolicies"),
    },
    "install-cnp.yaml": _GO_CORE | {("", "nodes"), ("policy.networking.k8s.io", "clusternetworkpolicies")},
}
# Where ours differ: our Kubernetes source always watches Nodes (issue 4), the Go agent's
# NetworkPolicy-only build does not. Ours also grants "get", which shows nothing "list" hides.
OUR_EXTRA = {"install.yaml": {("", "nodes")}}

SA_GROUPS = [
    "system:serviceaccounts",
    f"system:serviceaccounts:{NAMESPACE}",
    "system:authenticated",
]

params = pytest.mark.parametrize("manifest", sorted(MANIFESTS))


def load(manifest: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((REPO / manifest).read_text()) if d is not None]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(manifest: str) -> dict[str, Any]:
    pod = only(load(manifest), "DaemonSet")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    c: dict[str, Any] = pod["containers"][0]
    return c


def expand(arg: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion; an undefined reference is an error here (the kubelet
    would pass it on literally, which is never what a manifest means)."""

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"{arg}: $({m.group(1)}) is not defined in the container's env"
        return env[m.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def parsed_args(manifest: str) -> Any:
    """The DaemonSet's args as the image's entrypoint (`kube-network-policies run`) parses them."""
    c = container(manifest)
    # The entrypoint comes from the image (Dockerfile); a `command` would bypass it.
    assert "command" not in c
    env = {e["name"]: f"<{e['name']}>" for e in c.get("env", [])}
    args = [expand(a, env) for a in c["args"]]
    try:
        return build_parser().parse_args(["run", *args])
    except SystemExit as e:  # argparse printed the reason on stderr
        pytest.fail(f"{manifest}: `kube-network-policies run {' '.join(args)}` exits {e.code}")


def read_rules(manifest: str) -> set[tuple[str, str]]:
    """(apiGroup, resource) pairs of the ClusterRole, checking every rule is plainly read-only."""
    role = only(load(manifest), "ClusterRole")
    pairs = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no names, no URLs
        verbs = set(rule["verbs"])
        assert verbs <= READ_VERBS, f"{manifest}: verbs {sorted(verbs - READ_VERBS)} are not read-only"
        assert {"list", "watch"} <= verbs, f"{manifest}: an informer needs list and watch: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource) and "/" not in resource, rule
                pairs.add((group, resource))
    return pairs


# --- the files alone -------------------------------------------------------------------------


@params
def test_objects_and_references(manifest: str) -> None:
    docs = load(manifest)
    assert sorted(d["kind"] for d in docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    for d in docs:
        assert d["metadata"]["name"] == NAME
        namespaced = d["kind"] in ("ServiceAccount", "DaemonSet", "Role", "RoleBinding")
        assert d["metadata"].get("namespace") == (NAMESPACE if namespaced else None), d["kind"]
    binding = only(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": NAME,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    role_binding = only(docs, "RoleBinding")
    assert role_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME}
    assert role_binding["subjects"] == binding["subjects"]
    # The Role: get this one DaemonSet (exit_decision), nothing else.
    assert only(docs, "Role")["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": [NAME], "verbs": ["get"]}]
    ds = only(docs, "DaemonSet")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == NAME
    selector = ds["spec"]["selector"]["matchLabels"]
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()


@params
def test_flags_fit_the_file(manifest: str) -> None:
    flags, go_queue = MANIFESTS[manifest]
    args = parsed_args(manifest)
    assert args.manifests is None  # Kubernetes mode, not standalone
    assert {f for f in FLAG_KINDS if getattr(args, f)} == flags
    assert args.nfqueue_id == go_queue
    assert args.fail_open is False  # fail-closed, as the Go agent's manifests (its default)
    assert args.hostname == "<NODE_NAME>"
    assert args.metrics_bind_address == f":{METRICS_PORT}"
    env = {e["name"]: e for e in container(manifest)["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # Its own pod, to find its DaemonSet on SIGTERM (restart or uninstall).
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


@params
def test_pod_spec(manifest: str) -> None:
    ds = only(load(manifest), "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]  # every taint, every effect
    assert "volumes" not in pod  # no hostPath (/lib/modules included)
    c = container(manifest)
    assert c["image"] == IMAGE
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert set(c["resources"]) == {"requests"} and set(c["resources"]["requests"]) == {
        "cpu",
        "memory",
    }
    assert c["ports"] == [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        # No host: the kubelet probes the pod IP, the node's IP under hostNetwork.
        assert c[probe]["httpGet"] == {"path": path, "port": METRICS_PORT}, probe


def test_image_files() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm$", dockerfile, re.MULTILINE)
    assert re.search(r"apt-get install -y --no-install-recommends nftables iptables", dockerfile)
    assert 'ENTRYPOINT ["kube-network-policies", "run"]' in dockerfile
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^kube-network-policies = "kube_network_policies\.cli:main"$', pyproject, re.MULTILINE)
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {"*", "!pyproject.toml", "!README.md", "!src/"} <= set(ignore)
    # The lab stays out of the image, and the build proves it (tests/unit/test_packaging.py
    # computes the whole build context).
    assert ignore.index("src/kube_network_policies/lab/") > ignore.index("!src/")
    assert '! python -c "import kube_network_policies.lab"' in dockerfile
    assert IMAGE in (REPO / "README.md").read_text()


# --- against the API server --------------------------------------------------------------------


class Discovery:
    """Resource names and scope of a kind, as the API server's discovery documents them."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._by_version: dict[str, dict[str, dict[str, Any]]] = {}

    @staticmethod
    def prefix(api_version: str) -> str:
        return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"

    def resource(self, api_version: str, kind: str) -> tuple[str, str, bool]:
        """(apiGroup, plural resource, namespaced)."""
        if api_version not in self._by_version:
            deadline = time.monotonic() + 30  # a CRD's group shows up shortly after Established
            while True:
                status, body = self.cp.request("GET", self.prefix(api_version))
                if status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert status == 200, f"discovery of {api_version}: HTTP {status}: {body}"
            self._by_version[api_version] = {r["kind"]: r for r in body["resources"] if "/" not in r["name"]}
        r = self._by_version[api_version][kind]
        return api_version.rpartition("/")[0], r["name"], r["namespaced"]

    def collection(self, obj: dict[str, Any]) -> str:
        _, plural, namespaced = self.resource(obj["apiVersion"], obj["kind"])
        ns = obj["metadata"].get("namespace")
        assert bool(ns) == namespaced, f"{obj['kind']}: namespace {ns!r}, namespaced={namespaced}"
        middle = f"/namespaces/{ns}" if namespaced else ""
        return f"{self.prefix(obj['apiVersion'])}{middle}/{plural}"


@pytest.fixture(scope="module")
def api(controlplane: ControlPlane, policy_crds: list[str]) -> Discovery:
    """Discovery, with the policy API CRDs installed so that their group is known."""
    return Discovery(controlplane)


@pytest.fixture(scope="module")
def kube_system(controlplane: ControlPlane) -> str:
    """kube-system, which the API server creates itself shortly after it is ready."""
    deadline = time.monotonic() + 30
    while controlplane.request("GET", f"/api/v1/namespaces/{NAMESPACE}")[0] != 200:
        assert time.monotonic() < deadline, f"namespace {NAMESPACE} never appeared"
        time.sleep(0.2)
    return NAMESPACE


@params
def test_cluster_role_is_read_only_on_what_the_agent_reads(manifest: str, api: Discovery) -> None:
    flags, _ = MANIFESTS[manifest]
    kinds = BASE_KINDS.union(*(FLAG_KINDS[f] for f in flags))
    # Each at the version the Kubernetes source watches.
    expected = {api.resource(registry.require(k).api_version(registry.require(k).watched.version), k)[:2] for k in kinds}
    ours = read_rules(manifest)
    assert ours == expected
    go = GO_RESOURCES[manifest]
    assert go <= ours, f"the Go manifest grants {sorted(go - ours)} too: does the agent need it?"
    assert ours - go == OUR_EXTRA.get(manifest, set())


DRY_RUN = "?dryRun=All&fieldValidation=Strict"


@params
def test_server_side_dry_run(manifest: str, controlplane: ControlPlane, api: Discovery, kube_system: str) -> None:
    for obj in load(manifest):
        path = api.collection(obj)
        status, body = controlplane.request("POST", path + DRY_RUN, obj)
        assert status == 201, f"{manifest}: {obj['kind']}: HTTP {status}: {body}"
        assert (body["kind"], body["metadata"]["name"]) == (obj["kind"], obj["metadata"]["name"])
        assert body["metadata"].get("namespace") == obj["metadata"].get("namespace")
        # A dry run stores nothing.
        name = obj["metadata"]["name"]
        assert controlplane.request("GET", f"{path}/{name}")[0] == 404
    # The pod the DaemonSet controller would create, through Pod validation and admission.
    ds = only(load(manifest), "DaemonSet")
    pod_name = f"{NAME}-node-1"
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**ds["spec"]["template"]["metadata"], "name": pod_name},
        "spec": {**ds["spec"]["template"]["spec"], "nodeName": "node-1"},
    }
    path = f"/api/v1/namespaces/{kube_system}/pods"
    status, body = controlplane.request("POST", path + DRY_RUN, pod)
    assert status == 201, f"{manifest}: Pod: HTTP {status}: {body}"
    # Priority admission resolved system-node-critical (allowed in kube-system only) ...
    assert body["spec"]["priority"] == 2_000_001_000
    # ... and under hostNetwork the metrics port became a host port, known to the scheduler.
    assert body["spec"]["containers"][0]["ports"][0]["hostPort"] == METRICS_PORT
    assert controlplane.request("GET", f"{path}/{pod_name}")[0] == 404


def test_dry_run_rejects_a_misspelt_field(controlplane: ControlPlane, api: Discovery, kube_system: str) -> None:
    """The control for the test above: strict field validation is really in force."""
    ds = only(load("install.yaml"), "DaemonSet")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    status, body = controlplane.request("POST", api.collection(ds) + DRY_RUN, ds)
    assert status in (400, 422), body
    assert "readinesProbe" in body["message"]


@pytest.fixture
def installed_rbac(request: pytest.FixtureRequest, controlplane: ControlPlane, api: Discovery, kube_system: str) -> Iterator[str]:
    """The manifest's ServiceAccount, ClusterRole and ClusterRoleBinding, created for real under
    a unique name (parallel sessions and other tests keep theirs); yields the SA's user name."""
    manifest: str = request.param
    name = f"{NAME}-it-{secrets.token_hex(3)}"
    objects = []
    for obj in load(manifest):
        if obj["kind"] == "DaemonSet":
            continue
        obj = copy.deepcopy(obj)
        obj["metadata"]["name"] = name
        if obj["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            obj["roleRef"]["name"] = name
            obj["subjects"][0]["name"] = name
        objects.append(obj)
    created = []
    try:
        for obj in objects:
            path = api.collection(obj)
            status, body = controlplane.request("POST", path, obj)
            assert status == 201, f"{obj['kind']}: HTTP {status}: {body}"
            created.append(f"{path}/{name}")
        yield f"system:serviceaccount:{NAMESPACE}:{name}"
    finally:
        for path in reversed(created):
            controlplane.request("DELETE", path)


def allowed(cp: ControlPlane, user: str, group: str, resource: str, verb: str, subresource: str = "") -> bool:
    attributes = {"group": group, "resource": resource, "verb": verb, "subresource": subresource}
    return allowed_in(cp, user, attributes)


def allowed_in(cp: ControlPlane, user: str, attributes: dict[str, str]) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": SA_GROUPS, "resourceAttributes": attributes},
    }
    status, body = cp.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    assert status == 201, body
    return bool(body["status"].get("allowed"))


@pytest.mark.parametrize("installed_rbac", sorted(MANIFESTS), indirect=True)
def test_rbac_grants_exactly_reading(installed_rbac: str, request: pytest.FixtureRequest, controlplane: ControlPlane) -> None:
    manifest = request.node.callspec.params["installed_rbac"]
    user = installed_rbac
    readable = read_rules(manifest)
    first = next(iter(sorted(readable)))
    # The RBAC authorizer learns of new bindings through its informers: wait for it.
    deadline = time.monotonic() + 30
    while not allowed(controlplane, user, *first, "list"):
        assert time.monotonic() < deadline, f"{user} never got list on {first}"
        time.sleep(0.2)
    for group, resource in sorted(readable):
        for verb in sorted(READ_VERBS):
            assert allowed(controlplane, user, group, resource, verb), (group, resource, verb)
        for verb in ("create", "update", "patch", "delete", "deletecollection"):
            assert not allowed(controlplane, user, group, resource, verb), (group, resource, verb)
    others = {
        ("", "secrets"),
        ("", "configmaps"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        *((k.group, k.plural) for k in registry.all_kinds() if k.flag),  # the switchable kinds the file leaves off
    } - readable
    for group, resource in sorted(others):
        assert not allowed(controlplane, user, group, resource, "list"), (group, resource)
    # No status writes either: the agent reports nothing through the API.
    for group, resource in sorted(readable):
        assert not allowed(controlplane, user, group, resource, "update", "status"), resource
    # Its own DaemonSet, by name, in its namespace, read only: nothing more of the apps group.
    ds = {"group": "apps", "resource": "daemonsets", "namespace": NAMESPACE}
    assert allowed_in(controlplane, user, {**ds, "verb": "get", "name": NAME})
    assert not allowed_in(controlplane, user, {**ds, "verb": "get", "name": "other"})
    assert not allowed_in(controlplane, user, {**ds, "verb": "list"})
    assert not allowed_in(controlplane, user, {**ds, "verb": "delete", "name": NAME})
    assert not allowed_in(controlplane, user, {**ds, "verb": "get", "name": NAME, "namespace": "default"})
