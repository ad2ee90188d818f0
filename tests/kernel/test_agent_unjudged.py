"""The agent end to end, on what it cannot or did not judge: packets whose transport header sits
deep behind IPv6 extension headers, and packets accepted without a verdict of the engine
(fail-open: a full queue, no listener), which must never enter the accept cache.

Same topology and policies as test_agent.py (its fixtures are reused): pods t/a and t/b on
node-1, B default-deny for ingress, "allow-a" lets A reach B on TCP 80 only.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Callable

import pytest
import test_agent  # tests/kernel/test_agent.py: its topology, agent runner and helpers
from test_agent import A4, A6, B4, B6, QUEUE, AgentProcess, Lab, wait_for

import packets
from kube_network_policies.dataplane.nfqueue import DEFAULT_MAX_LEN, read_queue_stats
from kube_network_policies.lab.topology import entered

pytestmark = pytest.mark.kernel

# Its fixtures, used here under the same names (a module-scoped topology of this module's own).
lab = test_agent.lab
start = test_agent.start

TIMEOUT = 0.8  # a dropped SYN is retransmitted after 1 s: a shorter wait sees the first one's fate


def connect(lab: Lab, dst: str, port: int, *, options: int = 0) -> bool:
    """A TCP connection from pod A; with `options`, every packet (the SYN too) carries a
    destination options header of that many bytes (IPv6)."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with entered(lab.a_ns):
        s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if options:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, packets.destination_options(options))
        s.settimeout(TIMEOUT)
        s.connect((dst, port))
        return True
    except OSError:  # timeout
        return False
    finally:
        s.close()


def queue_stats(lab: Lab) -> tuple[int, int]:
    """(packets waiting, id of the last one queued) of the agent's queue."""
    with entered(lab.node_ns):
        st = read_queue_stats("/proc/thread-self/net/netfilter/nfnetlink_queue")[QUEUE]
    return st.queue_total, st.id_sequence


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn_flood(lab: Lab, dst: str, port: int, count: int) -> None:
    """`count` TCP SYNs from pod A to dst:port, each from another source port (so each is a new
    connection for conntrack), through a raw socket: no client socket waits for an answer."""
    with entered(lab.a_ns):
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    try:
        src_b, dst_b = socket.inet_aton(A4), socket.inet_aton(dst)
        for i in range(count):
            sport = 20000 + i
            header = struct.pack("!HHIIBBHHH", sport, port, 1000 + i, 0, 0x50, 0x02, 64240, 0, 0)
            pseudo = src_b + dst_b + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
            header = header[:16] + struct.pack("!H", _checksum(pseudo + header)) + header[18:]
            raw.sendto(header, (dst, 0))
    finally:
        raw.close()


def test_ipv6_options_header_cannot_hide_the_port(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    """A SYN whose TCP header sits behind 200 bytes of destination options (past the first 128
    bytes of the packet) is judged on its real port: denied under fail-open, allowed under
    fail-closed."""
    agent = start("-fail-open", allow=True)
    assert connect(lab, B6, 81, options=200) is False
    assert connect(lab, B6, 80, options=200) is True
    assert connect(lab, B6, 81, options=1024) is False
    # Nothing unjudged was remembered: a plain connection to the denied port stays denied.
    assert (A6, B6, "tcp", 81) not in lab.cached()
    assert connect(lab, B6, 81) is False
    assert agent.terminate() == 0

    agent = start(allow=True)  # fail-closed
    assert connect(lab, B6, 80, options=200) is True
    assert connect(lab, B6, 81, options=200) is False
    assert (A6, B6, "tcp", 80) in lab.cached()  # judged by the engine: cached as usual
    assert agent.terminate() == 0


def test_queue_overflow_accepts_are_not_cached(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    """fail-open: with the worker stopped the queue fills and the kernel accepts the overflow
    unjudged (NFQA_CFG_F_FAIL_OPEN). Those packets must not put their denied tuple into the
    accept cache, or ordinary connections on it would pass for its whole timeout."""
    agent = start("-fail-open", allow=True)
    assert connect(lab, B4, 81) is False
    (worker,) = agent.workers()
    os.kill(worker, signal.SIGSTOP)
    try:
        flood = DEFAULT_MAX_LEN + 400
        syn_flood(lab, B4, 81, flood)
        wait_for("a full queue", lambda: queue_stats(lab)[0] == DEFAULT_MAX_LEN)
        time.sleep(0.3)  # the overflow went through at once; let the last of it arrive
        assert (A4, B4, "tcp", 81) not in lab.cached(), "a packet accepted unjudged entered the accept cache"
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_for("the queue to drain", lambda: queue_stats(lab)[0] == 0)
    assert (A4, B4, "tcp", 81) not in lab.cached()
    assert connect(lab, B4, 81) is False
    # What the engine accepted is still cached.
    assert connect(lab, B4, 80) is True
    assert (A4, B4, "tcp", 80) in lab.cached()
    assert agent.terminate() == 0


def test_bypass_without_a_listener_is_not_cached(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    """fail-open: while the worker is down (it crashed; the agent restarts it) no one listens on
    the queue and the kernel accepts diverted packets (bypass). They must not be cached: the
    agent does not empty the cache when it restarts a worker."""
    agent = start("-fail-open", allow=True)
    assert connect(lab, B4, 81) is False
    (worker,) = agent.workers()
    os.kill(agent.process.pid, signal.SIGSTOP)  # so that it does not restart the worker yet
    try:
        os.kill(worker, signal.SIGKILL)
        wait_for("the queue to be unbound", lambda: QUEUE not in _queues(lab))
        before = lab.cached()
        assert connect(lab, B4, 81) is True  # bypass: fail-open lets it through, unjudged
        assert (A4, B4, "tcp", 81) not in lab.cached() and lab.cached() == before
    finally:
        os.kill(agent.process.pid, signal.SIGCONT)
    wait_for("a new worker", lambda: (w := agent.workers()) != [] and w != [worker], detail=lambda: agent.log)
    # Until the new worker has applied the state it accepts by default (fail-open), so an
    # accepted connection proves nothing: wait for the denied one to be denied again.
    wait_for("the new worker to enforce the state", lambda: connect(lab, B4, 81) is False, timeout=10, detail=lambda: agent.log)
    assert connect(lab, B4, 80) is True
    assert agent.terminate() == 0


def _queues(lab: Lab) -> dict[int, object]:
    with entered(lab.node_ns):
        return dict(read_queue_stats("/proc/thread-self/net/netfilter/nfnetlink_queue"))
