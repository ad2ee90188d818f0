"""NfQueue against the real kernel: two namespaces joined by a veth, iptables NFQUEUE rules in the
server namespace, the consumer in a thread (its socket created inside the server namespace).

Kernel tests skip when not root or when ip/iptables are missing, and fail instead under CI=true.
The first tests need neither (wire format, /proc parsing).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import netns
import pytest

from kube_network_policies.dataplane.nfqueue import (
    NF_ACCEPT,
    NF_DROP,
    NfQueue,
    NfQueueError,
    QueueStats,
    encode_verdict,
    read_queue_stats,
)
from kube_network_policies.dataplane.packet import parse_packet
from kube_network_policies.engine.flow import Flow

QUEUE = 100
TCP_ACCEPT, TCP_DROP, TCP_RAISE = 80, 81, 82
UDP_ACCEPT, UDP_DROP = 90, 91
DROPPED_AFTER = 1.2  # seconds a dropped SYN/datagram is waited for (first SYN retransmit: 1 s)


# --- no kernel needed -----------------------------------------------------------------------


def test_read_queue_stats_parses_the_proc_format(tmp_path: Path) -> None:
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text("  100  14187     3 2   128     5     7       50  1\n    7      0     0 2 65531     0     0        0  1\n\n")
    assert read_queue_stats(str(proc)) == {
        100: QueueStats(100, 14187, 3, 2, 128, 5, 7, 50),
        7: QueueStats(7, 0, 0, 2, 65531, 0, 0, 0),
    }


def test_read_queue_stats_without_the_module(tmp_path: Path) -> None:
    assert read_queue_stats(str(tmp_path / "absent")) == {}
    garbage = tmp_path / "garbage"
    garbage.write_text("not a number line at all here x y\n1 2\n")
    assert read_queue_stats(str(garbage)) == {}


def test_encode_verdict_layout() -> None:
    msg = encode_verdict(0x1234, 0xDEADBEEF, NF_DROP)
    assert len(msg) == 32
    length, mtype, flags, seq, portid = struct.unpack_from("=IHHII", msg)
    assert (length, mtype, flags, seq, portid) == (32, (3 << 8) | 1, 1, 0, 0)
    assert struct.unpack_from("!BBH", msg, 16) == (socket.AF_UNSPEC, 0, 0x1234)
    assert struct.unpack_from("=HH", msg, 20) == (12, 2)  # NFQA_VERDICT_HDR
    assert struct.unpack_from("!II", msg, 24) == (NF_DROP, 0xDEADBEEF)
    batch = encode_verdict(7, 42, NF_ACCEPT, batch=True, seq=9)
    assert struct.unpack_from("=IHHI", batch) == (32, (3 << 8) | 3, 1, 9)
    assert struct.unpack_from("!II", batch, 24) == (NF_ACCEPT, 42)


@pytest.mark.parametrize(
    "kwargs",
    [{"queue_num": -1}, {"queue_num": 65536}, {"queue_num": 1, "copy_range": 0},
     {"queue_num": 1, "max_len": 0}, {"queue_num": 1, "max_batch": 0}],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NfQueue(**kwargs)


# --- the real kernel --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[netns.NetnsPair]:
    netns.require_kernel("ip", "iptables", "ip6tables")
    netns.remove_stale()
    with netns.netns_pair() as p:
        for tool in ("iptables", "ip6tables"):
            p.server.run(tool, "-A", "INPUT", "-p", "tcp", "--syn", "--dport", "80:83",
                         "-j", "NFQUEUE", "--queue-num", str(QUEUE))
        p.server.run("iptables", "-A", "INPUT", "-p", "udp", "--dport", f"{UDP_ACCEPT}:{UDP_DROP}",
                     "-j", "NFQUEUE", "--queue-num", str(QUEUE))
        yield p


@pytest.fixture(scope="module")
def listeners(pair: netns.NetnsPair) -> Iterator[dict[int, socket.socket]]:
    """Dual-stack TCP listeners on 80-83 and UDP sockets on 90/91 in the server namespace."""
    socks: dict[int, socket.socket] = {}
    with pair.server.entered():
        for port in (80, 81, 82, 83):
            socks[port] = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                               backlog=512)
        for port in (UDP_ACCEPT, UDP_DROP):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind((pair.server_ip4, port))
            socks[port] = u
    yield socks
    for s in socks.values():
        s.close()


def _max_len_attr(max_len: int) -> bytes:
    return struct.pack("=HH", 8, 3) + struct.pack("!I", max_len)  # NFQA_CFG_QUEUE_MAXLEN


def port_policy(payload: memoryview) -> bool:
    """Accept TCP 80 / UDP 90 (any family), drop the rest, raise on TCP 82."""
    flow = parse_packet(payload)
    if not isinstance(flow, Flow):
        return False
    if flow.dst_port == TCP_RAISE:
        raise RuntimeError("policy engine exploded")
    return flow.dst_port in (TCP_ACCEPT, UDP_ACCEPT, 83)


def bind(pair: netns.NetnsPair, **kwargs: Any) -> NfQueue:
    with pair.server.entered():
        return NfQueue(QUEUE, **kwargs)


@contextlib.contextmanager
def consuming(q: NfQueue, decide: Callable[[memoryview], bool]) -> Iterator[NfQueue]:
    """Run q.run(decide) in a thread for the duration of the block; close q afterwards."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            q.run(decide, stop, poll_interval=0.05)
        except BaseException as e:  # surfaced in the test thread below
            failure.append(e)

    thread = threading.Thread(target=target, name="nfqueue-consumer", daemon=True)
    thread.start()
    try:
        yield q
    finally:
        stop.set()
        thread.join(5)
        q.close()
    assert not thread.is_alive(), "consumer did not stop"
    assert not failure, f"consumer crashed: {failure[0]!r}"


def connect(pair: netns.NetnsPair, port: int, *, v6: bool = False, timeout: float = 3.0) -> str:
    """TCP connect from the client namespace: "connected", "timeout" or "refused"."""
    family = socket.AF_INET6 if v6 else socket.AF_INET
    with pair.client.entered():
        s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((pair.server_ip6 if v6 else pair.server_ip4, port))
        return "connected"
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    finally:
        s.close()


def client_udp(pair: netns.NetnsPair) -> socket.socket:
    with pair.client.entered():
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def received(sock: socket.socket, timeout: float) -> list[bytes]:
    """Every datagram that arrives on sock until `timeout` passes without one."""
    sock.settimeout(timeout)
    got = []
    with contextlib.suppress(TimeoutError):
        while True:
            got.append(sock.recv(2048))
    return got


def queue_stats(pair: netns.NetnsPair) -> QueueStats:
    with pair.server.entered():
        stats = read_queue_stats("/proc/thread-self/net/netfilter/nfnetlink_queue")
    return stats[QUEUE]


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.kernel
class TestKernel:
    @pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
    def test_tcp_accepted_and_dropped(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket],
                                      v6: bool) -> None:
        with consuming(bind(pair), port_policy) as q:
            assert connect(pair, TCP_ACCEPT, v6=v6) == "connected"
            assert connect(pair, TCP_DROP, v6=v6, timeout=DROPPED_AFTER) == "timeout"
            assert connect(pair, TCP_ACCEPT, v6=v6) == "connected"  # a drop does not wedge the queue
        c = q.counters
        assert c.accepted >= 2 and c.dropped >= 1  # SYNs may be retransmitted on a slow machine
        assert (c.decide_errors, c.verdict_errors, c.bad_messages, c.overruns) == (0, 0, 0, 0)

    def test_udp_accepted_and_dropped(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
        client = client_udp(pair)
        with consuming(bind(pair), port_policy) as q:
            client.sendto(b"to-90", (pair.server_ip4, UDP_ACCEPT))
            client.sendto(b"to-91", (pair.server_ip4, UDP_DROP))
            assert received(listeners[UDP_ACCEPT], 1.0) == [b"to-90"]
            assert received(listeners[UDP_DROP], 0.3) == []
        client.close()
        assert (q.counters.accepted, q.counters.dropped) == (1, 1)

    def test_one_round_answers_a_burst(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
        """Drops interleaved with accepts, and drops after the last accept, in one verdict send."""
        q = bind(pair)
        client = client_udp(pair)
        try:
            ports = [UDP_ACCEPT, UDP_DROP, UDP_DROP, UDP_ACCEPT] * 5 + [UDP_DROP] * 3
            for i, port in enumerate(ports):
                client.sendto(b"%d" % i, (pair.server_ip4, port))
            assert wait_for(lambda: queue_stats(pair).queue_total == len(ports))
            assert q.process(port_policy, 1.0) == len(ports)
            assert (q.counters.rounds, q.counters.accepted, q.counters.dropped) == (1, 10, 13)
            expected = [b"%d" % i for i, port in enumerate(ports) if port == UDP_ACCEPT]
            assert sorted(received(listeners[UDP_ACCEPT], 0.5)) == sorted(expected)
            assert received(listeners[UDP_DROP], 0.1) == []
            assert queue_stats(pair).queue_total == 0
            assert q.process(port_policy, 0) == 0  # nothing left, and no error came back
            assert q.counters.verdict_errors == 0
        finally:
            client.close()
            q.close()

    def test_decide_error_uses_the_default_verdict(self, pair: netns.NetnsPair,
                                                   listeners: dict[int, socket.socket]) -> None:
        with consuming(bind(pair), port_policy) as q:
            assert connect(pair, TCP_RAISE, timeout=DROPPED_AFTER) == "timeout"
            assert connect(pair, TCP_ACCEPT) == "connected"  # the loop survived
        assert q.counters.decide_errors >= 1
        assert q.last_decide_error == "RuntimeError: policy engine exploded"

    def test_fail_open_default_accepts(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
        def broken(payload: memoryview) -> bool:
            raise ValueError("no engine yet")

        with consuming(bind(pair, fail_open=True), broken) as q:
            assert connect(pair, TCP_DROP) == "connected"
        assert q.counters.decide_errors == 1 and q.counters.accepted == 1

    def test_stats_reader_sees_the_queue(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
        with consuming(bind(pair), port_policy) as q:
            first = queue_stats(pair)
            assert (first.queue_num, first.peer_portid, first.copy_mode, first.copy_range) == (QUEUE, q.portid, 2, 128)
            assert connect(pair, TCP_ACCEPT) == "connected"
            assert connect(pair, 83) == "connected"
            stats = queue_stats(pair)
            assert stats.id_sequence - first.id_sequence == 2
            assert (stats.queue_total, stats.queue_dropped, stats.user_dropped) == (0, 0, 0)
        with pair.server.entered():
            assert QUEUE not in read_queue_stats("/proc/thread-self/net/netfilter/nfnetlink_queue")

    def test_max_len_limits_the_queue(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
        q = bind(pair, max_len=3)
        client = client_udp(pair)
        try:
            for i in range(10):
                client.sendto(b"%d" % i, (pair.server_ip4, UDP_ACCEPT))
            assert wait_for(lambda: queue_stats(pair).queue_dropped == 7)
            assert queue_stats(pair).queue_total == 3
            assert q.process(port_policy, 1.0) == 3
            assert sorted(received(listeners[UDP_ACCEPT], 0.5)) == [b"0", b"1", b"2"]
        finally:
            client.close()
            q.close()

    def test_overrun_is_counted_and_nothing_stays_queued(self, pair: netns.NetnsPair,
                                                         listeners: dict[int, socket.socket]) -> None:
        q = bind(pair, rcvbuf=8192)  # room for ~20 messages (832 bytes each with copy_range 128)
        client = client_udp(pair)
        try:
            for i in range(200):
                client.sendto(b"%d" % i, (pair.server_ip4, UDP_ACCEPT))
            assert wait_for(lambda: queue_stats(pair).user_dropped > 0)
            assert q.batching
            first = q.process(port_policy, 1.0)
            assert 0 < first < 200
            assert q.counters.overruns == 1
            assert not q.batching  # verdicts one by one until the overrun is behind us
            assert queue_stats(pair).queue_total == 0
            assert len(received(listeners[UDP_ACCEPT], 0.3)) == first

            for i in range(3):
                client.sendto(b"again-%d" % i, (pair.server_ip4, UDP_ACCEPT))
            assert wait_for(lambda: queue_stats(pair).queue_total == 3)
            assert q.process(port_policy, 1.0) == 3
            assert q.batching  # every id of that round postdated the overrun
            assert sorted(received(listeners[UDP_ACCEPT], 0.3)) == [b"again-0", b"again-1", b"again-2"]
            assert queue_stats(pair).queue_total == 0
            q.process(port_policy, 0.1)  # reads the kernel's answers to the reaping batch
            assert q.counters.verdict_errors == 0
            assert q.counters.packets == first + 3 == queue_stats(pair).id_sequence - queue_stats(pair).user_dropped
        finally:
            client.close()
            q.close()

    def test_interrupt_in_decide_still_answers_what_was_read(
        self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]
    ) -> None:
        q = bind(pair)
        client = client_udp(pair)
        try:
            for i in range(3):
                client.sendto(b"%d" % i, (pair.server_ip4, UDP_ACCEPT))
            assert wait_for(lambda: queue_stats(pair).queue_total == 3)
            calls = []

            def interrupted(payload: memoryview) -> bool:
                calls.append(1)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                return True

            with pytest.raises(KeyboardInterrupt):
                q.process(interrupted, 1.0)
            # Packet 0 accepted, packet 1 given the default (drop), packet 2 not read yet.
            assert queue_stats(pair).queue_total == 1
            assert q.process(port_policy, 1.0) == 1
            assert queue_stats(pair).queue_total == 0
            assert sorted(received(listeners[UDP_ACCEPT], 0.3)) == [b"0", b"2"]
        finally:
            client.close()
            q.close()

    def test_messages_read_while_configuring_are_answered(
        self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]
    ) -> None:
        """Packets that reach the socket before a config ACK are kept and answered next round."""
        q = bind(pair)
        client = client_udp(pair)
        try:
            client.sendto(b"early", (pair.server_ip4, UDP_ACCEPT))
            assert wait_for(lambda: queue_stats(pair).queue_total == 1)
            q._request("configure", _max_len_attr(64))  # reads the packet message before its ACK
            assert len(q._backlog) == 1
            assert q.process(port_policy, 0) == 1
            assert received(listeners[UDP_ACCEPT], 0.5) == [b"early"]
            assert queue_stats(pair).queue_total == 0
        finally:
            client.close()
            q.close()

    def test_second_consumer_is_refused(self, pair: netns.NetnsPair) -> None:
        q = bind(pair)
        try:
            with pytest.raises(NfQueueError) as info:
                bind(pair)
            assert info.value.errno == errno.EPERM
            assert f"another consumer is bound to it (netlink port {q.portid})" in str(info.value)
        finally:
            q.close()
        bind(pair).close()  # the queue number is free again after close

    def test_closed_queue(self, pair: netns.NetnsPair) -> None:
        with bind(pair) as q:
            assert q.fileno() >= 0
        q.close()  # idempotent
        with pytest.raises(NfQueueError):
            q.process(port_policy, 0)
