"""NfQueue against the real kernel: two namespaces joined by a veth, iptables NFQUEUE rules in the
server namespace, the consumer in a thread (its socket created inside the server namespace).

Kernel tests skip when not root or when ip/iptables are missing, and fail instead under CI=true.
The first tests need neither (wire format, /proc parsing).
"""

from __future__ import annotations

import collections
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

import packets
from kube_network_policies.dataplane.nfqueue import (
    ACCEPT,
    ACCEPT_JUDGED,
    DEFAULT_COPY_RANGE,
    DROP,
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
# Datagrams to UDP_MARKED arrive with mark ORIG_MARK (set in mangle before the queue), to
# UDP_UNMARKED with none; the payload's first byte says what decide() answers (mark_policy).
UDP_MARKED, UDP_UNMARKED = 92, 93
UDP_BYPASS = 94  # queued with --queue-bypass: accepted by the kernel while no consumer is bound
ORIG_MARK, JUDGED = 0x2000, 0x1000
SO_RCVMARK = 75  # linux/socket.h (5.19+): the packet's mark as a SO_MARK control message
SO_MARK = 36
SO_RCVBUFFORCE = 33
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


@pytest.mark.parametrize("batch", [False, True])
def test_encode_verdict_with_mark(batch: bool) -> None:
    msg = encode_verdict(100, 7, NF_ACCEPT, batch=batch, mark=0x80003000)
    assert len(msg) == 40
    assert struct.unpack_from("=IH", msg) == (40, (3 << 8) | (3 if batch else 1))
    assert struct.unpack_from("!II", msg, 24) == (NF_ACCEPT, 7)
    assert struct.unpack_from("=HH", msg, 32) == (8, 3)  # NFQA_MARK
    assert struct.unpack_from("!I", msg, 36) == (0x80003000,)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"queue_num": -1},
        {"queue_num": 65536},
        {"queue_num": 1, "copy_range": 0},
        {"queue_num": 1, "copy_range": 65532},
        {"queue_num": 1, "max_len": 0},
        {"queue_num": 1, "max_batch": 0},
        {"queue_num": 1, "judged_mark": -1},
        {"queue_num": 1, "judged_mark": 1 << 32},
    ],
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
            p.server.run(tool, "-A", "INPUT", "-p", "tcp", "--syn", "--dport", "80:83", "-j", "NFQUEUE", "--queue-num", str(QUEUE))
        p.server.run("iptables", "-A", "INPUT", "-p", "udp", "--dport", f"{UDP_ACCEPT}:{UDP_DROP}", "-j", "NFQUEUE", "--queue-num", str(QUEUE))
        p.server.run(
            "iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "--dport", str(UDP_MARKED), "-j", "MARK", "--set-mark", hex(ORIG_MARK)
        )
        p.server.run("iptables", "-A", "INPUT", "-p", "udp", "--dport", f"{UDP_MARKED}:{UDP_UNMARKED}", "-j", "NFQUEUE", "--queue-num", str(QUEUE))
        p.server.run("iptables", "-A", "INPUT", "-p", "udp", "--dport", str(UDP_BYPASS), "-j", "NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass")
        yield p


@pytest.fixture(scope="module")
def listeners(pair: netns.NetnsPair) -> Iterator[dict[int, socket.socket]]:
    """Dual-stack TCP listeners on 80-83 and UDP sockets on 90/91 in the server namespace."""
    socks: dict[int, socket.socket] = {}
    with pair.server.entered():
        for port in (80, 81, 82, 83):
            socks[port] = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=512)
        for port in (UDP_ACCEPT, UDP_DROP, UDP_MARKED, UDP_UNMARKED, UDP_BYPASS):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
            u.bind((pair.server_ip4, port))
            u.setsockopt(socket.SOL_SOCKET, SO_RCVMARK, 1)
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


def mark_policy(payload: memoryview) -> int:
    """The first byte of the UDP payload decides: j = ACCEPT_JUDGED, a = ACCEPT, else DROP."""
    flow = parse_packet(payload)
    assert isinstance(flow, Flow) and flow.dst_port in (UDP_MARKED, UDP_UNMARKED)
    return {ord("j"): ACCEPT_JUDGED, ord("a"): ACCEPT}.get(payload[28], DROP)


def received_marks(sock: socket.socket, timeout: float) -> dict[bytes, int]:
    """Datagram -> the mark it arrived with (SO_RCVMARK), until `timeout` passes without one."""
    sock.settimeout(timeout)
    got: dict[bytes, int] = {}
    with contextlib.suppress(TimeoutError):
        while True:
            data, ancillary, _, _ = sock.recvmsg(2048, socket.CMSG_SPACE(4))
            marks = [struct.unpack("=I", d[:4])[0] for level, kind, d in ancillary if (level, kind) == (socket.SOL_SOCKET, SO_MARK)]
            got[data] = marks[0] if marks else 0
    return got


def sent_verdicts(q: NfQueue) -> list[list[tuple[str, int, int | None]]]:
    """Wrap q._send: per send, the verdict messages in it as (kind, verdict, mark or None)."""
    sends: list[list[tuple[str, int, int | None]]] = []
    real = q._send

    def send(data: bytes) -> None:
        out = []
        off = 0
        while off < len(data):
            length, mtype = struct.unpack_from("=IH", data, off)
            verdict = struct.unpack_from("!I", data, off + 24)[0]
            mark = struct.unpack_from("!I", data, off + 36)[0] if length == 40 else None
            out.append(("batch" if mtype & 0xFF == 3 else "single", verdict, mark))
            off += length
        sends.append(out)
        real(data)

    q._send = send  # type: ignore[method-assign]
    return sends


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


def connect(pair: netns.NetnsPair, port: int, *, v6: bool = False, timeout: float = 3.0, options: int = 0) -> str:
    """TCP connect from the client namespace: "connected", "timeout" or "refused". options: size
    of a destination options header on every packet (IPv6), the SYN included."""
    v6 = v6 or bool(options)
    family = socket.AF_INET6 if v6 else socket.AF_INET
    with pair.client.entered():
        s = socket.socket(family, socket.SOCK_STREAM)
    if options:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, packets.destination_options(options))
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
    def test_tcp_accepted_and_dropped(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket], v6: bool) -> None:
        with consuming(bind(pair), port_policy) as q:
            assert connect(pair, TCP_ACCEPT, v6=v6) == "connected"
            assert connect(pair, TCP_DROP, v6=v6, timeout=DROPPED_AFTER) == "timeout"
            assert connect(pair, TCP_ACCEPT, v6=v6) == "connected"  # a drop does not wedge the queue
        c = q.counters
        assert c.accepted >= 2 and c.dropped >= 1  # SYNs may be retransmitted on a slow machine
        assert (c.decide_errors, c.verdict_errors, c.bad_messages, c.overruns) == (0, 0, 0, 0)

    @pytest.mark.parametrize("options", [200, 1024])
    def test_ports_behind_long_ipv6_options_are_read(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket], options: int) -> None:
        """The whole packet is copied: a SYN whose TCP header sits past byte 128 (where a
        headers-only copy range ended) is judged on its real port."""
        seen: list[int] = []

        def policy(payload: memoryview) -> bool:
            seen.append(len(payload))
            return port_policy(payload)

        with consuming(bind(pair), policy) as q:
            assert connect(pair, TCP_ACCEPT, options=options) == "connected"
            assert connect(pair, TCP_DROP, options=options, timeout=DROPPED_AFTER) == "timeout"
        assert min(seen) >= 40 + options + 20
        assert q.counters.accepted >= 1 and q.counters.dropped >= 1

    def test_large_first_packet_is_copied_whole(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
        lengths: list[int] = []

        def policy(payload: memoryview) -> bool:
            lengths.append(len(payload))
            return port_policy(payload)

        client = client_udp(pair)
        try:
            with consuming(bind(pair), policy):
                client.sendto(bytes(60000), (pair.server_ip4, UDP_ACCEPT))
                listeners[UDP_ACCEPT].settimeout(1.0)
                assert len(listeners[UDP_ACCEPT].recv(65536)) == 60000
        finally:
            client.close()
        assert lengths == [20 + 8 + 60000]  # reassembled before INPUT, copied in full

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

    def test_decide_error_uses_the_default_verdict(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
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
            assert (first.queue_num, first.peer_portid, first.copy_mode, first.copy_range) == (QUEUE, q.portid, 2, DEFAULT_COPY_RANGE)
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

    def test_overrun_is_counted_and_nothing_stays_queued(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
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

    def test_interrupt_in_decide_still_answers_what_was_read(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
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

    def test_messages_read_while_configuring_are_answered(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
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

    def test_judged_accepts_carry_the_judged_bit(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
        """ACCEPT_JUDGED adds the judged bit to the packet's own mark (read from NFQA_MARK, absent
        when 0); ACCEPT leaves the mark alone. One batch only where every accept wants one mark."""
        q = bind(pair, judged_mark=JUDGED)
        sends = sent_verdicts(q)
        client = client_udp(pair)

        def round_of(*datagrams: tuple[bytes, int]) -> dict[bytes, int]:
            for data, port in datagrams:
                client.sendto(data, (pair.server_ip4, port))
            assert wait_for(lambda: queue_stats(pair).queue_total == len(datagrams))
            assert q.process(mark_policy, 1.0) == len(datagrams)
            got = received_marks(listeners[UDP_MARKED], 0.3)
            got.update(received_marks(listeners[UDP_UNMARKED], 0.05))
            return got

        try:
            # All judged, one original mark: one batch verdict carrying ORIG_MARK | JUDGED.
            assert round_of(*((b"j%d" % i, UDP_MARKED) for i in range(5))) == {b"j%d" % i: ORIG_MARK | JUDGED for i in range(5)}
            assert sends[-1] == [("batch", NF_ACCEPT, ORIG_MARK | JUDGED)]
            # Judged and plain accepts (and drops) mixed: a batch would mark them all alike.
            got = round_of((b"j1", UDP_MARKED), (b"a1", UDP_MARKED), (b"d1", UDP_MARKED), (b"j2", UDP_MARKED), (b"a2", UDP_MARKED))
            assert got == {b"j1": ORIG_MARK | JUDGED, b"a1": ORIG_MARK, b"j2": ORIG_MARK | JUDGED, b"a2": ORIG_MARK}
            assert collections.Counter(sends[-1]) == {
                ("single", NF_DROP, None): 1,
                ("single", NF_ACCEPT, None): 2,
                ("single", NF_ACCEPT, ORIG_MARK | JUDGED): 2,
            }
            # Judged, with different original marks (none: no NFQA_MARK in the message).
            assert round_of((b"j3", UDP_UNMARKED), (b"j4", UDP_MARKED)) == {b"j3": JUDGED, b"j4": ORIG_MARK | JUDGED}
            assert [v[2] for v in sends[-1]] == [JUDGED, ORIG_MARK | JUDGED]
            # Only plain accepts: one batch without a mark.
            assert round_of((b"a3", UDP_MARKED), (b"a4", UDP_UNMARKED)) == {b"a3": ORIG_MARK, b"a4": 0}
            assert sends[-1] == [("batch", NF_ACCEPT, None)]
            assert len(sends) == 4  # one send per round
            assert queue_stats(pair).queue_total == 0
            q.process(mark_policy, 0.1)
            assert q.counters.verdict_errors == 0
        finally:
            client.close()
            q.close()

    def test_many_marked_verdicts_are_split_between_messages(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
        """One round of 2,000 individual verdicts (32 and 40 bytes mixed: over 64 KiB) goes out in
        several sends, each cut between messages."""
        q = bind(pair, judged_mark=JUDGED, max_batch=4096)
        sends = sent_verdicts(q)
        client = client_udp(pair)
        listeners[UDP_MARKED].setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: hold them all
        try:
            count = 2000
            for i in range(count):
                client.sendto(b"%s%d" % (b"ja"[i % 2 : i % 2 + 1], i), (pair.server_ip4, UDP_MARKED))
            assert wait_for(lambda: queue_stats(pair).queue_total == count)
            assert q.process(mark_policy, 1.0) == count
            assert len(sends) == 1 and len(sends[0]) == count
            got = received_marks(listeners[UDP_MARKED], 0.5)
            assert len(got) == count
            assert all(mark == (ORIG_MARK | JUDGED if data[:1] == b"j" else ORIG_MARK) for data, mark in got.items())
            assert queue_stats(pair).queue_total == 0
            q.process(mark_policy, 0.1)
            assert q.counters.verdict_errors == 0 and q.counters.send_errors == 0
        finally:
            client.close()
            q.close()

    def test_judged_bit_never_batched_over_unseen_packets(self, pair: netns.NetnsPair, listeners: dict[int, socket.socket]) -> None:
        """fail_open after a socket overrun: the kernel accepted what it could not deliver (without
        the judged bit); until the overrun is behind us, judged accepts go out one by one."""
        q = bind(pair, rcvbuf=8192, fail_open=True, judged_mark=JUDGED)
        sends = sent_verdicts(q)
        client = client_udp(pair)
        try:
            start = queue_stats(pair).id_sequence
            for i in range(200):
                client.sendto(b"j%d" % i, (pair.server_ip4, UDP_MARKED))
            # With fail-open an undeliverable message is accepted at once, not counted as dropped.
            assert wait_for(lambda: queue_stats(pair).id_sequence - start == 200)
            assert queue_stats(pair).queue_total < 200
            first = q.process(mark_policy, 1.0)
            assert 0 < first < 200 and q.counters.overruns == 1
            assert all(kind == "single" for kind, _, _ in sends[-1]) and len(sends[-1]) == first
            got = received_marks(listeners[UDP_MARKED], 0.5)
            assert len(got) == 200  # fail-open: the kernel accepted the rest unjudged
            assert sorted(got.values()).count(ORIG_MARK | JUDGED) == first
            assert sorted(got.values()).count(ORIG_MARK) == 200 - first
            # Once the overrun is behind us, batching with the mark resumes.
            for i in range(3):
                client.sendto(b"j-again-%d" % i, (pair.server_ip4, UDP_MARKED))
            assert wait_for(lambda: queue_stats(pair).queue_total == 3)
            assert q.process(mark_policy, 1.0) == 3
            assert sends[-1] == [("single", NF_ACCEPT, ORIG_MARK | JUDGED)] * 3
            for i in range(3):
                client.sendto(b"j-later-%d" % i, (pair.server_ip4, UDP_MARKED))
            assert wait_for(lambda: queue_stats(pair).queue_total == 3)
            assert q.process(mark_policy, 1.0) == 3
            assert sends[-1] == [("batch", NF_ACCEPT, ORIG_MARK | JUDGED)]
            assert set(received_marks(listeners[UDP_MARKED], 0.3).values()) == {ORIG_MARK | JUDGED}
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


@pytest.mark.parametrize("with_decide", [True, False], ids=["judged", "default"])
def test_close_under_load_hands_over_without_a_loss_fail_open(pair: netns.NetnsPair, listeners: dict[int, socket.socket], with_decide: bool) -> None:
    """A graceful close while packets stream in and sit queued: with fail-open nothing is lost.
    The consumer stops first, so packets pile up in the kernel queue; close() answers those,
    and every later packet is accepted by the kernel (queue bypass), none dropped by the unbind."""
    sock = listeners[UDP_BYPASS]
    received(sock, 0.05)
    q = bind(pair, fail_open=True)
    judged: list[int] = []

    def decide(payload: memoryview) -> int:
        judged.append(1)
        return ACCEPT

    stop = threading.Event()
    consumer = threading.Thread(target=q.run, args=(decide, stop, 0.01), daemon=True)
    consumer.start()
    n = 6000
    sender = client_udp(pair)
    started = threading.Event()

    def send() -> None:
        for i in range(n):
            sender.sendto(b"%06d" % i, (pair.server_ip4, UDP_BYPASS))
            if i == 1000:
                started.set()
            if i % 20 == 19:
                time.sleep(0.001)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    assert started.wait(5)
    stop.set()
    consumer.join(5)
    time.sleep(0.05)  # packets queue up with nobody reading
    before = len(judged)
    q.close(decide if with_decide else None)
    t.join(30)
    sender.close()
    got = set(received(sock, 0.3))
    missing = [i for i in range(n) if b"%06d" % i not in got]
    print(f"\nclose under load: {n} sent, {len(got)} received, {len(judged) - before} judged at close")
    assert not missing, f"{len(missing)} datagrams lost, first {missing[:5]}"
    assert with_decide == (len(judged) > before), "close() answered the queued packets with decide() only when given one"
