"""Restart or uninstall: what a fail-closed agent decides on SIGTERM, asked of a real API server.

A fail-closed agent keeps its ruleset across a restart (connections of policy-selected pods wait
for the next agent instead of passing unjudged) and removes it when uninstalled (else the node
stays blackholed for good). sources/daemonset.py asks the API; these tests build the objects a
cluster would hold (no controllers run here: the DaemonSet and its pod are written by hand, the
pod owned by the DaemonSet as the controller would make it) and check every answer, then run the
agent itself in a node namespace, once restarted and once uninstalled.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_reliability import METRICS_PORT, lab, need_root, ok, wait_for

from kube_network_policies.dataplane.nftables import TABLE
from kube_network_policies.lab.controlplane import ControlPlane
from kube_network_policies.lab.netns_mode import AgentProcess
from kube_network_policies.sources.daemonset import exit_decision, node_selected
from kube_network_policies.sources.kubeconfig import load_config

NS = "kube-system"


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def make_node(cp: ControlPlane, name: str, labels: dict[str, str], taints: list[dict[str, str]] | None = None) -> None:
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
    if taints:
        body["spec"] = {"taints": taints}
    ok(cp, "POST", "/api/v1/nodes", body)


def make_daemonset(cp: ControlPlane, name: str, pod_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = {"containers": [{"name": "agent", "image": "registry.k8s.io/networking/kube-network-policies-python:v0.1.0"}], "hostNetwork": True}
    spec.update(pod_spec or {})
    body = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": name}}, "template": {"metadata": {"labels": {"app": name}}, "spec": spec}},
    }
    out: dict[str, Any] = ok(cp, "POST", f"/apis/apps/v1/namespaces/{NS}/daemonsets", body)
    return out


def make_agent_pod(cp: ControlPlane, name: str, node: str, owner: dict[str, Any] | None) -> None:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "labels": {"app": "agent"}}
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "DaemonSet",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": node, "hostNetwork": True, "containers": [{"name": "agent", "image": "x"}]},
    }
    ok(cp, "POST", f"/api/v1/namespaces/{NS}/pods", body)


class Cluster:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.config = load_config(str(cp.kubeconfig_path))

    def decide(self, pod: str | None, node: str, namespace: str | None = NS) -> tuple[bool, str]:
        d = exit_decision(self.config, namespace, pod, node)
        return d.keep, d.reason


@pytest.fixture(scope="module")
def cluster(controlplane: ControlPlane) -> Iterator[Cluster]:
    yield Cluster(controlplane)


def test_restart_keeps_the_ruleset(cluster: Cluster) -> None:
    node, ds_name, pod = unique("node"), unique("knp"), unique("knp-pod")
    make_node(cluster.cp, node, {"kubernetes.io/os": "linux"})
    ds = make_daemonset(cluster.cp, ds_name, {"nodeSelector": {"kubernetes.io/os": "linux"}})
    make_agent_pod(cluster.cp, pod, node, ds)
    keep, why = cluster.decide(pod, node)
    assert keep, why
    assert "runs on node" in why


def test_deleted_daemonset_removes_the_ruleset(cluster: Cluster) -> None:
    node, ds_name, pod = unique("node"), unique("knp"), unique("knp-pod")
    make_node(cluster.cp, node, {})
    ds = make_daemonset(cluster.cp, ds_name)
    make_agent_pod(cluster.cp, pod, node, ds)
    ok(cluster.cp, "DELETE", f"/apis/apps/v1/namespaces/{NS}/daemonsets/{ds_name}")  # background: gone at once
    keep, why = cluster.decide(pod, node)
    assert not keep and "was deleted" in why, why


def test_daemonset_being_deleted_removes_the_ruleset(cluster: Cluster) -> None:
    node, ds_name, pod = unique("node"), unique("knp"), unique("knp-pod")
    make_node(cluster.cp, node, {})
    ds = make_daemonset(cluster.cp, ds_name)
    make_agent_pod(cluster.cp, pod, node, ds)
    # Foreground deletion: the DaemonSet stays, with a deletionTimestamp, until its pods are gone.
    ok(cluster.cp, "DELETE", f"/apis/apps/v1/namespaces/{NS}/daemonsets/{ds_name}", {"propagationPolicy": "Foreground"})
    keep, why = cluster.decide(pod, node)
    assert not keep and "being deleted" in why, why


def test_a_recreated_daemonset_keeps_the_ruleset(cluster: Cluster) -> None:
    """`kubectl delete -f install.yaml; kubectl apply -f install.yaml` (or a replace): a new agent
    comes to this node and takes the ruleset over."""
    node, ds_name, pod = unique("node"), unique("knp"), unique("knp-pod")
    make_node(cluster.cp, node, {})
    ds = make_daemonset(cluster.cp, ds_name)
    make_agent_pod(cluster.cp, pod, node, ds)
    ok(cluster.cp, "DELETE", f"/apis/apps/v1/namespaces/{NS}/daemonsets/{ds_name}")
    make_daemonset(cluster.cp, ds_name)
    keep, why = cluster.decide(pod, node)
    assert keep, why


def test_node_no_longer_selected_removes_the_ruleset(cluster: Cluster) -> None:
    cp = cluster.cp
    for labels, pod_spec, taints, expect in (
        ({"pool": "a"}, {"nodeSelector": {"pool": "b"}}, None, "nodeSelector pool=b"),
        (
            {"pool": "a"},
            {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["a"]}]}]
                        }
                    }
                }
            },
            None,
            "node affinity",
        ),
        ({}, {}, [{"key": "dedicated", "value": "db", "effect": "NoExecute"}], "taint dedicated:NoExecute"),
    ):
        node, ds_name, pod = unique("node"), unique("knp"), unique("knp-pod")
        make_node(cp, node, labels, taints)
        ds = make_daemonset(cp, ds_name, pod_spec)
        make_agent_pod(cp, pod, node, ds)
        keep, why = cluster.decide(pod, node)
        assert not keep and expect in why, why


def test_pod_without_a_daemonset_removes_the_ruleset(cluster: Cluster) -> None:
    node, pod = unique("node"), unique("knp-pod")
    make_node(cluster.cp, node, {})
    make_agent_pod(cluster.cp, pod, node, None)
    keep, why = cluster.decide(pod, node)
    assert not keep and "not run by a DaemonSet" in why


def test_no_answer_keeps_the_ruleset(cluster: Cluster) -> None:
    # Unknown pod identity, a pod the API does not know, an API that does not answer, no rights.
    assert cluster.decide(None, "n")[0] is True
    keep, why = cluster.decide("no-such-pod", "n")
    assert keep and "cleanup" in why
    down = load_config(str(cluster.cp.kubeconfig_path))
    unreachable = replace(down, server="https://127.0.0.1:1")
    d = exit_decision(unreachable, NS, "x", "n")
    assert d.keep and "did not answer" in d.reason
    anonymous = replace(down, auth=None)
    d = exit_decision(anonymous, NS, "x", "n")
    assert d.keep and ("HTTP 401" in d.reason or "HTTP 403" in d.reason), d.reason


def test_node_selected_rules() -> None:
    node = {
        "metadata": {"name": "n1", "labels": {"size": "8", "zone": "a"}},
        "spec": {
            "taints": [
                {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},  # DaemonSets tolerate it
                {"key": "gpu", "effect": "PreferNoSchedule"},  # never keeps a DaemonSet pod away
            ]
        },
    }
    assert node_selected({}, node) == ""
    assert node_selected({"tolerations": [{"operator": "Exists"}]}, node) == ""

    def term(*e: dict[str, Any]) -> dict[str, Any]:
        return {
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": list(e)}]}}}
        }

    assert node_selected(term({"key": "size", "operator": "Gt", "values": ["4"]}), node) == ""
    assert node_selected(term({"key": "size", "operator": "Lt", "values": ["4"]}), node) != ""
    assert node_selected(term({"key": "zone", "operator": "Exists"}, {"key": "x", "operator": "DoesNotExist"}), node) == ""
    fields = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]},
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
                    ]
                }
            }
        }
    }
    assert node_selected(fields, node) == ""
    tainted = {"metadata": {"name": "n1"}, "spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}
    assert "not tolerated" in node_selected({}, tainted)
    assert node_selected({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db"}]}, tainted) == ""
    assert "not tolerated" in node_selected({"tolerations": [{"key": "dedicated", "value": "web"}]}, tainted)


# ---- the agent itself ----------------------------------------------------------------------------


def run_agent_and_stop(cp: ControlPlane, topo: Any, node: str, workdir: Path, pod: str, name: str) -> str:
    agent = AgentProcess(
        topo, node, None, [], METRICS_PORT, workdir / f"{name}.log", kubeconfig=cp.kubeconfig_path, env={"POD_NAMESPACE": NS, "POD_NAME": pod}
    )
    try:
        wait_for(agent, lambda st: bool(st.get("ready")), 60, "the agent to be ready")
        assert topo.run(topo.node_netns(node), "nft", "list", "table", "inet", TABLE, check=False).returncode == 0
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(20) == 0, agent.log_tail(30)
    finally:
        agent.stop()
    return agent.log_path.read_text(errors="replace")


def test_the_agent_keeps_its_rules_on_restart_and_removes_them_on_uninstall(controlplane: ControlPlane) -> None:
    need_root()
    cp = controlplane
    with lab(cp, []) as (topo, node, _proxy, workdir):
        make_node(cp, node, {"kubernetes.io/os": "linux"})
        ds_name, pod = unique("knp"), unique("knp-pod")
        ds = make_daemonset(cp, ds_name, {"nodeSelector": {"kubernetes.io/os": "linux"}})
        make_agent_pod(cp, pod, node, ds)
        netns = topo.node_netns(node)

        log = run_agent_and_stop(cp, topo, node, workdir, pod, "restart")
        assert "keeping the ruleset on exit: DaemonSet" in log, log[-2000:]
        assert topo.run(netns, "nft", "list", "table", "inet", TABLE, check=False).returncode == 0

        # The next agent takes over the kept rules; then the DaemonSet goes (uninstall).
        ok(cp, "DELETE", f"/apis/apps/v1/namespaces/{NS}/daemonsets/{ds_name}")
        log = run_agent_and_stop(cp, topo, node, workdir, pod, "uninstall")
        assert "removing the ruleset on exit: DaemonSet" in log, log[-2000:]
        assert topo.run(netns, "nft", "list", "table", "inet", TABLE, check=False).returncode != 0
