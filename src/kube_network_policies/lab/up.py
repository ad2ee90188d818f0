"""`lab up` / `lab down`: a lab cluster with a real API server that stays up for a user.

`lab up` starts a background process that holds the control plane, the network namespaces, the
agents and the API relay, with the scenario's nodes, namespaces and pods created (its steps are
not applied: the user applies policies with kubectl). It prints the kubeconfig path and the
namespace of every pod, then returns. `lab down` stops that process, which removes everything.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kube_network_policies.lab.scenario import load_scenario

STATE_DIR = Path(os.environ.get("KNP_LAB_STATE_DIR", "/run/kube-network-policies-lab"))
STATE_FILE = STATE_DIR / "state.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def read_state() -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None
    return state if _alive(int(state.get("pid", 0))) else None


def _serve(path: str, ready_fd: int) -> None:
    """The background process: build the lab and hold it until SIGTERM."""
    from kube_network_policies.lab.apiserver_mode import ApiLabMode, ApiLabSession
    from kube_network_policies.lab.runner import ScenarioCluster
    from kube_network_policies.lab.topology import exit_on_sigterm

    exit_on_sigterm()
    report: dict[str, Any]
    mode = None
    session: ApiLabSession | None = None
    try:
        scenario = load_scenario(Path(path))
        # Every feature on: the user decides which policies to apply.
        scenario = type(scenario)(**{**{f: getattr(scenario, f) for f in scenario.__dataclass_fields__}, "requires": ("admin-network-policy", "baseline-admin-network-policy", "cluster-network-policy")})
        mode = ApiLabMode()
        session = mode.open(ScenarioCluster(scenario))
        assert session.topology is not None
        report = {
            "pid": os.getpid(),
            "kubeconfig": str(mode.cp.kubeconfig_path),
            "server": mode.cp.url,
            "pods": {p.key: {"netns": session.topology.netns_of(p.key), "ips": list(p.ips), "node": p.node} for p in scenario.pods},
            "nodes": {n.name: {"netns": session.topology.node_netns(n.name), "ips": list(n.ips)} for n in scenario.nodes},
        }
    except BaseException as exc:  # noqa: BLE001 - reported to `lab up`, which prints it
        os.write(ready_fd, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        os.close(ready_fd)
        if mode is not None:
            mode.close()
        return
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(report, indent=2))
    os.write(ready_fd, json.dumps(report).encode())
    os.close(ready_fd)
    try:
        while True:
            time.sleep(3600)
    finally:
        session.close()
        mode.close()
        STATE_FILE.unlink(missing_ok=True)


def lab_up(path: str) -> int:
    if read_state() is not None:
        print(f"error: a lab is already up (see {STATE_FILE}); run `kube-network-policies lab down` first", file=sys.stderr)
        return 2
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: detach from the terminal's session, then serve
        os.close(r)
        os.setsid()
        # Let go of the caller's terminal and pipes (a caller waiting for our output to end
        # must not wait for the lab's lifetime); what the holder prints goes to a log file.
        devnull = os.open(os.devnull, os.O_RDWR)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        log = os.open(STATE_DIR / "lab.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        try:
            _serve(path, w)
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    try:
        report = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        report = {"error": "the lab process ended without a report"}
    if "error" in report or not report:
        print(f"error: {report.get('error', 'the lab did not start')}", file=sys.stderr)
        return 1
    print(f"lab up (process {report['pid']}); API server {report['server']}")
    print(f"  export KUBECONFIG={report['kubeconfig']}")
    print("  pods (probe with `ip netns exec NETNS ...`):")
    for key, info in report["pods"].items():
        print(f"    {key:<24} {', '.join(info['ips']):<32} {info['netns']}")
    print("  stop with: kube-network-policies lab down")
    return 0


def lab_down() -> int:
    state = read_state()
    if state is None:
        print("no lab is up")
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        from kube_network_policies.lab.topology import Topology

        time.sleep(0.5)
        Topology.cleanup_stale()
    STATE_FILE.unlink(missing_ok=True)
    print("lab down")
    return 0
