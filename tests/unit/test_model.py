"""Tests for the model layer: parsing plain dicts into typed objects, defaulting and validation.

Every error test asserts the ValidationError subject and the exact FieldError paths, because those
are what a user sees when an object is refused.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

import builders  # tests/builders.py
from kube_network_policies.model import (
    AdminNetworkPolicy,
    BaselineAdminNetworkPolicy,
    ClusterNetworkPolicy,
    ContainerPort,
    FieldError,
    LabelSet,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    ValidationError,
    object_key,
    parse_object,
)
from kube_network_policies.model.adminpolicy import (
    ADMIN_TIER,
    ALLOW,
    BASELINE_TIER,
    DENY,
    PASS,
    DomainNamesPeer,
    NamedPort,
    NetworksPeer,
    NodesPeer,
    PodsPeer,
    PortRange,
    UnknownPeer,
    parse_admin_network_policy,
    parse_baseline_admin_network_policy,
    parse_cluster_network_policy,
)
from kube_network_policies.model.core import parse_namespace, parse_node, parse_pod
from kube_network_policies.model.fields import Fields
from kube_network_policies.model.ipnet import Cidr, IPBlock, canonical_address, parse_cidr
from kube_network_policies.model.networkpolicy import (
    EGRESS,
    INGRESS,
    IPBlockPeer,
    NetworkPolicyPort,
    NetworkPolicyRule,
    PodPeer,
    parse_network_policy,
)
from kube_network_policies.model.selectors import MATCH_ALL

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def errors_of(fn, obj) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        fn(obj)
    return info.value


def paths(err: ValidationError) -> list[str]:
    return [e.path for e in err.errors]


def np_obj(spec: dict[str, Any] | None = None, *, name: str = "np", namespace: str | None = "x") -> dict[str, Any]:
    return builders.network_policy(namespace, name, {"podSelector": {}} if spec is None else spec)


def ingress_peers(*peers: Any) -> dict[str, Any]:
    return np_obj({"podSelector": {}, "ingress": [{"from": list(peers)}]})


def ingress_ports(*ports: Any) -> dict[str, Any]:
    return np_obj({"podSelector": {}, "ingress": [{"ports": list(ports)}]})


def one_port(port: Any) -> NetworkPolicyPort:
    (rule,) = parse_network_policy(ingress_ports(port)).ingress
    (p,) = rule.ports
    return p


def one_peer(peer: Any):
    (rule,) = parse_network_policy(ingress_peers(peer)).ingress
    (p,) = rule.peers
    return p


def pod_obj(
    *, name: str = "p1", namespace: str = "ns1", labels: Any = None, spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Pod ns1/p1 (app=web) on node-a, Running at 10.0.0.1; `spec` and `status` replace whole."""
    labels = {"app": "web"} if labels is None else labels
    return builders.pod(namespace, name, "10.0.0.1", node="node-a", labels=labels, spec=spec, status=status)


def anp_obj(spec: dict[str, Any], name: str = "anp") -> dict[str, Any]:
    return builders.admin_network_policy(name, None, spec)


def banp_obj(spec: dict[str, Any], name: str = "default") -> dict[str, Any]:
    return builders.baseline_admin_network_policy(spec, name)


def cnp_obj(spec: dict[str, Any], name: str = "cnp") -> dict[str, Any]:
    return builders.cluster_network_policy(name, None, None, spec)


def anp_spec(**kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"priority": 10, "subject": {"namespaces": {}}}
    spec.update(kw)
    return spec


def cnp_spec(**kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}}}
    spec.update(kw)
    return spec


def anp_egress_rule(**kw: Any) -> Any:
    p = parse_admin_network_policy(anp_obj(anp_spec(egress=[kw])))
    (rule,) = p.egress
    return rule


# --------------------------------------------------------------------------------------------------
# errors.py
# --------------------------------------------------------------------------------------------------


class TestValidationError:
    def test_single_error_message(self):
        e = ValidationError("NetworkPolicy x/np", [FieldError("spec.a", "bad")])
        assert str(e) == "NetworkPolicy x/np: spec.a: bad"
        assert e.subject == "NetworkPolicy x/np"
        assert e.errors == (FieldError("spec.a", "bad"),)
        assert isinstance(e, ValueError)

    def test_multiple_errors_message(self):
        e = ValidationError("Pod a/b", [FieldError("x", "one"), FieldError("", "two")])
        assert str(e) == "Pod a/b: 2 problems\n  - x: one\n  - two"

    def test_field_error_without_path(self):
        assert str(FieldError("", "just a message")) == "just a message"

    def test_within_prefixes_subject(self):
        e = ValidationError("Pod a/b", [FieldError("x", "one")]).within("file.yaml")
        assert e.subject == "file.yaml: Pod a/b"
        assert e.errors == (FieldError("x", "one"),)
        assert str(e) == "file.yaml: Pod a/b: x: one"


# --------------------------------------------------------------------------------------------------
# fields.py
# --------------------------------------------------------------------------------------------------


class TestFields:
    def test_join(self):
        assert Fields.join("", "spec") == "spec"
        assert Fields.join("spec", "ingress") == "spec.ingress"
        assert Fields.join("spec.ingress", 3) == "spec.ingress[3]"

    def test_sequence_absent_null_and_empty_are_distinguished(self):
        f = Fields()
        assert f.sequence({}, "a", "s") is None
        assert f.sequence({"a": None}, "a", "s") is None
        assert f.sequence({"a": []}, "a", "s") == []
        assert f.errors == []

    def test_required_and_type_errors(self):
        f = Fields()
        assert f.mapping({}, "m", "p", required=True) is None
        assert f.mapping({"m": []}, "m", "p") is None
        assert f.sequence({"s": {}}, "s", "p") is None
        assert f.string({"s": 1}, "s", "p", default="d") == "d"
        assert f.integer({"i": "1"}, "i", "p") is None
        assert f.integer({"i": True}, "i", "p") is None  # a bool is not an integer
        assert f.integer({"i": 0}, "i", "p", minimum=1, maximum=5) is None
        assert f.boolean({"b": "true"}, "b", "p") is False
        assert [(e.path, e.message) for e in f.errors] == [
            ("p.m", "required field is missing"),
            ("p.m", "must be an object, got a list"),
            ("p.s", "must be a list, got an object"),
            ("p.s", "must be a string, got an integer"),
            ("p.i", "must be an integer, got a string '1'"),
            ("p.i", "must be an integer, got a boolean True"),
            ("p.i", "must be between 1 and 5, got 0"),
            ("p.b", "must be true or false, got 'true'"),
        ]

    def test_reading_from_a_non_mapping_is_absent(self):
        f = Fields()
        assert f.string([], "a", "p") is None  # type: ignore[arg-type]
        assert f.errors == []


# --------------------------------------------------------------------------------------------------
# ipnet.py
# --------------------------------------------------------------------------------------------------


def cidr(text: Any) -> Cidr:
    f = Fields()
    c = parse_cidr(f, text, "c")
    assert f.errors == [] and c is not None, f.errors
    return c


def cidr_error(text: Any) -> FieldError:
    f = Fields()
    assert parse_cidr(f, text, "c") is None
    (e,) = f.errors
    assert e.path == "c"
    return e


class TestCidr:
    @pytest.mark.parametrize(
        "text,canonical,family,prefix",
        [
            ("10.0.0.0/8", "10.0.0.0/8", 4, 8),
            ("10.0.0.5/24", "10.0.0.0/24", 4, 24),
            ("192.168.1.77/32", "192.168.1.77/32", 4, 32),
            ("0.0.0.0/0", "0.0.0.0/0", 4, 0),
            ("1.2.3.4/0", "0.0.0.0/0", 4, 0),
            ("fd00::/8", "fd00::/8", 6, 8),
            ("FD00:0:0:0::5/64", "fd00::/64", 6, 64),
            ("2001:db8::1/128", "2001:db8::1/128", 6, 128),
            ("::/0", "::/0", 6, 0),
        ],
    )
    def test_canonicalisation(self, text, canonical, family, prefix):
        c = cidr(text)
        assert str(c) == canonical
        assert c.family == family and c.prefix == prefix

    def test_integer_representation(self):
        c = cidr("10.1.2.3/16")
        assert c.network == 0x0A010000
        assert c.mask == 0xFFFF0000
        c6 = cidr("fd00::/8")
        assert c6.mask == 0xFF << 120
        assert c6.network == 0xFD << 120

    def test_contains(self):
        c = cidr("10.0.0.0/24")
        assert c.contains(4, int.from_bytes(bytes([10, 0, 0, 200]), "big"))
        assert not c.contains(4, int.from_bytes(bytes([10, 0, 1, 0]), "big"))
        assert not c.contains(6, 0x0A000001)  # same integer, other family
        assert cidr("0.0.0.0/0").contains(4, 0xFFFFFFFF)
        assert not cidr("::/0").contains(4, 1)

    def test_covers(self):
        assert cidr("10.0.0.0/8").covers(cidr("10.1.0.0/16"))
        assert cidr("10.0.0.0/8").covers(cidr("10.0.0.0/8"))
        assert not cidr("10.1.0.0/16").covers(cidr("10.0.0.0/8"))
        assert not cidr("10.0.0.0/8").covers(cidr("11.0.0.0/16"))
        assert not cidr("0.0.0.0/0").covers(cidr("::/0"))

    @pytest.mark.parametrize(
        "text",
        ["10.0.0.0/33", "10.0.0.256/24", "foo/8", "10.0.0.0/x", "fd00::/129", "10.0.0/8", "/8", "10.0.0.0/-1"],
    )
    def test_invalid_cidrs(self, text):
        e = cidr_error(text)
        assert e.message.startswith(f"invalid CIDR {text!r}")

    def test_missing_prefix_length(self):
        assert "missing /prefix-length" in cidr_error("10.0.0.1").message
        assert "missing /prefix-length" in cidr_error("fd00::1").message

    @pytest.mark.parametrize("value", [10, None, ["10.0.0.0/8"], {"cidr": "10.0.0.0/8"}])
    def test_non_string(self, value):
        assert "must be a CIDR string" in cidr_error(value).message

    def test_ipv4_mapped_ipv6_refused_in_files_read_as_ipv4_from_the_api(self):
        f = Fields(strict=True)
        assert parse_cidr(f, "::ffff:10.0.0.0/104", "c") is None
        assert "IPv4-mapped" in f.errors[0].message
        # Non-strict (objects the API server stored): read as the API server's Go parser reads it.
        assert str(cidr("::ffff:10.0.0.0/104")) == "10.0.0.0/8"

    def test_ip_block_contains_honours_excepts(self):
        block = IPBlock(cidr("10.0.0.0/8"), (cidr("10.1.0.0/16"),))
        ip = lambda s: int.from_bytes(bytes(map(int, s.split("."))), "big")  # noqa: E731
        assert block.contains(4, ip("10.2.3.4"))
        assert not block.contains(4, ip("10.1.3.4"))
        assert not block.contains(4, ip("11.0.0.1"))
        assert block.describe() == "10.0.0.0/8 except 10.1.0.0/16"
        assert IPBlock(cidr("10.0.0.0/8"), ()).describe() == "10.0.0.0/8"

    def test_canonical_address(self):
        assert canonical_address("FD00:0000::0001") == "fd00::1"


# --------------------------------------------------------------------------------------------------
# NetworkPolicy
# --------------------------------------------------------------------------------------------------


class TestNetworkPolicyHappyPath:
    def test_full_policy(self):
        obj = np_obj(
            {
                "podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {
                        "from": [
                            {"podSelector": {"matchLabels": {"role": "client"}}},
                            {"namespaceSelector": {"matchLabels": {"team": "a"}}},
                            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "mon"}}},
                            {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
                        ],
                        "ports": [{"protocol": "TCP", "port": 6379}, {"port": "http"}, {"protocol": "UDP", "port": 1000, "endPort": 2000}],
                    }
                ],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}], "ports": [{"protocol": "SCTP", "port": 5978}]}],
            }
        )
        np = parse_network_policy(obj)
        assert isinstance(np, NetworkPolicy)
        assert (np.namespace, np.name, np.key) == ("x", "np", "x/np")
        assert np.pod_selector.matches(LabelSet({"app": "web"}))
        assert not np.pod_selector.matches(LabelSet({"app": "db"}))
        assert np.policy_types == frozenset({INGRESS, EGRESS})
        (ing,) = np.ingress
        p0, p1, p2, p3 = ing.peers
        assert isinstance(p0, PodPeer) and p0.namespace_selector is None
        assert p0.pod_selector.matches(LabelSet({"role": "client"}))
        assert isinstance(p1, PodPeer) and p1.pod_selector is None
        assert p1.namespace_selector.matches(LabelSet({"team": "a"}))
        assert isinstance(p2, PodPeer) and p2.namespace_selector is MATCH_ALL
        assert p2.pod_selector.matches(LabelSet({"role": "mon"}))
        assert p3 == IPBlockPeer(IPBlock(cidr("172.17.0.0/16"), (cidr("172.17.1.0/24"),)))
        assert ing.ports == (
            NetworkPolicyPort("TCP", 6379, None, None),
            NetworkPolicyPort("TCP", None, "http", None),
            NetworkPolicyPort("UDP", 1000, None, 2000),
        )
        (eg,) = np.egress
        assert eg.peers == (IPBlockPeer(IPBlock(cidr("10.0.0.0/24"), ())),)
        assert eg.ports == (NetworkPolicyPort("SCTP", 5978, None, None),)

    def test_parse_object_dispatches(self):
        np = parse_object(np_obj())
        assert isinstance(np, NetworkPolicy)
        assert object_key(np) == ("NetworkPolicy", "x", "np")

    def test_namespace_defaults_to_default(self):
        np = parse_network_policy(np_obj(namespace=None))
        assert np.namespace == "default"

    def test_pod_selector_absent_or_empty_selects_all(self):
        assert parse_network_policy(np_obj({})).pod_selector is MATCH_ALL
        assert parse_network_policy(np_obj({"podSelector": {}})).pod_selector is MATCH_ALL

    def test_empty_peer_selectors_are_kept_distinct_from_absent(self):
        peer = one_peer({"podSelector": {}})
        assert peer == PodPeer(MATCH_ALL, None)
        peer = one_peer({"namespaceSelector": {}})
        assert peer == PodPeer(None, MATCH_ALL)

    def test_policy_is_immutable(self):
        np = parse_network_policy(np_obj())
        with pytest.raises(AttributeError):
            np.name = "other"  # type: ignore[misc]

    def test_input_is_not_modified(self):
        obj = np_obj({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.5/24"}}], "ports": [{"port": 80}]}]})
        before = copy.deepcopy(obj)
        parse_network_policy(obj)
        assert obj == before


class TestNetworkPolicyRulesRepresentation:
    def test_absent_ingress_is_no_rules(self):
        np = parse_network_policy(np_obj({"podSelector": {}}))
        assert np.ingress == ()
        assert np.policy_types == frozenset({INGRESS})

    def test_empty_ingress_list_is_no_rules(self):
        np = parse_network_policy(np_obj({"podSelector": {}, "ingress": []}))
        assert np.ingress == ()
        assert np.policy_types == frozenset({INGRESS})

    def test_ingress_with_empty_rule_allows_everything(self):
        np = parse_network_policy(np_obj({"podSelector": {}, "ingress": [{}]}))
        assert np.ingress == (NetworkPolicyRule((), ()),)

    def test_null_rule_is_an_empty_rule(self):
        np = parse_network_policy(np_obj({"podSelector": {}, "ingress": [None]}))
        assert np.ingress == (NetworkPolicyRule((), ()),)

    def test_empty_from_and_ports_lists_mean_all(self):
        np = parse_network_policy(np_obj({"podSelector": {}, "ingress": [{"from": [], "ports": []}]}))
        assert np.ingress == (NetworkPolicyRule((), ()),)

    def test_egress_rule_uses_to(self):
        np = parse_network_policy(np_obj({"podSelector": {}, "egress": [{"to": [{"podSelector": {}}]}]}))
        assert np.egress == (NetworkPolicyRule((PodPeer(MATCH_ALL, None),), ()),)
        assert np.ingress == ()

    def test_rules_keep_order(self):
        np = parse_network_policy(
            np_obj({"podSelector": {}, "ingress": [{"ports": [{"port": 1}]}, {"ports": [{"port": 2}]}, {"ports": [{"port": 3}]}]})
        )
        assert [r.ports[0].port for r in np.ingress] == [1, 2, 3]


class TestPolicyTypesDefaulting:
    @pytest.mark.parametrize(
        "spec,expected",
        [
            ({}, {INGRESS}),
            ({"policyTypes": None}, {INGRESS}),
            ({"policyTypes": []}, {INGRESS}),
            ({"ingress": [{}]}, {INGRESS}),
            ({"egress": []}, {INGRESS}),
            ({"egress": None}, {INGRESS}),
            ({"egress": [{}]}, {INGRESS, EGRESS}),
            ({"egress": [{"to": [{"ipBlock": {"cidr": "1.1.1.1/32"}}]}]}, {INGRESS, EGRESS}),
            ({"policyTypes": [], "egress": [{}]}, {INGRESS, EGRESS}),
            ({"ingress": [], "egress": [{}]}, {INGRESS, EGRESS}),
        ],
        ids=[
            "absent",
            "null",
            "empty",
            "ingress-rules",
            "egress-empty-list",
            "egress-null",
            "egress-empty-rule",
            "egress-rule",
            "empty-types-with-egress",
            "empty-ingress-with-egress",
        ],
    )
    def test_defaulting(self, spec, expected):
        spec = {"podSelector": {}, **spec}
        assert parse_network_policy(np_obj(spec)).policy_types == frozenset(expected)

    @pytest.mark.parametrize("types", [["Ingress"], ["Egress"], ["Ingress", "Egress"], ["Egress", "Ingress"], ["Egress", "Egress"]])
    def test_explicit_types_are_kept(self, types):
        np = parse_network_policy(np_obj({"podSelector": {}, "policyTypes": types, "ingress": [{}], "egress": [{}]}))
        assert np.policy_types == frozenset(types)

    def test_explicit_egress_only_with_ingress_rules(self):
        np = parse_network_policy(np_obj({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}))
        assert np.policy_types == frozenset({EGRESS})
        assert np.egress == ()  # deny all egress

    def test_unknown_policy_type(self):
        err = errors_of(parse_network_policy, np_obj({"podSelector": {}, "policyTypes": ["Ingress", "ingress", "Both"]}))
        assert err.subject == "NetworkPolicy x/np"
        assert paths(err) == ["spec.policyTypes[1]", "spec.policyTypes[2]"]
        assert "'ingress'" in err.errors[0].message

    def test_policy_types_must_be_a_list(self):
        err = errors_of(parse_network_policy, np_obj({"podSelector": {}, "policyTypes": "Ingress"}))
        assert paths(err) == ["spec.policyTypes"]


class TestNetworkPolicyPorts:
    def test_protocol_defaults_to_tcp(self):
        assert one_port({"port": 80}) == NetworkPolicyPort("TCP", 80, None, None)
        assert one_port({"protocol": None, "port": 80}).protocol == "TCP"

    def test_protocol_only_means_every_port(self):
        assert one_port({"protocol": "UDP"}) == NetworkPolicyPort("UDP", None, None, None)
        assert one_port({}) == NetworkPolicyPort("TCP", None, None, None)

    @pytest.mark.parametrize("proto", ["TCP", "UDP", "SCTP"])
    def test_protocols(self, proto):
        assert one_port({"protocol": proto, "port": 53}).protocol == proto

    def test_string_of_digits_is_a_number(self):
        assert one_port({"port": "80"}) == NetworkPolicyPort("TCP", 80, None, None)
        assert one_port({"port": "65535"}).port == 65535

    def test_string_digits_allow_end_port(self):
        assert one_port({"port": "80", "endPort": 90}) == NetworkPolicyPort("TCP", 80, None, 90)

    @pytest.mark.parametrize("name", ["http", "h", "web-8080", "a1", "1a", "a-b-c", "abcdefghijklmno", "9x9"])
    def test_valid_named_ports(self, name):
        assert one_port({"port": name}) == NetworkPolicyPort("TCP", None, name, None)

    def test_named_port_with_udp(self):
        assert one_port({"protocol": "UDP", "port": "dns"}) == NetworkPolicyPort("UDP", None, "dns", None)

    @pytest.mark.parametrize(
        "name",
        ["HTTP", "Http", "-http", "http-", "ht--tp", "abcdefghijklmnop", "web_1", "web.1", "http ", "wéb", "", "80a!"],
    )
    def test_invalid_named_ports(self, name):
        err = errors_of(parse_network_policy, ingress_ports({"port": name}))
        assert paths(err) == ["spec.ingress[0].ports[0].port"]
        assert "invalid port name" in err.errors[0].message

    @pytest.mark.parametrize("port", [0, 65536, -1, "0", "65536", "99999"])
    def test_port_out_of_range(self, port):
        err = errors_of(parse_network_policy, ingress_ports({"port": port}))
        assert paths(err) == ["spec.ingress[0].ports[0].port"]
        assert "between 1 and 65535" in err.errors[0].message

    @pytest.mark.parametrize("port", [True, 80.0, ["80"], {"n": 80}])
    def test_port_wrong_type(self, port):
        err = errors_of(parse_network_policy, ingress_ports({"port": port}))
        assert paths(err) == ["spec.ingress[0].ports[0].port"]

    @pytest.mark.parametrize("port", ["²", "٣"])
    def test_unicode_digit_port_is_a_validation_error(self, port):
        err = errors_of(parse_network_policy, ingress_ports({"port": port}))
        assert paths(err) == ["spec.ingress[0].ports[0].port"]

    @pytest.mark.parametrize("proto", ["tcp", "ICMP", "udp", "Tcp"])
    def test_unsupported_protocol(self, proto):
        err = errors_of(parse_network_policy, ingress_ports({"protocol": proto, "port": 80}))
        assert paths(err) == ["spec.ingress[0].ports[0].protocol"]

    def test_protocol_must_be_string(self):
        err = errors_of(parse_network_policy, ingress_ports({"protocol": 6, "port": 80}))
        assert paths(err) == ["spec.ingress[0].ports[0].protocol"]

    def test_end_port_range(self):
        assert one_port({"port": 1000, "endPort": 2000}) == NetworkPolicyPort("TCP", 1000, None, 2000)
        assert one_port({"port": 1000, "endPort": 1000}).end_port == 1000  # equal is allowed

    def test_end_port_less_than_port(self):
        err = errors_of(parse_network_policy, ingress_ports({"port": 1000, "endPort": 999}))
        assert paths(err) == ["spec.ingress[0].ports[0].endPort"]
        assert "greater than or equal to port (1000)" in err.errors[0].message

    def test_end_port_with_named_port(self):
        err = errors_of(parse_network_policy, ingress_ports({"port": "http", "endPort": 90}))
        assert paths(err) == ["spec.ingress[0].ports[0].endPort"]
        assert "numeric port" in err.errors[0].message

    def test_end_port_without_port(self):
        err = errors_of(parse_network_policy, ingress_ports({"protocol": "TCP", "endPort": 90}))
        assert paths(err) == ["spec.ingress[0].ports[0].endPort"]

    @pytest.mark.parametrize("end", [0, 65536, "90", True])
    def test_end_port_invalid_value(self, end):
        err = errors_of(parse_network_policy, ingress_ports({"port": 80, "endPort": end}))
        assert paths(err) == ["spec.ingress[0].ports[0].endPort"]

    def test_unknown_port_field(self):
        err = errors_of(parse_network_policy, ingress_ports({"port": 80, "portNumber": 80}))
        assert paths(err) == ["spec.ingress[0].ports[0].portNumber"]

    def test_port_entry_must_be_object(self):
        err = errors_of(parse_network_policy, ingress_ports(80))
        assert paths(err) == ["spec.ingress[0].ports[0]"]


class TestNetworkPolicyPeers:
    def test_ip_block_canonicalised(self):
        peer = one_peer({"ipBlock": {"cidr": "10.0.0.5/24", "except": ["10.0.0.130/25"]}})
        assert isinstance(peer, IPBlockPeer)
        assert str(peer.block.cidr) == "10.0.0.0/24"
        assert [str(e) for e in peer.block.excepts] == ["10.0.0.128/25"]

    def test_ip_block_ipv6(self):
        peer = one_peer({"ipBlock": {"cidr": "FD00::/16", "except": ["fd00:1::/32"]}})
        assert str(peer.block.cidr) == "fd00::/16"
        assert peer.block.cidr.family == 6
        assert [str(e) for e in peer.block.excepts] == ["fd00:1::/32"]

    def test_ip_block_empty_except(self):
        assert one_peer({"ipBlock": {"cidr": "0.0.0.0/0", "except": []}}).block.excepts == ()

    @pytest.mark.parametrize(
        "exc",
        ["10.0.0.0/8", "10.0.0.0/7", "11.0.0.0/16", "fd00::/16", "9.255.255.255/32"],
        ids=["equal", "wider", "disjoint", "other-family", "outside"],
    )
    def test_except_must_be_strict_subset(self, exc):
        err = errors_of(parse_network_policy, ingress_peers({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", exc]}}))
        assert err.subject == "NetworkPolicy x/np"
        assert paths(err) == ["spec.ingress[0].from[0].ipBlock.except[1]"]
        assert "strict subset of 10.0.0.0/8" in err.errors[0].message

    def test_except_invalid_cidr(self):
        err = errors_of(parse_network_policy, ingress_peers({"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["bogus"]}}))
        assert paths(err) == ["spec.ingress[0].from[1].ipBlock.except[0]"]

    def test_bad_cidr(self):
        err = errors_of(parse_network_policy, ingress_peers({"ipBlock": {"cidr": "10.0.0.0/40"}}))
        assert paths(err) == ["spec.ingress[0].from[0].ipBlock.cidr"]
        assert "invalid CIDR '10.0.0.0/40'" in err.errors[0].message

    def test_bad_cidr_with_except_reports_only_cidr(self):
        err = errors_of(parse_network_policy, ingress_peers({"ipBlock": {"cidr": "nope", "except": ["10.1.0.0/16"]}}))
        assert paths(err) == ["spec.ingress[0].from[0].ipBlock.cidr"]

    def test_cidr_missing(self):
        err = errors_of(parse_network_policy, ingress_peers({"ipBlock": {"except": ["10.0.0.0/24"]}}))
        assert paths(err) == ["spec.ingress[0].from[0].ipBlock.cidr"]
        assert err.errors[0].message == "required field is missing"

    @pytest.mark.parametrize("sel", ["podSelector", "namespaceSelector"])
    def test_ip_block_with_selector(self, sel):
        err = errors_of(parse_network_policy, ingress_peers({"ipBlock": {"cidr": "10.0.0.0/8"}, sel: {}}))
        assert paths(err) == ["spec.ingress[0].from[0]"]
        assert "cannot be combined" in err.errors[0].message

    def test_ip_block_must_be_object(self):
        err = errors_of(parse_network_policy, ingress_peers({"ipBlock": "10.0.0.0/8"}))
        assert "spec.ingress[0].from[0].ipBlock" in paths(err)

    def test_empty_peer(self):
        err = errors_of(parse_network_policy, ingress_peers({}))
        assert paths(err) == ["spec.ingress[0].from[0]"]
        assert "must specify podSelector, namespaceSelector or ipBlock" in err.errors[0].message

    def test_peer_with_only_null_fields(self):
        err = errors_of(parse_network_policy, ingress_peers({"podSelector": None, "ipBlock": None}))
        assert paths(err) == ["spec.ingress[0].from[0]"]

    def test_unknown_peer_field(self):
        err = errors_of(parse_network_policy, ingress_peers({"podSelector": {}, "serviceAccount": "x"}))
        assert paths(err) == ["spec.ingress[0].from[0].serviceAccount"]

    def test_peer_with_only_unknown_field_reported_once(self):
        err = errors_of(parse_network_policy, ingress_peers({"pods": {}}))
        assert paths(err) == ["spec.ingress[0].from[0].pods"]

    def test_peer_must_be_object(self):
        err = errors_of(parse_network_policy, ingress_peers("10.0.0.0/8"))
        assert paths(err) == ["spec.ingress[0].from[0]"]

    def test_selector_errors_inside_peers(self):
        err = errors_of(
            parse_network_policy,
            ingress_peers(
                {"podSelector": {"matchLabels": {"app": 1}}},
                {"namespaceSelector": {"matchExpressions": [{"key": "k", "operator": "Maybe"}]}},
            ),
        )
        assert paths(err) == [
            "spec.ingress[0].from[0].podSelector.matchLabels.app",
            "spec.ingress[0].from[1].namespaceSelector.matchExpressions[0].operator",
        ]

    def test_egress_peer_paths_use_to(self):
        err = errors_of(parse_network_policy, np_obj({"podSelector": {}, "egress": [{}, {"to": [{}, {"ipBlock": {"cidr": "x/1"}}]}]}))
        assert paths(err) == ["spec.egress[1].to[0]", "spec.egress[1].to[1].ipBlock.cidr"]

    def test_from_in_egress_rule_is_unknown(self):
        err = errors_of(parse_network_policy, np_obj({"podSelector": {}, "egress": [{"from": []}]}))
        assert paths(err) == ["spec.egress[0].from"]


class TestNetworkPolicyErrors:
    def test_all_problems_reported_at_once(self):
        obj = np_obj(
            {
                "podSelector": {"matchLabels": {"app": 5}},
                "policyTypes": ["Sideways"],
                "ingress": [
                    {
                        "from": [
                            {"podSelector": {}},
                            {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}},
                        ],
                        "ports": [{"port": 0}, {"protocol": "icmp"}],
                    },
                    "not-a-rule",
                ],
                "egress": [{"to": [{}], "ports": [{"port": "http", "endPort": 10}], "extra": True}],
            }
        )
        err = errors_of(parse_network_policy, obj)
        assert err.subject == "NetworkPolicy x/np"
        assert sorted(paths(err)) == sorted(
            [
                "spec.podSelector.matchLabels.app",
                "spec.policyTypes[0]",
                "spec.ingress[0].from[1].ipBlock.except[0]",
                "spec.ingress[0].ports[0].port",
                "spec.ingress[0].ports[1].protocol",
                "spec.ingress[1]",
                "spec.egress[0].extra",
                "spec.egress[0].to[0]",
                "spec.egress[0].ports[0].endPort",
            ]
        )
        assert str(err).startswith("NetworkPolicy x/np: 9 problems\n")

    def test_missing_spec(self):
        obj = np_obj()
        del obj["spec"]
        err = errors_of(parse_network_policy, obj)
        assert paths(err) == ["spec"]

    def test_missing_metadata_name(self):
        obj = np_obj()
        obj["metadata"] = {"namespace": "x"}
        err = errors_of(parse_network_policy, obj)
        assert err.subject == "NetworkPolicy <unnamed>"
        assert paths(err) == ["metadata.name"]

    def test_missing_metadata(self):
        obj = np_obj()
        del obj["metadata"]
        err = errors_of(parse_network_policy, obj)
        assert err.subject == "NetworkPolicy <unnamed>"
        assert paths(err) == ["metadata", "metadata.name"]

    def test_subject_without_namespace(self):
        err = errors_of(parse_network_policy, np_obj({"policyTypes": ["x"]}, namespace=None))
        assert err.subject == "NetworkPolicy np"

    def test_rules_must_be_a_list(self):
        err = errors_of(parse_network_policy, np_obj({"podSelector": {}, "ingress": {"from": []}}))
        assert paths(err) == ["spec.ingress"]

    def test_spec_pod_selector_must_be_an_object(self):
        err = errors_of(parse_network_policy, np_obj({"podSelector": "app=web"}))
        assert paths(err) == ["spec.podSelector"]


# --------------------------------------------------------------------------------------------------
# Pod, Namespace, Node
# --------------------------------------------------------------------------------------------------


class TestPod:
    def test_happy_path(self):
        pod = parse_pod(pod_obj())
        assert isinstance(pod, Pod)
        assert (pod.namespace, pod.name, pod.key) == ("ns1", "p1", "ns1/p1")
        assert pod.labels is LabelSet({"app": "web"})
        assert pod.ips == ("10.0.0.1",)
        assert pod.node == "node-a"
        assert pod.phase == "Running"
        assert pod.host_network is False
        assert pod.ports == ()
        assert not pod.terminated
        assert object_key(pod) == ("Pod", "ns1", "p1")

    def test_pod_ips_preferred_over_pod_ip_and_order_kept(self):
        pod = parse_pod(pod_obj(status={"podIP": "10.9.9.9", "podIPs": [{"ip": "fd00::10"}, {"ip": "10.0.0.1"}]}))
        assert pod.ips == ("fd00::10", "10.0.0.1")

    def test_pod_ip_used_when_pod_ips_absent_or_empty(self):
        assert parse_pod(pod_obj(status={"podIP": "10.0.0.7"})).ips == ("10.0.0.7",)
        assert parse_pod(pod_obj(status={"podIP": "10.0.0.7", "podIPs": []})).ips == ("10.0.0.7",)

    def test_no_ips(self):
        assert parse_pod(pod_obj(status={})).ips == ()
        assert parse_pod(pod_obj(status={"podIP": ""})).ips == ()
        obj = pod_obj()
        del obj["status"]
        pod = parse_pod(obj)
        assert pod.ips == () and pod.phase == "Running"

    def test_ipv6_canonical_text(self):
        pod = parse_pod(pod_obj(status={"podIPs": [{"ip": "FD00:0:0:0:0:0:0:1"}, {"ip": "2001:0db8::0001"}]}))
        assert pod.ips == ("fd00::1", "2001:db8::1")
        assert parse_pod(pod_obj(status={"podIP": "FD00:0::A"})).ips == ("fd00::a",)

    def test_duplicate_ips_collapsed(self):
        pod = parse_pod(pod_obj(status={"podIPs": [{"ip": "fd00::1"}, {"ip": "FD00::0001"}, {"ip": "10.0.0.1"}]}))
        assert pod.ips == ("fd00::1", "10.0.0.1")

    def test_invalid_ips(self):
        err = errors_of(parse_pod, pod_obj(status={"podIPs": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.300"}, {}, "10.0.0.3"]}))
        assert err.subject == "Pod ns1/p1"
        assert paths(err) == ["status.podIPs[3]", "status.podIPs[1].ip", "status.podIPs[2].ip"]
        err = errors_of(parse_pod, pod_obj(status={"podIP": "not-an-ip"}))
        assert paths(err) == ["status.podIP"]
        assert "invalid IP address 'not-an-ip'" in err.errors[0].message

    def test_host_network_and_phase(self):
        pod = parse_pod(pod_obj(spec={"hostNetwork": True, "nodeName": "n"}, status={"phase": "Succeeded", "podIP": "192.168.0.5"}))
        assert pod.host_network is True
        assert pod.phase == "Succeeded"
        assert pod.terminated
        assert parse_pod(pod_obj(status={"phase": "Failed"})).terminated
        assert not parse_pod(pod_obj(status={"phase": "Pending"})).terminated

    def test_host_network_must_be_boolean(self):
        err = errors_of(parse_pod, pod_obj(spec={"hostNetwork": "true"}))
        assert paths(err) == ["spec.hostNetwork"]

    def test_defaults(self):
        obj = {"metadata": {"name": "bare"}}
        pod = parse_pod(obj)
        assert (pod.namespace, pod.name, pod.node, pod.phase, pod.host_network, pod.ips, pod.ports) == (
            "default",
            "bare",
            "",
            "Running",
            False,
            (),
            (),
        )
        assert pod.labels is LabelSet()

    def test_container_ports(self):
        spec = {
            "containers": [
                {"name": "a", "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 53, "protocol": "UDP", "name": "dns"}]},
                {"name": "b", "ports": [{"containerPort": 9090}, {"containerPort": 9091, "protocol": "SCTP"}]},
                {"name": "c"},
            ]
        }
        pod = parse_pod(pod_obj(spec=spec))
        assert pod.ports == (
            ContainerPort("http", 8080, "TCP"),
            ContainerPort("dns", 53, "UDP"),
            ContainerPort("", 9090, "TCP"),
            ContainerPort("", 9091, "SCTP"),
        )

    def test_sidecar_init_containers_count_others_do_not(self):
        spec = {
            "initContainers": [
                {"name": "setup", "ports": [{"containerPort": 1111, "name": "setup"}]},
                {"name": "sidecar", "restartPolicy": "Always", "ports": [{"containerPort": 15001, "name": "proxy"}]},
                {"name": "other", "restartPolicy": "OnFailure", "ports": [{"containerPort": 2222}]},
            ],
            "containers": [{"name": "app", "ports": [{"containerPort": 80, "name": "http"}]}],
        }
        pod = parse_pod(pod_obj(spec=spec))
        assert sorted(pod.ports, key=lambda p: p.port) == [ContainerPort("http", 80, "TCP"), ContainerPort("proxy", 15001, "TCP")]

    def test_sidecar_port_errors_have_init_container_paths(self):
        spec = {"initContainers": [{"name": "i"}, {"restartPolicy": "Always", "ports": [{"containerPort": 0}]}]}
        err = errors_of(parse_pod, pod_obj(spec=spec))
        assert paths(err) == ["spec.initContainers[1].ports[0].containerPort"]

    def test_container_port_errors_all_reported(self):
        spec = {
            "containers": [
                {"ports": [{"containerPort": 70000}, {"containerPort": "80"}, {"protocol": "TCP"}, {"containerPort": 80, "protocol": "ICMP"}, 5]},
                "nope",
            ]
        }
        err = errors_of(parse_pod, pod_obj(spec=spec))
        assert paths(err) == [
            "spec.containers[0].ports[0].containerPort",
            "spec.containers[0].ports[1].containerPort",
            "spec.containers[0].ports[2].containerPort",
            "spec.containers[0].ports[3].protocol",
            "spec.containers[0].ports[4]",
            "spec.containers[1]",
        ]

    def test_label_values_must_be_strings(self):
        err = errors_of(parse_pod, pod_obj(labels={"version": 2, "ok": "y"}))
        assert paths(err) == ["metadata.labels.version"]
        assert "quote it" in err.errors[0].message

    def test_pod_is_immutable(self):
        pod = parse_pod(pod_obj())
        with pytest.raises(AttributeError):
            pod.ips = ()  # type: ignore[misc]


class TestNamespace:
    def test_implied_name_label(self):
        ns = parse_namespace({"metadata": {"name": "prod", "labels": {"team": "a"}}})
        assert isinstance(ns, Namespace)
        assert ns.name == "prod"
        assert ns.labels is LabelSet({"team": "a", "kubernetes.io/metadata.name": "prod"})

    def test_implied_label_without_labels(self):
        ns = parse_namespace({"metadata": {"name": "kube-system"}})
        assert ns.labels.as_dict() == {"kubernetes.io/metadata.name": "kube-system"}

    def test_implied_label_overrides_a_wrong_one(self):
        # The API server always sets it to the name.
        ns = parse_namespace({"metadata": {"name": "prod", "labels": {"kubernetes.io/metadata.name": "other"}}})
        assert ns.labels.get("kubernetes.io/metadata.name") == "prod"

    def test_namespace_in_metadata_is_ignored(self):
        ns = parse_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a", "namespace": "b"}})
        assert object_key(ns) == ("Namespace", "", "a")

    def test_errors(self):
        err = errors_of(parse_namespace, {"metadata": {"labels": {"a": 1}}})
        assert err.subject == "Namespace <unnamed>"
        assert paths(err) == ["metadata.name", "metadata.labels.a"]


class TestNode:
    def test_addresses_and_hostname_label(self):
        node = parse_node(
            {
                "metadata": {"name": "node-a", "labels": {"zone": "z1"}},
                "status": {
                    "addresses": [
                        {"type": "Hostname", "address": "node-a"},
                        {"type": "InternalIP", "address": "192.168.1.10"},
                        {"type": "InternalIP", "address": "FD00::0:10"},
                        {"type": "ExternalIP", "address": "203.0.113.7"},
                        {"type": "InternalDNS", "address": "node-a.cluster.local"},
                        {"type": "InternalIP", "address": "192.168.1.10"},
                    ]
                },
            }
        )
        assert isinstance(node, Node)
        assert node.name == "node-a"
        assert node.addresses == ("192.168.1.10", "fd00::10", "203.0.113.7")
        assert node.labels is LabelSet({"zone": "z1", "kubernetes.io/hostname": "node-a"})
        assert object_key(node) == ("Node", "", "node-a")

    def test_existing_hostname_label_kept(self):
        node = parse_node({"metadata": {"name": "node-a.example.com", "labels": {"kubernetes.io/hostname": "node-a"}}})
        assert node.labels.get("kubernetes.io/hostname") == "node-a"
        assert node.addresses == ()

    def test_hostname_label_implied_without_labels(self):
        assert parse_node({"metadata": {"name": "n1"}}).labels.as_dict() == {"kubernetes.io/hostname": "n1"}

    def test_invalid_addresses(self):
        err = errors_of(
            parse_node,
            {
                "metadata": {"name": "n1"},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": "10.0.0.1"},
                        {"type": "InternalIP", "address": "10.0.0.999"},
                        {"type": "ExternalIP"},
                        {"type": "Hostname", "address": "not-checked"},
                    ]
                },
            },
        )
        assert err.subject == "Node n1"
        assert paths(err) == ["status.addresses[1].address", "status.addresses[2].address"]


# --------------------------------------------------------------------------------------------------
# parse_object dispatch
# --------------------------------------------------------------------------------------------------


class TestParseObject:
    @pytest.mark.parametrize(
        "obj,cls",
        [
            (pod_obj(), Pod),
            ({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}}, Namespace),
            ({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}, Node),
            (np_obj(), NetworkPolicy),
            (anp_obj(anp_spec()), AdminNetworkPolicy),
            (banp_obj({"subject": {"namespaces": {}}}), BaselineAdminNetworkPolicy),
            (cnp_obj(cnp_spec()), ClusterNetworkPolicy),
        ],
    )
    def test_dispatch(self, obj, cls):
        assert type(parse_object(obj)) is cls

    @pytest.mark.parametrize("obj,typename", [([], "list"), ("kind: Pod", "str"), (None, "NoneType"), (3, "int")])
    def test_not_a_mapping(self, obj, typename):
        err = errors_of(parse_object, obj)
        assert err.subject == "object"
        assert paths(err) == [""]
        assert err.errors[0].message == f"must be a mapping (a Kubernetes object), got {typename}"

    @pytest.mark.parametrize("kind", [None, "", 5])
    def test_missing_kind(self, kind):
        obj = {"apiVersion": "v1", "metadata": {"name": "thing", "namespace": "ns"}}
        if kind is not None:
            obj["kind"] = kind
        err = errors_of(parse_object, obj)
        assert err.subject == "object ns/thing"
        assert paths(err) == ["kind"]
        assert err.errors[0].message == "required field is missing"

    def test_unknown_kind(self):
        err = errors_of(parse_object, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc", "namespace": "a"}})
        assert err.subject == "Service a/svc"
        assert paths(err) == ["kind"]
        msg = err.errors[0].message
        assert msg.startswith("unsupported kind 'Service'")
        for k in ("Pod", "Namespace", "Node", "NetworkPolicy", "AdminNetworkPolicy", "BaselineAdminNetworkPolicy", "ClusterNetworkPolicy"):
            assert k in msg

    @pytest.mark.parametrize(
        "kind,bad_version,expected",
        [
            ("NetworkPolicy", "networking.k8s.io/v1beta1", "networking.k8s.io/v1"),
            ("NetworkPolicy", None, "networking.k8s.io/v1"),
            ("Pod", "apps/v1", "v1"),
            ("AdminNetworkPolicy", "policy.networking.k8s.io/v1alpha2", "policy.networking.k8s.io/v1alpha1"),
            ("BaselineAdminNetworkPolicy", "policy.networking.k8s.io/v1alpha2", "policy.networking.k8s.io/v1alpha1"),
            ("ClusterNetworkPolicy", "policy.networking.k8s.io/v1alpha1", "policy.networking.k8s.io/v1alpha2"),
        ],
    )
    def test_wrong_api_version(self, kind, bad_version, expected):
        obj: dict[str, Any] = {"kind": kind, "metadata": {"name": "o"}}
        if bad_version is not None:
            obj["apiVersion"] = bad_version
        err = errors_of(parse_object, obj)
        assert err.subject == f"{kind} o"
        assert paths(err) == ["apiVersion"]
        assert err.errors[0].message == f"{bad_version!r} is not supported for {kind} (expected {expected})"

    def test_parser_errors_propagate(self):
        err = errors_of(parse_object, ingress_peers({}))
        assert err.subject == "NetworkPolicy x/np"
        assert paths(err) == ["spec.ingress[0].from[0]"]

    def test_unnamed_subject(self):
        err = errors_of(parse_object, {"kind": "Widget", "metadata": {"name": 5}})
        assert err.subject == "Widget <unnamed>"


# --------------------------------------------------------------------------------------------------
# AdminNetworkPolicy (v1alpha1)
# --------------------------------------------------------------------------------------------------


class TestAdminNetworkPolicy:
    def test_happy_path(self):
        obj = anp_obj(
            anp_spec(
                priority=50,
                subject={"pods": {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {"matchLabels": {"app": "web"}}}},
                ingress=[
                    {"name": "allow-mon", "action": "Allow", "from": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}]},
                    {
                        "action": "Deny",
                        "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"bad": "yes"}}}}],
                        "ports": [
                            {"portNumber": {"port": 80, "protocol": "TCP"}},
                            {"portRange": {"start": 1000, "end": 2000, "protocol": "UDP"}},
                            {"namedPort": "http"},
                        ],
                    },
                    {"action": "Pass", "from": [{"namespaces": {}}]},
                ],
                egress=[
                    {"name": "to-nodes", "action": "Allow", "to": [{"nodes": {"matchLabels": {"role": "cp"}}}]},
                    {"action": "Deny", "to": [{"networks": ["10.0.0.5/24", "fd00::/8"]}], "ports": [{"portNumber": {"port": 53, "protocol": "UDP"}}]},
                ],
            ),
            name="anp-1",
        )
        anp = parse_admin_network_policy(obj)
        assert isinstance(anp, AdminNetworkPolicy)
        assert (anp.name, anp.priority, anp.kind, anp.tier) == ("anp-1", 50, "AdminNetworkPolicy", ADMIN_TIER)
        assert anp.subject.namespace_selector.matches(LabelSet({"team": "a"}))
        assert anp.subject.pod_selector.matches(LabelSet({"app": "web"}))
        assert not anp.subject.pod_selector.matches(LabelSet({"app": "db"}))
        r0, r1, r2 = anp.ingress
        assert (r0.name, r0.action, r0.action_name, r0.ports) == ("allow-mon", ALLOW, "Allow", None)
        (peer,) = r0.peers
        assert isinstance(peer, PodsPeer) and peer.pod_selector is MATCH_ALL
        assert peer.namespace_selector.matches(LabelSet({"kubernetes.io/metadata.name": "mon"}))
        assert (r1.name, r1.action) == ("", DENY)
        assert r1.peers[0].namespace_selector is MATCH_ALL
        assert r1.peers[0].pod_selector.matches(LabelSet({"bad": "yes"}))
        assert r1.ports == (PortRange("TCP", 80, 80), PortRange("UDP", 1000, 2000), NamedPort("http"))
        assert r2.action == PASS and r2.action_name == "Pass"
        e0, e1 = anp.egress
        assert e0.peers[0] == NodesPeer(e0.peers[0].node_selector)
        assert e0.peers[0].node_selector.matches(LabelSet({"role": "cp"}))
        assert e1.peers == (NetworksPeer((cidr("10.0.0.0/24"), cidr("fd00::/8"))),)
        assert e1.ports == (PortRange("UDP", 53, 53),)
        assert object_key(anp) == ("AdminNetworkPolicy", "", "anp-1")

    def test_subject_namespaces(self):
        anp = parse_admin_network_policy(anp_obj(anp_spec(subject={"namespaces": {"matchLabels": {"a": "b"}}})))
        assert anp.subject.pod_selector is MATCH_ALL
        assert anp.subject.namespace_selector.matches(LabelSet({"a": "b"}))

    def test_no_rules(self):
        anp = parse_admin_network_policy(anp_obj(anp_spec()))
        assert anp.ingress == () and anp.egress == ()

    @pytest.mark.parametrize("priority", [0, 1000])
    def test_priority_bounds_accepted(self, priority):
        assert parse_admin_network_policy(anp_obj(anp_spec(priority=priority))).priority == priority

    @pytest.mark.parametrize("priority", [-1, 1001, "5", 2.5, True])
    def test_priority_invalid(self, priority):
        err = errors_of(parse_admin_network_policy, anp_obj(anp_spec(priority=priority), name="p"))
        assert err.subject == "AdminNetworkPolicy p"
        assert paths(err) == ["spec.priority"]

    def test_priority_and_subject_required(self):
        err = errors_of(parse_admin_network_policy, anp_obj({}))
        assert paths(err) == ["spec.priority", "spec.subject"]
        assert all(e.message == "required field is missing" for e in err.errors)

    @pytest.mark.parametrize(
        "subject",
        [{}, {"namespaces": {}, "pods": {"podSelector": {}, "namespaceSelector": {}}}, {"namespaces": None}, {"nodes": {}}],
        ids=["empty", "both", "null", "unknown"],
    )
    def test_subject_exactly_one(self, subject):
        err = errors_of(parse_admin_network_policy, anp_obj(anp_spec(subject=subject)))
        assert paths(err) == ["spec.subject"]
        assert "exactly one of namespaces or pods" in err.errors[0].message

    def test_subject_selector_errors(self):
        err = errors_of(
            parse_admin_network_policy,
            anp_obj(
                anp_spec(
                    subject={
                        "pods": {
                            "namespaceSelector": {"matchLabels": {"a": 1}},
                            "podSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]},
                        }
                    }
                )
            ),
        )
        assert paths(err) == ["spec.subject.pods.namespaceSelector.matchLabels.a", "spec.subject.pods.podSelector.matchExpressions[0].values"]

    @pytest.mark.parametrize("action", ["Accept", "allow", "Drop", ""])
    def test_invalid_action(self, action):
        err = errors_of(parse_admin_network_policy, anp_obj(anp_spec(ingress=[{"action": action, "from": [{"namespaces": {}}]}])))
        assert paths(err) == ["spec.ingress[0].action"]
        assert "Allow, Deny, Pass" in err.errors[0].message

    def test_action_required(self):
        err = errors_of(parse_admin_network_policy, anp_obj(anp_spec(egress=[{"to": [{"namespaces": {}}]}])))
        assert paths(err) == ["spec.egress[0].action"]

    def test_peers_required_and_non_empty(self):
        err = errors_of(parse_admin_network_policy, anp_obj(anp_spec(ingress=[{"action": "Allow"}], egress=[{"action": "Deny", "to": []}])))
        assert paths(err) == ["spec.ingress[0].from", "spec.egress[0].to"]
        assert err.errors[0].message == "required field is missing"
        assert "at least one peer" in err.errors[1].message

    def test_rule_name_length(self):
        ok = parse_admin_network_policy(anp_obj(anp_spec(ingress=[{"name": "n" * 100, "action": "Allow", "from": [{"namespaces": {}}]}])))
        assert ok.ingress[0].name == "n" * 100
        err = errors_of(parse_admin_network_policy, anp_obj(anp_spec(ingress=[{"name": "n" * 101, "action": "Allow", "from": [{"namespaces": {}}]}])))
        assert paths(err) == ["spec.ingress[0].name"]

    def test_rule_must_be_object(self):
        err = errors_of(parse_admin_network_policy, anp_obj(anp_spec(ingress=["Allow"])))
        assert paths(err) == ["spec.ingress[0]"]

    # ports -----------------------------------------------------------------------------------------

    def test_port_number_protocol_defaults_to_tcp(self):
        rule = anp_egress_rule(action="Allow", to=[{"namespaces": {}}], ports=[{"portNumber": {"port": 443}}, {"portRange": {"start": 1, "end": 2}}])
        assert rule.ports == (PortRange("TCP", 443, 443), PortRange("TCP", 1, 2))

    def test_sctp_port(self):
        rule = anp_egress_rule(action="Allow", to=[{"namespaces": {}}], ports=[{"portNumber": {"port": 9, "protocol": "SCTP"}}])
        assert rule.ports == (PortRange("SCTP", 9, 9),)

    def test_ports_absent_vs_empty(self):
        assert anp_egress_rule(action="Deny", to=[{"namespaces": {}}]).ports is None
        assert anp_egress_rule(action="Deny", to=[{"namespaces": {}}], ports=None).ports is None
        assert anp_egress_rule(action="Deny", to=[{"namespaces": {}}], ports=[]).ports == ()

    @pytest.mark.parametrize("rng", [{"start": 100, "end": 100}, {"start": 200, "end": 100}])
    def test_port_range_start_must_be_less_than_end(self, rng):
        err = errors_of(
            parse_admin_network_policy,
            anp_obj(anp_spec(egress=[{"action": "Deny", "to": [{"namespaces": {}}], "ports": [{"portNumber": {"port": 1}}, {"portRange": rng}]}])),
        )
        assert paths(err) == ["spec.egress[0].ports[1].portRange"]
        assert "must be less than end" in err.errors[0].message

    def test_port_range_inclusive_bounds(self):
        rule = anp_egress_rule(action="Deny", to=[{"namespaces": {}}], ports=[{"portRange": {"start": 1, "end": 65535, "protocol": "UDP"}}])
        assert rule.ports == (PortRange("UDP", 1, 65535),)

    @pytest.mark.parametrize(
        "port,bad_paths",
        [
            ({}, ["spec.egress[0].ports[0]"]),
            ({"portNumber": {"port": 80}, "namedPort": "http"}, ["spec.egress[0].ports[0]"]),
            ({"portNumber": {"port": 0}}, ["spec.egress[0].ports[0].portNumber.port"]),
            ({"portNumber": {"port": 65536}}, ["spec.egress[0].ports[0].portNumber.port"]),
            ({"portNumber": {}}, ["spec.egress[0].ports[0].portNumber.port"]),
            ({"portNumber": {"port": 80, "protocol": "ICMP"}}, ["spec.egress[0].ports[0].portNumber.protocol"]),
            ({"portNumber": {"port": 80, "protocol": "tcp"}}, ["spec.egress[0].ports[0].portNumber.protocol"]),
            ({"portRange": {"start": 10}}, ["spec.egress[0].ports[0].portRange.end"]),
            ({"portRange": {"start": 0, "end": 10}}, ["spec.egress[0].ports[0].portRange.start"]),
            ({"portRange": {"start": 1, "end": 10, "protocol": "GRE"}}, ["spec.egress[0].ports[0].portRange.protocol"]),
            ({"namedPort": 80}, ["spec.egress[0].ports[0].namedPort"]),
            ("80", ["spec.egress[0].ports[0]"]),
        ],
    )
    def test_port_errors(self, port, bad_paths):
        err = errors_of(parse_admin_network_policy, anp_obj(anp_spec(egress=[{"action": "Deny", "to": [{"namespaces": {}}], "ports": [port]}])))
        assert paths(err) == bad_paths

    def test_named_port_with_pods_peer_ok(self):
        rule = anp_egress_rule(action="Allow", to=[{"pods": {"namespaceSelector": {}, "podSelector": {}}}], ports=[{"namedPort": "dns"}])
        assert rule.ports == (NamedPort("dns"),)

    @pytest.mark.parametrize("peer", [{"networks": ["10.0.0.0/8"]}, {"nodes": {}}], ids=["networks", "nodes"])
    def test_named_port_with_networks_or_nodes_peer(self, peer):
        err = errors_of(
            parse_admin_network_policy,
            anp_obj(
                anp_spec(egress=[{"action": "Deny", "to": [{"namespaces": {}}, peer], "ports": [{"portNumber": {"port": 1}}, {"namedPort": "http"}]}])
            ),
        )
        assert paths(err) == ["spec.egress[0]"]
        assert "named ports" in err.errors[0].message

    def test_numeric_ports_with_networks_peer_ok(self):
        rule = anp_egress_rule(action="Deny", to=[{"networks": ["0.0.0.0/0"]}], ports=[{"portNumber": {"port": 1}}])
        assert rule.ports == (PortRange("TCP", 1, 1),)

    # peers -----------------------------------------------------------------------------------------

    def test_empty_peer_is_unknown_peer_not_error(self):
        rule = anp_egress_rule(action="Deny", to=[{}, {"namespaces": {}}])
        p0, p1 = rule.peers
        assert isinstance(p0, UnknownPeer)
        assert "no field" in p0.reason
        assert isinstance(p1, PodsPeer)

    def test_peer_with_only_unknown_fields_is_unknown_peer(self):
        rule = anp_egress_rule(action="Allow", to=[{"fqdns": ["example.com"], "serviceAccounts": {}}])
        (p,) = rule.peers
        assert isinstance(p, UnknownPeer)
        assert "fqdns" in p.reason and "serviceAccounts" in p.reason

    def test_peer_with_only_null_known_fields_is_unknown(self):
        rule = anp_egress_rule(action="Deny", to=[{"namespaces": None}])
        assert isinstance(rule.peers[0], UnknownPeer)

    @pytest.mark.parametrize("peer", [{"nodes": {}}, {"networks": ["10.0.0.0/8"]}], ids=["nodes", "networks"])
    def test_egress_only_peer_in_ingress_is_unknown(self, peer):
        anp = parse_admin_network_policy(anp_obj(anp_spec(ingress=[{"action": "Deny", "from": [peer]}])))
        assert isinstance(anp.ingress[0].peers[0], UnknownPeer)

    def test_domain_names_unknown_in_v1alpha1(self):
        rule = anp_egress_rule(action="Allow", to=[{"domainNames": ["example.com"]}])
        assert isinstance(rule.peers[0], UnknownPeer)

    def test_unknown_field_beside_known_field_is_ignored(self):
        rule = anp_egress_rule(action="Deny", to=[{"namespaces": {}, "future": {}}])
        assert isinstance(rule.peers[0], PodsPeer)

    def test_peer_with_two_fields(self):
        err = errors_of(
            parse_admin_network_policy, anp_obj(anp_spec(egress=[{"action": "Deny", "to": [{"namespaces": {}, "networks": ["10.0.0.0/8"]}]}]))
        )
        assert paths(err) == ["spec.egress[0].to[0]"]
        assert "got namespaces, networks" in err.errors[0].message

    def test_peer_must_be_object(self):
        err = errors_of(parse_admin_network_policy, anp_obj(anp_spec(ingress=[{"action": "Deny", "from": ["ns"]}])))
        assert paths(err) == ["spec.ingress[0].from[0]"]

    def test_networks_errors(self):
        spec = anp_spec(
            egress=[
                {"action": "Deny", "to": [{"networks": []}]},
                {"action": "Deny", "to": [{"networks": ["10.0.0.0/8", "bad", "::ffff:1.2.3.0/120", "10.0.0.1"]}]},
                {"action": "Deny", "to": [{"networks": [f"10.0.{i}.0/24" for i in range(26)]}]},
                {"action": "Deny", "to": [{"networks": "10.0.0.0/8"}]},
            ]
        )
        err = errors_of(parse_admin_network_policy, anp_obj(spec))
        assert paths(err) == [
            "spec.egress[0].to[0].networks",
            "spec.egress[1].to[0].networks[1]",
            "spec.egress[1].to[0].networks[2]",
            "spec.egress[1].to[0].networks[3]",
            "spec.egress[2].to[0].networks",
            "spec.egress[3].to[0].networks",
            "spec.egress[3].to[0].networks",
        ]

    def test_networks_25_allowed(self):
        rule = anp_egress_rule(action="Deny", to=[{"networks": [f"10.0.{i}.0/24" for i in range(25)]}])
        assert len(rule.peers[0].cidrs) == 25

    def test_peer_selector_errors(self):
        spec = anp_spec(
            egress=[
                {
                    "action": "Deny",
                    "to": [
                        {"namespaces": {"matchLabels": {"a": True}}},
                        {"pods": {"namespaceSelector": {"bogus": 1}, "podSelector": {}}},
                        {"nodes": {"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["v"]}]}},
                    ],
                }
            ]
        )
        err = errors_of(parse_admin_network_policy, anp_obj(spec))
        assert paths(err) == [
            "spec.egress[0].to[0].namespaces.matchLabels.a",
            "spec.egress[0].to[1].pods.namespaceSelector.bogus",
            "spec.egress[0].to[2].nodes.matchExpressions[0].values",
        ]

    def test_all_problems_reported_at_once(self):
        obj = anp_obj(
            {
                "priority": 5000,
                "subject": {},
                "ingress": [{"action": "Accept", "from": [{"namespaces": {}}]}, {"action": "Allow", "from": [{"pods": "x"}]}],
                "egress": [{"action": "Deny", "to": [{"networks": ["x"]}], "ports": [{"namedPort": "a"}]}],
            },
            name="many",
        )
        err = errors_of(parse_admin_network_policy, obj)
        assert err.subject == "AdminNetworkPolicy many"
        assert paths(err) == [
            "spec.priority",
            "spec.subject",
            "spec.ingress[0].action",
            "spec.ingress[1].from[0].pods",
            "spec.egress[0].to[0].networks[0]",
            "spec.egress[0]",
        ]


# --------------------------------------------------------------------------------------------------
# BaselineAdminNetworkPolicy (v1alpha1)
# --------------------------------------------------------------------------------------------------


class TestBaselineAdminNetworkPolicy:
    def test_happy_path(self):
        banp = parse_baseline_admin_network_policy(
            banp_obj(
                {
                    "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "x"}}}},
                    "ingress": [{"action": "Deny", "from": [{"namespaces": {}}], "ports": [{"namedPort": "http"}]}],
                    "egress": [{"action": "Allow", "to": [{"networks": ["192.168.0.0/16"]}, {"nodes": {}}]}],
                }
            )
        )
        assert isinstance(banp, BaselineAdminNetworkPolicy)
        assert (banp.name, banp.kind, banp.tier) == ("default", "BaselineAdminNetworkPolicy", BASELINE_TIER)
        assert not hasattr(banp, "priority")
        assert banp.subject.pod_selector.matches(LabelSet({"app": "x"}))
        assert banp.ingress[0].action == DENY and banp.ingress[0].ports == (NamedPort("http"),)
        assert banp.egress[0].action == ALLOW
        assert banp.egress[0].peers == (NetworksPeer((cidr("192.168.0.0/16"),)), NodesPeer(MATCH_ALL))
        assert object_key(banp) == ("BaselineAdminNetworkPolicy", "", "default")

    def test_must_be_named_default(self):
        err = errors_of(parse_baseline_admin_network_policy, banp_obj({"subject": {"namespaces": {}}}, name="other"))
        assert err.subject == "BaselineAdminNetworkPolicy other"
        assert paths(err) == ["metadata.name"]
        assert '"default"' in err.errors[0].message

    def test_pass_not_allowed(self):
        err = errors_of(
            parse_baseline_admin_network_policy, banp_obj({"subject": {"namespaces": {}}, "egress": [{"action": "Pass", "to": [{"namespaces": {}}]}]})
        )
        assert paths(err) == ["spec.egress[0].action"]
        assert "Allow, Deny" in err.errors[0].message and "Pass" not in err.errors[0].message.split("expected")[1]

    def test_priority_ignored(self):
        banp = parse_baseline_admin_network_policy(banp_obj({"subject": {"namespaces": {}}, "priority": 99999}))
        assert banp.name == "default"

    def test_unknown_peer(self):
        banp = parse_baseline_admin_network_policy(banp_obj({"subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{}]}]}))
        assert isinstance(banp.ingress[0].peers[0], UnknownPeer)

    def test_named_port_with_nodes(self):
        err = errors_of(
            parse_baseline_admin_network_policy,
            banp_obj({"subject": {"namespaces": {}}, "egress": [{"action": "Allow", "to": [{"nodes": {}}], "ports": [{"namedPort": "x"}]}]}),
        )
        assert paths(err) == ["spec.egress[0]"]

    def test_all_problems_reported_at_once(self):
        err = errors_of(
            parse_baseline_admin_network_policy,
            banp_obj({"subject": {"namespaces": {}, "pods": {}}, "ingress": [{"action": "Pass", "from": [{"namespaces": {}}]}]}, name="x"),
        )
        assert err.subject == "BaselineAdminNetworkPolicy x"
        assert paths(err) == ["metadata.name", "spec.subject", "spec.ingress[0].action"]


# --------------------------------------------------------------------------------------------------
# ClusterNetworkPolicy (v1alpha2)
# --------------------------------------------------------------------------------------------------


def cnp_egress_rule(**kw: Any):
    (rule,) = parse_cluster_network_policy(cnp_obj(cnp_spec(egress=[kw]))).egress
    return rule


class TestClusterNetworkPolicy:
    def test_happy_path(self):
        cnp = parse_cluster_network_policy(
            cnp_obj(
                cnp_spec(
                    tier="Baseline",
                    priority=7,
                    subject={"pods": {"namespaceSelector": {"matchLabels": {"t": "a"}}, "podSelector": {}}},
                    ingress=[
                        {
                            "name": "ok",
                            "action": "Accept",
                            "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"a": "b"}}}}],
                            "protocols": [
                                {"tcp": {"destinationPort": {"number": 80}}},
                                {"udp": {"destinationPort": {"range": {"start": 5000, "end": 6000}}}},
                                {"sctp": {"destinationPort": {"number": 9}}},
                                {"destinationNamedPort": "metrics"},
                            ],
                        },
                        {"action": "Pass", "from": [{"namespaces": {}}]},
                    ],
                    egress=[
                        {
                            "action": "Accept",
                            "to": [{"domainNames": ["example.com", "*.kubernetes.io"]}],
                            "protocols": [{"tcp": {"destinationPort": {"number": 443}}}],
                        },
                        {"action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}, {"nodes": {"matchLabels": {"n": "1"}}}]},
                    ],
                ),
                name="cnp-1",
            )
        )
        assert isinstance(cnp, ClusterNetworkPolicy)
        assert (cnp.name, cnp.tier, cnp.priority, cnp.kind) == ("cnp-1", BASELINE_TIER, 7, "ClusterNetworkPolicy")
        assert cnp.subject.namespace_selector.matches(LabelSet({"t": "a"}))
        assert cnp.subject.pod_selector is MATCH_ALL
        i0, i1 = cnp.ingress
        assert (i0.name, i0.action, i0.action_name) == ("ok", ALLOW, "Accept")
        assert i0.ports == (PortRange("TCP", 80, 80), PortRange("UDP", 5000, 6000), PortRange("SCTP", 9, 9), NamedPort("metrics"))
        assert (i1.action, i1.action_name, i1.ports) == (PASS, "Pass", None)
        e0, e1 = cnp.egress
        assert e0.peers == (DomainNamesPeer(("example.com", "*.kubernetes.io")),)
        assert e0.action == ALLOW and e0.ports == (PortRange("TCP", 443, 443),)
        assert e1.action == DENY and e1.action_name == "Deny"
        assert e1.peers[0] == NetworksPeer((cidr("0.0.0.0/0"), cidr("::/0")))
        assert isinstance(e1.peers[1], NodesPeer) and e1.peers[1].node_selector.matches(LabelSet({"n": "1"}))
        assert object_key(cnp) == ("ClusterNetworkPolicy", "", "cnp-1")

    def test_admin_tier(self):
        assert parse_cluster_network_policy(cnp_obj(cnp_spec(tier="Admin"))).tier == ADMIN_TIER

    @pytest.mark.parametrize("tier,message", [("admin", "unsupported value"), ("NetworkPolicy", "unsupported value"), (None, "required")])
    def test_tier_invalid(self, tier, message):
        spec = cnp_spec()
        if tier is None:
            del spec["tier"]
        else:
            spec["tier"] = tier
        err = errors_of(parse_cluster_network_policy, cnp_obj(spec, name="c"))
        assert err.subject == "ClusterNetworkPolicy c"
        assert paths(err) == ["spec.tier"]
        assert message in err.errors[0].message

    @pytest.mark.parametrize("priority", [-1, 1001])
    def test_priority_range(self, priority):
        err = errors_of(parse_cluster_network_policy, cnp_obj(cnp_spec(priority=priority)))
        assert paths(err) == ["spec.priority"]

    def test_required_fields(self):
        err = errors_of(parse_cluster_network_policy, cnp_obj({}))
        assert paths(err) == ["spec.tier", "spec.priority", "spec.subject"]

    @pytest.mark.parametrize("action", ["Allow", "accept", "Reject"])
    def test_invalid_action(self, action):
        err = errors_of(parse_cluster_network_policy, cnp_obj(cnp_spec(ingress=[{"action": action, "from": [{"namespaces": {}}]}])))
        assert paths(err) == ["spec.ingress[0].action"]
        assert "Accept, Deny, Pass" in err.errors[0].message

    def test_protocols_absent_vs_empty(self):
        assert cnp_egress_rule(action="Deny", to=[{"namespaces": {}}]).ports is None
        err = errors_of(parse_cluster_network_policy, cnp_obj(cnp_spec(egress=[{"action": "Deny", "to": [{"namespaces": {}}], "protocols": []}])))
        assert paths(err) == ["spec.egress[0].protocols"]

    def test_ports_field_of_v1alpha1_ignored_in_v1alpha2(self):
        rule = cnp_egress_rule(action="Deny", to=[{"namespaces": {}}], ports=[{"portNumber": {"port": 80}}])
        assert rule.ports is None

    def test_range_inclusive_full(self):
        rule = cnp_egress_rule(
            action="Deny", to=[{"namespaces": {}}], protocols=[{"udp": {"destinationPort": {"range": {"start": 1, "end": 65535}}}}]
        )
        assert rule.ports == (PortRange("UDP", 1, 65535),)

    @pytest.mark.parametrize(
        "proto,bad_paths",
        [
            ({}, ["spec.egress[0].protocols[0]"]),
            ({"tcp": {"destinationPort": {"number": 1}}, "udp": {"destinationPort": {"number": 1}}}, ["spec.egress[0].protocols[0]"]),
            ({"tcp": {"destinationPort": {"number": 1}}, "destinationNamedPort": "x"}, ["spec.egress[0].protocols[0]"]),
            ({"tcp": {}}, ["spec.egress[0].protocols[0].tcp.destinationPort"]),
            ({"udp": {"destinationPort": {}}}, ["spec.egress[0].protocols[0].udp.destinationPort"]),
            ({"tcp": {"destinationPort": {"number": 1, "range": {"start": 1, "end": 2}}}}, ["spec.egress[0].protocols[0].tcp.destinationPort"]),
            ({"tcp": {"destinationPort": {"number": 0}}}, ["spec.egress[0].protocols[0].tcp.destinationPort.number"]),
            ({"sctp": {"destinationPort": {"number": 65536}}}, ["spec.egress[0].protocols[0].sctp.destinationPort.number"]),
            ({"tcp": {"destinationPort": {"number": "80"}}}, ["spec.egress[0].protocols[0].tcp.destinationPort.number"]),
            ({"tcp": {"destinationPort": {"range": {"start": 10, "end": 10}}}}, ["spec.egress[0].protocols[0].tcp.destinationPort.range"]),
            ({"udp": {"destinationPort": {"range": {"start": 20, "end": 10}}}}, ["spec.egress[0].protocols[0].udp.destinationPort.range"]),
            ({"udp": {"destinationPort": {"range": {"start": 20}}}}, ["spec.egress[0].protocols[0].udp.destinationPort.range.end"]),
            ({"icmp": {}}, ["spec.egress[0].protocols[0]"]),
            ({"TCP": {"destinationPort": {"number": 1}}}, ["spec.egress[0].protocols[0]"]),
            ("tcp/80", ["spec.egress[0].protocols[0]"]),
        ],
    )
    def test_protocol_errors(self, proto, bad_paths):
        err = errors_of(
            parse_cluster_network_policy, cnp_obj(cnp_spec(egress=[{"action": "Deny", "to": [{"namespaces": {}}], "protocols": [proto]}]))
        )
        assert paths(err) == bad_paths

    def test_range_error_message(self):
        err = errors_of(
            parse_cluster_network_policy,
            cnp_obj(
                cnp_spec(
                    egress=[
                        {"action": "Deny", "to": [{"namespaces": {}}], "protocols": [{"tcp": {"destinationPort": {"range": {"start": 9, "end": 3}}}}]}
                    ]
                )
            ),
        )
        assert err.errors[0].message == "start (9) must be less than end (3)"

    @pytest.mark.parametrize(
        "peer", [{"networks": ["10.0.0.0/8"]}, {"nodes": {}}, {"domainNames": ["a.example.com"]}], ids=["networks", "nodes", "domainNames"]
    )
    def test_named_port_not_with_networks_nodes_domain_names(self, peer):
        err = errors_of(
            parse_cluster_network_policy,
            cnp_obj(cnp_spec(egress=[{"action": "Accept", "to": [peer], "protocols": [{"destinationNamedPort": "http"}]}])),
        )
        assert paths(err) == ["spec.egress[0]"]

    def test_named_port_with_pods_ok(self):
        rule = cnp_egress_rule(action="Accept", to=[{"namespaces": {}}], protocols=[{"destinationNamedPort": "http"}])
        assert rule.ports == (NamedPort("http"),)

    @pytest.mark.parametrize("action", ["Deny", "Pass"])
    def test_domain_names_only_on_accept(self, action):
        err = errors_of(
            parse_cluster_network_policy, cnp_obj(cnp_spec(egress=[{"action": action, "to": [{"namespaces": {}}, {"domainNames": ["example.com"]}]}]))
        )
        assert paths(err) == ["spec.egress[0].to"]
        assert "Accept" in err.errors[0].message

    def test_domain_names_unknown_in_ingress(self):
        cnp = parse_cluster_network_policy(cnp_obj(cnp_spec(ingress=[{"action": "Deny", "from": [{"domainNames": ["example.com"]}]}])))
        assert isinstance(cnp.ingress[0].peers[0], UnknownPeer)

    def test_domain_name_entries_must_be_strings(self):
        err = errors_of(parse_cluster_network_policy, cnp_obj(cnp_spec(egress=[{"action": "Accept", "to": [{"domainNames": ["ok.com", "", 5]}]}])))
        assert paths(err) == ["spec.egress[0].to[0].domainNames[1]", "spec.egress[0].to[0].domainNames[2]"]

    def test_empty_domain_names_refused(self):
        err = errors_of(parse_cluster_network_policy, cnp_obj(cnp_spec(egress=[{"action": "Accept", "to": [{"domainNames": []}]}])))
        assert paths(err) == ["spec.egress[0].to[0].domainNames"]

    def test_unknown_peers(self):
        rule = cnp_egress_rule(action="Deny", to=[{}, {"services": {}}, {"namespaces": {}}])
        p0, p1, p2 = rule.peers
        assert isinstance(p0, UnknownPeer) and isinstance(p1, UnknownPeer)
        assert "services" in p1.reason
        assert isinstance(p2, PodsPeer)

    def test_peer_with_two_fields(self):
        err = errors_of(
            parse_cluster_network_policy, cnp_obj(cnp_spec(egress=[{"action": "Accept", "to": [{"domainNames": ["a.com"], "nodes": {}}]}]))
        )
        assert paths(err) == ["spec.egress[0].to[0]"]

    def test_all_problems_reported_at_once(self):
        obj = cnp_obj(
            {
                "tier": "Middle",
                "priority": -3,
                "subject": {"namespaces": {"matchLabels": {"x": 1}}},
                "ingress": [{"action": "Accept", "from": [{"namespaces": {}}], "protocols": [{"tcp": {"destinationPort": {"number": 0}}}]}],
                "egress": [{"action": "Deny", "to": [{"domainNames": ["a.com"]}]}, {"action": "Accept", "to": []}],
            },
            name="bad",
        )
        err = errors_of(parse_cluster_network_policy, obj)
        assert err.subject == "ClusterNetworkPolicy bad"
        assert paths(err) == [
            "spec.tier",
            "spec.priority",
            "spec.subject.namespaces.matchLabels.x",
            "spec.ingress[0].protocols[0].tcp.destinationPort.number",
            "spec.egress[0].to",
            "spec.egress[1].to",
        ]
