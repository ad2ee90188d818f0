"""CPU time per queued packet of the NFQUEUE consumer (dataplane/nfqueue.py), root only.

    python -m kube_network_policies.lab.bench_nfqueue [SECONDS]

New TCP connections over loopback in a scratch network namespace; an iptables rule queues every
SYN to an `NfQueue` in its own process, whose `decide` parses the packet and allows one port (the
consumer's work without the engine). Clients keep 64 non-blocking connects in flight each. The
consumer's user and system CPU time over the run, divided by the packets it answered, is the
figure; `packets_per_round` shows how well verdicts were batched.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

from kube_network_policies.dataplane.netns import entered
from kube_network_policies.dataplane.nfqueue import NfQueue


def _fork(target: Callable[[], dict[str, float] | None], netns: str) -> tuple[int, int]:
    """Run target() in a child process inside `netns`; returns (pid, read end of its result pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the parent's code
        code = 1
        try:
            os.close(r)
            with entered(netns):
                result = target()
            os.write(w, json.dumps(result or {}).encode())
            code = 0
        except BaseException as e:  # noqa: BLE001 - report, do not print a traceback
            try:
                os.write(w, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid: int, r: int) -> dict[str, float]:
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    result: dict[str, float] = json.loads(b"".join(chunks) or b"{}")
    if "error" in result:
        raise RuntimeError(str(result["error"]))
    return result


def _bench_consumer(queue_num: int, ready: int, port: int) -> dict[str, float]:
    # Local names, as when this bench lived in dataplane/nfqueue.py: `decide` reads them from its
    # closure, not as globals, so figures stay comparable with earlier ones.
    from kube_network_policies.dataplane.packet import parse_packet
    from kube_network_policies.engine.flow import Flow

    allowed = {port}

    def decide(payload: memoryview) -> bool:
        flow = parse_packet(payload)
        return type(flow) is Flow and flow.dst_port in allowed

    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: stop.set())
    with NfQueue(queue_num) as q:
        os.write(ready, b"x")
        os.close(ready)
        t0 = os.times()
        q.run(decide, stop, poll_interval=0.05)
        t1 = os.times()
        c = q.counters
        return {
            "packets": c.packets,
            "rounds": c.rounds,
            "user": t1.user - t0.user,
            "system": t1.system - t0.system,
            "overruns": c.overruns,
            "decide_errors": c.decide_errors,
            "verdict_errors": c.verdict_errors,
        }


def _bench_server(port: int, ready: int, seconds: float) -> dict[str, float]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.settimeout(0.2)
    os.write(ready, b"x")
    os.close(ready)
    accepted = 0
    deadline = time.monotonic() + seconds + 5
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            continue
        conn.close()
        accepted += 1
    return {"accepted": accepted}


def _bench_client(port: int, seconds: float, window: int) -> dict[str, float]:
    """Keep `window` non-blocking connects in flight; RST-close each once it completes."""
    linger = struct.pack("ii", 1, 0)
    poller = select.poll()
    pending: dict[int, socket.socket] = {}
    ok = failed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        while len(pending) < window:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)  # no TIME_WAIT
            s.connect_ex(("127.0.0.1", port))
            pending[s.fileno()] = s
            poller.register(s, select.POLLOUT)
        for fd, _ in poller.poll(100):
            s = pending.pop(fd)
            poller.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                ok += 1
            else:
                failed += 1
            s.close()
    for s in pending.values():
        s.close()
    return {"ok": ok, "failed": failed}


def _wait_ready(r: int) -> None:
    if not select.select([r], [], [], 10)[0] or not os.read(r, 1):
        raise RuntimeError("a benchmark process did not start")
    os.close(r)


def bench(seconds: float = 5.0, clients: int = 2, window: int = 64, queue_num: int = 100) -> dict[str, float]:
    """New TCP connections over loopback in a scratch network namespace, every SYN queued to a
    consumer in its own process; returns the consumer's CPU time per packet."""
    netns = f"knp-bench-{os.getpid()}"
    port = 8080

    def sh(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, text=True)

    sh("ip", "netns", "add", netns)
    try:
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh(
            "ip",
            "netns",
            "exec",
            netns,
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--syn",
            "--dport",
            str(port),
            "-j",
            "NFQUEUE",
            "--queue-num",
            str(queue_num),
        )
        ready_r, ready_w = os.pipe()
        consumer = _fork(lambda: _bench_consumer(queue_num, ready_w, port), netns)
        os.close(ready_w)
        _wait_ready(ready_r)
        ready_r, ready_w = os.pipe()
        server = _fork(lambda: _bench_server(port, ready_w, seconds), netns)
        os.close(ready_w)
        _wait_ready(ready_r)
        t0 = time.monotonic()
        gens = [_fork(lambda: _bench_client(port, seconds, window), netns) for _ in range(clients)]
        results = [_collect(*g) for g in gens]
        elapsed = time.monotonic() - t0
        os.kill(consumer[0], signal.SIGUSR1)
        c = _collect(*consumer)
        os.kill(server[0], signal.SIGTERM)
        try:
            os.waitpid(server[0], 0)
        except ChildProcessError:
            pass
        os.close(server[1])
        ok = sum(r["ok"] for r in results)
        packets = c["packets"] or 1
        return {
            "packets": c["packets"],
            "connections_ok": ok,
            "connections_failed": sum(r["failed"] for r in results),
            "connections_per_s": ok / elapsed,
            "packets_per_round": c["packets"] / max(1, c["rounds"]),
            "cpu_us_per_packet": (c["user"] + c["system"]) / packets * 1e6,
            "user_us_per_packet": c["user"] / packets * 1e6,
            "system_us_per_packet": c["system"] / packets * 1e6,
            "overruns": c["overruns"],
            "decide_errors": c["decide_errors"],
            "verdict_errors": c["verdict_errors"],
        }
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def _iter_bench_lines(result: dict[str, float]) -> Iterator[str]:
    for key, value in result.items():
        yield f"{key:24s} {value:12.1f}" if isinstance(value, float) else f"{key:24s} {value:12d}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kube_network_policies.lab.bench_nfqueue", description="CPU time per queued packet of the NFQUEUE consumer (root)"
    )
    parser.add_argument("seconds", nargs="?", type=float, default=5.0, help="measured seconds (default: %(default)s)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the NFQUEUE benchmark needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        print(f"the NFQUEUE benchmark needs {', '.join(missing)} on PATH", file=sys.stderr)
        return 2
    try:
        result = bench(args.seconds)
    except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        print(f"benchmark failed: {detail}", file=sys.stderr)
        return 1
    for line in _iter_bench_lines(result):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
