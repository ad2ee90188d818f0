"""One entry point from a plain dict to a typed API object (the kinds and their parsers: model.kinds)."""

from __future__ import annotations

from collections.abc import Mapping

from kube_network_policies.model import kinds
from kube_network_policies.model.core import object_subject
from kube_network_policies.model.errors import FieldError, ValidationError, shown
from kube_network_policies.model.kinds import ApiObject

__all__ = ["ApiObject", "object_key", "parse_object"]


def parse_object(obj: object, *, strict: bool = False) -> ApiObject:
    """Parse a Kubernetes object of a supported kind and version; raises ValidationError naming
    what is wrong.

    `strict` (files): unknown fields are errors and names, labels and list sizes are checked as
    the API server checks them (see model.fields). Non-strict: objects the API server stored
    (sources.codecs calls the registry's parsers directly).
    """
    if not isinstance(obj, Mapping):
        raise ValidationError("object", [FieldError("", f"must be a mapping (a Kubernetes object), got {type(obj).__name__}")])
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ValidationError(object_subject("object", obj), [FieldError("kind", "required field is missing")])
    entry = kinds.get(kind)
    if entry is None:
        supported = ", ".join(k.name for k in kinds.all_kinds())
        raise ValidationError(
            object_subject(shown(kind, quote=False), obj), [FieldError("kind", f"unsupported kind {shown(kind)} (supported: {supported})")]
        )
    api_version = obj.get("apiVersion")
    version = entry.version(api_version) if isinstance(api_version, str) else None
    if version is None:
        raise ValidationError(
            object_subject(kind, obj),
            [FieldError("apiVersion", f"{shown(api_version)} is not supported for {kind} (expected {' or '.join(entry.api_versions)})")],
        )
    result: ApiObject = version.parse(obj, strict=strict)
    return result


def object_key(obj: ApiObject) -> tuple[str, str, str]:
    """(kind, namespace, name): the identity of an object in the cluster."""
    return kinds.key(obj)
