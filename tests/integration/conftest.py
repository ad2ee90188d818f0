"""Integration tests against a real kube-apiserver + etcd on loopback.

The binaries come from ``hack/controlplane/build.sh`` (built once, 10-25 minutes cold on 2
cores, then reused from ``${KNP_CACHE:-/var/cache/kube-network-policies}/controlplane``).

- ``KNP_CONTROLPLANE_BIN_DIR=DIR``: use the etcd and kube-apiserver in DIR, build nothing.
- ``KNP_BUILD_CONTROLPLANE=1``: build the binaries when they are missing (10-25 min cold);
  without it (and outside CI) tests that need the control plane skip with the reason.
- ``CI=true``: these tests never skip: the binaries are built if missing, and anything that
  keeps the control plane from running fails the tests.
- ``KNP_CRDS_DIR``: the policy API CRDs (default: ``shared/crds`` beside the repository).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kube_network_policies.lab.controlplane import ControlPlane
from skips import in_ci, skip_or_fail  # tests/skips.py

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "controlplane" / "build.sh"


def _has_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / n, os.X_OK) for n in ("etcd", "kube-apiserver"))


@pytest.fixture(scope="session")
def controlplane_bin_dir(request: pytest.FixtureRequest) -> Path:
    """The directory holding etcd and kube-apiserver, built (or reused) by build.sh."""
    override = os.environ.get("KNP_CONTROLPLANE_BIN_DIR")
    if override:
        if not _has_binaries(Path(override)):
            skip_or_fail(f"KNP_CONTROLPLANE_BIN_DIR={override} has no etcd and kube-apiserver")
        return Path(override)
    if shutil.which("go") is None:
        skip_or_fail("needs Go to build kube-apiserver and etcd (hack/controlplane/build.sh)")
    # Opt-in: a test run never starts a long build by surprise (CI builds: it must run these).
    allowed = in_ci() or os.environ.get("KNP_BUILD_CONTROLPLANE") == "1"
    probe = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-path"], capture_output=True, text=True)
    if probe.returncode != 0:
        skip_or_fail(f"hack/controlplane/build.sh --print-path failed: {probe.stderr.strip()}")
    bin_dir = Path(probe.stdout.strip())
    if _has_binaries(bin_dir):
        return bin_dir
    if not allowed:
        skip_or_fail(f"kube-apiserver/etcd not built in {bin_dir}: run hack/controlplane/build.sh (10-25 min cold) or set KNP_BUILD_CONTROLPLANE=1")
    # A long build: show its progress on the terminal rather than capturing it.
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        print(
            "\nbuilding the test control plane (hack/controlplane/build.sh, 10-25 min cold)",
            flush=True,
        )
        build = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if build.returncode != 0 or not _has_binaries(bin_dir):
        pytest.fail(f"hack/controlplane/build.sh failed (exit {build.returncode})", pytrace=False)
    return bin_dir


@pytest.fixture(scope="session")
def controlplane(controlplane_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running etcd + kube-apiserver for the whole session (no CRDs: see ``policy_crds``)."""
    cp = ControlPlane.start(controlplane_bin_dir, tmp_path_factory.mktemp("controlplane"))
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def policy_crds_dir() -> Path:
    """Where the policy API CRDs are (read in place, never copied into the repo)."""
    d = Path(os.environ.get("KNP_CRDS_DIR") or REPO.parent / "shared" / "crds")
    if not d.is_dir():
        skip_or_fail(f"the policy API CRDs are not at {d} (set KNP_CRDS_DIR)")
    return d


@pytest.fixture(scope="session")
def policy_crds(controlplane: ControlPlane, policy_crds_dir: Path) -> list[str]:
    """The AdminNetworkPolicy, BaselineAdminNetworkPolicy and ClusterNetworkPolicy CRDs,
    installed from shared/crds and Established; returns the CRD names."""
    return controlplane.install_crds([policy_crds_dir])
