"""A path-aware reader over plain dicts (what JSON and YAML give).

Parsers ask it for typed fields; every problem is recorded with the field path instead of raising
at the first one, so a user sees all that is wrong with an object at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kube_network_policies.model.errors import FieldError

_MISSING: Any = object()


class Fields:
    __slots__ = ("errors",)

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    @staticmethod
    def join(path: str, key: str | int) -> str:
        if isinstance(key, int):
            return f"{path}[{key}]"
        return f"{path}.{key}" if path else key

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
            self.error(p, f"must be an integer, got {_type_name(value)} {value!r}")
            return None
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            self.error(p, f"must be between {minimum} and {maximum}, got {value}")
            return None
        return value

    def boolean(self, obj: Mapping[str, Any], key: str, path: str, *, default: bool = False) -> bool:
        value = obj.get(key, _MISSING) if isinstance(obj, Mapping) else _MISSING
        if value is _MISSING or value is None:
            return default
        if not isinstance(value, bool):
            self.error(self.join(path, key), f"must be true or false, got {value!r}")
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
            if not isinstance(k, str) or not isinstance(v, str):
                self.error(f"{p}.{k}", f"label keys and values must be strings, got {_type_name(v)} {v!r} (quote it)")
                continue
            out[k] = v
        return out


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
