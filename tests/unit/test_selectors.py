"""Tests for model.selectors: LabelSet interning and immutability, LabelSelector parsing and matching."""

from __future__ import annotations

import gc
import pickle

import pytest

from kube_network_policies.model.errors import FieldError
from kube_network_policies.model.fields import Fields
from kube_network_policies.model.selectors import _INTERNED, MATCH_ALL, LabelSelector, LabelSet, Requirement, parse_selector


def compile_ok(raw, path="sel") -> LabelSelector:
    f = Fields()
    sel = parse_selector(f, raw, path)
    assert f.errors == [], f.errors
    return sel


def compile_errors(raw, path="sel") -> list[FieldError]:
    f = Fields()
    parse_selector(f, raw, path)
    assert f.errors, "expected validation errors"
    return f.errors


def paths(errors) -> list[str]:
    return [e.path for e in errors]


def L(**labels: str) -> LabelSet:
    return LabelSet(labels)


# --------------------------------------------------------------------------------------------------
# LabelSet
# --------------------------------------------------------------------------------------------------


class TestLabelSet:
    def test_same_labels_give_the_same_object(self):
        a = LabelSet({"app": "web", "tier": "front"})
        b = LabelSet({"tier": "front", "app": "web"})  # insertion order does not matter
        assert a is b

    def test_different_labels_give_different_objects(self):
        a = LabelSet({"app": "web"})
        b = LabelSet({"app": "db"})
        c = LabelSet({"app": "web", "x": "y"})
        assert a is not b and a is not c and b is not c
        assert a != b and a != c

    def test_empty_and_none_are_the_same_object(self):
        assert LabelSet() is LabelSet(None) is LabelSet({})
        assert len(LabelSet()) == 0

    def test_items_keys_and_accessors(self):
        s = LabelSet({"app": "web", "tier": "front"})
        assert s.items == frozenset({("app", "web"), ("tier", "front")})
        assert s.keys == frozenset({"app", "tier"})
        assert len(s) == 2
        assert s.get("app") == "web"
        assert s.get("missing") is None
        assert s.as_dict() == {"app": "web", "tier": "front"}
        assert list(s.as_dict()) == ["app", "tier"]  # sorted

    def test_equality_and_hash_follow_contents(self):
        a = LabelSet({"k": "v"})
        assert a == LabelSet({"k": "v"})
        assert hash(a) == hash(LabelSet({"k": "v"}))
        assert a != {"k": "v"}  # not equal to a plain dict
        assert {a: 1}[LabelSet({"k": "v"})] == 1

    def test_setattr_is_refused(self):
        s = LabelSet({"app": "web"})
        with pytest.raises(AttributeError):
            s.items = frozenset()  # type: ignore[misc]
        with pytest.raises(AttributeError):
            s.keys = frozenset()  # type: ignore[misc]
        with pytest.raises(AttributeError):
            s.other = 1  # type: ignore[attr-defined]
        assert s.as_dict() == {"app": "web"}

    def test_delattr_is_refused(self):
        s = LabelSet({"immutable-del": "check"})
        with pytest.raises(AttributeError):
            del s.items  # type: ignore[misc]
        assert s.items == frozenset({("immutable-del", "check")})

    def test_mutating_source_dict_does_not_change_set(self):
        d = {"app": "web"}
        s = LabelSet(d)
        d["app"] = "db"
        d["new"] = "x"
        assert s.as_dict() == {"app": "web"}

    def test_pickle_round_trip_is_interned(self):
        s = LabelSet({"app": "web", "a/b": "c"})
        t = pickle.loads(pickle.dumps(s))
        assert t is s

    def test_interning_is_weak(self):
        # The intern table must not keep label sets of deleted pods alive.
        key = frozenset({("weak-test", "1")})
        s = LabelSet({"weak-test": "1"})
        assert _INTERNED[key] is s
        del s
        gc.collect()
        assert key not in _INTERNED
        assert LabelSet({"weak-test": "1"}).as_dict() == {"weak-test": "1"}

    def test_repr(self):
        assert repr(LabelSet({"b": "2", "a": "1"})) == "LabelSet({'a': '1', 'b': '2'})"


# --------------------------------------------------------------------------------------------------
# Parsing and matching
# --------------------------------------------------------------------------------------------------


class TestMatchAll:
    @pytest.mark.parametrize(
        "raw",
        [
            None,
            {},
            {"matchLabels": {}},
            {"matchExpressions": []},
            {"matchLabels": {}, "matchExpressions": []},
            {"matchLabels": None, "matchExpressions": None},
        ],
    )
    def test_empty_selector_is_match_all(self, raw):
        sel = compile_ok(raw)
        assert sel is MATCH_ALL
        assert sel.matches_all
        assert sel.describe() == "<all>"

    @pytest.mark.parametrize("labels", [{}, {"app": "web"}, {"a": "1", "b": "2", "kubernetes.io/metadata.name": "x"}])
    def test_match_all_matches_everything(self, labels):
        assert MATCH_ALL.matches(LabelSet(labels))

    def test_non_empty_selector_is_not_match_all(self):
        assert not compile_ok({"matchLabels": {"a": "b"}}).matches_all
        assert not compile_ok({"matchExpressions": [{"key": "a", "operator": "Exists"}]}).matches_all


class TestMatchLabels:
    def test_single_label(self):
        sel = compile_ok({"matchLabels": {"app": "web"}})
        assert sel.required == frozenset({("app", "web")})
        assert sel.requirements == ()
        assert sel.matches(L(app="web"))
        assert sel.matches(L(app="web", tier="front"))
        assert not sel.matches(L(app="db"))
        assert not sel.matches(L(tier="front"))
        assert not sel.matches(LabelSet())

    def test_all_labels_are_required(self):
        sel = compile_ok({"matchLabels": {"app": "web", "tier": "front"}})
        assert sel.matches(L(app="web", tier="front", extra="x"))
        assert not sel.matches(L(app="web"))
        assert not sel.matches(L(app="web", tier="back"))

    def test_empty_value_is_a_real_value(self):
        sel = compile_ok({"matchLabels": {"app": ""}})
        assert sel.matches(L(app=""))
        assert not sel.matches(L(app="web"))
        assert not sel.matches(LabelSet())

    def test_prefixed_key(self):
        sel = compile_ok({"matchLabels": {"kubernetes.io/metadata.name": "prod"}})
        assert sel.matches(LabelSet({"kubernetes.io/metadata.name": "prod"}))
        assert not sel.matches(LabelSet({"metadata.name": "prod"}))


class TestMatchExpressions:
    def test_in(self):
        sel = compile_ok({"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "staging"]}]})
        (req,) = sel.requirements
        assert req == Requirement("env", "In", ("prod", "staging"), frozenset({("env", "prod"), ("env", "staging")}))
        assert sel.matches(L(env="prod"))
        assert sel.matches(L(env="staging", x="y"))
        assert not sel.matches(L(env="dev"))
        assert not sel.matches(L(other="prod"))  # key absent
        assert not sel.matches(LabelSet())

    def test_not_in(self):
        sel = compile_ok({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod", "staging"]}]})
        assert not sel.matches(L(env="prod"))
        assert not sel.matches(L(env="staging"))
        assert sel.matches(L(env="dev"))
        assert sel.matches(L(other="prod"))  # key absent: NotIn is true
        assert sel.matches(LabelSet())

    def test_exists(self):
        sel = compile_ok({"matchExpressions": [{"key": "env", "operator": "Exists"}]})
        assert sel.matches(L(env="prod"))
        assert sel.matches(L(env=""))
        assert not sel.matches(L(other="x"))
        assert not sel.matches(LabelSet())

    def test_does_not_exist(self):
        sel = compile_ok({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]})
        assert not sel.matches(L(env="prod"))
        assert not sel.matches(L(env=""))
        assert sel.matches(L(other="x"))
        assert sel.matches(LabelSet())

    def test_exists_with_empty_values_list_is_accepted(self):
        sel = compile_ok({"matchExpressions": [{"key": "env", "operator": "Exists", "values": []}]})
        assert sel.matches(L(env="a"))
        sel = compile_ok({"matchExpressions": [{"key": "env", "operator": "DoesNotExist", "values": None}]})
        assert sel.matches(LabelSet())

    def test_expressions_are_anded(self):
        sel = compile_ok(
            {
                "matchExpressions": [
                    {"key": "env", "operator": "In", "values": ["prod"]},
                    {"key": "tier", "operator": "Exists"},
                    {"key": "legacy", "operator": "DoesNotExist"},
                    {"key": "zone", "operator": "NotIn", "values": ["a"]},
                ]
            }
        )
        assert len(sel.requirements) == 4
        assert sel.matches(L(env="prod", tier="x"))
        assert sel.matches(L(env="prod", tier="x", zone="b"))
        assert not sel.matches(L(env="prod", tier="x", zone="a"))
        assert not sel.matches(L(env="prod", tier="x", legacy="1"))
        assert not sel.matches(L(env="prod"))
        assert not sel.matches(L(env="dev", tier="x"))

    def test_match_labels_and_expressions_combined(self):
        sel = compile_ok(
            {
                "matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "dev"]}],
            }
        )
        assert sel.required == frozenset({("app", "web")})
        assert sel.matches(L(app="web", env="dev"))
        assert not sel.matches(L(app="web", env="qa"))
        assert not sel.matches(L(app="db", env="dev"))
        assert not sel.matches(L(env="dev"))

    def test_contradictory_selector_matches_nothing(self):
        sel = compile_ok({"matchLabels": {"env": "prod"}, "matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]})
        assert not sel.matches(L(env="prod"))
        assert not sel.matches(LabelSet())

    def test_describe(self):
        sel = compile_ok(
            {
                "matchLabels": {"b": "2", "a": "1"},
                "matchExpressions": [
                    {"key": "env", "operator": "In", "values": ["x", "y"]},
                    {"key": "zone", "operator": "NotIn", "values": ["z"]},
                    {"key": "t", "operator": "Exists"},
                    {"key": "u", "operator": "DoesNotExist"},
                ],
            }
        )
        assert sel.describe() == "a=1,b=2,env in (x,y),zone notin (z),t,!u"

    def test_selector_is_immutable(self):
        sel = compile_ok({"matchLabels": {"a": "b"}})
        with pytest.raises(AttributeError):
            sel.required = frozenset()  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class TestSelectorErrors:
    def test_unknown_operator(self):
        errs = compile_errors({"matchExpressions": [{"key": "env", "operator": "Equals", "values": ["a"]}]})
        assert paths(errs) == ["sel.matchExpressions[0].operator"]
        assert "'Equals'" in errs[0].message and "In, NotIn, Exists, DoesNotExist" in errs[0].message

    def test_operator_is_case_sensitive(self):
        errs = compile_errors({"matchExpressions": [{"key": "env", "operator": "in", "values": ["a"]}]})
        assert paths(errs) == ["sel.matchExpressions[0].operator"]

    @pytest.mark.parametrize("op", ["In", "NotIn"])
    @pytest.mark.parametrize("values", [None, []], ids=["absent", "empty"])
    def test_in_and_not_in_need_values(self, op, values):
        expr = {"key": "env", "operator": op}
        if values is not None:
            expr["values"] = values
        errs = compile_errors({"matchExpressions": [expr]})
        assert paths(errs) == ["sel.matchExpressions[0].values"]
        assert op in errs[0].message

    @pytest.mark.parametrize("op", ["Exists", "DoesNotExist"])
    def test_exists_and_does_not_exist_take_no_values(self, op):
        errs = compile_errors({"matchExpressions": [{"key": "env", "operator": op, "values": ["a"]}]})
        assert paths(errs) == ["sel.matchExpressions[0].values"]
        assert "takes no values" in errs[0].message

    def test_non_string_value_in_expression(self):
        # YAML reads `values: [80, true]` as int and bool, which the API refuses.
        errs = compile_errors({"matchExpressions": [{"key": "port", "operator": "In", "values": ["http", 80, True]}]})
        assert paths(errs) == ["sel.matchExpressions[0].values[1]", "sel.matchExpressions[0].values[2]"]
        assert "quote it" in errs[0].message

    def test_only_non_string_values_reports_the_value(self):
        errs = compile_errors({"matchExpressions": [{"key": "port", "operator": "In", "values": [80]}]})
        assert "sel.matchExpressions[0].values[0]" in paths(errs)

    @pytest.mark.parametrize("value", [80, True, 1.5, None], ids=["int", "bool", "float", "null"])
    def test_non_string_match_label_value(self, value):
        errs = compile_errors({"matchLabels": {"app": "web", "port": value}})
        assert paths(errs) == ["sel.matchLabels.port"]
        assert "must be strings" in errs[0].message

    def test_non_string_match_label_key(self):
        errs = compile_errors({"matchLabels": {1: "x"}})
        assert paths(errs) == ["sel.matchLabels.1"]

    def test_unknown_selector_field(self):
        errs = compile_errors({"matchLabel": {"app": "web"}})
        assert paths(errs) == ["sel.matchLabel"]
        assert "unknown field" in errs[0].message

    def test_unknown_field_with_empty_path(self):
        errs = compile_errors({"podSelector": {}}, path="")
        assert paths(errs) == ["podSelector"]

    def test_match_labels_must_be_an_object(self):
        errs = compile_errors({"matchLabels": ["app=web"]})
        assert paths(errs) == ["sel.matchLabels"]
        assert "must be an object" in errs[0].message

    def test_match_expressions_must_be_a_list(self):
        errs = compile_errors({"matchExpressions": {"key": "a", "operator": "Exists"}})
        assert paths(errs) == ["sel.matchExpressions"]
        assert "must be a list" in errs[0].message

    def test_expression_must_be_an_object(self):
        errs = compile_errors({"matchExpressions": ["env in (a)"]})
        assert paths(errs) == ["sel.matchExpressions[0]"]

    def test_expression_missing_key_and_operator(self):
        errs = compile_errors({"matchExpressions": [{}]})
        assert paths(errs) == ["sel.matchExpressions[0].key", "sel.matchExpressions[0].operator"]
        assert all(e.message == "required field is missing" for e in errs)

    def test_expression_key_and_operator_must_be_strings(self):
        errs = compile_errors({"matchExpressions": [{"key": 5, "operator": ["In"], "values": ["a"]}]})
        assert paths(errs) == ["sel.matchExpressions[0].key", "sel.matchExpressions[0].operator"]

    @pytest.mark.parametrize("key", ["", "a/b/c", "example.com/", "x" * 64, "example.com/" + "y" * 64])
    def test_invalid_label_keys(self, key):
        errs = compile_errors({"matchLabels": {key: "v"}})
        assert paths(errs) == [f"sel.matchLabels.{key}"]
        errs = compile_errors({"matchExpressions": [{"key": key, "operator": "Exists"}]})
        assert paths(errs) == ["sel.matchExpressions[0].key"]

    @pytest.mark.parametrize("key", ["a", "x" * 63, "example.com/app", "kubernetes.io/metadata.name"])
    def test_valid_label_keys(self, key):
        assert compile_ok({"matchLabels": {key: "v"}}).matches(LabelSet({key: "v"}))

    def test_all_problems_reported_at_once_with_indices(self):
        errs = compile_errors(
            {
                "matchLabels": {"ok": "yes", "bad": 3},
                "matchExpressions": [
                    {"key": "a", "operator": "Exists"},
                    {"key": "b", "operator": "Bogus"},
                    {"key": "c", "operator": "In"},
                    {"key": "d", "operator": "DoesNotExist", "values": ["x"]},
                ],
                "extra": 1,
            },
            path="spec.podSelector",
        )
        assert sorted(paths(errs)) == sorted(
            [
                "spec.podSelector.extra",
                "spec.podSelector.matchLabels.bad",
                "spec.podSelector.matchExpressions[1].operator",
                "spec.podSelector.matchExpressions[2].values",
                "spec.podSelector.matchExpressions[3].values",
            ]
        )

    def test_errors_are_appended_to_existing_fields(self):
        f = Fields()
        f.error("earlier", "x")
        parse_selector(f, {"matchExpressions": [{"key": "k", "operator": "Nope"}]}, "p")
        assert paths(f.errors) == ["earlier", "p.matchExpressions[0].operator"]
