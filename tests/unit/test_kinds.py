"""The kind registry (model.kinds): what is derived from it, and that a new served version of a
kind is an entry in the registry and nothing else.

The fake version `policy.networking.k8s.io/v1test1` of ClusterNetworkPolicy is registered by
the `v1test1` fixture alone (as ClusterNetworkPolicy v1beta1 will be: same schema as v1alpha2);
every other layer must take it up without being told.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kube_network_policies.cli import build_parser, features_from_args, main
from kube_network_policies.engine import ALL_FEATURES, ClusterState, Features, Flow
from kube_network_policies.explain import explain, features_for_objects
from kube_network_policies.lab.apiserver_mode import resource_path
from kube_network_policies.lab.engine_mode import EngineMode, features_for
from kube_network_policies.lab.runner import run_paths
from kube_network_policies.lab.scenario import FEATURES
from kube_network_policies.model import ClusterNetworkPolicy, ValidationError, kinds, object_key, parse_object
from kube_network_policies.model.adminpolicy import parse_cluster_network_policy
from kube_network_policies.sources.codecs import codec_for
from kube_network_policies.sources.kubeconfig import ApiConfig
from kube_network_policies.sources.kubernetes import KubernetesSource
from kube_network_policies.sources.resources import resource, resources_for

REPO = Path(__file__).resolve().parents[2]
V1TEST1 = "policy.networking.k8s.io/v1test1"


@pytest.fixture
def v1test1() -> Iterator[None]:
    """The only change a new version of ClusterNetworkPolicy needs: one registry entry (watched:
    the Kubernetes source lists and watches it instead of v1alpha2)."""
    kinds.add_version("ClusterNetworkPolicy", kinds.ApiVersion("v1test1", parse_cluster_network_policy, ClusterNetworkPolicy), watched=True)
    try:
        yield
    finally:
        kinds.remove_version("ClusterNetworkPolicy", "v1test1")


def pod(ns: str, name: str, ip: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Running", "podIP": ip},
    }


def cnp(api_version: str = V1TEST1) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "deny-to-db"},
        "spec": {
            "tier": "Admin",
            "priority": 5,
            "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}},
            "ingress": [
                {"name": "deny-web", "action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}}]}
            ],
        },
    }


CLUSTER = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
    pod("x", "web", "10.0.0.1", app="web"),
    pod("x", "db", "10.0.0.2", app="db"),
]
WEB_TO_DB = Flow.of("10.0.0.1", "10.0.0.2", "TCP", 5432, 40000)


# ---- a new version: the registry entry is all it takes -------------------------------------


def test_new_version_is_parsed(v1test1: None) -> None:
    policy = parse_object(cnp(), strict=True)
    assert isinstance(policy, ClusterNetworkPolicy) and object_key(policy) == ("ClusterNetworkPolicy", "", "deny-to-db")
    assert parse_object(cnp("policy.networking.k8s.io/v1alpha2")) == policy  # the older version still is
    assert kinds.require("ClusterNetworkPolicy").api_versions == (V1TEST1, "policy.networking.k8s.io/v1alpha2")


def test_unregistered_version_is_refused() -> None:
    with pytest.raises(ValidationError) as err:
        parse_object(cnp())
    assert err.value.errors[0].path == "apiVersion"
    assert "expected policy.networking.k8s.io/v1alpha2" in err.value.errors[0].message


def test_new_version_is_watched_when_its_flag_is_on(v1test1: None) -> None:
    watched = {r.kind: r for r in resources_for({"cluster-network-policy"})}
    r = watched["ClusterNetworkPolicy"]
    assert (r.version, r.path, r.name) == (
        "v1test1",
        "/apis/policy.networking.k8s.io/v1test1/clusternetworkpolicies",
        "clusternetworkpolicies.policy.networking.k8s.io",
    )
    assert "ClusterNetworkPolicy" not in {r.kind for r in resources_for(())}
    source = KubernetesSource(ApiConfig("http://127.0.0.1:1"), frozenset({"cluster-network-policy"}))
    try:
        assert [i.resource.path for i in source.informers if i.resource.kind == "ClusterNetworkPolicy"] == [r.path]
    finally:
        source.stop()
    # What the API server sends at that version decodes with that version's parser.
    key, obj, _, error = codec_for(r).item(json.dumps(cnp()).encode())
    assert error is None and key == ("ClusterNetworkPolicy", "", "deny-to-db") and isinstance(obj, ClusterNetworkPolicy)


def test_new_version_is_enforced_by_the_engine(v1test1: None) -> None:
    state = ClusterState(Features.of("cluster-network-policy"))
    for obj in [*CLUSTER, cnp()]:
        state.apply(parse_object(obj))
    decision = state.evaluate(WEB_TO_DB)
    assert not decision.allowed and decision.ingress.chain[0].policy == "cnp/deny-to-db"
    assert state.delete("ClusterNetworkPolicy", "", "deny-to-db") and state.evaluate(WEB_TO_DB).allowed
    off = ClusterState(Features())
    for obj in [*CLUSTER, cnp()]:
        off.apply(parse_object(obj))
    assert off.evaluate(WEB_TO_DB).allowed and ("ClusterNetworkPolicy", "", "deny-to-db") in off.ignored


def test_new_version_is_explained(v1test1: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    objects = [parse_object(o) for o in [*CLUSTER, cnp()]]
    features = features_for_objects(objects, Features())
    assert features.flags == {"cluster-network-policy"}
    state = ClusterState(features)
    for o in objects:
        state.apply(o)
    ((_, _, _, decision),) = explain(state, "x/web", "x/db", "TCP", 5432)
    assert not decision.allowed
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all([*CLUSTER, cnp()]))
    assert main(["explain", "--manifests", str(tmp_path), "--from", "x/web", "--to", "x/db", "--port", "5432"]) == 0
    out = capsys.readouterr().out
    assert ": DENY" in out and "cnp/deny-to-db rule 0 [deny-web]" in out, out


def test_new_version_runs_in_the_labs_engine_mode(v1test1: None, tmp_path: Path) -> None:
    # An existing scenario of the cluster-v1alpha2 suite, with every ClusterNetworkPolicy
    # written in the new version: the same verdicts.
    original = REPO / "tests/scenarios/cluster-v1alpha2/cnp-admin-accept-overrides-np-deny.yaml"
    text = original.read_text()
    assert "policy.networking.k8s.io/v1alpha2" in text
    (tmp_path / "s.yaml").write_text(text.replace("policy.networking.k8s.io/v1alpha2", V1TEST1))
    out = io.StringIO()
    assert run_paths([str(tmp_path)], EngineMode(), out=out) == 0, out.getvalue()
    assert "1 passed, 0 failed" in out.getvalue()
    # The lab's API-server mode writes an object at the version it is written in.
    assert resource_path("ClusterNetworkPolicy", "", "p", V1TEST1) == "/apis/policy.networking.k8s.io/v1test1/clusternetworkpolicies/p"


# ---- what is derived from the registry ------------------------------------------------------


def test_flags_and_features() -> None:
    assert kinds.flags() == ("admin-network-policy", "baseline-admin-network-policy", "cluster-network-policy")
    assert ALL_FEATURES.flags == frozenset(kinds.flags())
    assert set(kinds.flags()) <= set(FEATURES)  # scenario files may require each
    assert features_for(["cluster-network-policy", "sctp"]) == Features.of("cluster-network-policy")
    args = build_parser().parse_args(["run", "-admin-network-policy", "--cluster-network-policy=true"])
    assert features_from_args(args) == Features.of("admin-network-policy", "cluster-network-policy")
    with pytest.raises(ValueError, match="unknown feature flag"):
        Features.of("network-policy")
    assert Features().enabled("NetworkPolicy") and not Features().enabled("AdminNetworkPolicy")
    with pytest.raises(ValueError, match="unsupported kind 'Service'"):
        Features().enabled("Service")


def test_apply_order_scope_and_resources() -> None:
    order = sorted(kinds.all_kinds(), key=lambda k: kinds.apply_order(k.name))
    assert [k.name for k in order][:3] == ["Namespace", "Node", "Pod"]
    assert {kinds.apply_order(k) for k in ("NetworkPolicy", "AdminNetworkPolicy", "BaselineAdminNetworkPolicy", "ClusterNetworkPolicy")} == {3}
    assert [k.name for k in kinds.all_kinds() if k.namespaced] == ["Pod", "NetworkPolicy"]
    assert not kinds.namespaced("Service")
    assert [r.name for r in resources_for(())] == ["namespaces", "nodes", "pods", "networkpolicies"]
    assert resource("AdminNetworkPolicy").path == "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies"
    assert resource("Pod").object_path("x", "a") == "/api/v1/namespaces/x/pods/a"
    assert kinds.rank("AdminNetworkPolicy") < kinds.rank("ClusterNetworkPolicy")


def test_registry_refuses_duplicates_and_unknown_versions() -> None:
    v = kinds.ApiVersion("v1alpha2", parse_cluster_network_policy, ClusterNetworkPolicy)
    with pytest.raises(ValueError, match="already registered"):
        kinds.add_version("ClusterNetworkPolicy", v)
    with pytest.raises(ValueError, match="not registered"):
        kinds.remove_version("ClusterNetworkPolicy", "v9")
    with pytest.raises(ValueError, match="not a registered version"):
        resource("ClusterNetworkPolicy", "v9")
