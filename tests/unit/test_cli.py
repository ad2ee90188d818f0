"""The command line, run as a user runs it: a subprocess, its output and exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def knp(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("KNP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "kube_network_policies", *args], capture_output=True, text=True, env=env, timeout=60)


def test_explain_text_names_the_chain() -> None:
    r = knp("explain", "--manifests", str(EXAMPLES / "manifests"), "--from", "frontend/web", "--to", "backend/db", "--port", "5432")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "TCP 10.244.1.10:40000 -> 10.244.2.10:5432: DENY"
    assert lines[1] == "  egress frontend/web: default: allow (no policy selects the pod for egress)"
    assert lines[2].startswith(
        "  ingress backend/db: admin tier: Pass (anp/pass-backend rule 0 [delegate-to-team]) -> NetworkPolicy: deny (selected by backend/db-from-api"
    )


def test_explain_json() -> None:
    r = knp("explain", "--manifests", str(EXAMPLES / "manifests"), "--from", "backend/api", "--to", "10.244.2.10", "--port", "5432", "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "allow"
    ingress = doc["flows"][0]["ingress"]
    assert ingress["pod"] == "backend/db"
    assert [c["tier"] for c in ingress["chain"]] == ["admin", "network_policy"]
    assert ingress["chain"][1] == {"tier": "network_policy", "action": "Allow", "policy": "backend/db-from-api", "rule": "ingress rule 0"}


def test_explain_baseline_denies_cross_team() -> None:
    r = knp("explain", "--manifests", str(EXAMPLES / "manifests"), "--from", "frontend/web", "--to", "backend/api", "--port", "8080")
    assert r.returncode == 0
    assert "baseline tier: Deny (banp/default rule 0 [deny-cross-team])" in r.stdout


def test_explain_bad_manifests_exit_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: x}\n"
        "spec:\n  podSelector: {}\n  ingress:\n    - from:\n        - ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/16]}\n"
        "---\nkind: Widget\napiVersion: v1\nmetadata: {name: w}\n---\n: [oops\n"
    )
    r = knp("explain", "--manifests", str(bad), "--from", "1.1.1.1", "--to", "2.2.2.2", "--port", "80")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{bad}: invalid YAML at line" in r.stderr
    r = knp("explain", "--manifests", str(bad).replace("bad.yaml", "missing.yaml"), "--from", "1.1.1.1", "--to", "2.2.2.2", "--port", "80")
    assert r.returncode == 2 and "no such file or directory" in r.stderr
    bad.write_text(bad.read_text().split("---\n: [oops")[0])
    r = knp("explain", "--manifests", str(bad), "--from", "1.1.1.1", "--to", "2.2.2.2", "--port", "80")
    assert r.returncode == 2
    assert (
        f"{bad} document 1: NetworkPolicy x/db: spec.ingress[0].from[0].ipBlock.except[0]: 10.1.0.0/16 must be a strict subset of 10.0.0.0/16"
        in r.stderr
    )
    assert f"{bad} document 2: Widget w: kind: unsupported kind 'Widget'" in r.stderr


def test_explain_unknown_pod_and_bad_flags() -> None:
    r = knp("explain", "--manifests", str(EXAMPLES / "manifests"), "--from", "x/nope", "--to", "backend/db", "--port", "80")
    assert r.returncode == 2 and "--from x/nope: no such pod in the manifests" in r.stderr
    r = knp("explain", "--manifests", str(EXAMPLES / "manifests"), "--from", "backend/api", "--to", "backend/db", "--port", "70000")
    assert r.returncode == 2 and "70000 is not between 1 and 65535" in r.stderr and "Traceback" not in r.stderr


def test_lab_run_engine_only_demo() -> None:
    r = knp("lab", "run", "--engine-only", "--tables", str(EXAMPLES / "demo.yaml"))
    assert r.returncode == 0, r.stdout
    assert "step 4 TCP/80: 12 correct, 0 wrong" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "1 passed, 0 failed"


def test_bench_prints_figures() -> None:
    r = knp("bench", "--pods", "500", "--policies", "50", "--admin-policies", "10", "--seconds", "0.2", "--json")
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["pods"] == 500 and figures["decisions_per_s"] > 0 and figures["bytes_per_pod"] > 0


def _limited_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB of address space


def test_hostile_manifests_exit_2_fast_with_bounded_memory(tmp_path: Path) -> None:
    from test_manifest_input import HOSTILE, HOSTILE_PROBLEM

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("KNP_DEBUG", None)
    for name, text in HOSTILE.items():
        path = tmp_path / name
        path.write_text(text)
        args = ["explain", "--manifests", str(path), "--from", "1.1.1.1", "--to", "2.2.2.2", "--port", "80"]
        r = subprocess.run(
            [sys.executable, "-m", "kube_network_policies", *args], capture_output=True, text=True, env=env, timeout=30, preexec_fn=_limited_memory
        )
        assert r.returncode == 2, (name, r.stderr)
        assert r.stderr.startswith(f"error: {path}") and HOSTILE_PROBLEM[name] in r.stderr and "internal error" not in r.stderr
        path.unlink()


def test_explain_refuses_addresses_with_zones() -> None:
    r = knp("explain", "--manifests", str(EXAMPLES / "manifests"), "--from", "fd00::1%eth0", "--to", "backend/db", "--port", "80")
    assert r.returncode == 2 and "zones (%...) are not allowed" in r.stderr


def test_lab_run_with_bad_scenario_files_exits_2(tmp_path: Path) -> None:
    from test_manifest_input import HOSTILE

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(HOSTILE["bomb.yaml"].replace("apiVersion", "steps: []\nx-apiVersion", 1))
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: deep\nsource: s\ncluster: " + "[" * 5000 + "]" * 5000 + "\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text((EXAMPLES / "demo.yaml").read_text().replace("podSelector:", "podSelectr:", 1))
    for path, problem in ((bomb, "aliases expand to more than"), (deep, "nested deeper than 64 levels"), (typo, "podSelectr: unknown field")):
        r = knp("lab", "run", "--engine-only", str(path))
        assert r.returncode == 2, (path, r.stdout, r.stderr)
        assert f"ERROR {path}" in r.stdout and problem in r.stdout and "Traceback" not in r.stderr
