#!/usr/bin/env python3
"""Reads the image declarations and packs a root filesystem into an OCI image archive.

Used by hack/images/build.sh; standard library only, so it runs with any Python >= 3.11.

    oci.py get DECL KEY                    print a declaration: a string as is, a list one item a
                                           line, a table KEY=VALUE a line (KEY like image.env)
    oci.py inputs DECL ROOT                print package.inputs under ROOT, less package.exclude
                                           (.dockerignore's pattern forms), one file a line
    oci.py refs ARCHIVE                    print the references an archive's index.json names
    oci.py pack DECL ROOTFS OUT            pack ROOTFS as the single layer of an image configured
                                           by DECL's [image] table; write the OCI layout tar OUT

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) in a tar, which
`ctr images import` reads. Each name in image.references gets its own index entry annotated with
io.containerd.image.name (the full reference: containerd then imports under exactly that name)
and org.opencontainers.image.ref.name.

The layer is reproducible: entries sorted, mtimes clamped to SOURCE_DATE_EPOCH when set, gzip
without a timestamp; so equal root filesystems give equal digests.
"""

from __future__ import annotations

import datetime
import fnmatch
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

# Directories whose contents belong to the runtime, not the image: the runtime mounts /proc,
# /sys, /dev and /run, and a build leaves only scratch files in /tmp. The directories stay.
RUNTIME_DIRS = ("dev", "proc", "sys", "run", "tmp", "var/tmp")


class DeclarationError(Exception):
    """A declaration file is missing, malformed, or lacks a key."""


@dataclass(frozen=True)
class ImageConfig:
    """The [image] table of a declaration file."""

    references: list[str]
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    workdir: str
    user: str


def load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise DeclarationError(f"cannot read {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise DeclarationError(f"{path} is not valid TOML: {e}") from e


def lookup(decl: dict[str, Any], key: str, path: Path) -> object:
    node: object = decl
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise DeclarationError(f"{path} declares no '{key}'")
        node = node[part]
    return node


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DeclarationError(f"{what} must be a list of strings")
    return [str(v) for v in value]


def _table(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise DeclarationError(f"{what} must be a table of strings")
    return {str(k): str(v) for k, v in value.items()}


def image_config(decl: dict[str, Any], path: Path) -> ImageConfig:
    image = lookup(decl, "image", path)
    if not isinstance(image, dict):
        raise DeclarationError(f"{path}: [image] must be a table")
    references = _strings(image.get("references"), f"{path}: image.references")
    if not references:
        raise DeclarationError(f"{path}: image.references is empty")
    return ImageConfig(
        references=references,
        entrypoint=_strings(image.get("entrypoint", []), f"{path}: image.entrypoint"),
        cmd=_strings(image.get("cmd", []), f"{path}: image.cmd"),
        env=_table(image.get("env", {}), f"{path}: image.env"),
        labels=_table(image.get("labels", {}), f"{path}: image.labels"),
        workdir=str(image.get("workdir", "/")),
        user=str(image.get("user", "")),
    )


def excluded(rel: str, patterns: list[str]) -> bool:
    """Whether the relative path `rel` is left out by one of the .dockerignore-style patterns.

    Two forms, the ones .dockerignore uses: `**/GLOB` leaves out every path with a component
    matching GLOB (a directory with all below it); `DIR/` or `PATH` leaves out that path and
    everything below it.
    """
    parts = PurePosixPath(rel).parts
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
        else:
            prefix = pattern.rstrip("/")
            if rel == prefix or rel.startswith(prefix + "/"):
                return True
    return False


def package_inputs(decl: dict[str, Any], path: Path, root: Path) -> list[str]:
    """The files the package build sees: package.inputs under root, less package.exclude."""
    inputs = _strings(lookup(decl, "package.inputs", path), f"{path}: package.inputs")
    exclude = _strings(lookup(decl, "package.exclude", path), f"{path}: package.exclude")
    files: list[str] = []
    for name in inputs:
        top = root / name
        if top.is_file():
            candidates = [top]
        elif top.is_dir():
            candidates = [p for p in top.rglob("*") if p.is_file()]
        else:
            raise DeclarationError(f"package input {top} does not exist")
        files.extend(rel for p in candidates if not excluded(rel := p.relative_to(root).as_posix(), exclude))
    return sorted(files)


def format_value(value: object) -> str:
    """A declaration as bash reads it: one line per list item or table entry."""
    if isinstance(value, list):
        return "".join(f"{v}\n" for v in value)
    if isinstance(value, dict):
        return "".join(f"{k}={v}\n" for k, v in value.items())
    return f"{value}\n"


class _HashingWriter(io.RawIOBase):
    """Passes writes through to `sink`, hashing and counting them on the way."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.sink.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)
        return len(chunk)


def _walk(rootfs: Path) -> list[Path]:
    """Every path under rootfs, sorted, without the contents of the runtime's directories."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(rootfs):
        here = Path(dirpath)
        rel = here.relative_to(rootfs).as_posix()
        if rel in RUNTIME_DIRS:
            dirnames.clear()
            continue
        found.extend(here / name for name in dirnames + filenames)
    return sorted(found, key=lambda p: p.relative_to(rootfs).as_posix())


def write_layer(rootfs: Path, sink: IO[bytes], epoch: int | None) -> tuple[str, str, int]:
    """Write rootfs as a gzipped tar to sink; returns (diff_id, digest, size)."""
    compressed = _HashingWriter(sink)
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, compresslevel=6) as gz:
        uncompressed = _HashingWriter(gz)  # type: ignore[arg-type]
        with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in _walk(rootfs):
                mode = path.lstat().st_mode
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                    continue  # device nodes, sockets, fifos: the runtime provides them
                info = tar.gettarinfo(str(path), arcname=path.relative_to(rootfs).as_posix())
                info.uname = info.gname = ""  # numeric ids only: the image has its own passwd
                if epoch is not None and info.mtime > epoch:
                    info.mtime = epoch
                if info.isreg():
                    with path.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return f"sha256:{uncompressed.digest.hexdigest()}", f"sha256:{compressed.digest.hexdigest()}", compressed.size


def _json_blob(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _tag_of(reference: str) -> str:
    last = reference.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


def pack(config: ImageConfig, rootfs: Path, out: Path, epoch: int | None) -> None:
    """Write the OCI layout tar `out` holding rootfs as one layer, configured by `config`."""
    if not rootfs.is_dir():
        raise DeclarationError(f"root filesystem {rootfs} is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out.parent) as layer:
        diff_id, layer_digest, layer_size = write_layer(rootfs, layer, epoch)
        created = "1970-01-01T00:00:00Z" if epoch is None else _rfc3339(epoch)
        image_config_blob = _json_blob(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": created,
                "config": _runtime_config(config),
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created": created, "created_by": "hack/images/build.sh"}],
            }
        )
        config_digest = "sha256:" + hashlib.sha256(image_config_blob).hexdigest()
        manifest_blob = _json_blob(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_MANIFEST,
                "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(image_config_blob)},
                "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": layer_digest, "size": layer_size}],
            }
        )
        manifest_digest = "sha256:" + hashlib.sha256(manifest_blob).hexdigest()
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": manifest_digest,
                    "size": len(manifest_blob),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {ANNOTATION_CONTAINERD_NAME: ref, ANNOTATION_REF_NAME: _tag_of(ref)},
                }
                for ref in config.references
            ],
        }
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", _json_blob({"imageLayoutVersion": "1.0.0"}))
            _add_bytes(tar, "index.json", _json_blob(index))
            tar.addfile(_dir_info("blobs"))
            tar.addfile(_dir_info("blobs/sha256"))
            _add_bytes(tar, f"blobs/sha256/{config_digest[7:]}", image_config_blob)
            _add_bytes(tar, f"blobs/sha256/{manifest_digest[7:]}", manifest_blob)
            layer.seek(0)
            info = tarfile.TarInfo(f"blobs/sha256/{layer_digest[7:]}")
            info.size = layer_size
            info.mode = 0o644
            tar.addfile(info, layer)
        partial.replace(out)


def archive_references(archive: Path) -> list[str]:
    """The names `ctr images import` gives the images of an archive this tool wrote."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            member = tar.extractfile("index.json")
            if member is None:
                raise DeclarationError(f"{archive}: index.json is not a file")
            index = json.load(member)
    except KeyError as e:
        raise DeclarationError(f"{archive} is not an OCI image layout: it has no index.json") from e
    except (tarfile.TarError, json.JSONDecodeError) as e:
        raise DeclarationError(f"{archive} is not a readable OCI image archive: {e}") from e
    refs: list[str] = []
    for entry in index.get("manifests", []):
        name = entry.get("annotations", {}).get(ANNOTATION_CONTAINERD_NAME)
        if isinstance(name, str):
            refs.append(name)
    return refs


def _runtime_config(config: ImageConfig) -> dict[str, object]:
    """The image config's `config` object; empty fields are left out, as image builders do."""
    fields: dict[str, object] = {
        "Entrypoint": config.entrypoint,
        "Cmd": config.cmd,
        "Env": [f"{k}={v}" for k, v in config.env.items()],
        "Labels": config.labels,
        "WorkingDir": config.workdir,
        "User": config.user,
    }
    return {k: v for k, v in fields.items() if v}


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def _rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


USAGE = "usage: oci.py get DECL KEY | oci.py inputs DECL ROOT | oci.py refs ARCHIVE | oci.py pack DECL ROOTFS OUT"


def main(argv: list[str]) -> int:
    try:
        match argv:
            case ["get", decl, key]:
                sys.stdout.write(format_value(lookup(load(Path(decl)), key, Path(decl))))
            case ["inputs", decl, root]:
                sys.stdout.write(format_value(package_inputs(load(Path(decl)), Path(decl), Path(root))))
            case ["refs", archive]:
                sys.stdout.write(format_value(archive_references(Path(archive))))
            case ["pack", decl, rootfs, out]:
                epoch_text = os.environ.get("SOURCE_DATE_EPOCH")
                epoch = int(epoch_text) if epoch_text else None
                pack(image_config(load(Path(decl)), Path(decl)), Path(rootfs), Path(out), epoch)
            case _:
                print(USAGE, file=sys.stderr)
                return 2
    except DeclarationError as e:
        print(f"oci.py: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"oci.py: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
