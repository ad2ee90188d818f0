"""A pure-Python NFQUEUE consumer over raw netlink (NETLINK_NETFILTER), built for throughput.

Why this shape (figures in /work/shared/NOTES.md): Python has no recvmmsg, and one syscall per
verdict doubles the cost per packet. So each round drains the socket with non-blocking
`recv_into` until it is empty (or `max_batch` packets), asks `decide` about each packet while
its bytes are still in the receive buffer, then answers the whole round with ONE send: an
individual DROP verdict per dropped packet first, then one NFQNL_MSG_VERDICT_BATCH ACCEPT for
the last accepted id (the kernel accepts every still-queued packet up to that id, in order).

Kernel facts this relies on (net/netfilter/nfnetlink_queue.c):
- packet ids grow by one per queued packet and messages reach the socket in id order; a batch
  verdict walks the queue in that order and compares ids with serial arithmetic, so "the last
  accepted id of the round" is right across the 2^32 wrap-around;
- a packet whose message cannot be delivered (socket receive buffer full: ENOBUFS) is never
  queued: it is dropped (or accepted with NFQA_CFG_F_FAIL_OPEN) and its id is skipped.
  So a batch ACCEPT cannot reach a packet we never saw on today's kernels; we still do not
  rely on it (older kernels, a message we failed to parse, an interrupted round): after an
  overrun, until every id that could have been lost is behind us (see `_reap`), accepts go out
  one by one and the round ends with a batch DROP up to the last id seen. An unseen packet can
  then be dropped but never accepted, and never stays queued for ever; the cost is the same as
  "individual verdicts" and normal batching resumes on its own one round later. With
  fail_open, accepting an unseen packet is the configured behaviour, so batching continues.

Verdicts and the accept cache (dataplane/nftables.py): `decide` answers DROP, ACCEPT or
ACCEPT_JUDGED (the engine accepted the packet's full tuple; False and True work as DROP and
ACCEPT). With `judged_mark`, an ACCEPT_JUDGED verdict carries NFQA_MARK = the packet's own mark
(NFQA_MARK of its message, present when nonzero) | judged_mark, and the ruleset caches only
packets that come back with that bit: never what the kernel accepted unjudged (no listener, full
queue) nor what we accepted without a verdict on the tuple. A batch verdict sets its NFQA_MARK on
EVERY packet it covers, so a round's accepts share one batch only when they all want the same
mark (the usual case: all judged, all with the ruleset's one queueing mark), and a batch with the
judged bit is never sent while an id we did not see could be queued (after an overrun); otherwise
the accepts go out one by one, still in the round's one send.

`python -m kube_network_policies.lab.bench_nfqueue` (root) measures CPU per packet.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NamedTuple

from kube_network_policies.errors import KnpError

__all__ = [
    "ACCEPT",
    "ACCEPT_JUDGED",
    "DEFAULT_COPY_RANGE",
    "DEFAULT_MAX_LEN",
    "DROP",
    "NfQueue",
    "NfQueueCounters",
    "NfQueueError",
    "QueueStats",
    "encode_verdict",
    "read_queue_stats",
]

# --- constants (linux/netlink.h, linux/netfilter/nfnetlink*.h); the stdlib lacks most --------

NETLINK_NETFILTER: Final = 12
SOL_NETLINK: Final = 270
SO_RCVBUFFORCE: Final = 33

NLMSG_ERROR: Final = 2
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4

NFNETLINK_V0: Final = 0
NFNL_SUBSYS_QUEUE: Final = 3
NFQNL_MSG_PACKET: Final = 0
NFQNL_MSG_VERDICT: Final = 1
NFQNL_MSG_CONFIG: Final = 2
NFQNL_MSG_VERDICT_BATCH: Final = 3

NFQA_PACKET_HDR: Final = 1
NFQA_VERDICT_HDR: Final = 2
NFQA_MARK: Final = 3
NFQA_PAYLOAD: Final = 10

NFQA_CFG_CMD: Final = 1
NFQA_CFG_PARAMS: Final = 2
NFQA_CFG_QUEUE_MAXLEN: Final = 3
NFQA_CFG_MASK: Final = 4
NFQA_CFG_FLAGS: Final = 5
NFQNL_CFG_CMD_BIND: Final = 1
NFQNL_CFG_CMD_UNBIND: Final = 2
NFQNL_COPY_PACKET: Final = 2
NFQA_CFG_F_FAIL_OPEN: Final = 0x01
NFQA_CFG_F_GSO: Final = 0x04

NF_DROP: Final = 0
NF_ACCEPT: Final = 1

# What `decide` returns (bools work too: False = DROP, True = ACCEPT).
DROP: Final = 0
ACCEPT: Final = 1  # accepted without a verdict on the full tuple: never cached
ACCEPT_JUDGED: Final = 2  # the engine accepted this (source, destination, protocol, port)

# The whole packet, up to the most a message can carry (NFQNL_MAX_COPY_RANGE = 0xffff minus an
# attribute header): IPv6 extension headers have no length limit short of the packet's, and a
# transport header we cannot see cannot be judged. The kernel copies min(copy range, packet
# length), so a SYN costs what it did with a headers-only range; only a large first packet (a
# big UDP datagram, a GSO burst: up to 64 KiB) costs its size in copying.
DEFAULT_COPY_RANGE: Final = 0xFFFF - 4
# The queue only ever holds the first packet of new connections. 4096 entries ride out a stall
# of ~100 ms at the ~41k new connections/s this box can carry (a GC pause, a scheduling
# hiccup); the kernel default of 1024 is ~25 ms. Much more buys nothing: a client retransmits
# its SYN after 1 s, and a packet that waited that long is answered too late to matter.
DEFAULT_MAX_LEN: Final = 4096
# Receive-buffer memory per queued message as counted against SO_RCVBUF (skb truesize):
# measured 832 bytes for a SYN on this kernel, whatever the copy range. The buffer is sized for a
# full queue of first packets up to _TYPICAL_PACKET bytes (+ 1 KiB); larger ones take more room
# and can overflow the socket before the queue is full, which the kernel handles like a full
# queue (dropped, or accepted unjudged with fail-open; either way never cached).
_OVERHEAD_PER_MESSAGE: Final = 1024
_TYPICAL_PACKET: Final = 256
_MAX_RCVBUF: Final = 64 << 20
# A whole message must fit one recv: a bigger one is truncated by the kernel and lost.
_MESSAGE_OVERHEAD: Final = 4096

_PACKET_TYPE: Final = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_CONFIG_TYPE: Final = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
_VERDICT_TYPE: Final = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
_BATCH_TYPE: Final = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT_BATCH
# Sequence number on reaping batch DROPs, to recognise their expected ENOENT ("nothing left").
_REAP_SEQ: Final = 0x52454150

_nlmsghdr = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host order)
_nfgenmsg = struct.Struct("!BBH")  # family, version, res_id (queue number, big endian)
_nlattr = struct.Struct("=HH")  # len, type (host order)
_unpack_msg = struct.Struct("=IH").unpack_from
_unpack_attr = _nlattr.unpack_from
_unpack_be32 = struct.Struct("!I").unpack_from
_unpack_error = struct.Struct("=i4xHHI").unpack_from  # error, then the request's len/type/flags/seq
_pack_be32 = struct.Struct("!I").pack


class NfQueueError(KnpError, OSError):
    """The queue could not be set up or the socket failed; the message says what to do."""


@dataclass(slots=True)
class NfQueueCounters:
    """Monotonic counters, updated once per round (cheap to read from another thread)."""

    packets: int = 0  # packets answered
    accepted: int = 0
    dropped: int = 0
    decide_errors: int = 0  # decide() raised: the default verdict was used
    no_payload: int = 0  # a packet message without payload (copy mode not applied yet)
    overruns: int = 0  # ENOBUFS: the kernel could not deliver some packets to us
    verdict_errors: int = 0  # the kernel rejected a verdict (e.g. ENOENT: id unknown)
    bad_messages: int = 0  # netlink data that did not parse
    send_errors: int = 0  # a verdict send failed; it is retried on the next round
    rounds: int = 0  # verdict sends (one per round with packets)


class QueueStats(NamedTuple):
    """One line of /proc/net/netfilter/nfnetlink_queue (per network namespace)."""

    queue_num: int
    peer_portid: int  # netlink port id of the bound socket
    queue_total: int  # packets waiting for a verdict right now
    copy_mode: int  # 0 none, 1 meta, 2 packet
    copy_range: int
    queue_dropped: int  # dropped because the queue was full (queue max length)
    user_dropped: int  # dropped because the message could not reach the socket (ENOBUFS)
    id_sequence: int  # id of the last packet queued (or attempted); ids start at 1


def read_queue_stats(path: str = "/proc/net/netfilter/nfnetlink_queue") -> dict[int, QueueStats]:
    """Per-queue kernel counters, keyed by queue number; {} when no queue exists.

    Column order from seq_show() in net/netfilter/nfnetlink_queue.c: queue_num, peer_portid,
    queue_total, copy_mode, copy_range, queue_dropped, queue_user_dropped, id_sequence, and a
    constant 1. /proc/net follows the reading thread group's network namespace.
    """
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except FileNotFoundError:  # nfnetlink_queue not loaded: no queue anywhere
        return {}
    stats: dict[int, QueueStats] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            values = [int(v) for v in fields[:8]]
        except ValueError:
            continue
        stats[values[0]] = QueueStats(*values)
    return stats


def _message(mtype: int, flags: int, seq: int, queue_num: int, attrs: bytes) -> bytes:
    body = _nfgenmsg.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue_num) + attrs
    return _nlmsghdr.pack(_nlmsghdr.size + len(body), mtype, flags, seq, 0) + body


def _attr(atype: int, payload: bytes) -> bytes:
    return _nlattr.pack(_nlattr.size + len(payload), atype) + payload + bytes(-len(payload) % 4)


def encode_verdict(queue_num: int, packet_id: int, verdict: int, *, batch: bool = False, seq: int = 0, mark: int | None = None) -> bytes:
    """One NFQNL_MSG_VERDICT (or _VERDICT_BATCH: every queued id up to packet_id) message;
    with `mark`, NFQA_MARK sets the packet's mark (a batch: of every packet it covers)."""
    attrs = _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
    if mark is not None:
        attrs += _attr(NFQA_MARK, _pack_be32(mark))
    return _message(_BATCH_TYPE if batch else _VERDICT_TYPE, NLM_F_REQUEST, seq, queue_num, attrs)


def _mark_tail(mark: int) -> bytes:
    """The NFQA_MARK attribute that follows the packet id in a marked verdict."""
    return _nlattr.pack(8, NFQA_MARK) + _pack_be32(mark)


def _config_message(queue_num: int, seq: int, *attrs: bytes) -> bytes:
    return _message(_CONFIG_TYPE, NLM_F_REQUEST | NLM_F_ACK, seq, queue_num, b"".join(attrs))


def _cmd(command: int) -> bytes:
    # struct nfqnl_msg_config_cmd { __u8 command; __u8 _pad; __be16 pf; } - pf unused since 3.8
    return _attr(NFQA_CFG_CMD, struct.pack("!BxH", command, 0))


_ERRNO_HINTS: Final[dict[int, str]] = {
    errno.EBUSY: "this socket is already bound to it",
    errno.EPERM: "needs CAP_NET_ADMIN",
    errno.EOPNOTSUPP: "this kernel does not support a requested queue flag",
    errno.EINVAL: "the kernel rejected the queue configuration",
}


class NfQueue:
    """Consumer of one NFQUEUE queue number in the current network namespace.

    Not thread-safe: call process()/run() from one thread. The memoryview given to `decide`
    points into the receive buffer and is only valid during that call.

    copy_range: bytes of each packet copied to us (the whole packet, up to 65,531, by default).
    max_len: kernel queue length; beyond it packets are dropped (accepted if fail_open).
    fail_open: NFQA_CFG_F_FAIL_OPEN, and the default verdict when decide() raises. It covers a
        full queue only: with no consumer bound, the rule's --queue-bypass decides.
    judged_mark: the mark bit an ACCEPT_JUDGED verdict adds to the packet's mark (0: none, and
        ACCEPT_JUDGED is a plain accept). See the module docstring.
    rcvbuf: socket receive buffer to request; default sized for max_len messages.
    max_batch: most packets read before answering, to bound the wait of the first one.
    Raises NfQueueError (an OSError with a readable message) when the queue cannot be bound.
    """

    def __init__(
        self,
        queue_num: int,
        *,
        copy_range: int = DEFAULT_COPY_RANGE,
        max_len: int = DEFAULT_MAX_LEN,
        fail_open: bool = False,
        rcvbuf: int | None = None,
        max_batch: int = 1024,
        judged_mark: int = 0,
    ) -> None:
        if not 0 <= queue_num <= 0xFFFF:
            raise ValueError(f"queue number {queue_num} is out of range 0-65535")
        if not 1 <= copy_range <= 0xFFFF - 4:
            raise ValueError(f"copy_range {copy_range} is out of range 1-65531")
        if max_len < 1:
            raise ValueError(f"max_len {max_len} must be at least 1")
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} must be at least 1")
        if not 0 <= judged_mark <= 0xFFFFFFFF:
            raise ValueError(f"judged_mark {judged_mark:#x} is not a 32-bit mark")
        self.queue_num = queue_num
        self.copy_range = copy_range
        self.max_len = max_len
        self.fail_open = fail_open
        self.max_batch = max_batch
        self.judged_mark = judged_mark
        self.counters = NfQueueCounters()
        self.last_decide_error: str | None = None  # "Type: message" of the latest decide() failure
        self._seq = 0
        # Overrun state: 0 normal; 1 ENOBUFS seen, socket not yet seen empty since; 2 socket seen
        # empty since, so every id read from now on is newer than any id that could be lost.
        self._reap = 0
        self._unsent = b""  # verdicts whose send failed, retried first thing next round
        self._backlog: list[bytes] = []  # packet messages read while waiting for a config ACK
        self._buf = bytearray(copy_range + _MESSAGE_OVERHEAD)
        self._view = memoryview(self._buf)
        self._drop_prefix = encode_verdict(queue_num, 0, NF_DROP)[:-4]
        self._accept_prefix = encode_verdict(queue_num, 0, NF_ACCEPT)[:-4]
        self._batch_accept_prefix = encode_verdict(queue_num, 0, NF_ACCEPT, batch=True)[:-4]
        # Marked verdicts: prefix + packet id + _mark_tail(mark).
        self._accept_marked_prefix = encode_verdict(queue_num, 0, NF_ACCEPT, mark=0)[:-12]
        self._batch_accept_marked_prefix = encode_verdict(queue_num, 0, NF_ACCEPT, batch=True, mark=0)[:-12]
        self._batch_reap_prefix = encode_verdict(queue_num, 0, NF_DROP, batch=True, seq=_REAP_SEQ)[:-4]
        self._closed = False

        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as e:
            raise NfQueueError(e.errno, f"cannot open a netfilter netlink socket: {e.strerror}") from None
        try:
            self._sock.bind((0, 0))
            self.portid: int = self._sock.getsockname()[0]
            # Room for a full queue's worth of messages, so that the queue limit (counted as
            # queue_dropped, fail-open aware) is what overflows, not the socket. RCVBUFFORCE
            # (CAP_NET_ADMIN, which NFQUEUE needs anyway) is not capped by net.core.rmem_max;
            # the kernel doubles the value for its bookkeeping.
            if rcvbuf is None:
                per_message = min(copy_range, _TYPICAL_PACKET) + _OVERHEAD_PER_MESSAGE
                rcvbuf = min(_MAX_RCVBUF, max(1 << 20, max_len * per_message // 2))
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.rcvbuf: int = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            # NETLINK_NO_ENOBUFS stays off on purpose: ENOBUFS is the only in-band sign that
            # packets were lost (we count it and switch verdict mode), and it costs one failed
            # recv per overrun. Trade-off: without the option an overrun also marks the socket
            # congested, and the kernel delivers nothing more until we have drained it; with
            # the buffer sized for the whole queue, that is a rare path.
            self._sock.setblocking(False)
            self._poll = select.poll()
            self._poll.register(self._sock, select.POLLIN)
            flags = NFQA_CFG_F_GSO | (NFQA_CFG_F_FAIL_OPEN if fail_open else 0)
            # One message, so the kernel binds and configures atomically: between a bare BIND
            # and the PARAMS, copy mode "none" would make the kernel drop (EINVAL) packets.
            # Flags are validated before the bind, so an unsupported flag binds nothing.
            # PF_BIND/PF_UNBIND are no-ops since Linux 3.8 and are not sent.
            self._request(
                "bind",
                _cmd(NFQNL_CFG_CMD_BIND),
                _attr(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET)),
                _attr(NFQA_CFG_QUEUE_MAXLEN, _pack_be32(max_len)),
                _attr(NFQA_CFG_FLAGS, _pack_be32(flags)),
                _attr(NFQA_CFG_MASK, _pack_be32(NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN)),
            )
        except BaseException:
            self._sock.close()
            self._closed = True
            raise

    # --- setup and teardown ------------------------------------------------------------------

    def _request(self, what: str, *attrs: bytes, timeout: float = 5.0) -> None:
        """Send a config message and wait for its ACK, keeping packet messages for later."""
        self._seq += 1
        seq = self._seq
        try:
            self._sock.send(_config_message(self.queue_num, seq, *attrs))
        except OSError as e:
            raise NfQueueError(e.errno, f"cannot {what} queue {self.queue_num}: {e.strerror}") from None
        deadline = time.monotonic() + timeout
        buf = self._buf
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll.poll(max(1, int(remaining * 1000))):
                raise NfQueueError(errno.ETIMEDOUT, f"no answer from the kernel to {what} queue {self.queue_num}")
            try:
                n = self._sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.counters.overruns += 1
                    self._reap = 1
                    continue
                raise NfQueueError(e.errno, f"cannot {what} queue {self.queue_num}: {e.strerror}") from None
            off = 0
            acked = False
            while off + 16 <= n:
                mlen, mtype = _unpack_msg(buf, off)
                if mlen < 16 or off + mlen > n:
                    break
                if mtype == NLMSG_ERROR and mlen >= 36:
                    code, _, _, req_seq = _unpack_error(buf, off + 16)
                    if req_seq == seq:
                        if code:
                            raise NfQueueError(-code, self._explain(what, -code))
                        acked = True
                off += (mlen + 3) & ~3
            if acked:
                return
            self._backlog.append(bytes(buf[:n]))  # packets that raced the ACK: answer them later

    def _explain(self, what: str, err: int) -> str:
        msg = f"cannot {what} queue {self.queue_num}: {os.strerror(err)}"
        hint = _ERRNO_HINTS.get(err, "")
        if err == errno.EPERM:
            # The kernel answers EPERM both without CAP_NET_ADMIN and when another socket owns
            # the queue; /proc tells which (thread-self: the namespace our socket was made in).
            owner = read_queue_stats("/proc/thread-self/net/netfilter/nfnetlink_queue").get(self.queue_num)
            if owner is not None and owner.peer_portid != self.portid:
                hint = f"another consumer is bound to it (netlink port {owner.peer_portid})"
        return f"{msg} ({hint})" if hint else msg

    def close(self, decide: Callable[[memoryview], int] | None = None, drain_s: float = 0.25) -> None:
        """Hand the queue back to the kernel without losing what it holds for us, then close.

        The kernel drops every packet still queued when we unbind, and a flow under load always
        has one in flight. With fail_open the queue is first shrunk to nothing: from the ACK on,
        the kernel accepts new packets itself (NFQA_CFG_F_FAIL_OPEN) instead of queueing them,
        so answering what is already in the socket leaves nothing to drop. Without fail_open
        packets keep arriving; they are answered for at most drain_s and the unbind drops the
        rest (their senders retransmit to the next consumer). Packets are answered with
        decide(), or the default verdict without one.
        """
        if self._closed:
            return
        default = ACCEPT if self.fail_open else DROP
        verdict = decide if decide is not None else (lambda _payload: default)
        try:
            if self.fail_open:
                self._request("hand over", _attr(NFQA_CFG_QUEUE_MAXLEN, _pack_be32(0)), timeout=1.0)
            deadline = time.monotonic() + drain_s
            while (self.process(verdict, 0.005) or self._backlog) and time.monotonic() < deadline:
                pass
        except Exception:  # noqa: BLE001, S110 - closing must not fail; the kernel drops anything left
            pass
        try:
            self._request("unbind", _cmd(NFQNL_CFG_CMD_UNBIND), timeout=1.0)
        except OSError:
            pass
        self._closed = True
        self._sock.close()

    def __enter__(self) -> NfQueue:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def batching(self) -> bool:
        """Whether the next round answers accepts with one batch verdict (False after an overrun)."""
        return self.fail_open or self._reap == 0

    # --- the packet path -----------------------------------------------------------------------

    def process(self, decide: Callable[[memoryview], int], timeout: float | None = None) -> int:
        """Wait up to `timeout` seconds (None: for ever, 0: not at all) for packets, read all that
        are waiting (up to max_batch), answer them in one send, and return how many were handled.

        decide(payload) returns DROP, ACCEPT or ACCEPT_JUDGED (or a bool).
        """
        if self._closed:
            raise NfQueueError(errno.EBADF, f"queue {self.queue_num} is closed")
        if self._unsent:
            self._send(self._unsent)
        sock = self._sock
        recv_into = sock.recv_into
        buf = self._buf
        view = self._view
        unpack_msg = _unpack_msg
        unpack_attr = _unpack_attr
        unpack_be32 = _unpack_be32
        default: int = ACCEPT if self.fail_open else DROP
        max_batch = self.max_batch
        judged_mark = self.judged_mark
        accepts: list[int] = []
        # With judged_mark: per accept, the mark its verdict sets, or -1 for none (parallel list).
        marks: list[int] = []
        drops: list[int] = []
        last_id = 0
        handled = 0
        decide_errors = no_payload = verdict_errors = bad = 0
        reap_at_start = self._reap
        waited = False
        wait_ms = -1 if timeout is None else int(timeout * 1000)

        try:
            while handled < max_batch:
                if self._backlog:
                    chunk = self._backlog.pop(0)
                    n = len(chunk)
                    buf[:n] = chunk
                else:
                    try:
                        n = recv_into(buf)
                    except BlockingIOError:
                        if self._reap == 1:
                            self._reap = 2
                        if handled or waited or wait_ms == 0:
                            break
                        if not self._poll.poll(wait_ms):
                            break
                        waited = True
                        continue
                    except OSError as e:
                        if e.errno == errno.ENOBUFS:  # reported once per overrun; keep reading
                            self.counters.overruns += 1
                            self._reap = 1
                            continue
                        raise NfQueueError(e.errno, f"queue {self.queue_num}: receive failed: {e.strerror}") from None
                off = 0
                while off + 16 <= n:
                    mlen, mtype = unpack_msg(buf, off)
                    if mlen < 16 or off + mlen > n:
                        bad += 1
                        break
                    if mtype == _PACKET_TYPE:
                        # Attributes follow nlmsghdr (16) + nfgenmsg (4). The kernel puts
                        # NFQA_PACKET_HDR first and NFQA_PAYLOAD last; walk rather than assume.
                        end = off + mlen
                        a = off + 20
                        packet_id = -1
                        mark = 0  # NFQA_MARK is only there when the packet's mark is nonzero
                        payload = None
                        while a + 4 <= end:
                            alen, atype = unpack_attr(buf, a)
                            if alen < 4:
                                break
                            if atype == NFQA_PAYLOAD:
                                payload = view[a + 4 : min(a + alen, end)]
                                break
                            if atype == NFQA_PACKET_HDR and alen >= 8:
                                packet_id = unpack_be32(buf, a + 4)[0]
                            elif atype == NFQA_MARK and alen >= 8:
                                mark = unpack_be32(buf, a + 4)[0]
                            a += (alen + 3) & ~3
                        if packet_id < 0:
                            # Cannot be answered. It stays queued, so treat it like a lost
                            # message: no batch accept may reach it (see _reap).
                            bad += 1
                            self._reap = 1
                        else:
                            if payload is None:
                                no_payload += 1
                                verdict = default
                            else:
                                try:
                                    verdict = decide(payload)
                                except Exception as e:  # noqa: BLE001 - never let one packet take the loop down
                                    decide_errors += 1
                                    self.last_decide_error = f"{type(e).__name__}: {e}"
                                    verdict = default
                                except BaseException:
                                    # Stopping (KeyboardInterrupt, SystemExit): answer this packet
                                    # too, or a later batch verdict would accept it unjudged.
                                    if default:
                                        accepts.append(packet_id)
                                        if judged_mark:
                                            marks.append(-1)
                                    else:
                                        drops.append(packet_id)
                                    last_id = packet_id
                                    raise
                            if verdict:
                                accepts.append(packet_id)
                                if judged_mark:
                                    marks.append(mark | judged_mark if verdict == ACCEPT_JUDGED else -1)
                            else:
                                drops.append(packet_id)
                            last_id = packet_id
                            handled += 1
                    elif mtype == NLMSG_ERROR:
                        if mlen >= 36:
                            code, _, _, req_seq = _unpack_error(buf, off + 16)
                            if code and not (req_seq == _REAP_SEQ and code == -errno.ENOENT):
                                verdict_errors += 1
                        else:
                            bad += 1
                    off += (mlen + 3) & ~3
        finally:
            # Also on the way out of an exception (KeyboardInterrupt in decide, a socket error):
            # packets already decided must not stay queued.
            self._finish_round(accepts, marks, drops, last_id, reap_at_start)
            c = self.counters
            c.decide_errors += decide_errors
            c.no_payload += no_payload
            c.verdict_errors += verdict_errors
            c.bad_messages += bad
        return handled

    def _finish_round(self, accepts: list[int], marks: list[int], drops: list[int], last_id: int, reap_at_start: int) -> None:
        """Count the round and send its verdicts (plus any left unsent earlier) in one go.

        marks: empty without judged_mark; else per accept the mark to set, -1 for none.
        """
        if not accepts and not drops:
            if self._unsent:
                self._send(self._unsent)
            return
        c = self.counters
        c.packets += len(accepts) + len(drops)
        c.accepted += len(accepts)
        c.dropped += len(drops)
        c.rounds += 1
        reaping = self._reap != 0
        if reap_at_start == 2 and self._reap == 2:
            self._reap = 0  # this round's ids all postdate the overrun: reaped, back to batching
        if reaping and not self.fail_open:
            # Accept one by one, then drop everything else up to the last id seen: whatever is
            # still queued there is a packet we never saw, and it must not be accepted.
            parts = self._one_by_one(accepts, marks)
            parts.append(self._batch_reap_prefix + _pack_be32(last_id))
        else:
            prefix = self._drop_prefix
            parts = [prefix + _pack_be32(i) for i in drops]
            if accepts:
                mark = marks[0] if marks else -1
                if mark < 0 and (not marks or marks.count(-1) == len(marks)):
                    parts.append(self._batch_accept_prefix + _pack_be32(accepts[-1]))
                elif not reaping and marks.count(mark) == len(marks):
                    parts.append(self._batch_accept_marked_prefix + _pack_be32(accepts[-1]) + _mark_tail(mark))
                else:
                    # A batch would give every packet it covers one mark: the judged bit to a
                    # packet accepted without a verdict on its tuple, or to one we never saw.
                    parts += self._one_by_one(accepts, marks)
        self._send(self._unsent + b"".join(parts))  # anything still unsent goes first

    def _one_by_one(self, accepts: list[int], marks: list[int]) -> list[bytes]:
        """An individual ACCEPT verdict per packet, each with its mark (if any)."""
        plain = self._accept_prefix
        if not marks:
            return [plain + _pack_be32(i) for i in accepts]
        marked = self._accept_marked_prefix
        tails: dict[int, bytes] = {}
        parts = []
        for i, mark in zip(accepts, marks, strict=True):
            if mark < 0:
                parts.append(plain + _pack_be32(i))
            else:
                tail = tails.get(mark)
                if tail is None:
                    tail = tails[mark] = _mark_tail(mark)
                parts.append(marked + _pack_be32(i) + tail)
        return parts

    def _send(self, data: bytes) -> None:
        # Keep each send well under the default socket send buffer, and split only between
        # messages (verdicts are 32 or, with a mark, 40 bytes): the kernel reads a send as
        # whole messages and would reject a cut one.
        limit = 64 << 10
        try:
            while data:
                n = len(data)
                if n > limit:
                    n = 0
                    while n < len(data) and n + _unpack_msg(data, n)[0] <= limit:
                        n += _unpack_msg(data, n)[0]
                self._sock.send(data[:n])
                data = data[n:]
            self._unsent = b""
        except OSError as e:
            self._unsent = data
            self.counters.send_errors += 1
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EINTR):
                raise NfQueueError(e.errno, f"queue {self.queue_num}: sending verdicts failed: {e.strerror}") from None

    def run(self, decide: Callable[[memoryview], int], stop: threading.Event, poll_interval: float = 0.2) -> None:
        """process() until `stop` is set (checked at least every poll_interval seconds).

        decide() errors never end the loop; NfQueueError (the socket itself failed) does.
        """
        while not stop.is_set():
            self.process(decide, poll_interval)
