"""The test control plane itself: a real kube-apiserver stores and validates the objects the agent
watches (Namespaces, Pods with status.podIPs, NetworkPolicies, and with the policy API CRDs
installed AdminNetworkPolicies, BaselineAdminNetworkPolicies and ClusterNetworkPolicies)."""

from __future__ import annotations

import secrets
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from kube_network_policies.lab.controlplane import ControlPlane

POLICY_API = "/apis/policy.networking.k8s.io"
ANP = f"{POLICY_API}/v1alpha1/adminnetworkpolicies"
BANP = f"{POLICY_API}/v1alpha1/baselineadminnetworkpolicies"
CNP = f"{POLICY_API}/v1alpha2/clusternetworkpolicies"


def ok(cp: ControlPlane, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    status, out = cp.request(method, path, body, **kw)
    assert status in (200, 201), f"{method} {path}: HTTP {status}: {out}"
    return out


def names(listing: dict[str, Any]) -> set[str]:
    return {item["metadata"]["name"] for item in listing["items"]}


@pytest.fixture
def namespace(controlplane: ControlPlane) -> str:
    name = f"knp-it-{secrets.token_hex(3)}"
    ns = ok(
        controlplane,
        "POST",
        "/api/v1/namespaces",
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {"team": "x"}},
        },
    )
    # The NamespaceDefaultLabelName admission adds the implied name label.
    assert ns["metadata"]["labels"]["kubernetes.io/metadata.name"] == name
    return name


def test_ready_and_authenticated(controlplane: ControlPlane) -> None:
    assert controlplane.running
    status, body = controlplane.request("GET", "/readyz")
    assert (status, body) == (200, "ok")
    version = ok(controlplane, "GET", "/version")
    assert version["gitVersion"].startswith("v1.34.")
    # The CA in ca_path verifies the serving certificate. Without the token the request is
    # anonymous and forbidden by RBAC; with a wrong token it is not authenticated at all.
    ctx = ssl.create_default_context(cafile=str(controlplane.ca_path))
    for headers, code in (({}, 403), ({"Authorization": "Bearer wrong"}, 401)):
        req = urllib.request.Request(controlplane.url + "/api/v1/namespaces", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, context=ctx, timeout=10)
        assert e.value.code == code


def test_kubeconfig(controlplane: ControlPlane) -> None:
    config = yaml.safe_load(controlplane.kubeconfig_path.read_text())
    context = {c["name"]: c["context"] for c in config["contexts"]}[config["current-context"]]
    cluster = {c["name"]: c["cluster"] for c in config["clusters"]}[context["cluster"]]
    user = {u["name"]: u["user"] for u in config["users"]}[context["user"]]
    assert cluster["server"] == controlplane.url
    assert cluster["certificate-authority"] == str(controlplane.ca_path)
    assert user["token"] == controlplane.token


def test_pod_with_status_pod_ips(controlplane: ControlPlane, namespace: str) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "nodeName": "node-1",
            "containers": [
                {
                    "name": "web",
                    "image": "registry.k8s.io/pause:3.10",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                }
            ],
        },
    }
    created = ok(controlplane, "POST", pods, pod)
    assert created["status"].get("podIPs") is None  # no kubelet here: the test plays its part
    status_patch = {
        "status": {
            "phase": "Running",
            "hostIP": "192.0.2.1",
            "podIP": "10.244.1.10",
            "podIPs": [{"ip": "10.244.1.10"}, {"ip": "fd00:10:244:1::a"}],
        }
    }
    patched = ok(
        controlplane,
        "PATCH",
        f"{pods}/web/status",
        status_patch,
        content_type="application/merge-patch+json",
    )
    assert patched["status"]["podIPs"] == status_patch["status"]["podIPs"]
    # The main resource ignores status changes; the status subresource is the way.
    got = ok(controlplane, "GET", f"{pods}/web")
    assert got["status"]["podIP"] == "10.244.1.10"
    assert [p["ip"] for p in got["status"]["podIPs"]] == ["10.244.1.10", "fd00:10:244:1::a"]
    listing = ok(controlplane, "GET", f"{pods}?labelSelector=app%3Dweb")
    assert names(listing) == {"web"}
    # Status validation is real too: at most one IP of each family.
    bad = {"status": {"podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.10"}, {"ip": "10.244.1.11"}]}}
    status, body = controlplane.request("PATCH", f"{pods}/web/status", bad, content_type="application/merge-patch+json")
    assert status == 422, body


def test_network_policy(controlplane: ControlPlane, namespace: str) -> None:
    nps = f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"
    np: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-team-x"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}}],
                    "ports": [{"port": "http"}, {"protocol": "UDP", "port": 53, "endPort": 60}],
                }
            ],
        },
    }
    created = ok(controlplane, "POST", nps, np)
    assert created["spec"]["policyTypes"] == ["Ingress"]  # defaulted by the API server
    assert created["spec"]["ingress"][0]["ports"][0]["protocol"] == "TCP"
    assert names(ok(controlplane, "GET", nps)) == {"allow-team-x"}
    # ipBlock.except must lie inside ipBlock.cidr.
    bad_peer = {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}
    bad = {
        **np,
        "metadata": {"name": "bad"},
        "spec": {**np["spec"], "ingress": [{"from": [bad_peer]}]},
    }
    status, body = controlplane.request("POST", nps, bad)
    assert status == 422, body


def test_policy_crds_established(controlplane: ControlPlane, policy_crds: list[str], policy_crds_dir: Path) -> None:
    assert set(policy_crds) == {
        "adminnetworkpolicies.policy.networking.k8s.io",
        "baselineadminnetworkpolicies.policy.networking.k8s.io",
        "clusternetworkpolicies.policy.networking.k8s.io",
    }
    # Installing again updates in place.
    assert controlplane.install_crds([policy_crds_dir]) == policy_crds


ANP_OBJ: dict[str, Any] = {
    "apiVersion": "policy.networking.k8s.io/v1alpha1",
    "kind": "AdminNetworkPolicy",
    "metadata": {"name": "deny-from-y"},
    "spec": {
        "priority": 10,
        "subject": {"namespaces": {"matchLabels": {"team": "x"}}},
        "ingress": [
            {
                "name": "deny-y",
                "action": "Deny",
                "from": [{"namespaces": {"matchLabels": {"team": "y"}}}],
            },
            {
                "name": "pass-web",
                "action": "Pass",
                "from": [
                    {
                        "pods": {
                            "namespaceSelector": {},
                            "podSelector": {"matchLabels": {"app": "web"}},
                        }
                    }
                ],
                "ports": [{"portNumber": {"protocol": "TCP", "port": 8080}}],
            },
        ],
        "egress": [
            {
                "name": "allow-dns-net",
                "action": "Allow",
                "to": [{"networks": ["10.96.0.0/16"]}],
                "ports": [{"portRange": {"protocol": "UDP", "start": 53, "end": 54}}],
            }
        ],
    },
}

BANP_OBJ: dict[str, Any] = {
    "apiVersion": "policy.networking.k8s.io/v1alpha1",
    "kind": "BaselineAdminNetworkPolicy",
    "metadata": {"name": "default"},
    "spec": {
        "subject": {"namespaces": {}},
        "ingress": [{"name": "default-deny", "action": "Deny", "from": [{"namespaces": {}}]}],
    },
}

CNP_OBJ: dict[str, Any] = {
    "apiVersion": "policy.networking.k8s.io/v1alpha2",
    "kind": "ClusterNetworkPolicy",
    "metadata": {"name": "baseline-accept-y"},
    "spec": {
        "tier": "Baseline",
        "priority": 10,
        "subject": {"namespaces": {"matchLabels": {"team": "x"}}},
        "ingress": [{"action": "Accept", "from": [{"namespaces": {"matchLabels": {"team": "y"}}}]}],
    },
}


def test_admin_baseline_and_cluster_policies(controlplane: ControlPlane, policy_crds: list[str]) -> None:
    for path, obj in ((ANP, ANP_OBJ), (BANP, BANP_OBJ), (CNP, CNP_OBJ)):
        created = ok(controlplane, "POST", path, obj)
        assert created["spec"] == obj["spec"]
        assert obj["metadata"]["name"] in names(ok(controlplane, "GET", path))
    # The status subresource of the CRDs works too.
    status: dict[str, Any] = {"status": {"conditions": []}}
    ok(
        controlplane,
        "PATCH",
        f"{ANP}/deny-from-y/status",
        status,
        content_type="application/merge-patch+json",
    )


@pytest.mark.parametrize(
    ("path", "obj", "field"),
    [
        (
            ANP,
            {
                **ANP_OBJ,
                "metadata": {"name": "too-high"},
                "spec": {**ANP_OBJ["spec"], "priority": 2000},
            },
            "spec.priority",
        ),
        (BANP, {**BANP_OBJ, "metadata": {"name": "not-default"}}, "default"),  # CEL rule
        (
            CNP,
            {
                **CNP_OBJ,
                "metadata": {"name": "no-tier"},
                "spec": {**CNP_OBJ["spec"], "tier": "Developer"},
            },
            "spec.tier",
        ),
    ],
    ids=["anp-priority-2000", "banp-name-not-default", "cnp-unknown-tier"],
)
def test_crd_validation_rejects_invalid(controlplane: ControlPlane, policy_crds: list[str], path: str, obj: dict[str, Any], field: str) -> None:
    status, body = controlplane.request("POST", path, obj)
    assert status == 422, body
    assert body["reason"] == "Invalid"
    assert field in body["message"], body["message"]
