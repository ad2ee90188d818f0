"""`lab up` / `lab down`: a lab cluster with a real API server that stays up for a user.

`lab up` starts a background process (the holder) that holds the control plane, the network
namespaces, the agents and the API relay, with the scenario's nodes, namespaces and pods created
(its steps are not applied: the user applies policies with kubectl). It prints the kubeconfig
path and the namespace of every pod, then returns. `lab down` stops the holder, which removes
everything.

The holder may die without cleaning up (kill -9, OOM): then its agents go on running in
namespaces nobody removes. So `lab down` does not rely on it. Before building anything the
holder records in the state file what identifies all it will leave:
- its pid and start time: it is the leader of a session of its own (setsid), and every process
  it starts (etcd, kube-apiserver, the agents and their workers) stays in that session;
- the prefix of its network namespaces (`knp<pid>-`, see topology.new_prefix);
- its work directory: the holder's temporary files (certificates, etcd data, kubeconfig, agent
  logs) all go there (tempfile.tempdir).
`lab down` asks a live holder to stop, then kills whatever is left in that session, deletes the
namespaces with that prefix and the work directory, whether the holder stopped cleanly, hangs
or was gone already. `lab up` does the same for the leftovers of a dead holder before it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kube_network_policies.lab.scenario import load_scenario
from kube_network_policies.model import kinds

STATE_DIR = Path(os.environ.get("KNP_LAB_STATE_DIR", "/run/kube-network-policies-lab"))
STATE_FILE = STATE_DIR / "state.json"
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class _Proc:
    pid: int
    session: int
    start: int  # clock ticks since boot: with the pid, names a process even if the pid is reused


def _proc(pid: int) -> _Proc | None:
    """A live (not zombie) process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return _Proc(pid, int(fields[3]), int(fields[19]))


def _alive(pid: int, start: int) -> bool:
    p = _proc(pid)
    return p is not None and p.start == start


def _describe(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "process"
    text = b" ".join(argv).decode(errors="replace")
    if "kube_network_policies run" in text:
        return "agent"
    return os.path.basename(argv[0].decode(errors="replace")) or "process"


def read_state() -> dict[str, Any] | None:
    """The state file, whether or not its holder still runs."""
    try:
        state: dict[str, Any] = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        return None
    if not isinstance(state.get("start"), int):  # written by an older version: the pid alone
        p = _proc(state["pid"])
        state["start"] = p.start if p is not None else -1
    return state


def _running(state: dict[str, Any]) -> bool:
    return _alive(int(state["pid"]), int(state.get("start", -1)))


def _write_state(state: dict[str, Any]) -> None:
    tmp = STATE_FILE.with_name(STATE_FILE.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(STATE_FILE)


def _serve(path: str, ready_fd: int, state: dict[str, Any]) -> None:
    """The holder: build the lab and hold it until SIGTERM."""
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
        scenario = type(scenario)(
            **{
                **{f: getattr(scenario, f) for f in scenario.__dataclass_fields__},
                "requires": kinds.flags(),
            }
        )
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
    _write_state({**state, **report})
    os.write(ready_fd, json.dumps(report).encode())
    os.close(ready_fd)
    try:
        while True:
            time.sleep(3600)
    finally:
        session.close()
        mode.close()


def _hold(path: str, ready_fd: int) -> None:
    """The forked holder: a session of its own, its state recorded before anything is built."""
    os.setsid()
    # Let go of the caller's terminal and pipes (a caller waiting for our output to end must
    # not wait for the lab's lifetime); what the holder prints goes to a log file.
    devnull = os.open(os.devnull, os.O_RDWR)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log = os.open(STATE_DIR / "lab.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    me = _proc(os.getpid())
    workdir = Path(tempfile.mkdtemp(prefix=f"work-{os.getpid()}-", dir=STATE_DIR))
    tempfile.tempdir = str(workdir)  # every temporary file of the lab, so that `lab down` finds it
    state = {"pid": os.getpid(), "start": me.start if me else -1, "netnsPrefix": f"knp{os.getpid()}-", "workdir": str(workdir)}
    try:
        _write_state(state)
        _serve(path, ready_fd, state)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        current = read_state()
        if current is not None and current.get("pid") == os.getpid():
            STATE_FILE.unlink(missing_ok=True)


def demo_scenario() -> contextlib.AbstractContextManager[Path]:
    """The demo scenario (package data, so an installed package has it; examples/demo.yaml in a
    checkout links to the same file), as a path for the block."""
    return resources.as_file(resources.files("kube_network_policies.lab").joinpath("data", "demo.yaml"))


def lab_up(path: str | None = None) -> int:
    """Bring up the scenario at `path` (default: the demo scenario)."""
    if path is None:
        with demo_scenario() as demo:  # read by the holder before it reports: the block may end
            return lab_up(str(demo))
    state = read_state()
    if state is not None and _running(state):
        print(f"error: a lab is already up (process {state['pid']}, see {STATE_FILE}); run `kube-network-policies lab down` first", file=sys.stderr)
        return 2
    if state is not None:
        print(f"the lab process {state['pid']} died without cleaning up: {_remove(state, stopped=False)}")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _hold(path, w)
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
    pid, start = int(state["pid"]), int(state.get("start", -1))
    stopped = False
    if _alive(pid, start):
        os.kill(pid, signal.SIGTERM)  # the holder removes everything itself
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped = not _alive(pid, start)
        if not stopped:
            print(f"the lab process {pid} did not stop within {STOP_TIMEOUT_S:.0f} s: killing it")
    else:
        print(f"the lab process {pid} was gone")
    print(f"lab down: {_remove(state, stopped)}")
    return 0


def _remove(state: dict[str, Any], stopped: bool) -> str:
    """Remove what the holder of `state` left: the processes of its session, its namespaces, its
    work directory, the state file. A summary of what was found."""
    from kube_network_policies.dataplane.netns import NETNS_DIR
    from kube_network_policies.lab.topology import delete_netns

    pid, start = int(state["pid"]), int(state.get("start", -1))
    killed = _kill_session(pid, start)
    prefix = str(state.get("netnsPrefix") or f"knp{pid}-")
    try:
        names = sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        names = []
    problems = []
    try:
        delete_netns(names)
    except Exception as exc:  # noqa: BLE001 - reported, and the rest is still removed
        problems.append(str(exc))
    workdir = state.get("workdir")
    removed_dir = False
    if isinstance(workdir, str) and workdir and Path(workdir).parent == STATE_DIR:  # never anything else
        removed_dir = Path(workdir).exists()
        shutil.rmtree(workdir, ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)
    parts = []
    if killed:
        kinds: dict[str, int] = {}
        for what in killed:
            kinds[what] = kinds.get(what, 0) + 1
        parts.append(f"killed {len(killed)} processes ({', '.join(f'{n} {k}s' if n > 1 else k for k, n in sorted(kinds.items()))})")
    if names:
        parts.append(f"removed {len(names)} network namespaces")
    if removed_dir:
        parts.append(f"removed {workdir}")
    if problems:
        parts.append("problems: " + "; ".join(problems))
    if not parts:
        return "the lab process had removed everything" if stopped else "nothing was left"
    return ", ".join(parts)


def _kill_session(leader: int, start: int) -> list[str]:
    """SIGKILL every process of the session `leader` led (the holder itself included if it still
    runs), wait until they are gone; what they were. If the leader's pid now names another
    process, only processes older than that one can be ours."""
    current = _proc(leader)
    newer_than_ours = current.start if current is not None and current.start != start else None
    me = os.getpid()
    victims: dict[int, str] = {}
    for _ in range(3):  # a process may fork while we look: look again until none is left
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            p = _proc(int(entry))
            if p is None or p.session != leader or (newer_than_ours is not None and p.start >= newer_than_ours):
                continue
            found.append(p.pid)
        if not found:
            break
        for pid in found:
            victims.setdefault(pid, _describe(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(_proc(p) is not None for p in found) and time.monotonic() < deadline:
            time.sleep(0.02)
    return sorted(victims.values())
