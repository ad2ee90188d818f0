"""Manifest files: YAML or JSON, one or many documents, `kind: List`, files or directories.

Reading is bounded and complete or refused: a file over MAX_FILE_BYTES, manifests over
MAX_TOTAL_BYTES together, a path that cannot be read (a directory or file without permission, a
dangling symlink, a FIFO) or any invalid content (see sources.decode for the limits) is an error
naming the path, never a silently smaller set. Objects are parsed strictly (model.parse_object):
unknown fields are errors, as with `kubectl apply`. The same object (kind, namespace, name) in
two places is an error naming both.

Directories are read recursively; names starting with '.' are skipped, as the kubelet does for
static pod manifests: Kubernetes ConfigMap volumes keep their files twice (`..data/` and a
timestamped `..2024_...` directory, besides the visible symlinks), and editors keep swap and
backup files there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kube_network_policies.errors import InputError
from kube_network_policies.model import (
    ApiObject,
    ValidationError,
    object_key,
    parse_object,
)
from kube_network_policies.model.errors import clip, shown
from kube_network_policies.sources.base import Batch, Change, Key, SourceError
from kube_network_policies.sources.decode import DecodeError, load_json, load_yaml

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 16 << 20  # 4x a List of 10,000 pods (4 MB); the API server takes 3 MiB per request
MAX_TOTAL_BYTES = 64 << 20
MAX_PROBLEMS_SHOWN = 100  # per refusal; the number of the rest is given
# Content is re-hashed when a file's stat changed, while its last change is this recent (a
# write within the same timestamp tick leaves stat unchanged), and for every file this often:
# no change is missed, whatever a writer does to timestamps (cp -p, rsync -t, tar).
RACY_S = 2.0
REHASH_ALL_S = 5.0


class ManifestError(InputError):
    """A manifest that cannot be read or holds an invalid object; names the file and document."""


@dataclass(frozen=True, slots=True)
class Located:
    where: str  # "policies.yaml document 2" or "policies.yaml document 2 item 3"
    raw: Mapping[str, Any]


# --- finding and reading files ------------------------------------------------------------------


def _walk(paths: list[str], suffixes: tuple[str, ...] = MANIFEST_SUFFIXES) -> list[tuple[Path, str]]:
    """(path, name relative to its root) of every file named directly and every file with one of
    `suffixes` under a directory; raises ManifestError for any path that cannot be listed or
    read."""
    out: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise ManifestError(f"{raw}: no such file or directory") from None
        except OSError as exc:
            raise ManifestError(f"{raw}: cannot read: {exc.strerror or exc}") from None
        if stat.S_ISDIR(st.st_mode):
            _walk_dir(p, "", out, {(st.st_dev, st.st_ino)}, suffixes)
        elif stat.S_ISREG(st.st_mode):
            out.append((p, p.name))
        else:
            raise ManifestError(f"{raw}: not a regular file or directory")
    return out


def _walk_dir(d: Path, rel: str, out: list[tuple[Path, str]], ancestors: set[tuple[int, int]], suffixes: tuple[str, ...]) -> None:
    try:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise ManifestError(f"{d}: cannot read directory: {exc.strerror or exc}") from None
    for e in entries:
        if e.name.startswith("."):
            continue
        path, name = Path(e.path), f"{rel}{e.name}"
        is_manifest = e.name.endswith(suffixes)
        try:
            st = os.stat(e.path)  # follows symlinks, like a reader of the file
        except OSError as exc:
            if is_manifest or not e.is_symlink():
                raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
            continue  # a dangling symlink with another suffix is not ours
        if stat.S_ISDIR(st.st_mode):
            ident = (st.st_dev, st.st_ino)
            if ident in ancestors:
                raise ManifestError(f"{path}: symlink loop (a directory that contains itself)")
            _walk_dir(path, f"{name}/", out, ancestors | {ident}, suffixes)
        elif is_manifest:
            if not stat.S_ISREG(st.st_mode):
                raise ManifestError(f"{path}: not a regular file")
            out.append((path, name))


def manifest_files(paths: list[str], suffixes: tuple[str, ...] = MANIFEST_SUFFIXES) -> list[Path]:
    """Every file named in `paths` and every file with one of `suffixes` under a directory in
    them (hidden names skipped); ManifestError for anything that cannot be listed or read, so
    that nothing is left out silently."""
    return [p for p, _ in _walk(paths, suffixes)]


def read_file(path: Path) -> bytes:
    """The bytes of a regular file, at most MAX_FILE_BYTES; raises ManifestError."""
    try:
        # O_NONBLOCK: a FIFO put in place of a file must not block the reader in open().
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ManifestError(f"{path}: {st.st_size} bytes, more than the limit of {MAX_FILE_BYTES}")
        chunks, size = [], 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, min(1 << 20, MAX_FILE_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise ManifestError(f"{path}: more than the limit of {MAX_FILE_BYTES} bytes")
    return b"".join(chunks)


# --- parsing ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileObjects:
    """What one file holds: its objects with their locations, or its problems."""

    objects: tuple[tuple[str, ApiObject], ...]
    problems: tuple[str, ...]


def _documents(path: Path, docs: list[Any]) -> Iterator[Located | str]:
    """Every object of the documents (kind: List expanded), or a problem text."""
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        where = f"{path} document {i}"
        if not isinstance(doc, Mapping):
            yield f"{where}: must be a Kubernetes object (a mapping), got {shown(doc)}"
            continue
        kind = doc.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and "items" in doc:
            items = doc.get("items") or []
            if not isinstance(items, list):
                yield f"{where}: items must be a list"
                continue
            for j, item in enumerate(items):
                if not isinstance(item, Mapping):
                    yield f"{where} item {j}: must be a Kubernetes object (a mapping)"
                else:
                    yield Located(f"{where} item {j}", item)
        else:
            yield Located(where, doc)


def parse_file(path: Path, data: bytes) -> FileObjects:
    """Decode and parse one file's content. Never raises: whatever the bytes are, the outcome
    is objects or problems naming the file."""
    try:
        return _parse_file(path, data)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a fail-closed agent against its input
        return FileObjects((), (f"{path}: cannot be read: {type(exc).__name__}: {clip(str(exc), 300)}",))


def _parse_file(path: Path, data: bytes) -> FileObjects:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return FileObjects((), (f"{path}: not UTF-8 text (byte {exc.start})",))
    try:
        docs = [load_json(text)] if path.suffix == ".json" else load_yaml(text)
    except DecodeError as exc:
        where = f"{path} document {exc.document}" if exc.document and not exc.syntax else str(path)
        return FileObjects((), (f"{where}: {exc}",))
    objects: list[tuple[str, ApiObject]] = []
    problems: list[str] = []
    for located in _documents(path, docs):
        if isinstance(located, str):
            problems.append(located)
            continue
        try:
            objects.append((located.where, parse_object(located.raw, strict=True)))
        except ValidationError as exc:
            problems.append(exc.within(located.where).describe())
    return FileObjects(tuple(objects), tuple(problems))


def _collect(results: list[FileObjects]) -> dict[Key, ApiObject]:
    """The objects of every file by key; raises ManifestError with every problem, duplicates
    included."""
    objects: dict[Key, ApiObject] = {}
    where: dict[Key, str] = {}
    problems: list[str] = []
    for r in results:
        problems.extend(r.problems)
        for w, obj in r.objects:
            key = object_key(obj)
            if key in where:
                kind, ns, name = key
                problems.append(f"{w}: {kind} {f'{ns}/' if ns else ''}{name}: duplicate object, already defined in {where[key]}")
                continue
            where[key] = w
            objects[key] = obj
    if problems:
        shown_problems = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            shown_problems.append(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more problems")
        raise ManifestError("\n".join(shown_problems))
    return objects


def _check_total(total: int) -> None:
    if total > MAX_TOTAL_BYTES:
        raise ManifestError(f"manifests of {total} bytes together, more than the limit of {MAX_TOTAL_BYTES}")


def load_objects(paths: list[str]) -> list[ApiObject]:
    """Parse every object; all problems are collected into one ManifestError."""
    results: list[FileObjects] = []
    total = 0
    for path, _ in _walk(paths):
        data = read_file(path)
        total += len(data)
        _check_total(total)
        results.append(parse_file(path, data))
    return list(_collect(results).values())


def _digest(entries: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, file_digest in entries:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0" + file_digest)
    return h.hexdigest()[:16]


def manifest_digest(paths: list[str]) -> str:
    """A digest of the manifest files' names and contents: what a reader of these paths sees.

    The agent reports the digest of what it enforces; a writer (the lab) computes the same over
    what it wrote and waits until they agree. Raises ManifestError when a file cannot be read.
    """
    return _digest([(name, hashlib.sha256(read_file(p)).digest()) for p, name in _walk(paths)])


def diff_objects(old: Mapping[Key, ApiObject], new: Mapping[Key, ApiObject]) -> list[Change]:
    """The changes that turn `old` into `new`."""
    changes = [Change(key, old.get(key), obj) for key, obj in new.items() if old.get(key) != obj]
    changes.extend(Change(key, obj, None) for key, obj in old.items() if key not in new)
    return changes


# --- the source ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Cached:
    signature: tuple[int, int, int, int, int]  # dev, inode, size, mtime_ns, ctime_ns
    digest: bytes  # sha256 of the content
    size: int
    parsed: FileObjects


def _signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class ManifestSource:
    """Manifest files as a source (standalone mode): read when the agent starts, read again when
    they change. A set that cannot be read completely, or holds an invalid object, is refused as
    a whole: the previous state stays in force, and the refusal is logged once (and shown in
    /statusz) until the files change. Each batch is marked with the digest of the files it came
    from.

    Changes are found by polling: every file is stat'ed on each `take`; a file is read and
    hashed again when its stat changed, while it changed recently, and every REHASH_ALL_S;
    only a file whose content hash changed is parsed again.
    """

    name = "manifests"

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)
        self.objects: dict[Key, ApiObject] = {}
        self.digest = ""
        self.error = ""  # why the files on disk are not what is applied ("" when they are)
        self._cache: dict[Path, _Cached] = {}
        self._applied: tuple[tuple[str, bytes], ...] | None = None
        self._refused: tuple[tuple[str, bytes], ...] | None = None
        self._hashed_all_at = float("-inf")
        self._pending: Batch | None = None
        self._opened = False

    def _scan(self) -> tuple[tuple[str, bytes], ...]:
        """(name, content digest) of every file, reading only what may have changed; updates
        the per-file cache. Raises ManifestError."""
        now = time.time()
        rehash_all = time.monotonic() - self._hashed_all_at >= REHASH_ALL_S
        cache: dict[Path, _Cached] = {}
        total = 0
        for path, _ in (files := _walk(self.paths)):
            try:
                st = os.stat(path)
            except OSError as exc:
                raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}") from None
            total += st.st_size
            _check_total(total)
            old = self._cache.get(path)
            sig = _signature(st)
            recent = now - max(st.st_mtime, st.st_ctime) < RACY_S
            if old is not None and old.signature == sig and not recent and not rehash_all:
                cache[path] = old
                continue
            data = read_file(path)
            digest = hashlib.sha256(data).digest()
            if old is not None and old.digest == digest:
                cache[path] = _Cached(sig, digest, len(data), old.parsed)
            else:
                cache[path] = _Cached(sig, digest, len(data), parse_file(path, data))
        if rehash_all:
            self._hashed_all_at = time.monotonic()
        self._cache = cache
        return tuple((name, cache[path].digest) for path, name in files)

    def _read(self) -> dict[Key, ApiObject]:
        return _collect([c.parsed for c in self._cache.values()])

    def open(self) -> None:
        try:
            current = self._scan()
            new = self._read()
        except ManifestError as exc:
            raise SourceError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - whatever the files hold, the caller sees a SourceError
            raise SourceError(f"manifests could not be read: {type(exc).__name__}: {clip(str(exc), 500)}") from None
        digest = _digest(list(current))
        self._pending = Batch(diff_objects({}, new), {"digest": digest})
        self.objects, self.digest, self._opened, self._applied = new, digest, True, current

    def start(self) -> None:
        pass

    def synced(self) -> bool:
        return self._opened

    def take(self) -> Batch | None:
        """The changes since the last call, or None. Never raises: a refused change is logged
        and the previous state stays in force."""
        if self._pending is not None:
            batch, self._pending = self._pending, None
            return batch
        current: tuple[tuple[str, bytes], ...] | None = None
        try:
            current = self._scan()
            if current == self._applied:
                if self.error:
                    log.info("manifests: the files are the applied ones again")
                    self.error = ""
                return None
            if current == self._refused:
                return None  # refused already, and reported
            new = self._read()
        except ManifestError as exc:
            self._refuse(str(exc), current)
            return None
        except Exception as exc:  # noqa: BLE001 - nothing a file holds may stop a fail-closed agent
            self._refuse(f"manifests could not be read: {type(exc).__name__}: {clip(str(exc), 500)}", current)
            return None
        digest = _digest(list(current))
        batch = Batch(diff_objects(self.objects, new), {"digest": digest})
        self.objects, self.digest, self._applied, self._refused, self.error = new, digest, current, None, ""
        return batch

    def _refuse(self, message: str, current: tuple[tuple[str, bytes], ...] | None) -> None:
        """Keep the applied state; log the reason once (until it changes)."""
        self._refused = current  # None when the files could not even be listed or read
        if message != self.error:
            log.error("manifests not applied, the previous state stays in force:\n%s", message)
        self.error = message

    def fileno(self) -> int | None:
        return None

    def status(self) -> dict[str, object]:
        return {
            "manifests": {
                "synced": self._opened,
                "digest": self.digest,
                "objects": len(self.objects),
                "paths": self.paths,
                "files": len(self._cache),
                "error": self.error,
            }
        }

    def problems(self) -> dict[str, str]:
        """A refused change: the files are not what is enforced."""
        return {"manifests": "the manifest files changed but were refused; the previous state stays in force (see the log)"} if self.error else {}

    def stop(self) -> None:
        pass
