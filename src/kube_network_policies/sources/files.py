"""Manifest files: YAML or JSON, one or many documents, `kind: List`, files or directories."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kube_network_policies.model import ApiObject, ValidationError, parse_object

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(Exception):
    """A manifest that cannot be read or holds an invalid object; names the file and document."""


@dataclass(frozen=True, slots=True)
class Located:
    where: str  # "policies.yaml document 2" or "policies.yaml document 2 item 3"
    raw: Mapping[str, Any]


def manifest_files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in MANIFEST_SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise ManifestError(f"{raw}: no such file or directory")
    return out


def read_documents(path: Path) -> Iterator[Located]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None
    try:
        if path.suffix == ".json":
            docs: list[Any] = [json.loads(text)]
        else:
            docs = list(yaml.safe_load_all(text))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ManifestError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        where = f"{path} document {i}"
        if not isinstance(doc, Mapping):
            raise ManifestError(f"{where}: must be a Kubernetes object (a mapping), got {type(doc).__name__}")
        kind = doc.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and "items" in doc:
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ManifestError(f"{where}: items must be a list")
            for j, item in enumerate(items):
                if not isinstance(item, Mapping):
                    raise ManifestError(f"{where} item {j}: must be a Kubernetes object (a mapping)")
                yield Located(f"{where} item {j}", item)
        else:
            yield Located(where, doc)


def load_objects(paths: list[str]) -> list[ApiObject]:
    """Parse every object; all errors are collected into one ManifestError."""
    objects: list[ApiObject] = []
    problems: list[str] = []
    for path in manifest_files(paths):
        try:
            for located in read_documents(path):
                try:
                    objects.append(parse_object(located.raw))
                except ValidationError as exc:
                    problems.append(exc.within(located.where).describe())
        except ManifestError as exc:
            problems.append(str(exc))
    if problems:
        raise ManifestError("\n".join(problems))
    return objects


def manifest_digest(paths: list[str]) -> str:
    """A digest of the manifest files' names and contents: what a reader of these paths sees.

    The agent reports the digest of what it enforces; a writer (the lab) computes the same over
    what it wrote and waits until they agree.
    """
    h = hashlib.sha256()
    for p in manifest_files(paths):
        try:
            data = p.read_bytes()
        except OSError:
            continue
        h.update(p.name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


class ManifestWatcher:
    """Notices changes to manifest files by polling their names, sizes and modification times:
    cheap, and it works for files that editors replace and for directories that gain files."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self._signature: tuple[tuple[str, int, int], ...] | None = None

    def _current(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        try:
            files = manifest_files(self.paths)
        except ManifestError:
            return ()
        for p in files:
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p), st.st_size, st.st_mtime_ns))
        return tuple(out)

    def changed(self) -> bool:
        current = self._current()
        if current != self._signature:
            self._signature = current
            return True
        return False
