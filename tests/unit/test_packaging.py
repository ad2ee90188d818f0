"""What an installation holds: the demo scenario as package data, and the image's build context
(.dockerignore) with the agent but not the lab, tests or examples. No Docker here: the context is
computed from .dockerignore, and the package it holds is run from a copy."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from kube_network_policies.lab.scenario import load_scenario
from kube_network_policies.lab.up import demo_scenario

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_scenario_is_package_data() -> None:
    with demo_scenario() as demo:
        assert demo.is_file()
        assert load_scenario(demo).name == "demo-three-tiers"
        # The README's `lab run --tables examples/demo.yaml` reads the same file.
        assert (ROOT / "examples" / "demo.yaml").samefile(demo)
        relative = demo.relative_to(ROOT / "src" / "kube_network_policies" / "lab").as_posix()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["kube_network_policies.lab"]
    assert any(fnmatch(relative, p) for p in patterns), f"{relative} is not in pyproject's package-data"


def _pattern(rule: str) -> re.Pattern[str]:
    """The subset of .dockerignore's syntax used here: `*` (within a path segment), `**/` (any
    directories, or none), `?`, character classes; a rule names a path or any of its parents."""
    out = ""
    i = 0
    while i < len(rule):
        if rule.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif rule[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif rule[i] == "?":
            out, i = out + "[^/]", i + 1
        elif rule[i] == "[":
            end = rule.index("]", i)
            out, i = out + rule[i : end + 1], end + 1
        else:
            out, i = out + re.escape(rule[i]), i + 1
    return re.compile(out + "(?:/.*)?")


def docker_context() -> set[str]:
    """Files (relative, POSIX) that `docker build .` sends: the last matching rule decides."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            exclude = not line.startswith("!")
            rules.append((_pattern(line.lstrip("!").strip("/")), exclude))
    files = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv")]
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(ROOT).as_posix()
            excluded = False
            for pattern, exclude in rules:
                if pattern.fullmatch(rel):
                    excluded = exclude
            if not excluded:
                files.add(rel)
    return files


def test_the_image_context_holds_the_agent_without_lab_tests_or_examples() -> None:
    files = docker_context()
    assert {"pyproject.toml", "README.md", "src/kube_network_policies/agent.py", "src/kube_network_policies/cli.py"} <= files
    assert "src/kube_network_policies/dataplane/nfqueue.py" in files
    unwanted = [f for f in files if f.startswith(("tests/", "examples/", "tools/", "hack/", "src/kube_network_policies/lab/")) or "__pycache__" in f]
    assert not unwanted, unwanted
    assert all(f in ("pyproject.toml", "README.md") or f.startswith("src/") for f in files), sorted(files)


def test_the_package_without_the_lab_runs_the_agent_and_says_what_is_missing(tmp_path: Path) -> None:
    src = ROOT / "src"
    for rel in docker_context():
        if rel.startswith("src/kube_network_policies/"):
            target = tmp_path / Path(rel).relative_to("src")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / Path(rel).relative_to("src"), target)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def knp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kube_network_policies", *args], capture_output=True, text=True, env=env, timeout=60)

    where = subprocess.run(
        [sys.executable, "-c", "import kube_network_policies, kube_network_policies.agent as a; print(a.__file__)"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert where.returncode == 0 and where.stdout.startswith(str(tmp_path)), where
    assert knp("run", "--help").returncode == 0
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n"
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {nodeName: n}\nstatus: {phase: Running, podIP: 10.0.0.1}\n"
    )
    r = knp("explain", "--manifests", str(manifest), "--from", "10.0.0.2", "--to", "a/p", "--port", "80")
    assert r.returncode == 0 and "ALLOW" in r.stdout, r
    for command in (["lab", "run", "--engine-only", "x.yaml"], ["bench"]):
        r = knp(*command)
        assert r.returncode == 2, r
        assert "needs the lab, which this installation does not include" in r.stderr and "Traceback" not in r.stderr, r
