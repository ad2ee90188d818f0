"""`kube-network-policies run` refusing bad input: exit status 2, a message naming the flag, file
or field, and never a traceback. None of these cases gets as far as the dataplane, so they need no
root and touch nothing (every run binds its metrics port on 127.0.0.1, port 0 or a busy port).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: t}\n"
BAD_EXCEPT = (
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: t}\n"
    "spec:\n  podSelector: {}\n  ingress:\n    - from:\n"
    "        - ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/16]}\n"
)


def run(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("KNP_DEBUG", None)
    env.pop("NODE_NAME", None)
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        env.pop(name, None)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "kube_network_policies", "run", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def assert_refused(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    return out


@pytest.fixture
def good(tmp_path: Path) -> Path:
    d = tmp_path / "good"
    d.mkdir()
    (d / "ns.yaml").write_text(NAMESPACE)
    return d


def test_missing_manifest_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    r = run("--manifests", str(missing), "-metrics-bind-address", "127.0.0.1:0")
    assert_refused(r, str(missing), "no such file or directory")


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(NAMESPACE + "---\nkind: [unclosed\n")
    r = run("--manifests", str(bad), "-metrics-bind-address", "127.0.0.1:0")
    assert_refused(r, str(bad), "invalid YAML at line")


def test_invalid_field_names_file_document_object_and_field(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "a-ns.yaml").write_text(NAMESPACE)
    bad = d / "b-policy.yaml"
    bad.write_text(NAMESPACE + "---\n" + BAD_EXCEPT)
    r = run("--manifests", str(d), "--hostname-override", "node-1", "-metrics-bind-address", "127.0.0.1:0")
    assert_refused(r, f"{bad} document 2", "NetworkPolicy t/bad", "spec.ingress[0].from[0].ipBlock.except[0]", "strict subset")


def test_not_a_kubernetes_object(tmp_path: Path) -> None:
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    r = run("--manifests", str(bad), "-metrics-bind-address", "127.0.0.1:0")
    assert_refused(r, str(bad), "must be a Kubernetes object")


@pytest.mark.parametrize(
    ("flag", "needles"),
    [
        ("-nfqueue-id=70000", ("-nfqueue-id", "70000 is not between 0 and 65535")),
        ("--nfqueue-id=-1", ("-nfqueue-id", "-1 is not between 0 and 65535")),
        ("-nfqueue-id=abc", ("-nfqueue-id", "'abc' is not a queue number")),
        ("-nfqueue-count=0", ("-nfqueue-count", "0 is not between 1 and 64")),
        ("-fail-open=maybe", ("-fail-open", "'maybe' is not a boolean")),
        ("-no-such-flag", ("unrecognized arguments: -no-such-flag",)),
    ],
)
def test_bad_flags(good: Path, flag: str, needles: tuple[str, ...]) -> None:
    r = run("--manifests", str(good), "-metrics-bind-address", "127.0.0.1:0", flag)
    out = assert_refused(r, *needles)
    assert "usage:" in out


@pytest.mark.parametrize(
    ("address", "needles"),
    [
        ("nonsense", ("'nonsense' has no port",)),
        ("example.com:9080", ("'example.com' is not an IP address",)),
        ("127.0.0.1:99999", ("port must be a number in 0..65535",)),
        ("::1:9080", ("write an IPv6 host in brackets",)),
    ],
)
def test_bad_metrics_bind_address(good: Path, address: str, needles: tuple[str, ...]) -> None:
    r = run("--manifests", str(good), f"-metrics-bind-address={address}")
    assert_refused(r, "-metrics-bind-address", *needles)


def test_busy_metrics_port(good: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run("--manifests", str(good), "-metrics-bind-address", f"127.0.0.1:{port}")
    assert_refused(r, f"cannot listen on 127.0.0.1:{port}", "Address already in use")


def test_kubernetes_mode_needs_a_cluster_or_a_kubeconfig() -> None:
    # Without --manifests the agent watches the Kubernetes API: outside a pod (no
    # KUBERNETES_SERVICE_HOST, no KUBECONFIG) that is a clear usage error.
    r = run("-metrics-bind-address", "127.0.0.1:0")
    assert_refused(r, "not running in a Kubernetes pod", "--kubeconfig")


def test_bad_kubeconfig(tmp_path: Path) -> None:
    missing = tmp_path / "nope.kubeconfig"
    r = run("--kubeconfig", str(missing), "-metrics-bind-address", "127.0.0.1:0")
    assert_refused(r, f"kubeconfig {missing}: cannot read")
    bad = tmp_path / "bad.kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\ncontexts: []\ncurrent-context: gone\n")
    r = run("--kubeconfig", str(bad), "-metrics-bind-address", "127.0.0.1:0")
    assert_refused(r, "context 'gone' not found")


def test_manifests_and_kubeconfig_exclude_each_other(good: Path, tmp_path: Path) -> None:
    r = run("--manifests", str(good), "--kubeconfig", str(tmp_path / "k"), "-metrics-bind-address", "127.0.0.1:0")
    assert_refused(r, "exclude each other")


def test_no_nft_is_a_clear_error_not_an_internal_one(good: Path, tmp_path: Path) -> None:
    # Valid input, but nftables cannot be used (here: nft not on PATH; as non-root it fails the
    # same way): a start-up problem for the user, exit status 2 like the others. The run stops at
    # backend detection, before anything is installed.
    empty = tmp_path / "bin"
    empty.mkdir()
    r = run("--manifests", str(good), "--hostname-override", "node-1", "-metrics-bind-address", "127.0.0.1:0", path=str(empty))
    out = assert_refused(r, "nftables is not usable", "nft")
    assert "internal error" not in out
