"""The lab through a real API server: a scenario end to end, and `lab up` / `lab down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _needs_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the API-server lab needs root, and CI must run it", pytrace=False)
        pytest.skip("needs root: network namespaces, nftables and NFQUEUE")


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
        from kube_network_policies.sources.kubernetes import load_config  # noqa: PLC0415

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
