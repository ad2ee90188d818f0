"""The agent image built by hack/images/build.sh runs the agent and leaves the lab out.

The image's root filesystem is unpacked from the archive and the checks run in it with chroot
(root). Building the image takes a minute or more and needs the Debian mirror and PyPI, so this
test never builds it unless asked: it runs when the archive for the current sources is already
built (`hack/images/build.sh agent`), or with KNP_IMAGE_BUILD=1, which builds it first; otherwise
it skips, CI included (.ci/run does not build images: too slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import IO

import pytest

from skips import require_root

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "hack" / "images" / "build.sh"


def _archive() -> Path:
    if os.environ.get("KNP_IMAGE_BUILD") == "1":
        built = subprocess.run(["bash", str(BUILD), "agent"], capture_output=True, text=True, timeout=1800)
        assert built.returncode == 0, built.stderr[-3000:]
        return Path(built.stdout.split()[-1])
    where = subprocess.run(["bash", str(BUILD), "--print-path", "agent"], capture_output=True, text=True, timeout=120)
    if where.returncode != 0:
        pytest.skip(f"cannot tell where the agent image archive is: {where.stderr.strip()}")
    archive = Path(where.stdout.split()[-1])
    if not archive.is_file():
        pytest.skip(
            f"the agent image for these sources is not built ({archive}); build it with `hack/images/build.sh agent`, "
            "or set KNP_IMAGE_BUILD=1 to build it here (not done by default or in .ci/run: it takes a minute or more "
            "and needs the Debian mirror and PyPI)"
        )
    return archive


def _member(outer: tarfile.TarFile, name: str) -> IO[bytes]:
    member = outer.extractfile(name)
    assert member is not None, f"{name} is not a file in the archive"
    return member


def _blob(outer: tarfile.TarFile, digest: str) -> IO[bytes]:
    return _member(outer, f"blobs/sha256/{digest.removeprefix('sha256:')}")


def _unpack(archive: Path, rootfs: Path) -> dict[str, object]:
    """Extract the image's single layer into rootfs; return the image config's `config` object."""
    with tarfile.open(archive) as outer:
        index = json.load(_member(outer, "index.json"))
        manifest = json.load(_blob(outer, index["manifests"][0]["digest"]))
        config = json.load(_blob(outer, manifest["config"]["digest"]))
        (layer,) = manifest["layers"]
        with tarfile.open(fileobj=_blob(outer, layer["digest"]), mode="r|gz") as tar:
            tar.extractall(rootfs, numeric_owner=True, filter="fully_trusted")
    runtime: dict[str, object] = config["config"]
    return runtime


def test_the_built_agent_image_runs_the_cli_and_has_no_lab(tmp_path: Path) -> None:
    require_root("chroot", why="the image's root filesystem is unpacked with its owners and entered with chroot")
    archive = _archive()
    rootfs = tmp_path / "rootfs"
    config = _unpack(archive, rootfs)
    env_list = config["Env"]
    assert isinstance(env_list, list)
    env = dict(str(e).split("=", 1) for e in env_list)
    entrypoint = config["Entrypoint"]
    assert entrypoint == ["kube-network-policies", "run"]

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["chroot", str(rootfs), *argv], capture_output=True, text=True, env=env, timeout=120)

    helped = run("kube-network-policies", "--help")
    assert helped.returncode == 0 and "usage: kube-network-policies" in helped.stdout, helped
    assert run("kube-network-policies", "run", "--help").returncode == 0
    assert run("python3", "-c", "import kube_network_policies.agent, kube_network_policies.explain").returncode == 0
    lab = run("python3", "-c", "import kube_network_policies.lab")
    assert lab.returncode != 0 and "No module named 'kube_network_policies.lab'" in lab.stderr, lab
    iptables = run("iptables", "--version")
    assert iptables.returncode == 0 and "nf_tables" in iptables.stdout, iptables
    assert run("nft", "--version").returncode == 0
