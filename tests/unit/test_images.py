"""The agent image built without Docker (hack/images/build.sh agent) stays the Dockerfile's image.

build.sh takes everything it puts in the image from hack/images/agent.toml; these tests parse the
Dockerfile and .dockerignore and check that the declaration says the same: entrypoint, working
directory, environment, labels, packages, iptables alternatives, base release, the package's build
context (the lab left out). Plus oci.py's archive format on a tiny root filesystem. No root, no build.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import re
import shlex
import sys
import tarfile
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from test_packaging import docker_context  # tests/unit: the .dockerignore semantics, computed

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "hack" / "images"
# What the Dockerfile's base image (python:3.11-slim-bookworm) adds to the environment.
BASE_IMAGE_ENV = {"PATH", "LANG"}


def _oci() -> ModuleType:
    spec = importlib.util.spec_from_file_location("knp_images_oci", IMAGES / "oci.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


oci = _oci()


def _agent() -> dict[str, Any]:
    return tomllib.loads((IMAGES / "agent.toml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def _all(instruction: str) -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == instruction]


def _pairs(args: str) -> dict[str, str]:
    """LABEL/ENV key=value pairs, values possibly quoted."""
    pairs = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"not a key=value pair: {word!r} in {args!r}"
        pairs[key] = value
    return pairs


def _run_commands() -> list[list[str]]:
    """Every simple command of every RUN, split at && (the Dockerfile's only separator)."""
    commands = []
    for args in _all("RUN"):
        for part in args.split("&&"):
            words = shlex.split(part)
            if words:
                commands.append(words)
    return commands


def test_same_entrypoint_and_working_directory_and_no_user() -> None:
    image = _agent()["image"]
    (entrypoint,) = _all("ENTRYPOINT")
    assert json.loads(entrypoint) == image["entrypoint"]
    assert _all("WORKDIR")[-1] == image["workdir"]
    assert not _all("USER") and not image.get("user")
    assert not _all("CMD") and not image.get("cmd")


def test_same_environment() -> None:
    env = _agent()["image"]["env"]
    dockerfile_env: dict[str, str] = {}
    for args in _all("ENV"):
        dockerfile_env.update(_pairs(args))
    assert dockerfile_env, "the Dockerfile sets no ENV: the parser is out of date"
    assert {k: env.get(k) for k in dockerfile_env} == dockerfile_env
    assert set(env) - set(dockerfile_env) <= BASE_IMAGE_ENV


def test_same_labels() -> None:
    labels: dict[str, str] = {}
    for args in _all("LABEL"):
        labels.update(_pairs(args))
    assert labels == _agent()["image"]["labels"]


def test_same_base_release_and_python() -> None:
    rootfs = _agent()["rootfs"]
    (base,) = _all("FROM")
    match = re.fullmatch(r"python:(\d+\.\d+)-slim-(\w+)", base)
    assert match, f"unexpected base image {base!r}: update hack/images/agent.toml and this test"
    assert (match[1], match[2]) == (rootfs["python"], rootfs["suite"])
    assert rootfs["base_packages"] == ["python3"]  # bookworm's python3 is 3.11


def test_same_packages_and_iptables_alternatives() -> None:
    rootfs = _agent()["rootfs"]
    installed: list[str] = []
    alternatives: list[str] = []
    for words in _run_commands():
        if words[:2] == ["apt-get", "install"]:
            installed += [w for w in words[2:] if not w.startswith("-")]
        if words[:2] == ["update-alternatives", "--set"]:
            alternatives.append(f"{words[2]}={words[3]}")
    assert installed and sorted(installed) == sorted(rootfs["packages"])
    assert sorted(alternatives) == sorted(rootfs["alternatives"])


def test_same_package_build_context_without_the_lab() -> None:
    files = set(oci.package_inputs(_agent(), IMAGES / "agent.toml", ROOT))
    assert files == docker_context()
    assert "src/kube_network_policies/cli.py" in files
    assert not [f for f in files if f.startswith("src/kube_network_policies/lab/")]
    # The Dockerfile copies exactly the declared inputs.
    copied = {w.rstrip("/") for args in _all("COPY") for w in shlex.split(args)[:-1]}
    assert copied == set(_agent()["package"]["inputs"])


def test_the_image_name_is_the_manifests_one() -> None:
    (reference,) = _agent()["image"]["references"]
    for manifest in ("install.yaml", "install-anp.yaml", "install-cnp.yaml"):
        images = {
            c["image"]
            for doc in yaml.safe_load_all((ROOT / manifest).read_text())
            if doc and doc.get("kind") == "DaemonSet"
            for c in doc["spec"]["template"]["spec"]["containers"]
        }
        assert images == {reference}, manifest


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("src/kube_network_policies/lab/up.py", True),
        ("src/kube_network_policies/lab", True),
        ("src/kube_network_policies/laboratory.py", False),
        ("src/kube_network_policies/__pycache__/cli.cpython-311.pyc", True),
        ("src/kube_network_policies/cli.pyc", True),
        ("src/kube_network_policies.egg-info/PKG-INFO", True),
        ("src/kube_network_policies/cli.py", False),
    ],
)
def test_exclusion_patterns(rel: str, expected: bool) -> None:
    assert oci.excluded(rel, _agent()["package"]["exclude"]) is expected


def test_pack_writes_an_oci_layout_containerd_imports_by_name(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "hello").write_text("#!/bin/sh\necho hi\n")
    (rootfs / "bin" / "hi").symlink_to("hello")
    (rootfs / "tmp").mkdir()
    (rootfs / "tmp" / "scratch").write_text("left out: the runtime's directory")
    decl = tmp_path / "x.toml"
    decl.write_text('[image]\nreferences = ["example.org/a/b:v1", "example.org/c:2"]\nentrypoint = ["/bin/hello"]\n[image.env]\nA = "1"\n')
    out = tmp_path / "x.tar"
    oci.pack(oci.image_config(oci.load(decl), decl), rootfs, out, 1_700_000_000)

    with tarfile.open(out) as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert json.loads(blobs["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(blobs["index.json"])
    names = [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]]
    assert names == ["example.org/a/b:v1", "example.org/c:2"]
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["v1", "2"]
    assert oci.archive_references(out) == names

    def blob(digest: str) -> bytes:
        data = blobs[f"blobs/sha256/{digest.removeprefix('sha256:')}"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        return data

    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    assert config["config"] == {"Entrypoint": ["/bin/hello"], "Env": ["A=1"], "WorkingDir": "/"}
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    layer = gzip.decompress(blob(manifest["layers"][0]["digest"]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["bin", "bin/hello", "bin/hi", "tmp"]
    assert members["bin/hi"].issym() and members["bin/hi"].linkname == "hello"
    assert all(m.mtime <= 1_700_000_000 for m in members.values())

    # Equal root filesystems, equal archives: the cache and the digests are stable.
    again = tmp_path / "again.tar"
    oci.pack(oci.image_config(oci.load(decl), decl), rootfs, again, 1_700_000_000)
    assert again.read_bytes() == out.read_bytes()
