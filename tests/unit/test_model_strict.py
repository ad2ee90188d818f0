"""Validation as the API server does it, for files (strict), and leniency for what the API server
already stored (non-strict: what sources.codecs gets): addresses, names, labels, list sizes
and unknown fields."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

import builders  # tests/builders.py
from kube_network_policies.model import ValidationError, parse_object
from kube_network_policies.model.adminpolicy import UnknownPeer
from kube_network_policies.model.errors import FieldError
from kube_network_policies.sources.codecs import codec_for
from kube_network_policies.sources.resources import NETWORK_POLICIES, PODS, resource


def pod(ips: list[str] | None = None, **meta: Any) -> dict[str, Any]:
    """Pod x/p, with a spec of nodeName only: the fields under test are metadata and status."""
    meta = {"name": "p", "namespace": "x", **meta}
    return builders.pod(meta.pop("namespace"), meta.pop("name"), ips or (), spec={"nodeName": "n"}, **meta)


def np(spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    meta = {"name": "np", "namespace": "x", **meta}
    return builders.network_policy(meta.pop("namespace"), meta.pop("name"), spec, **meta)


def anp(spec: dict[str, Any], name: str = "a") -> dict[str, Any]:
    return builders.admin_network_policy(name, None, {"priority": 10, "subject": {"namespaces": {}}, **spec})


def cnp(spec: dict[str, Any]) -> dict[str, Any]:
    return builders.cluster_network_policy("c", None, None, {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}}, **spec})


def errors(obj: dict[str, Any], *, strict: bool = True) -> list[FieldError]:
    with pytest.raises(ValidationError) as info:
        parse_object(obj, strict=strict)
    return list(info.value.errors)


def messages(obj: dict[str, Any], *, strict: bool = True) -> list[str]:
    return [str(e) for e in errors(obj, strict=strict)]


# --- addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("ip", ["fd00::99%x", "fe80::1%eth0", " 10.0.0.1", "10.0.0.1 "])
def test_zones_and_spaces_are_never_addresses(ip: str, strict: bool) -> None:
    (e,) = errors(pod([ip]), strict=strict)
    assert e.path == "status.podIPs[0].ip" and "invalid IP address" in e.message


@pytest.mark.parametrize("strict", [True, False])
def test_zones_are_not_cidrs(strict: bool) -> None:
    obj = np({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00::%eth0/64"}}]}]})
    (e,) = errors(obj, strict=strict)
    assert "zones" in e.message


def test_pods_from_the_api_with_zoned_addresses_are_refused_others_read_as_the_api_server_does() -> None:
    codec = codec_for(PODS)
    _, parsed, _, error = codec.item(json.dumps(pod(["fd00::99%x"])).encode())
    assert parsed is None and error is not None and error.errors[0].path == "status.podIPs[0].ip"
    for written, read in (("010.1.1.1", "10.1.1.1"), ("::ffff:1.2.3.4", "1.2.3.4")):
        _, parsed, _, error = codec.item(json.dumps(pod([written])).encode())
        assert error is None and parsed.ips == (read,)  # type: ignore[union-attr]


def test_node_address_with_zone() -> None:
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "n"},
        "status": {"addresses": [{"type": "InternalIP", "address": "fd00::1%eth0"}]},
    }
    (e,) = errors(node, strict=False)
    assert e.path == "status.addresses[0].address"


def test_leading_zeros_and_ipv4_mapped_refused_in_files_read_as_the_api_server_reads_them() -> None:
    assert messages(pod(["010.1.1.1"])) == ["status.podIPs[0].ip: invalid IP address '010.1.1.1': must not have leading 0s"]
    assert "IPv4-mapped" in messages(pod(["::ffff:1.2.3.4"]))[0]
    assert parse_object(pod(["010.1.1.1"])).ips == ("10.1.1.1",)  # type: ignore[union-attr]
    assert parse_object(pod(["::ffff:1.2.3.4"])).ips == ("1.2.3.4",)  # type: ignore[union-attr]
    block = np({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["010.0.0.0/08", "::ffff:11.0.0.0/104"]}}]}]})
    assert [e.path for e in errors(block)] == ["spec.ingress[0].from[0].ipBlock.except[0]", "spec.ingress[0].from[0].ipBlock.except[1]"]
    peer = parse_object(block).ingress[0].peers[0]  # type: ignore[union-attr]
    assert peer.block.describe() == "0.0.0.0/0 except 10.0.0.0/8, 11.0.0.0/8"  # type: ignore[union-attr]


def test_pod_ips_as_the_api_server_requires_them() -> None:
    assert messages(pod(["10.0.0.1", "10.0.0.2"])) == ["status.podIPs: must not hold two addresses of the same family"]
    obj = pod(["10.0.0.1", "fd00::1"])
    obj["status"]["podIP"] = "10.0.0.9"
    assert messages(obj) == ["status.podIP: must equal status.podIPs[0].ip (10.0.0.1), got '10.0.0.9'"]
    assert parse_object(pod(["10.0.0.1", "FD00::1"]), strict=True).ips == ("10.0.0.1", "fd00::1")  # type: ignore[union-attr]


# --- names and labels ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        (np({"podSelector": {}}, name="Bad_Name"), "metadata.name"),
        (np({"podSelector": {}}, name=""), "metadata.name"),
        (np({"podSelector": {}}, namespace="a.b"), "metadata.namespace"),
        ({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a.b"}}, "metadata.name"),
        (pod(name="x" * 254), "metadata.name"),
        (anp({}, name="UPPER"), "metadata.name"),
    ],
)
def test_names_follow_the_api_servers_rule_for_the_kind(obj: dict[str, Any], path: str) -> None:
    assert [e.path for e in errors(obj)] == [path]


def test_dotted_names_are_valid_subdomains() -> None:
    parse_object(np({"podSelector": {}}, name="allow.web-1"), strict=True)
    parse_object(pod(name="web.1"), strict=True)


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ({"a/b/c": "x"}, "at most one '/'"),
        ({"/b": "x"}, "prefix before '/' must not be empty"),
        ({"Example.COM/b": "x"}, "prefix"),
        ({"x" * 64: "v"}, "no more than 63"),
        ({"-a": "v"}, "starts and ends"),
        ({"a": "-v"}, "invalid label value"),
        ({"a": "v" * 64}, "no more than 63"),
        ({"a": "sp ace"}, "invalid label value"),
    ],
)
def test_label_syntax_in_metadata_and_network_policy_selectors(labels: dict[str, str], problem: str) -> None:
    (e,) = errors(pod(labels=labels))
    assert e.path.startswith("metadata.labels.") and problem in e.message
    key, value = next(iter(labels.items()))
    sel = {"matchLabels": labels, "matchExpressions": [{"key": key, "operator": "In", "values": [value]}]}
    paths = [e.path for e in errors(np({"podSelector": sel}))]
    assert paths[0].startswith("spec.podSelector.matchLabels.")
    assert paths[1] in ("spec.podSelector.matchExpressions[0].key", "spec.podSelector.matchExpressions[0].values[0]")


def test_valid_labels_pass() -> None:
    labels = {"app.kubernetes.io/name": "web", "a": "", "x_y.z-1": "A.b_c-9", "k" * 63: "v" * 63}
    assert parse_object(pod(labels=labels), strict=True).labels.as_dict() == labels  # type: ignore[union-attr]


def test_crd_selectors_take_any_key_as_the_api_server_does() -> None:
    """The policy CRDs declare selector keys as plain strings: the API server accepts any."""
    obj = anp({"subject": {"namespaces": {"matchLabels": {"odd key!": "any value?"}}}})
    policy = parse_object(obj, strict=True)
    assert policy.subject.namespace_selector.describe() == "odd key!=any value?"  # type: ignore[union-attr]


# --- list sizes ---------------------------------------------------------------------------------


def test_crd_max_items_for_files_only() -> None:
    rule = {"action": "Deny", "from": [{"namespaces": {}}]}
    obj = anp({"ingress": [rule] * 101})
    assert messages(obj) == ["spec.ingress: must have at most 100 entries, got 101"]
    assert len(parse_object(obj).ingress) == 101  # type: ignore[union-attr]  # a newer CRD may allow more
    assert messages(anp({"egress": [{"action": "Deny", "to": [{"namespaces": {}}] * 101}]})) == [
        "spec.egress[0].to: must have at most 100 entries, got 101"
    ]
    v2 = cnp({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}] * 26})
    assert messages(v2) == ["spec.ingress: must have at most 25 entries, got 26"]
    ports = [{"portNumber": {"port": 80, "protocol": "TCP"}}] * 101
    assert messages(anp({"ingress": [{**rule, "ports": ports}]})) == ["spec.ingress[0].ports: must have at most 100 entries, got 101"]


def test_cnp_pods_peer_without_namespace_selector_means_every_namespace() -> None:
    obj = cnp({"ingress": [{"action": "Deny", "from": [{"pods": {"podSelector": {"matchLabels": {"app": "a"}}}}]}]})
    for strict in (True, False):
        peer = parse_object(obj, strict=strict).ingress[0].peers[0]  # type: ignore[union-attr]
        assert peer.namespace_selector.matches_all and peer.pod_selector.describe() == "app=a"  # type: ignore[union-attr]


# --- unknown fields -----------------------------------------------------------------------------


def test_unknown_fields_are_errors_in_files_with_their_paths() -> None:
    obj = np({"podSelector": {}, "ingres": [{"from": [{"podSelector": {}}]}]})
    assert messages(obj) == ["spec.ingres: unknown field (did you mean ingress?)"]
    obj = anp({"ingress": [{"action": "Allow", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {}, "podselector": {}}}], "prots": []}]})
    assert [e.path for e in errors(obj)] == ["spec.ingress[0].prots", "spec.ingress[0].from[0].pods.podselector"]
    obj = pod(["10.0.0.1"])
    obj["metadata"]["lables"] = {"app": "a"}
    obj["spec"]["hostnetwork"] = True
    obj["spec"]["containers"] = [{"name": "c", "image": "i", "ports": [{"containerPort": 80, "protcol": "UDP"}]}]
    assert messages(obj) == [
        "metadata.lables: unknown field (did you mean labels?)",
        "spec.hostnetwork: unknown field (did you mean hostNetwork?)",
        "spec.containers[0].ports[0].protcol: unknown field (did you mean protocol?)",
    ]


def test_unknown_fields_from_the_api_are_accepted() -> None:
    """A newer CRD version may carry fields this agent does not know: a policy from the API
    server must not be dropped for them (sources.codecs parses non-strict)."""
    obj = anp({"newField": 1, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "newRuleField": {}}]})
    policy = parse_object(obj)
    assert len(policy.ingress) == 1  # type: ignore[union-attr]
    key, parsed, _, error = codec_for(resource("AdminNetworkPolicy")).item(json.dumps(obj).encode())
    assert error is None and parsed == policy and key == ("AdminNetworkPolicy", "", "a")
    obj2 = cnp({"ingress": [{"action": "Deny", "from": [{"futurePeer": {}}]}]})
    _, parsed2, _, error2 = codec_for(resource("ClusterNetworkPolicy")).item(json.dumps(obj2).encode())
    assert error2 is None and isinstance(parsed2.ingress[0].peers[0], UnknownPeer)  # type: ignore[union-attr]
    obj3 = np({"podSelector": {}, "futureSpecField": True}, labels={"odd": "-x"})
    _, parsed3, _, error3 = codec_for(NETWORK_POLICIES).item(json.dumps(obj3).encode())
    assert error3 is None and parsed3 is not None


def test_admin_peer_with_only_unknown_fields_fails_closed_even_in_files() -> None:
    """The API specifies what a consumer does with a peer it does not know: fail closed. A
    typo beside a known field is an error."""
    peer = parse_object(cnp({"ingress": [{"action": "Deny", "from": [{"futurePeerType": {}}]}]}), strict=True).ingress[0].peers[0]  # type: ignore[union-attr]
    assert isinstance(peer, UnknownPeer)
    obj = cnp({"ingress": [{"action": "Deny", "from": [{"namespaces": {}, "futurePeerType": {}}]}]})
    assert [e.path for e in errors(obj)] == ["spec.ingress[0].from[0].futurePeerType"]


def test_all_problems_at_once_in_the_usual_format() -> None:
    obj = np({"podSelector": {"matchLabels": {"a": "-"}}, "ingres": [], "policyTypes": ["Ingress", "Egress", "Ingress"]}, name="Bad")
    with pytest.raises(ValidationError) as info:
        parse_object(copy.deepcopy(obj), strict=True)
    assert info.value.describe().splitlines() == [
        "NetworkPolicy x/Bad: 4 problems",
        "  - metadata.name: invalid name 'Bad': a DNS-1123 subdomain consists of lowercase letters, digits, '-' and '.', and starts and ends with a letter or digit",
        "  - spec.ingres: unknown field (did you mean ingress?)",
        "  - spec.podSelector.matchLabels.a: invalid label value '-': letters, digits, '-', '_' and '.', starting and ending with a letter or digit (or empty)",
        "  - spec.policyTypes: may not hold more than 2 entries, got 3",
    ]
