"""A path-aware reader over plain dicts (what JSON and YAML give).

Parsers ask it for typed fields; every problem is recorded with the field path instead of raising
at the first one, so a user sees all that is wrong with an object at once.

`strict` is how files are read (like `kubectl apply` with its default strict field validation):
unknown fields are errors, and names, labels and list sizes are checked as the API server checks
them when an object is created. Objects from the API server are read non-strict: the server has
validated them already, and a field this agent does not know (a newer API version) must not make
it drop a policy.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from functools import lru_cache
from typing import Any

from kube_network_policies.model.errors import FieldError, clip, shown

_MISSING: Any = object()
MAX_KEY_IN_PATH = 330  # the longest valid label key (253 + 1 + 63) fits


class Fields:
    __slots__ = ("errors", "strict")

    def __init__(self, strict: bool = False) -> None:
        self.errors: list[FieldError] = []
        self.strict = strict

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    @staticmethod
    def join(path: str, key: str | int) -> str:
        """A list index (int) or a field name (str) appended to a path."""
        if isinstance(key, int):
            return f"{path}[{key}]"
        if len(key) > MAX_KEY_IN_PATH:
            key = clip(key, MAX_KEY_IN_PATH)
        return f"{path}.{key}" if path else key

    @staticmethod
    def key(path: str, key: object) -> str:
        """A mapping key appended to a path, whatever its type, cut to a bounded length."""
        text = clip(key, MAX_KEY_IN_PATH) if isinstance(key, str) else shown(key)
        return f"{path}.{text}" if path else text

    def unknown(self, obj: Mapping[Any, Any], path: str, known: Collection[str]) -> None:
        """Strict mode: an error for every key of `obj` not in `known`."""
        if not self.strict:
            return
        for k in obj:
            if k not in known:
                self.error(self.key(path, k), _unknown_message(k, known))

    def near_misses(self, obj: Mapping[Any, Any], path: str, read: Collection[str]) -> None:
        """Strict mode, for objects whose full schema is not modelled here (PodSpec, PodStatus,
        containers): a key that differs only in case from a field this agent reads is an error,
        since the API server would not know it and the agent would silently not see it."""
        if not self.strict:
            return
        lowered = _lowered(tuple(read))
        for k in obj:
            if isinstance(k, str) and k not in read and k.lower() in lowered:
                self.error(self.key(path, k), f"unknown field (did you mean {lowered[k.lower()]}?)")

    def mapping(self, obj: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> Mapping[str, Any] | None:
        """A nested object; None when absent (or null) and not required."""
        value = obj.get(key, _MISSING) if isinstance(obj, Mapping) else _MISSING
        p = self.join(path, key)
        if value is _MISSING or value is None:
            if required:
                self.error(p, "required field is missing")
            return None
        if not isinstance(value, Mapping):
            self.error(p, f"must be an object, got {_type_name(value)}")
            return None
        return value

    def sequence(self, obj: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> list[Any] | None:
        """A list; None when absent (or null), [] when present and empty: the API tells them apart."""
        value = obj.get(key, _MISSING) if isinstance(obj, Mapping) else _MISSING
        p = self.join(path, key)
        if value is _MISSING or value is None:
            if required:
                self.error(p, "required field is missing")
            return None
        if not isinstance(value, list):
            self.error(p, f"must be a list, got {_type_name(value)}")
            return None
        return value

    def string(self, obj: Mapping[str, Any], key: str, path: str, *, required: bool = False, default: str | None = None) -> str | None:
        value = obj.get(key, _MISSING) if isinstance(obj, Mapping) else _MISSING
        p = self.join(path, key)
        if value is _MISSING or value is None:
            if required:
                self.error(p, "required field is missing")
            return default
        if not isinstance(value, str):
            self.error(p, f"must be a string, got {_type_name(value)}")
            return default
        return value

    def integer(
        self,
        obj: Mapping[str, Any],
        key: str,
        path: str,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        value = obj.get(key, _MISSING) if isinstance(obj, Mapping) else _MISSING
        p = self.join(path, key)
        if value is _MISSING or value is None:
            if required:
                self.error(p, "required field is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(p, f"must be an integer, got {_type_name(value)} {shown(value)}")
            return None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            self.error(p, f"must be between {minimum} and {maximum}, got {shown(value)}")
            return None
        return value

    def boolean(self, obj: Mapping[str, Any], key: str, path: str, *, default: bool = False) -> bool:
        value = obj.get(key, _MISSING) if isinstance(obj, Mapping) else _MISSING
        if value is _MISSING or value is None:
            return default
        if not isinstance(value, bool):
            self.error(self.join(path, key), f"must be true or false, got {shown(value)}")
            return default
        return value

    def string_map(self, obj: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
        """A map of strings to strings (labels); values that YAML read as numbers or booleans are errors."""
        raw = self.mapping(obj, key, path)
        if raw is None:
            return {}
        out: dict[str, str] = {}
        p = self.join(path, key)
        for k, v in raw.items():
            if not isinstance(k, str):
                self.error(self.key(p, k), f"label keys must be strings, got {_type_name(k)} {shown(k)} (quote it)")
                continue
            if not isinstance(v, str):
                self.error(self.key(p, k), f"label values must be strings, got {_type_name(v)} {shown(v)} (quote it)")
                continue
            out[k] = v
        return out


@lru_cache(maxsize=64)
def _lowered(read: tuple[str, ...]) -> dict[str, str]:
    return {r.lower(): r for r in read}


def _unknown_message(key: object, known: Collection[str]) -> str:
    if not isinstance(key, str):
        return f"unknown field {shown(key)} (field names are strings)"
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75) if len(key) <= 100 else []
    if close:
        return f"unknown field (did you mean {close[0]}?)"
    if len(known) <= 8:
        return f"unknown field (expected {', '.join(sorted(known))})"
    return "unknown field"


def _type_name(value: object) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__
