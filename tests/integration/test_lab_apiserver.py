"""The lab through a real API server: a scenario end to end, and `lab up` / `lab down`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from skips import require_root

ROOT = Path(__file__).resolve().parents[2]


def _needs_root() -> None:
    require_root(why="network namespaces, nftables and NFQUEUE")


def knp(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kube_network_policies", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def lab_env(controlplane_bin_dir: Path, policy_crds_dir: Path, tmp_path: Path) -> dict[str, str]:
    _needs_root()
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "KNP_CONTROLPLANE_BIN_DIR": str(controlplane_bin_dir),
        "KNP_CRDS_DIR": str(policy_crds_dir),
        "KNP_LAB_STATE_DIR": str(tmp_path / "state"),
    }


def test_demo_scenario_through_the_api_server(lab_env: dict[str, str]) -> None:
    r = knp(lab_env, "lab", "run", "--apiserver", "-v", str(ROOT / "examples" / "demo.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "changes took effect in" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "1 passed, 0 failed"


def test_lab_up_serves_kubectl_style_clients_and_down_removes_it(lab_env: dict[str, str]) -> None:
    r = knp(lab_env, "lab", "up")
    assert r.returncode == 0, r.stdout + r.stderr
    state = json.loads((Path(lab_env["KNP_LAB_STATE_DIR"]) / "state.json").read_text())
    try:
        assert "export KUBECONFIG=" in r.stdout
        kubeconfig = Path(state["kubeconfig"])
        assert kubeconfig.exists()
        # A client using the printed kubeconfig sees the demo's pods, with the IPs the lab gave them.
        from kube_network_policies.sources.kubeconfig import load_config

        config = load_config(str(kubeconfig))
        with config.client() as client:
            pods = client.get(config.server + "/api/v1/pods").json()["items"]
        ips = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p["status"].get("podIP") for p in pods}
        assert ips["backend/db"] == "10.244.2.10"
        netns = state["pods"]["backend/db"]["netns"]
        assert netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        down = knp(lab_env, "lab", "down")
    assert down.returncode == 0 and "lab down" in down.stdout
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not (Path(lab_env["KNP_LAB_STATE_DIR"]) / "state.json").exists()


def session_members(leader: int) -> dict[int, str]:
    """Live processes of the session `leader` led: {pid: command line}."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[3]) == leader and fields[0] not in ("Z", "X"):
            found[int(entry)] = cmd
    return found


def lab_netns(prefix: str) -> list[str]:
    return [n for n in os.listdir("/var/run/netns") if n.startswith(prefix)] if os.path.isdir("/var/run/netns") else []


def kill_holder(state: dict[str, Any]) -> dict[int, str]:
    """kill -9 the `lab up` holder; what of its lab survives it."""
    holder = int(state["pid"])
    os.kill(holder, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while holder in session_members(holder):
        assert time.monotonic() < deadline, "the holder did not die"
        time.sleep(0.05)
    time.sleep(0.5)  # etcd and kube-apiserver die with it (parent-death signal); the agents do not
    return session_members(holder)


@pytest.mark.parametrize("cleaner", ["lab down", "lab up"])
def test_leftovers_of_a_killed_lab_are_removed(lab_env: dict[str, str], cleaner: str) -> None:
    """`lab up`'s holder killed with SIGKILL leaves agents running in namespaces nobody removes.
    `lab down` (or the next `lab up`) must find and remove all of it."""
    state_file = Path(lab_env["KNP_LAB_STATE_DIR"]) / "state.json"
    r = knp(lab_env, "lab", "up")
    assert r.returncode == 0, r.stdout + r.stderr
    state = json.loads(state_file.read_text())
    try:
        holder, prefix, workdir = state["pid"], state["netnsPrefix"], Path(state["workdir"])
        members = session_members(holder)
        assert any("kube-apiserver" in c for c in members.values()) and sum("kube_network_policies run" in c for c in members.values()) >= 2, members
        assert len(lab_netns(prefix)) >= 3 and workdir.is_dir()
        survivors = kill_holder(state)
        assert survivors, "nothing survived the holder: this tests nothing"
        if cleaner == "lab down":
            out = knp(lab_env, "lab", "down")
            assert out.returncode == 0, out.stdout + out.stderr
            assert "lab down: killed" in out.stdout and "network namespaces" in out.stdout, out.stdout
        else:
            out = knp(lab_env, "lab", "up")
            assert out.returncode == 0, out.stdout + out.stderr
            assert f"the lab process {holder} died without cleaning up: killed" in out.stdout, out.stdout
        print(f"\n{cleaner} after kill -9 of the holder: {out.stdout.strip().splitlines()[0 if cleaner == 'lab up' else -1]}")
        assert session_members(holder) == {}
        assert lab_netns(prefix) == []
        assert not workdir.exists()
        if cleaner == "lab up":
            assert json.loads(state_file.read_text())["pid"] != holder  # the new lab's
    finally:
        down = knp(lab_env, "lab", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not state_file.exists()
    assert knp(lab_env, "lab", "down").stdout.strip() == "no lab is up"
