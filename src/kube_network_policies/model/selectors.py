"""Label sets and label selectors, compiled once into set operations that run at C speed.

A LabelSet keeps its labels as a frozenset of (key, value) pairs plus a frozenset of keys, so every
selector term is one frozenset operation:
  matchLabels          required <= items
  In (k, [v1, v2])     not items.isdisjoint({(k, v1), (k, v2)})
  NotIn                items.isdisjoint(...)   (true when the key is absent, as the API says)
  Exists / DoesNotExist   k in keys / k not in keys
LabelSets are interned: pods that carry the same labels share one object, which keeps memory per pod
small and lets caches key on identity.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kube_network_policies.model.errors import shown
from kube_network_policies.model.fields import Fields
from kube_network_policies.model.names import label_key_problem, label_value_problem


class LabelSet:
    __slots__ = ("__weakref__", "items", "keys")

    items: frozenset[tuple[str, str]]
    keys: frozenset[str]

    def __new__(cls, labels: Mapping[str, str] | None = None) -> LabelSet:
        items = frozenset((labels or {}).items())
        cached = _INTERNED.get(items)
        if cached is not None:
            return cached
        self = object.__new__(cls)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "keys", frozenset(k for k, _ in items))
        _INTERNED[items] = self
        return self

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("LabelSet is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("LabelSet is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (LabelSet, (self.as_dict(),))

    def as_dict(self) -> dict[str, str]:
        return dict(sorted(self.items))

    def get(self, key: str) -> str | None:
        for k, v in self.items:
            if k == key:
                return v
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and other.items == self.items

    def __hash__(self) -> int:
        return hash(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"LabelSet({self.as_dict()!r})"


_INTERNED: weakref.WeakValueDictionary[frozenset[tuple[str, str]], LabelSet] = weakref.WeakValueDictionary()

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # one of OPERATORS
    values: tuple[str, ...]
    pairs: frozenset[tuple[str, str]]  # (key, value) for In/NotIn

    def matches(self, labels: LabelSet) -> bool:
        op = self.operator
        if op == "In":
            return not labels.items.isdisjoint(self.pairs)
        if op == "NotIn":
            return labels.items.isdisjoint(self.pairs)
        if op == "Exists":
            return self.key in labels.keys
        return self.key not in labels.keys

    def describe(self) -> str:
        if self.operator in ("In", "NotIn"):
            return f"{self.key} {self.operator.lower()} ({','.join(self.values)})"
        return self.key if self.operator == "Exists" else f"!{self.key}"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A compiled metav1.LabelSelector. The empty selector matches everything."""

    required: frozenset[tuple[str, str]]
    requirements: tuple[Requirement, ...]

    @property
    def matches_all(self) -> bool:
        return not self.required and not self.requirements

    def matches(self, labels: LabelSet) -> bool:
        if not self.required <= labels.items:
            return False
        for r in self.requirements:  # noqa: SIM110 - a plain loop is cheaper than all() here
            if not r.matches(labels):
                return False
        return True

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.required)] + [r.describe() for r in self.requirements]
        return ",".join(parts) if parts else "<all>"


MATCH_ALL = LabelSelector(frozenset(), ())


def parse_selector(fields: Fields, raw: Mapping[str, Any] | None, path: str, *, label_syntax: bool = False) -> LabelSelector:
    """Compile a metav1.LabelSelector; errors are recorded in `fields` with their paths.

    `label_syntax`: in strict mode, check keys and values as label keys and values, as the API
    server does for the selectors of built-in kinds (NetworkPolicy). The policy CRDs declare
    plain strings, so the API server accepts any key there; such a selector is matched
    literally (a key no label can carry matches nothing with In, Exists and matchLabels).
    """
    if raw is None:
        return MATCH_ALL
    syntax = label_syntax and fields.strict
    for field_name in raw:
        if field_name not in ("matchLabels", "matchExpressions"):
            fields.error(Fields.key(path, field_name), "unknown field in a label selector (expected matchLabels or matchExpressions)")
    match_labels = fields.string_map(raw, "matchLabels", path)
    for k, v in match_labels.items():
        kpath = Fields.key(Fields.join(path, "matchLabels"), k)
        if syntax:
            problem = label_key_problem(k) or label_value_problem(v)
            if problem is not None:
                fields.error(kpath, problem)
        else:
            _check_key(fields, k, kpath)
    requirements: list[Requirement] = []
    exprs = fields.sequence(raw, "matchExpressions", path) or []
    for i, expr in enumerate(exprs):
        p = Fields.join(Fields.join(path, "matchExpressions"), i)
        if not isinstance(expr, Mapping):
            fields.error(p, "must be an object with key, operator and values")
            continue
        key = fields.string(expr, "key", p, required=True)
        op = fields.string(expr, "operator", p, required=True)
        raw_values = fields.sequence(expr, "values", p)
        values: list[str] = []
        fields.unknown(expr, p, ("key", "operator", "values"))
        for j, v in enumerate(raw_values or []):
            if not isinstance(v, str):
                fields.error(Fields.join(Fields.join(p, "values"), j), f"must be a string, got {shown(v)} (quote it)")
            else:
                if syntax and (problem := label_value_problem(v)) is not None:
                    fields.error(Fields.join(Fields.join(p, "values"), j), problem)
                values.append(v)
        if key is None or op is None:
            continue
        if syntax:
            if (problem := label_key_problem(key)) is not None:
                fields.error(Fields.join(p, "key"), problem)
        else:
            _check_key(fields, key, Fields.join(p, "key"))
        if op not in OPERATORS:
            fields.error(Fields.join(p, "operator"), f"unknown operator {shown(op)} (expected one of {', '.join(OPERATORS)})")
            continue
        if op in ("In", "NotIn") and not values:
            fields.error(Fields.join(p, "values"), f"operator {op} needs at least one value")
            continue
        if op in ("Exists", "DoesNotExist") and values:
            fields.error(Fields.join(p, "values"), f"operator {op} takes no values")
            continue
        requirements.append(Requirement(key, op, tuple(values), frozenset((key, v) for v in values)))
    if not match_labels and not requirements:
        return MATCH_ALL
    return LabelSelector(frozenset(match_labels.items()), tuple(requirements))


def _check_key(fields: Fields, key: str, path: str) -> None:
    name = key.rsplit("/", 1)[-1]
    if not name or len(name) > 63 or (key.count("/") > 1):
        fields.error(path, f"invalid label key {shown(key)}")
