"""Kubernetes name and label syntax, as the API server validates it (apimachinery's
IsDNS1123Label, IsDNS1123Subdomain, IsQualifiedName and IsValidLabelValue).

Each check returns None when the value is valid, else a short problem text.
"""

from __future__ import annotations

import re
from functools import lru_cache

from kube_network_policies.model.errors import shown

# Label keys, label values, namespaces and port names repeat across objects: their checks are
# cached (bounded); names of objects are mostly unique and are not.
_cached = lru_cache(maxsize=8192)

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")

DNS_LABEL_MAX = 63
DNS_SUBDOMAIN_MAX = 253
NAME_MAX = 63  # the name part of a qualified name, and a label value


@_cached
def dns_label_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if len(value) > DNS_LABEL_MAX:
        return f"must be no more than {DNS_LABEL_MAX} characters, got {len(value)}"
    if not _DNS_LABEL.fullmatch(value):
        return (
            f"invalid name {shown(value)}: a DNS-1123 label consists of lowercase letters, digits and '-', and starts and ends with a letter or digit"
        )
    return None


def dns_subdomain_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if len(value) > DNS_SUBDOMAIN_MAX:
        return f"must be no more than {DNS_SUBDOMAIN_MAX} characters, got {len(value)}"
    if not _DNS_SUBDOMAIN.fullmatch(value):
        return (
            f"invalid name {shown(value)}: a DNS-1123 subdomain consists of lowercase letters, digits, '-' and '.', "
            "and starts and ends with a letter or digit"
        )
    return None


@_cached
def label_key_problem(key: str) -> str | None:
    """A qualified name: an optional DNS-subdomain prefix and '/', then a name of at most 63
    characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if "/" in prefix:
            return f"invalid label key {shown(key)}: at most one '/'"
        if not prefix:
            return f"invalid label key {shown(key)}: the prefix before '/' must not be empty"
        problem = dns_subdomain_problem(prefix)
        if problem is not None:
            return f"invalid label key {shown(key)}: prefix {problem}"
    if not name:
        return f"invalid label key {shown(key)}: the name must not be empty"
    if len(name) > NAME_MAX:
        return f"invalid label key {shown(key)}: the name must be no more than {NAME_MAX} characters"
    if not _QUALIFIED_NAME.fullmatch(name):
        return f"invalid label key {shown(key)}: the name consists of letters, digits, '-', '_' and '.', and starts and ends with a letter or digit"
    return None


@_cached
def label_value_problem(value: str) -> str | None:
    if not value:
        return None  # an empty label value is valid
    if len(value) > NAME_MAX:
        return f"invalid label value {shown(value)}: must be no more than {NAME_MAX} characters"
    if not _QUALIFIED_NAME.fullmatch(value):
        return f"invalid label value {shown(value)}: letters, digits, '-', '_' and '.', starting and ending with a letter or digit (or empty)"
    return None


@_cached
def port_name_problem(name: str) -> str | None:
    """IANA_SVC_NAME: at most 15 characters, lowercase letters, digits and '-', at least one
    letter, no leading, trailing or double '-'."""
    ok = (
        1 <= len(name) <= 15
        and name.isascii()
        and not name.startswith("-")
        and not name.endswith("-")
        and "--" not in name
        and all(c.islower() or c.isdigit() or c == "-" for c in name)
        and any(c.isalpha() for c in name)
    )
    return None if ok else f"invalid port name {shown(name)} (1-15 lowercase letters, digits or '-', with a letter)"
