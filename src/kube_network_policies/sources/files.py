"""Manifest files: YAML or JSON, one or many documents, `kind: List`, files or directories."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kube_network_policies.model import (
    ApiObject,
    ValidationError,
    object_key,
    parse_object,
)
from kube_network_policies.sources.base import Batch, Change, Key, SourceError

log = logging.getLogger(__name__)

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


def diff_objects(old: Mapping[Key, ApiObject], new: Mapping[Key, ApiObject]) -> list[Change]:
    """The changes that turn `old` into `new`."""
    changes = [Change(key, old.get(key), obj) for key, obj in new.items() if old.get(key) != obj]
    changes.extend(Change(key, obj, None) for key, obj in old.items() if key not in new)
    return changes


class ManifestSource:
    """Manifest files as a source (standalone mode): read when the agent starts, read again when
    they change. A set with an invalid object is refused as a whole: the previous state stays in
    force. Each batch is marked with the digest of the files it came from."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)
        self.objects: dict[Key, ApiObject] = {}
        self.digest = ""
        self._watcher = ManifestWatcher(self.paths)
        self._pending: Batch | None = None
        self._opened = False

    name = "manifests"

    def _read(self) -> tuple[dict[Key, ApiObject], str]:
        objects = load_objects(self.paths)
        return {object_key(o): o for o in objects}, manifest_digest(self.paths)

    def open(self) -> None:
        self._watcher.changed()
        try:
            new, digest = self._read()
        except ManifestError as exc:
            raise SourceError(str(exc)) from None
        self._pending = Batch(diff_objects({}, new), {"digest": digest})
        self.objects, self.digest, self._opened = new, digest, True

    def start(self) -> None:
        pass

    def synced(self) -> bool:
        return self._opened

    def take(self) -> Batch | None:
        if self._pending is not None:
            batch, self._pending = self._pending, None
            return batch
        if not self._watcher.changed():
            return None
        try:
            new, digest = self._read()
        except ManifestError as exc:
            log.error("manifests not applied, the previous state stays in force:\n%s", exc)
            return None
        batch = Batch(diff_objects(self.objects, new), {"digest": digest})
        self.objects, self.digest = new, digest
        return batch

    def fileno(self) -> int | None:
        return None

    def status(self) -> dict[str, object]:
        return {"manifests": {"synced": self._opened, "digest": self.digest, "objects": len(self.objects), "paths": self.paths}}

    def stop(self) -> None:
        pass
