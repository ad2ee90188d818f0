"""The metrics/health HTTP server under hostile clients: idle and half-sent connections, slow
requests, oversized heads, connection floods. Everything here runs on loopback without root;
tests/kernel/test_metrics_server.py checks the local/remote split across real namespaces."""

from __future__ import annotations

import http.client
import resource
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from kube_network_policies.endpoints import MetricsServer
from kube_network_policies.httpserver import ServerLimits


def healthz_ms(port: int, path: str = "/healthz") -> tuple[int, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, (time.perf_counter() - started) * 1000
    finally:
        conn.close()


def closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing the connection within `within` seconds; None if it
    is still open then."""
    sock.settimeout(within)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    with MetricsServer("127.0.0.1:0", lambda: b"x 1\n", ready=lambda: True, status=lambda: {"ready": True}) as s:
        yield s


def test_half_sent_requests_hold_no_thread_and_probes_are_answered(server: MetricsServer) -> None:
    """A thread per connection was the bug: 300 half-sent requests were 300 threads."""
    n = 300
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 200), hard))
    threads_before = threading.active_count()
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            socks.append(s)
        times = []
        for _ in range(20):
            status, ms = healthz_ms(server.port)
            assert status == 200
            times.append(ms)
        assert threading.active_count() <= threads_before, "a connection got a thread of its own"
        assert server.server.connections() <= server.server.limits.local_connections + 1
        print(
            f"\n{n} half-sent requests: {threading.active_count()} threads; /healthz median {statistics.median(times):.1f} ms, max {max(times):.1f} ms"
        )
        assert statistics.median(times) < 100 and max(times) < 1000
    finally:
        for s in socks:
            s.close()


def test_a_request_must_arrive_within_the_request_timeout() -> None:
    limits = ServerLimits(request_timeout=0.5)
    with MetricsServer("127.0.0.1:0", lambda: b"", ready=lambda: True, limits=limits) as server:
        silent = socket.create_connection(("127.0.0.1", server.port))
        slow = socket.create_connection(("127.0.0.1", server.port))
        started = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        # A byte every 0.1 s: each read is quick, the request never completes.
        for _ in range(12):
            try:
                slow.sendall(b"X")
            except OSError:
                break
            time.sleep(0.1)
        answer = closed_by_server(slow, 2.0)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
        assert closed_by_server(silent, 2.0) == b""
        assert time.monotonic() - started < 2.0
        silent.close()
        slow.close()


def test_keep_alive_connections_close_after_the_idle_timeout() -> None:
    limits = ServerLimits(idle_timeout=0.5, request_timeout=5)
    with MetricsServer("127.0.0.1:0", lambda: b"x 1\n", ready=lambda: True, limits=limits) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        conn.request("GET", "/metrics")  # kept alive: the same connection
        assert conn.getresponse().read() == b"x 1\n"
        assert conn.sock is not None
        assert closed_by_server(conn.sock, 2.0) == b""
        conn.close()


def test_request_size_methods_bodies_and_pipelining(server: MetricsServer) -> None:
    def exchange(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(data)
            got = closed_by_server(s, 3.0)
            assert got is not None, "the server kept a connection it should have closed"
            return got

    big = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n"
    assert exchange(big).startswith(b"HTTP/1.1 431 ")
    assert exchange(b"GET /healthz HTTP/1.1\r\n" + b"X: " + b"b" * 20_000).startswith(b"HTTP/1.1 431 ")  # no end in sight
    post = exchange(b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post
    assert exchange(b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").startswith(b"HTTP/1.1 400 ")
    assert exchange(b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert exchange(b"GET /healthz\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert exchange(b"GET /healthz HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    # HTTP/1.0 without keep-alive: answered, then closed.
    assert exchange(b"GET /healthz HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nok\n")
    # Pipelined requests are answered in order; "Connection: close" ends the connection.
    two = exchange(b"GET /healthz HTTP/1.1\r\n\r\nHEAD /statusz HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert two.count(b"HTTP/1.1 200 OK") == 2 and two.count(b"HTTP/1.1 404 ") == 1
    assert b'"ready"' not in two  # HEAD: no body


def test_a_flood_of_connections_evicts_the_oldest_idle_ones() -> None:
    limits = ServerLimits(local_connections=4, max_connections=4)
    with MetricsServer("127.0.0.1:0", lambda: b"", ready=lambda: True, limits=limits) as server:
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(10)]
        try:
            # The first six were closed to make room; the last four are held.
            assert all(closed_by_server(s, 2.0) == b"" for s in socks[:6])
            assert server.server.connections() <= 4
            assert healthz_ms(server.port)[0] == 200  # a newcomer that talks is served
            assert server.server.stats["evicted"] >= 7
        finally:
            for s in socks:
                s.close()


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ServerLimits(max_connections=0)
    with pytest.raises(ValueError, match="positive"):
        ServerLimits(request_timeout=0)
