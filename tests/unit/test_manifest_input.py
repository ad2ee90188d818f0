"""Manifest files as untrusted input: bounded decoding (depth, aliases, numbers, sizes,
duplicate keys), complete reading (unreadable paths are errors), the file source's change
detection and its promise to the agent: `open()` and `take()` raise nothing but
SourceError/ManifestError, and a refused change keeps the previous state."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kube_network_policies.sources import files
from kube_network_policies.sources.base import SourceError
from kube_network_policies.sources.decode import LOADER, MAX_DEPTH, PYTHON_LOADER, DecodeError, load_json, load_yaml
from kube_network_policies.sources.files import ManifestError, ManifestSource, load_objects, manifest_digest

ROOT = Path(__file__).resolve().parents[2]

DENY_ALL = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: x}\nspec: {podSelector: {}}\n"


def policy(name: str, namespace: str = "x") -> str:
    return f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{podSelector: {{}}}}\n"


def alias_bomb(field: str = "priority") -> str:
    """A 'billion laughs' ANP (about 600 bytes): nine levels of nine aliases, expanded where an
    error message quotes the value."""
    lines = [
        "apiVersion: policy.networking.k8s.io/v1alpha1",
        "kind: AdminNetworkPolicy",
        "metadata: {name: bomb}",
        "spec:",
        "  subject: {namespaces: {}}",
        "  x:",
        '    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    ]
    prev = "a"
    for n in "bcdefghi":
        lines.append(f"    {n}: &{n} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = n
    lines.append(f"  {field}: *i")
    return "\n".join(lines) + "\n"


HOSTILE = {
    "bomb.yaml": alias_bomb(),
    "deep.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: deep}\nx: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "deep.json": '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "deep"}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "huge-int.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: big}\nx: " + "9" * 5000 + "\n",
    "huge-int.json": '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "big"}, "x": ' + "9" * 5000 + "}",
}
HOSTILE_PROBLEM = {
    "bomb.yaml": "document 1: aliases expand to more than",
    "deep.yaml": "nested deeper than 64 levels",
    "deep.json": "nested deeper than 64 levels",
    "huge-int.yaml": "document 1: number of 5000 characters refused (at most 100) at line 4",
    "huge-int.json": "number of more than 100 characters refused at line 1",
}


def knp(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("KNP_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "kube_network_policies", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        preexec_fn=without_dac_override if unprivileged else None,
    )


# --- decoding -----------------------------------------------------------------------------------


# libyaml's loader (when libyaml limits nesting itself, as the bundled 0.2.5 does) and the
# Python one, used without it
LOADERS = pytest.mark.parametrize("loader", sorted({LOADER, PYTHON_LOADER}, key=str), ids=lambda c: c.__mro__[1].__name__)


@LOADERS
def test_depth_limit_is_exact(loader: type) -> None:
    def nested(n: int) -> str:
        return "[" * n + "]" * n

    assert load_json(nested(MAX_DEPTH)) is not None
    assert load_yaml(nested(MAX_DEPTH), loader) is not None
    for load in (load_json, lambda text: load_yaml(text, loader)):
        for depth in (MAX_DEPTH + 1, 100_000):
            with pytest.raises(DecodeError, match="nested deeper than 64 levels"):
                load(nested(depth))


@LOADERS
def test_aliases_are_allowed_within_bounds_and_recursive_ones_refused(loader: type) -> None:
    (doc,) = load_yaml("labels: &l {app: web}\nselector: *l\n", loader)
    assert doc["selector"] == {"app": "web"}
    with pytest.raises(DecodeError, match="recursive alias"):
        load_yaml("a: &a [1, *a]\n", loader)


@LOADERS
def test_alias_bomb_refused_in_milliseconds(loader: type) -> None:
    started = time.perf_counter()
    with pytest.raises(DecodeError, match="aliases expand to more than 100000 additional nodes"):
        load_yaml(alias_bomb(), loader)
    assert time.perf_counter() - started < 0.5


@LOADERS
@pytest.mark.parametrize("scalar", ["9" * 101, "0b" + "1" * 200, "1:" * 60 + "1", "-" + "9" * 100])
def test_long_numbers_refused_before_conversion(scalar: str, loader: type) -> None:
    with pytest.raises(DecodeError, match=r"number of .* characters refused") as info:
        load_yaml(f"a: 1\nb: {scalar}\n", loader)
    assert info.value.line == 2


@LOADERS
def test_duplicate_keys_name_their_line(loader: type) -> None:
    with pytest.raises(DecodeError) as info:
        load_yaml("metadata:\n  name: a\n  labels: {}\n  name: b\n", loader)
    assert info.value.line == 4 and "duplicate key 'name' (first at line 2)" in str(info.value)
    with pytest.raises(DecodeError) as jinfo:
        load_json('{"a": {"b": 1,\n "c": 2,\n "b": 3}}')
    assert jinfo.value.line == 3 and "duplicate key 'b'" in str(jinfo.value)
    # Merge keys may be overridden: that is what they are for.
    (doc,) = load_yaml("base: &b {x: 1, y: 2}\nd: {<<: *b, x: 3}\n", loader)
    assert doc["d"] == {"x": 3, "y": 2}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_are_manifest_errors_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(HOSTILE[name])
    with pytest.raises(ManifestError) as info:
        load_objects([str(path)])
    assert str(info.value).startswith(f"{path}")
    assert HOSTILE_PROBLEM[name] in str(info.value)


def test_error_messages_are_bounded(tmp_path: Path) -> None:
    big = "x" * 1_000_000
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": big, "namespace": big, "labels": {big: big}, big: 1},
        "spec": {"containers": [{"ports": [{"containerPort": 80, "protocol": big, "name": big}]}]},
        "status": {"podIP": big},
    }
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [pod, {"kind": big, "apiVersion": "v1", "metadata": {"name": big}}]}))
    with pytest.raises(ManifestError) as info:
        load_objects([str(path)])
    assert len(str(info.value)) < 10_000
    assert "more characters" in str(info.value)


def test_sizes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "MAX_FILE_BYTES", 1000)
    (tmp_path / "a.yaml").write_text(DENY_ALL + "#" * 1000)
    with pytest.raises(ManifestError, match="more than the limit of 1000"):
        load_objects([str(tmp_path)])
    monkeypatch.setattr(files, "MAX_FILE_BYTES", 10_000)
    monkeypatch.setattr(files, "MAX_TOTAL_BYTES", 2_500)
    (tmp_path / "a.yaml").write_text(policy("a"))
    (tmp_path / "b.yaml").write_text(policy("b") + "#" * 1500)
    (tmp_path / "c.yaml").write_text(policy("c") + "#" * 1500)
    with pytest.raises(ManifestError, match="more than the limit of 2500"):
        load_objects([str(tmp_path)])


# --- reading directories --------------------------------------------------------------------------


def test_duplicate_objects_name_both_places(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(policy("p") + "---\n" + policy("q"))
    (tmp_path / "b.json").write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {
                        "apiVersion": "networking.k8s.io/v1",
                        "kind": "NetworkPolicy",
                        "metadata": {"name": "q", "namespace": "x"},
                        "spec": {"podSelector": {}},
                    }
                ],
            }
        )
    )
    with pytest.raises(ManifestError) as info:
        load_objects([str(tmp_path)])
    assert (
        str(info.value)
        == f"{tmp_path / 'b.json'} document 1 item 0: NetworkPolicy x/q: duplicate object, already defined in {tmp_path / 'a.yaml'} document 2"
    )


def test_dangling_symlink_fifo_and_symlink_loop_are_errors(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text(DENY_ALL)
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "missing.yaml")
    with pytest.raises(ManifestError, match=re.escape("gone.yaml: cannot read: No such file or directory")):
        load_objects([str(tmp_path)])
    (tmp_path / "gone.yaml").unlink()
    os.mkfifo(tmp_path / "pipe.yaml")
    with pytest.raises(ManifestError, match=re.escape("pipe.yaml: not a regular file")):
        load_objects([str(tmp_path)])
    with pytest.raises(ManifestError, match=re.escape("pipe.yaml: not a regular file or directory")):
        load_objects([str(tmp_path / "pipe.yaml")])  # named directly: refused, not blocked on
    (tmp_path / "pipe.yaml").unlink()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to(tmp_path)
    with pytest.raises(ManifestError, match="symlink loop"):
        load_objects([str(tmp_path)])


def test_configmap_volume_layout_is_read_once(tmp_path: Path) -> None:
    """A ConfigMap volume holds each file twice (a timestamped directory and ..data, both
    hidden) besides the visible symlink: only the visible name counts."""
    data = tmp_path / "..2026_01_01_00_00_00.1"
    data.mkdir()
    (data / "policies.yaml").write_text(DENY_ALL)
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "policies.yaml").symlink_to("..data/policies.yaml")
    (tmp_path / ".policies.yaml.swp").write_text("not yaml: [")
    assert [o.name for o in load_objects([str(tmp_path)])] == ["deny-all"]


UNREADABLE_SCRIPT = """
import json, os, sys
from kube_network_policies.sources.files import ManifestSource
root, sub = sys.argv[1], sys.argv[2]
src = ManifestSource([root])
src.open()
first = len(src.take().changes)
os.chmod(sub, 0)
try:
    batch = src.take()
    outcome = {"first": first, "batch": None if batch is None else len(batch.changes), "objects": len(src.objects), "error": src.error}
finally:
    os.chmod(sub, 0o755)
print(json.dumps(outcome))
"""


def unreadable_tree(tmp_path: Path) -> tuple[Path, Path]:
    sub = tmp_path / "team"
    sub.mkdir()
    (tmp_path / "a.yaml").write_text(policy("a"))
    (sub / "deny.yaml").write_text(DENY_ALL)
    return tmp_path, sub


def without_dac_override() -> None:
    """In the child, before exec: drop the capabilities that let root read any directory
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set, so that a mode-000 directory
    is unreadable to it as to any user. Without root this does nothing (and is not needed)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_subdirectory_keeps_the_state_and_names_the_path(tmp_path: Path) -> None:
    root, sub = unreadable_tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(
        [sys.executable, "-c", UNREADABLE_SCRIPT, str(root), str(sub)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        preexec_fn=without_dac_override,
    )
    assert r.returncode == 0, r.stderr
    outcome = json.loads(r.stdout)
    assert outcome["first"] == 2 and outcome["batch"] is None and outcome["objects"] == 2
    assert outcome["error"] == f"{sub}: cannot read directory: Permission denied"


def test_explain_refuses_a_directory_with_an_unreadable_subdirectory(tmp_path: Path) -> None:
    root, sub = unreadable_tree(tmp_path)
    os.chmod(sub, 0)
    try:
        r = knp("explain", "--manifests", str(root), "--from", "1.1.1.1", "--to", "2.2.2.2", "--port", "80", unprivileged=True)
    finally:
        os.chmod(sub, 0o755)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"error: {sub}: cannot read directory: Permission denied" in r.stderr and "ALLOW" not in r.stdout


# --- the source: never raises, keeps the previous state, notices every change ------------------------


def opened(tmp_path: Path, **contents: str) -> ManifestSource:
    for name, text in contents.items():
        (tmp_path / name).write_text(text)
    src = ManifestSource([str(tmp_path)])
    src.open()
    assert src.take() is not None
    return src


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_take_never_raises_and_keeps_the_state(tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    src = opened(tmp_path, **{"deny.yaml": DENY_ALL})
    (tmp_path / name).write_text(HOSTILE[name])
    with caplog.at_level(logging.ERROR):
        assert src.take() is None
        assert src.take() is None  # logged once, not on every poll
    assert list(src.objects) == [("NetworkPolicy", "x", "deny-all")]
    assert src.error.startswith(str(tmp_path / name)) and HOSTILE_PROBLEM[name] in src.error
    assert len([r for r in caplog.records if "previous state stays in force" in r.getMessage()]) == 1
    assert src.status()["manifests"]["error"] == src.error  # type: ignore[index]
    (tmp_path / name).unlink()
    assert src.take() is None and src.error == ""  # the applied files again: nothing to do


def test_open_raises_only_source_error(tmp_path: Path) -> None:
    for name, text in HOSTILE.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SourceError) as info:
        ManifestSource([str(tmp_path)]).open()
    for name in HOSTILE:
        assert str(tmp_path / name) in str(info.value)


def test_same_size_replace_with_preserved_mtime_is_noticed(tmp_path: Path) -> None:
    """cp -p, rsync -t and tar keep the modification time; a same-size edit must still count."""
    src = opened(tmp_path, **{"p.yaml": policy("aaa")})
    st = (tmp_path / "p.yaml").stat()
    (tmp_path / "p.yaml").write_text(policy("bbb"))
    os.utime(tmp_path / "p.yaml", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (tmp_path / "p.yaml").stat().st_size == st.st_size
    batch = src.take()
    assert batch is not None and sorted(c.type for c in batch.changes) == ["add", "delete"]
    assert list(src.objects) == [("NetworkPolicy", "x", "bbb")]


def test_only_changed_files_are_parsed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = opened(tmp_path, **{f"p{i}.yaml": policy(f"p{i}") for i in range(5)})
    parsed: list[str] = []
    real = files.parse_file
    monkeypatch.setattr(files, "parse_file", lambda path, data: parsed.append(path.name) or real(path, data))
    (tmp_path / "p3.yaml").write_text(policy("changed"))
    os.utime(tmp_path / "p1.yaml")  # touched, same content: hashed, not parsed
    batch = src.take()
    assert batch is not None and parsed == ["p3.yaml"]
    assert {c.key[2] for c in batch.changes} == {"p3", "changed"}
    assert src.digest == manifest_digest([str(tmp_path)])


def test_fixed_file_after_refusal_is_applied(tmp_path: Path) -> None:
    src = opened(tmp_path, **{"p.yaml": policy("a")})
    (tmp_path / "p.yaml").write_text(policy("a") + "spec: {ingres: []}\n")
    assert src.take() is None and "duplicate key 'spec'" in src.error
    (tmp_path / "p.yaml").write_text(policy("b"))
    batch = src.take()
    assert batch is not None and src.error == "" and list(src.objects) == [("NetworkPolicy", "x", "b")]


def test_lab_run_refuses_an_unreadable_scenario_directory(tmp_path: Path) -> None:
    """A scenario suite must not pass by leaving a directory out."""
    scenarios = ROOT / "tests" / "scenarios" / "admin-v1alpha1"
    sub = tmp_path / "more"
    sub.mkdir()
    (tmp_path / "one.yaml").write_text((scenarios / "anp-empty-peer-fails-closed.yaml").read_text())
    (sub / "two.yaml").write_text((scenarios / "anp-pass-delegates-to-networkpolicy.yaml").read_text())
    os.chmod(sub, 0)
    try:
        r = knp("lab", "run", "--engine-only", str(tmp_path), unprivileged=True)
    finally:
        os.chmod(sub, 0o755)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"ERROR {sub}: cannot read directory: Permission denied" in r.stdout
    assert knp("lab", "run", "--engine-only", str(tmp_path)).returncode == 0  # readable: both pass
