"""Servers and connectivity probes inside network namespaces, all from this one process.

A socket belongs to the namespace it was created in, whatever thread uses it later. So the calling
thread steps into a namespace (setns), creates sockets there, and steps back; one background
thread then serves every namespace with one selector, and one selector loop runs every probe of a
batch in parallel. No process is started per probe or per server.

Probe semantics (SCENARIOS.md: "allow" = the connection completes, or for SCTP the server receives
it; "deny" = the first packet never reaches the server):

* TCP: non-blocking connect from `client_ip`; allowed when connected (SO_ERROR 0) in time;
  denied on timeout, RST (ECONNREFUSED) or ICMP unreachable.
* UDP: a datagram carrying a unique token; allowed when the server's echo of that token comes
  back. The server answers from the address the datagram was sent to (IP_PKTINFO), so the echo
  matches the client's connected socket and the flow's conntrack entry.
* SCTP: this kernel has no SCTP sockets. The client sends a hand-made INIT (CRC32c checksum, a
  unique initiate tag) on a raw IPPROTO_SCTP socket; allowed when the server namespace's raw
  SCTP listener receives an INIT with that tag, addressed to that IP and port, in time.

Every probe uses a fresh source port (a per-client-address counter, not the kernel's random
choice, which can repeat a port to the same server): a 5-tuple repeats only after ~40,000 probes
from one address, so conntrack state of an earlier probe (a UDP entry lives 30-120 s) never
answers for a later one.

DEFAULT_TIMEOUT is 1.0 s: the largest timeout under which a TCP answer can only be the answer to
the first SYN (the kernel retransmits an unanswered SYN after exactly 1 s, TCP_TIMEOUT_INIT, and
the deadline starts before the SYN leaves), and ample for a verdict taken in userspace (10-20 µs
per queued packet: ~10 ms for 500 probes at once). Allowed probes return as soon as they
complete; only a batch with a denied probe waits the full timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import itertools
import os
import random
import resource
import selectors
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from kube_network_policies.dataplane.netns import entered, netns_path
from kube_network_policies.errors import KnpError
from kube_network_policies.lab.topology import Topology, TopologyError, exit_on_sigterm

DEFAULT_TIMEOUT = 1.0
PROTOCOLS = ("TCP", "UDP", "SCTP")
IPPROTO_SCTP = 132
IP_PKTINFO = 8  # <linux/in.h>; absent from Python 3.11's socket module
SCTP_INIT = 1
SOURCE_PORTS = (20000, 60000)  # probes' source ports cycle through this range
LISTEN_BACKLOG = 4096

ProbeRequest = tuple[str, str, str, str, int]  # (client netns, client ip, server ip, protocol, port)


class ProbeError(KnpError):
    """A probe or server cannot be set up (unknown namespace, address not in the namespace...)."""


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    client_netns: str
    client_ip: str
    server_ip: str
    protocol: Literal["TCP", "UDP", "SCTP"]
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.server_ip else socket.AF_INET


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str  # "connected", "echoed", "received", "timeout", "refused", ...
    seconds: float  # from sending to the answer (or to giving up)


# --- CRC32c and SCTP packets ------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as SCTP uses it (RFC 9260 appendix A). crc32c(b"123456789") ==
    0xE3069283."""
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def sctp_init_packet(sport: int, dport: int, tag: int, tsn: int = 1) -> bytes:
    """An SCTP common header (verification tag 0, as an INIT requires) and one INIT chunk with no
    parameters. The checksum goes in little-endian byte order, as Linux's sctp_compute_cksum."""
    chunk = struct.pack("!BBHIIHHI", SCTP_INIT, 0, 20, tag, 65535, 1, 1, tsn)
    header = struct.pack("!HHII", sport, dport, 0, 0)
    checksum = crc32c(header + chunk)
    return header[:8] + struct.pack("<I", checksum) + chunk


def parse_sctp_init(packet: bytes) -> tuple[int, int, int] | None:
    """(source port, destination port, initiate tag) of a valid SCTP INIT packet, else None."""
    if len(packet) < 32:
        return None
    sport, dport, vtag, _checksum = struct.unpack_from("!HHII", packet)
    ctype, _, clen, tag = struct.unpack_from("!BBHI", packet, 12)
    if ctype != SCTP_INIT or vtag != 0 or clen < 20:
        return None
    if crc32c(packet[:8] + b"\0\0\0\0" + packet[12:]) != struct.unpack_from("<I", packet, 8)[0]:
        return None
    return sport, dport, tag


# --- unique source ports, tokens, tags ----------------------------------------------------------


class _Ports:
    """Per client address, the next source port: sequential, so a 5-tuple only repeats after the
    whole range has been used (unlike bind(port 0), which picks at random)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, ip: str) -> int:
        lo, hi = SOURCE_PORTS
        with self._lock:
            port = self._next.get(ip)
            if port is None:
                # A random start: two processes probing from one address rarely walk in step.
                port = random.randrange(lo, hi)
            self._next[ip] = lo if port + 1 >= hi else port + 1
            return port


_PORTS = _Ports()  # process-wide: several Probers on one topology still never repeat a tuple
_serial = itertools.count(random.getrandbits(32))


def _unique() -> int:
    return next(_serial)


# --- namespaces ------------------------------------------------------------------------------


def _raise_nofile() -> None:
    # Hundreds of parallel probes each hold a socket: lift the soft fd limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _sockaddr(ip: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    return (ip, port, 0, 0) if ":" in ip else (ip, port)


def _errname(err: int) -> str:
    return {
        errno.ECONNREFUSED: "refused",
        errno.EHOSTUNREACH: "host unreachable",
        errno.ENETUNREACH: "network unreachable",
        errno.ETIMEDOUT: "timeout",
        errno.EPERM: "not permitted",
        errno.EACCES: "not permitted",
    }.get(err, errno.errorcode.get(err, str(err)).lower())


def _protocol(value: str) -> Literal["TCP", "UDP", "SCTP"]:
    upper = str(value).upper()
    if upper == "TCP":
        return "TCP"
    if upper == "UDP":
        return "UDP"
    if upper == "SCTP":
        return "SCTP"
    raise ProbeError(f"unsupported protocol {value!r} (expected TCP, UDP or SCTP)")


def _port(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ProbeError(f"invalid port {value!r} (expected 1-65535)")
    return value


def _spec(p: ProbeRequest | ProbeSpec) -> ProbeSpec:
    if isinstance(p, ProbeSpec):
        return p
    try:
        netns, client_ip, server_ip, protocol, port = p
    except (TypeError, ValueError):
        raise ProbeError(f"a probe is (client netns, client ip, server ip, protocol, port), got {p!r}") from None
    try:
        client = ipaddress.ip_address(client_ip)
        server = ipaddress.ip_address(server_ip)
    except ValueError as exc:
        raise ProbeError(f"probe {p!r}: {exc}") from None
    if client.version != server.version:
        raise ProbeError(f"probe {p!r}: client and server addresses are of different families")
    return ProbeSpec(netns, str(client), str(server), _protocol(protocol), _port(port))


def _server_socket(protocol: str, family: socket.AddressFamily, port: int, netns: str) -> socket.socket:
    kind = socket.SOCK_STREAM if protocol == "TCP" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the AF_INET socket has v4
            if protocol == "UDP":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        elif protocol == "UDP":
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        if protocol == "TCP":
            sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


# --- the server loop ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Listener:
    kind: Literal["tcp", "udp", "sctp"]
    netns: str
    family: socket.AddressFamily


class _ServerLoop(threading.Thread):
    """One thread, one selector, every server socket of every namespace."""

    def __init__(self, on_sctp_init: Callable[[str, str, int, int], None]) -> None:
        super().__init__(name="knp-lab-servers", daemon=True)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._incoming: list[tuple[socket.socket, _Listener]] = []
        self._stopping = False
        self._on_sctp_init = on_sctp_init
        self.errors: list[str] = []

    def add(self, sock: socket.socket, listener: _Listener) -> None:
        with self._lock:
            self._incoming.append((sock, listener))
        self._wake()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self.is_alive():
            self.join(timeout=5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()
        self._wake_w.close()
        with self._lock:
            for sock, _ in self._incoming:
                sock.close()
            self._incoming.clear()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending (or closing): one byte is enough

    def run(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select():
                if key.data is None:
                    self._drain_wake()
                    continue
                try:
                    self._handle(key.fileobj, key.data)  # type: ignore[arg-type]
                except OSError as exc:  # keep serving: one bad packet must not stop the lab
                    if len(self.errors) < 100:
                        self.errors.append(f"{key.data.kind} server in {key.data.netns}: {exc}")

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for sock, listener in incoming:
            self._sel.register(sock, selectors.EVENT_READ, listener)

    def _handle(self, sock: socket.socket, listener: _Listener) -> None:
        if listener.kind == "tcp":
            while True:  # accept and close: the client already counted the handshake
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    return
                except (ConnectionAbortedError, ConnectionResetError):
                    continue
                conn.close()
        elif listener.kind == "udp":
            self._echo(sock, listener.family)
        else:
            self._sctp(sock, listener)

    @staticmethod
    def _echo(sock: socket.socket, family: socket.AddressFamily) -> None:
        v4 = family == socket.AF_INET
        space = socket.CMSG_SPACE(12 if v4 else 20)
        while True:
            try:
                data, anc, _, addr = sock.recvmsg(65535, space)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                continue  # an ICMP error about an earlier echo
            reply = []
            for level, kind, value in anc:
                # Answer from the address the client used (a node has several).
                if v4 and level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    reply = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, value[8:12], b"\0" * 4))]
                elif not v4 and level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                    reply = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, value[:16] + struct.pack("=i", 0))]
            try:
                sock.sendmsg([data], reply, 0, addr)
            except (BlockingIOError, OSError):
                pass  # the client times out: same as a lost echo

    def _sctp(self, sock: socket.socket, listener: _Listener) -> None:
        v4 = listener.family == socket.AF_INET
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(65535, socket.CMSG_SPACE(20))
            except BlockingIOError:
                return
            if v4:  # an IPv4 raw socket receives the IP header too
                if len(data) < 20:
                    continue
                dst = socket.inet_ntop(socket.AF_INET, data[16:20])
                data = data[(data[0] & 0x0F) * 4 :]
            else:
                dst = next(
                    (socket.inet_ntop(socket.AF_INET6, v[:16]) for lv, k, v in anc if lv == socket.IPPROTO_IPV6 and k == socket.IPV6_PKTINFO), ""
                )
            parsed = parse_sctp_init(data)
            if parsed is not None:
                self._on_sctp_init(listener.netns, dst, parsed[1], parsed[2])


# --- one batch of probes ------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    index: int
    spec: ProbeSpec
    sent: float
    deadline: float
    sock: socket.socket | None
    token: bytes = b""  # UDP
    tag: int = 0  # SCTP


class _Batch:
    """The state of one probe() call: its selector, the probes still waiting, the results."""

    def __init__(self, specs: list[ProbeSpec], timeout: float, notify: socket.socket) -> None:
        self.specs = specs
        self.timeout = timeout
        self.results: list[ProbeResult | None] = [None] * len(specs)
        self.pending: dict[int, _Pending] = {}
        self.by_tag: dict[int, _Pending] = {}
        self.tags: list[int] = []  # every SCTP tag of the batch, to forget them at the end
        self.sel = selectors.DefaultSelector()
        self.sel.register(notify, selectors.EVENT_READ, None)

    def add(self, p: _Pending) -> None:
        self.pending[p.index] = p

    def done(self, p: _Pending, ok: bool, detail: str) -> None:
        if self.results[p.index] is None:
            self.results[p.index] = ProbeResult(ok, detail, time.monotonic() - p.sent)
        self.pending.pop(p.index, None)
        if p.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(p.sock)
            p.sock.close()
            p.sock = None
        if p.tag:
            self.by_tag.pop(p.tag, None)

    def expire(self, now: float) -> None:
        for p in [p for p in self.pending.values() if p.deadline <= now]:
            self.done(p, False, "timeout")

    def close(self) -> list[ProbeResult]:
        for p in list(self.pending.values()):
            self.done(p, False, "aborted")
        self.sel.close()
        return [r if r is not None else ProbeResult(False, "aborted", 0.0) for r in self.results]


# --- the prober ---------------------------------------------------------------------------------


class Prober:
    """Servers and probes for the namespaces of a topology. Close it (or the topology, which closes
    attached probers first) to release every socket and namespace handle."""

    def __init__(self, topology: Topology | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        _raise_nofile()
        self.timeout = timeout
        self._ns_fds: dict[str, int] = {}
        self._served: dict[str, set[tuple[str, int]]] = {}
        self._sctp_ports: dict[str, frozenset[int]] = {}  # replaced whole: read by the server thread
        self._sctp_sockets: set[str] = set()
        self._lock = threading.Lock()
        self._awaited: dict[int, tuple[str, int]] = {}  # SCTP tag -> (server ip, port)
        self._seen: set[int] = set()
        self._notify_r, self._notify_w = socket.socketpair()
        self._notify_r.setblocking(False)
        self._notify_w.setblocking(False)
        self._probe_lock = threading.Lock()
        self._closed = False
        self._loop = _ServerLoop(self._sctp_seen)
        self._loop.start()
        if topology is not None:
            topology.on_close(self.close)

    # -- namespaces --

    def _ns_fd(self, netns: str) -> int:
        fd = self._ns_fds.get(netns)
        if fd is None:
            try:
                fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise ProbeError(f"network namespace {netns!r}: {exc.strerror or exc}") from None
            self._ns_fds[netns] = fd
        return fd

    # -- servers --

    def serve(self, netns: str, ports: Iterable[tuple[str, int]]) -> None:
        """Serve (protocol, port) pairs on every address of `netns`, IPv4 and IPv6. TCP: listen,
        accept, close. UDP: echo. SCTP: a raw listener (one per family and namespace) records INITs
        to the served ports. Serving a port twice is a no-op."""
        self._check_open()
        wanted = {(_protocol(p), _port(n)) for p, n in ports}
        served = self._served.setdefault(netns, set())
        new = sorted(wanted - served)
        if not new:
            return
        created: list[tuple[socket.socket, _Listener]] = []
        try:
            with entered(self._ns_fd(netns)):
                for protocol, port in new:
                    if protocol == "SCTP":
                        continue
                    for family in (socket.AF_INET, socket.AF_INET6):
                        created.append(
                            (_server_socket(protocol, family, port, netns), _Listener("tcp" if protocol == "TCP" else "udp", netns, family))
                        )
                if any(p == "SCTP" for p, _ in new) and netns not in self._sctp_sockets:
                    for family in (socket.AF_INET, socket.AF_INET6):
                        raw = socket.socket(family, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, IPPROTO_SCTP)
                        if family == socket.AF_INET6:
                            raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                        created.append((raw, _Listener("sctp", netns, family)))
        except OSError as exc:
            for sock, _ in created:
                sock.close()
            raise ProbeError(f"cannot serve in {netns}: {exc.strerror or exc}") from None
        if any(p == "SCTP" for p, _ in new):
            self._sctp_sockets.add(netns)
            self._sctp_ports[netns] = frozenset(self._sctp_ports.get(netns, frozenset()) | {n for p, n in new if p == "SCTP"})
        served.update(new)
        for sock, listener in created:
            self._loop.add(sock, listener)

    def served(self, netns: str) -> frozenset[tuple[str, int]]:
        return frozenset(self._served.get(netns, ()))

    def _sctp_seen(self, netns: str, dst: str, port: int, tag: int) -> None:
        # Runs on the server thread.
        if port not in self._sctp_ports.get(netns, ()):
            return  # not served here: like a closed port
        with self._lock:
            if self._awaited.get(tag) != (dst, port):
                return
            self._seen.add(tag)
        try:
            self._notify_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # -- probes --

    def probe(self, pairs: Sequence[ProbeRequest | ProbeSpec], timeout: float | None = None) -> list[bool]:
        """Run every probe in parallel; True where the connection got through (see module doc).
        `pairs`: (client netns, client ip, server ip, protocol, port) tuples or ProbeSpecs."""
        return [r.ok for r in self.run(pairs, timeout)]

    def run(self, pairs: Sequence[ProbeRequest | ProbeSpec], timeout: float | None = None) -> list[ProbeResult]:
        """Like probe(), with a detail and the time of each probe."""
        self._check_open()
        specs = [_spec(p) for p in pairs]
        batch = _Batch(specs, self.timeout if timeout is None else timeout, self._notify_r)
        with self._probe_lock:  # one batch at a time: SCTP notifications are per prober
            try:
                by_ns: dict[str, list[int]] = {}
                for i, s in enumerate(specs):
                    by_ns.setdefault(s.client_netns, []).append(i)
                for netns, indexes in by_ns.items():
                    with entered(self._ns_fd(netns)):  # one setns round trip per client namespace
                        for i in indexes:
                            self._start(batch, i)
                while batch.pending:
                    now = time.monotonic()
                    batch.expire(now)
                    if not batch.pending:
                        break
                    wait = max(0.0, min(p.deadline for p in batch.pending.values()) - now)
                    for key, _ in batch.sel.select(wait):
                        if key.data is None:
                            self._collect_sctp(batch)
                        elif key.data.index in batch.pending:
                            self._event(batch, key.data)
            finally:
                with self._lock:  # forget this batch's tags: a late INIT must not linger
                    for tag in batch.tags:
                        self._awaited.pop(tag, None)
                        self._seen.discard(tag)
                results = batch.close()
        return results

    def _start(self, batch: _Batch, i: int) -> None:
        spec = batch.specs[i]
        kind = {"TCP": socket.SOCK_STREAM, "UDP": socket.SOCK_DGRAM, "SCTP": socket.SOCK_RAW}[spec.protocol]
        try:
            sock = socket.socket(spec.family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, IPPROTO_SCTP if spec.protocol == "SCTP" else 0)
        except OSError as exc:
            raise ProbeError(f"cannot create a {spec.protocol} socket in {spec.client_netns}: {exc.strerror or exc}") from None
        now = time.monotonic()
        p = _Pending(i, spec, now, now + batch.timeout, sock)
        batch.add(p)
        try:
            if spec.protocol == "SCTP":
                sock.bind(_sockaddr(spec.client_ip, 0))  # the source address of the raw packet
                p.tag = _unique() % 0xFFFFFFFF + 1  # never 0 (RFC 9260: invalid initiate tag)
                batch.by_tag[p.tag] = p
                batch.tags.append(p.tag)
                with self._lock:
                    self._awaited[p.tag] = (spec.server_ip, spec.port)
                sock.sendto(sctp_init_packet(_PORTS.take(spec.client_ip), spec.port, p.tag), _sockaddr(spec.server_ip, 0))
                sock.close()  # nothing comes back to the client: the server's listener decides
                p.sock = None
                return
            self._bind_fresh(sock, spec)
            if spec.protocol == "TCP":
                # Close with RST: no TIME_WAIT pile-up in the client namespaces.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                err = sock.connect_ex(_sockaddr(spec.server_ip, spec.port))
                if err == 0:
                    batch.done(p, True, "connected")
                elif err == errno.EINPROGRESS:
                    batch.sel.register(sock, selectors.EVENT_WRITE, p)
                else:
                    batch.done(p, False, _errname(err))
            else:
                sock.connect(_sockaddr(spec.server_ip, spec.port))
                p.token = b"knp-probe:" + struct.pack("!Q", _unique()) + os.urandom(8)
                batch.sel.register(sock, selectors.EVENT_READ, p)
                sock.send(p.token)
        except ProbeError:
            batch.done(p, False, "setup failed")
            raise
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                batch.done(p, False, "setup failed")
                raise ProbeError(f"{spec.client_ip} is not an address of netns {spec.client_netns}") from None
            batch.done(p, False, _errname(exc.errno or 0))

    @staticmethod
    def _bind_fresh(sock: socket.socket, spec: ProbeSpec) -> None:
        for _ in range(64):
            try:
                sock.bind(_sockaddr(spec.client_ip, _PORTS.take(spec.client_ip)))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:  # else a server or a lingering socket holds it
                    raise
        raise ProbeError(f"no free source port on {spec.client_ip} in {spec.client_netns}")

    @staticmethod
    def _event(batch: _Batch, p: _Pending) -> None:
        sock = p.sock
        assert sock is not None
        if p.spec.protocol == "TCP":
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            batch.done(p, err == 0, "connected" if err == 0 else _errname(err))
            return
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP port/host unreachable on the connected socket
                batch.done(p, False, _errname(exc.errno or 0))
                return
            if data == p.token:
                batch.done(p, True, "echoed")
                return

    def _collect_sctp(self, batch: _Batch) -> None:
        try:
            while self._notify_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            hits = [t for t in self._seen if t in batch.by_tag]
            self._seen.difference_update(hits)
            for t in hits:
                self._awaited.pop(t, None)
        for t in hits:
            batch.done(batch.by_tag[t], True, "received")

    # -- lifecycle --

    def _check_open(self) -> None:
        if self._closed:
            raise ProbeError("prober is closed")

    @property
    def server_errors(self) -> list[str]:
        """Errors the server thread met and survived (for diagnostics)."""
        return list(self._loop.errors)

    def close(self) -> None:
        """Stop the server thread; close every socket and namespace handle. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._loop.stop()
        self._notify_r.close()
        self._notify_w.close()
        for fd in self._ns_fds.values():
            os.close(fd)
        self._ns_fds.clear()

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- benchmark ----------------------------------------------------------------------------------


def bench_topology(nodes: int = 2, pods: int = 8) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str, list[str], bool]]]:
    """A kind-like cluster: nodes 172.18.0.2..., pods 10.244.<node>.<n> spread over the nodes."""
    node_list = [(f"node-{i + 1}", [f"172.18.0.{i + 2}"]) for i in range(nodes)]
    pod_list = [(f"bench/pod-{j}", f"node-{j % nodes + 1}", [f"10.244.{j % nodes + 1}.{j // nodes + 10}"], False) for j in range(pods)]
    return node_list, pod_list


def _bench(nodes: int, pods: int, repeat: int) -> None:
    node_list, pod_list = bench_topology(nodes, pods)
    t0 = time.monotonic()
    topo = Topology.build(node_list, pod_list)
    build = time.monotonic() - t0
    try:
        with Prober(topo) as prober:
            t0 = time.monotonic()
            for key, *_ in pod_list:
                prober.serve(topo.netns_of(key), {("TCP", 80), ("UDP", 80), ("SCTP", 80)})
            serve = time.monotonic() - t0
            pairs = [(a, b) for a in pod_list for b in pod_list if a is not b]

            def requests(protocol: str) -> list[ProbeRequest]:
                return [(topo.netns_of(a[0]), a[2][0], b[2][0], protocol, 80) for a, b in pairs]

            def timed(reqs: list[ProbeRequest], expect: bool) -> str:
                times, wrong = [], 0
                for _ in range(repeat):
                    t = time.monotonic()
                    got = prober.probe(reqs)
                    times.append(time.monotonic() - t)
                    wrong += sum(1 for ok in got if ok is not expect)
                return f"{statistics.median(times) * 1000:8.1f} ms median  (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}; {wrong} unexpected of {len(reqs) * repeat})"

            tcp = requests("TCP")
            mixed = tcp + requests("UDP") + requests("SCTP")
            print(f"topology: {nodes} nodes, {pods} pods, {len(topo.namespaces)} namespaces")
            print(f"{'build':<28}{build * 1000:8.1f} ms")
            print(f"{'serve TCP+UDP+SCTP':<28}{serve * 1000:8.1f} ms")
            print(f"{f'{len(tcp)} TCP probes, allowed':<28}{timed(tcp, True)}")
            print(f"{f'{len(mixed)} TCP+UDP+SCTP, allowed':<28}{timed(mixed, True)}")
            for node, _ in node_list:
                topo.run(topo.node_netns(node), "iptables", "-I", "FORWARD", "-p", "tcp", "--dport", "80", "-j", "DROP")
            print(f"{f'{len(tcp)} TCP probes, dropped':<28}{timed(tcp, False)}  (timeout {prober.timeout:.1f} s)")
    finally:
        t0 = time.monotonic()
        topo.close()
        print(f"{'teardown':<28}{(time.monotonic() - t0) * 1000:8.1f} ms")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kube_network_policies.lab.probe", description="Lab topology and probe timings (needs root).")
    parser.add_argument("--bench", action="store_true", help="build a topology, time probes, tear it down")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--pods", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="probe rounds per measurement")
    parser.add_argument("--cleanup-stale", action="store_true", help="remove namespaces left by dead runs")
    args = parser.parse_args(argv)
    if not (args.bench or args.cleanup_stale):
        parser.print_usage(sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("error: needs root (creates network namespaces)", file=sys.stderr)
        return 1
    exit_on_sigterm()
    try:
        if args.cleanup_stale:
            removed = Topology.cleanup_stale()
            print(f"removed {len(removed)} stale namespaces" + (": " + ", ".join(removed) if removed else ""))
        if args.bench:
            _bench(args.nodes, args.pods, max(1, args.repeat))
    except (TopologyError, ProbeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
