"""A small HTTP/1.1 server for the agent's /metrics, /healthz, /readyz and /statusz.

Why not http.server: ThreadingHTTPServer runs one thread per connection with no deadline, so
anyone who can reach the port holds a thread per idle or half-sent request for as long as
they like (3000 connections, 3000 threads), and the kubelet's probes queue behind them.

Here one thread serves every connection from a selector loop, and every answer is computed
in that thread (each takes well under a millisecond to a few milliseconds: nothing blocks).
What a client can hold is bounded:

- connections: at most ``max_connections`` from other hosts. A new connection beyond that
  closes the oldest one that is not being answered (it is idle or still sending its request)
  rather than being refused, so a client that sends its request at once (the kubelet,
  Prometheus) is served even while others hold every slot. Connections from this host (the
  peer address is the local address, or loopback: kubelet probes of a hostNetwork pod come from
  the node's own address) have their own ``local_connections`` slots, which remote peers cannot
  take.
- time: a request (line and headers) must arrive completely within ``request_timeout`` of its
  first byte (of the accept for the first request); a keep-alive connection may stay idle
  between requests for ``idle_timeout``; an answer must be taken within ``write_timeout``.
- size: request line and headers at most ``max_request_bytes`` (431 beyond); no request
  bodies (400); methods other than GET and HEAD get 405.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BindAddress", "HttpServer", "Response", "ServerLimits", "parse_bind_address"]

log = logging.getLogger(__name__)

Response = tuple[int, bytes, str]  # status, body, content type
Handler = Callable[[str], Response]  # path (query removed) -> response

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"
_ACCEPT_BATCH = 32  # accepts per loop turn: requests already read are answered between batches
_MAX_HEADERS = 64
_BACKLOG = 128
_WARN_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one client may hold; see the module docstring."""

    max_connections: int = 64
    local_connections: int = 16
    request_timeout: float = 5.0
    idle_timeout: float = 120.0  # longer than the usual scrape intervals: Prometheus keeps its connection
    write_timeout: float = 10.0
    max_request_bytes: int = 8192

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.local_connections < 1:
            raise ValueError("connection limits must be at least 1")
        if min(self.request_timeout, self.idle_timeout, self.write_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_request_bytes < 256:
            raise ValueError("max_request_bytes must be at least 256")


# --- bind addresses -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindAddress:
    host: str  # an IP literal, "" for all addresses
    port: int
    family: socket.AddressFamily


def parse_bind_address(address: str) -> BindAddress:
    """Parse a Go-style listen address: ":9080", "127.0.0.1:9080", "[::1]:9080", "0.0.0.0:0".

    An empty host means every address (IPv6 and IPv4 when the node has IPv6). Host names are
    refused: what a name resolves to can change, a bind address should not. ValueError says
    what is wrong.
    """
    if not isinstance(address, str) or not address:
        raise ValueError("metrics bind address is empty; expected host:port such as :9080 or 127.0.0.1:9080")
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError(f"metrics bind address {address!r} has no port; expected host:port such as :9080")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"metrics bind address {address!r}: port must be a number in 0..65535")
    port = int(port_text)
    if host.startswith("[") and host.endswith("]"):
        try:
            ip = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"metrics bind address {address!r}: {host} is not an IPv6 address") from None
        return BindAddress(str(ip), port, socket.AF_INET6)
    if ":" in host or "[" in host or "]" in host:
        raise ValueError(f"metrics bind address {address!r}: write an IPv6 host in brackets, e.g. [::1]:9080")
    if host == "":
        return BindAddress("", port, socket.AF_INET6 if socket.has_ipv6 and _ipv6_works() else socket.AF_INET)
    try:
        ip4 = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"metrics bind address {address!r}: {host!r} is not an IP address") from None
    return BindAddress(str(ip4), port, socket.AF_INET)


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
        return True
    except OSError:  # IPv6 disabled on this node
        return False


def _is_local(sock: socket.socket, peer: object) -> bool:
    """Whether the peer is this host: it connected from the address it connected to (the
    kernel picks the destination as source for local destinations), or from loopback."""
    try:
        local = sock.getsockname()[0]
        remote = peer[0] if isinstance(peer, tuple) else ""
    except OSError:
        return False
    if not isinstance(remote, str) or not remote:
        return False
    if remote == local:
        return True
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


# --- connections ----------------------------------------------------------------------------

_IDLE, _READING, _WRITING = 0, 1, 2


class _Conn:
    __slots__ = ("answered", "close_after", "closed", "deadline", "fd", "inbuf", "local", "out", "sent", "sock", "state")

    def __init__(self, sock: socket.socket, local: bool, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.local = local
        self.state = _IDLE
        self.deadline = deadline
        self.inbuf = b""
        self.out = b""
        self.sent = 0
        self.close_after = False
        self.answered = 0
        self.closed = False


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _parse_head(head: bytes) -> tuple[str, str, bool]:
    """(method, path without query, keep-alive) of a request head; _BadRequest if it is not a
    bodiless HTTP/1.x request."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[1]:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(400, "unsupported HTTP version")
    if len(lines) - 1 > _MAX_HEADERS:
        raise _BadRequest(431, "too many header fields")
    connection: set[str] = set()
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header field")  # also obsolete line folding
        lname = name.lower()
        if lname == "transfer-encoding" or (lname == "content-length" and value.strip() != "0"):
            raise _BadRequest(400, "request bodies are not accepted")
        if lname == "connection":
            connection.update(t.strip().lower() for t in value.split(","))
    if method not in ("GET", "HEAD"):
        raise _BadRequest(405, "only GET and HEAD")
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return method, target.split("?", 1)[0], keep_alive


def _find_head_end(buf: bytes) -> int:
    """Index just past the blank line ending the head, or -1."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


def _render(status: int, body: bytes, ctype: str, *, head_only: bool, close: bool, extra: str = "") -> bytes:
    connection = "Connection: close\r\n" if close else ""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}{connection}\r\n"
    ).encode("latin-1")
    return head if head_only else head + body


class HttpServer:
    """Binds in the constructor (OSError if it cannot), serves from one thread after start()."""

    def __init__(self, host: str, port: int, family: socket.AddressFamily, handler: Handler, limits: ServerLimits | None = None) -> None:
        self.limits = limits or ServerLimits()
        self._handler = handler
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual-stack
            sock.bind((host, port))
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self.port = int(sock.getsockname()[1])
        # Oldest first: eviction takes the front. A connection moves to the back when it is
        # answered (it proved to be a client that talks).
        self._pools: dict[bool, collections.OrderedDict[int, _Conn]] = {True: collections.OrderedDict(), False: collections.OrderedDict()}
        self.stats = {"accepted": 0, "evicted": 0, "timed_out": 0, "refused": 0, "requests": 0}
        self._sel: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._pending: collections.deque[_Conn] = collections.deque()
        self._stopping = False
        self._last_warning = -1e9
        self._sweep_every = max(0.02, min(0.5, self.limits.request_timeout / 4, self.limits.write_timeout / 4))

    def start(self) -> None:
        if self._thread is None:
            self._sel = selectors.DefaultSelector()
            self._sel.register(self._listener, selectors.EVENT_READ, "listen")
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stopping = True
        if self._thread is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            self._thread.join(timeout=5)
        else:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def connections(self) -> int:
        return len(self._pools[True]) + len(self._pools[False])

    # --- the loop ---

    def _serve(self) -> None:
        sel = self._sel
        assert sel is not None
        next_sweep = time.monotonic() + self._sweep_every
        try:
            while not self._stopping:
                timeout = 0.0 if self._pending else max(0.0, next_sweep - time.monotonic())
                events = sel.select(timeout)
                now = time.monotonic()
                accept = False
                for key, mask in events:
                    data = key.data
                    if data == "listen":
                        accept = True
                    elif data == "wake":
                        try:
                            self._wake_r.recv(64)
                        except OSError:
                            pass
                    elif isinstance(data, _Conn) and not data.closed:
                        if mask & selectors.EVENT_READ:
                            self._on_readable(data, now)
                        elif mask & selectors.EVENT_WRITE:
                            self._flush(data, now)
                # Pipelined requests: one per connection and turn, so that one client cannot
                # keep the loop busy with a buffer full of requests while others wait.
                for _ in range(len(self._pending)):
                    conn = self._pending.popleft()
                    if not conn.closed:
                        self._next_request(conn, now)
                if accept and not self._stopping:
                    self._accept(now)
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + self._sweep_every
        except Exception:  # never expected; without the loop nothing answers the probes
            log.exception("the metrics server stopped")
        finally:
            for pool in self._pools.values():
                for conn in list(pool.values()):
                    self._close(conn)
            sel.close()
            self._listener.close()

    def _accept(self, now: float) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: make room, or the listener stays readable in a busy loop.
                    self._warn(f"accepting a connection: {exc.strerror}")
                    if not self._evict(self._pools[False]):
                        time.sleep(0.01)
                return  # ECONNABORTED and the like: the client gave up
            self.stats["accepted"] += 1
            sock.setblocking(False)
            local = _is_local(sock, peer)
            pool = self._pools[local]
            cap = self.limits.local_connections if local else self.limits.max_connections
            if len(pool) >= cap and not self._evict(pool):
                self.stats["refused"] += 1  # every slot is being answered: there is no idle one to drop
                sock.close()
                continue
            conn = _Conn(sock, local, now + self.limits.request_timeout)
            pool[conn.fd] = conn
            assert self._sel is not None
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _evict(self, pool: collections.OrderedDict[int, _Conn]) -> bool:
        for conn in pool.values():
            if conn.state != _WRITING:
                self.stats["evicted"] += 1
                self._warn(f"more than {len(pool)} {'local' if conn.local else 'remote'} connections: closing the oldest idle ones")
                self._close(conn)
                return True
        return False

    def _sweep(self, now: float) -> None:
        for pool in self._pools.values():
            expired = [c for c in pool.values() if c.deadline <= now]
            for conn in expired:
                self.stats["timed_out"] += 1
                if conn.state == _READING:  # a slow request: say why, best effort, then close
                    try:
                        conn.sock.send(_render(408, b"request timeout\n", _TEXT, head_only=False, close=True))
                    except OSError:
                        pass
                self._close(conn)

    def _on_readable(self, conn: _Conn, now: float) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if len(conn.inbuf) + len(data) > 4 * self.limits.max_request_bytes:
            self._close(conn)  # far more pipelined requests than any client sends: not a client
            return
        if conn.state == _IDLE:
            conn.state = _READING
            if conn.answered:  # the next request on a kept-alive connection: its own deadline
                conn.deadline = now + self.limits.request_timeout
        conn.inbuf += data
        self._next_request(conn, now)

    def _next_request(self, conn: _Conn, now: float) -> None:
        """Answer the request at the start of conn.inbuf if its head is complete."""
        if conn.state == _WRITING:
            return  # the previous answer is still being sent; _flush queues this one again
        limit = self.limits.max_request_bytes
        end = _find_head_end(conn.inbuf[: limit + 4])
        if end < 0 or end > limit:
            if len(conn.inbuf) > limit:
                self._respond(conn, (431, b"request header fields too large\n", _TEXT), head_only=False, keep_alive=False, now=now)
            return
        head, conn.inbuf = conn.inbuf[:end], conn.inbuf[end:]
        self.stats["requests"] += 1
        try:
            method, path, keep_alive = _parse_head(head)
        except _BadRequest as exc:
            extra = "Allow: GET, HEAD\r\n" if exc.status == 405 else ""
            self._respond(conn, (exc.status, f"{exc}\n".encode(), _TEXT), head_only=False, keep_alive=False, now=now, extra=extra)
            return
        try:
            response = self._handler(path)
        except Exception as exc:  # never a traceback to the client: log it, answer 500
            log.error("serving %s: %s: %s", path, type(exc).__name__, exc)
            log.debug("serving %s", path, exc_info=True)
            response = (500, b"internal error\n", _TEXT)
        self._respond(conn, response, head_only=method == "HEAD", keep_alive=keep_alive, now=now)

    def _respond(self, conn: _Conn, response: Response, *, head_only: bool, keep_alive: bool, now: float, extra: str = "") -> None:
        status, body, ctype = response
        conn.out = _render(status, body, ctype, head_only=head_only, close=not keep_alive, extra=extra)
        conn.sent = 0
        conn.close_after = not keep_alive
        conn.state = _WRITING
        conn.deadline = now + self.limits.write_timeout
        conn.answered += 1
        self._flush(conn, now, registered_for_write=False)

    def _flush(self, conn: _Conn, now: float, registered_for_write: bool = True) -> None:
        try:
            conn.sent += conn.sock.send(memoryview(conn.out)[conn.sent :])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(conn)
            return
        assert self._sel is not None
        if conn.sent < len(conn.out):
            if not registered_for_write:
                self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return
        if conn.close_after:
            self._close(conn)
            return
        conn.out = b""
        conn.state = _READING if conn.inbuf else _IDLE
        conn.deadline = now + (self.limits.request_timeout if conn.inbuf else self.limits.idle_timeout)
        if registered_for_write:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
        self._pools[conn.local].move_to_end(conn.fd)
        if conn.inbuf:
            self._pending.append(conn)  # a pipelined request: answered on the next turn

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._pools[conn.local].pop(conn.fd, None)
        if self._sel is not None:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning("metrics server: %s (%s)", message, ", ".join(f"{k} {v}" for k, v in self.stats.items()))
