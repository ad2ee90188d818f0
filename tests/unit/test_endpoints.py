"""The agent's HTTP endpoints (endpoints.py): bind addresses, /metrics, /healthz, /readyz, /statusz."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from test_metrics import NS, lbl, parse, sample_metrics  # tests/unit/test_metrics.py

from kube_network_policies.endpoints import MetricsServer
from kube_network_policies.httpserver import parse_bind_address

# --- bind addresses and the HTTP server -----------------------------------------------------


@pytest.mark.parametrize(
    ("address", "host", "port", "family"),
    [
        ("127.0.0.1:9080", "127.0.0.1", 9080, socket.AF_INET),
        ("[::1]:9080", "::1", 9080, socket.AF_INET6),
        ("0.0.0.0:0", "0.0.0.0", 0, socket.AF_INET),
        ("[::]:65535", "::", 65535, socket.AF_INET6),
    ],
)
def test_parse_bind_address(address: str, host: str, port: int, family: socket.AddressFamily) -> None:
    b = parse_bind_address(address)
    assert (b.host, b.port, b.family) == (host, port, family)


def test_parse_bind_address_all_interfaces() -> None:
    b = parse_bind_address(":9080")
    assert b.host == "" and b.port == 9080


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("", "empty"),
        ("9080", "no port"),
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "port must be a number"),
        (":http", "port must be a number"),
        (":65536", "port must be a number"),
        (":-1", "port must be a number"),
        ("::1:9080", "brackets"),
        ("[::1:9080", "brackets"),
        ("[127.0.0.1]:9080", "not an IPv6 address"),
        ("localhost:9080", "not an IP address"),
        ("256.0.0.1:9080", "not an IP address"),
    ],
)
def test_bad_bind_addresses(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bind_address(address)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, list[bool]]]:
    ready = [False]
    with MetricsServer("127.0.0.1:0", sample_metrics(), ready=lambda: ready[0]) as server:
        yield server, ready


def test_server_endpoints(served: tuple[MetricsServer, list[bool]]) -> None:
    server, ready = served
    base = f"http://127.0.0.1:{server.port}"
    status, ctype, body = get(f"{base}/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    _, samples = parse(body)
    assert samples[(f"{NS}_packet_count", lbl(protocol="TCP", family="IPv4", verdict="accept"))] == 90
    assert get(f"{base}/healthz")[:1] == (200,)
    assert get(f"{base}/readyz")[0] == 503
    ready[0] = True
    assert get(f"{base}/readyz")[0] == 200
    ready[0] = False  # readiness is re-evaluated on every request
    assert get(f"{base}/readyz")[0] == 503
    assert get(f"{base}/nope")[0] == 404


def test_server_readiness_callback_error_is_not_ready() -> None:
    def broken() -> bool:
        raise RuntimeError("informer exploded")

    with MetricsServer("127.0.0.1:0", lambda: b"", ready=broken) as server:
        status, _, body = get(f"http://127.0.0.1:{server.port}/readyz")
        assert status == 503 and "Traceback" not in body
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200


def test_server_metrics_error_is_500_without_traceback() -> None:
    def broken() -> bytes:
        raise RuntimeError("collector exploded")

    with MetricsServer("127.0.0.1:0", broken, ready=lambda: True) as server:
        status, _, body = get(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 500 and "Traceback" not in body


def test_server_ipv6_and_port_in_use() -> None:
    try:
        server = MetricsServer("[::1]:0", lambda: b"x 1\n", ready=lambda: True)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server:
        assert get(f"http://[::1]:{server.port}/metrics")[2] == "x 1\n"
        with pytest.raises(OSError, match=r"cannot listen on \[::1\]:\d+ for metrics"):
            MetricsServer(f"[::1]:{server.port}", lambda: b"", ready=lambda: True)


def test_server_all_interfaces() -> None:
    with MetricsServer(":0", lambda: b"x 1\n", ready=lambda: True) as server:
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200  # IPv4 on a dual-stack socket


def test_server_binds_first_serves_on_start_and_statusz() -> None:
    before = threading.active_count()
    server = MetricsServer("127.0.0.1:0", lambda: b"", ready=lambda: True, status=lambda: {"generation": 3, "ready": True})
    try:
        assert threading.active_count() == before  # binding starts no thread (workers fork after)
        server.start()
        server.start()  # idempotent
        status, ctype, body = get(f"http://127.0.0.1:{server.port}/statusz")
        assert status == 200 and ctype == "application/json"
        assert json.loads(body) == {"generation": 3, "ready": True}
    finally:
        server.close()
    with MetricsServer("127.0.0.1:0", lambda: b"", ready=lambda: True) as plain:
        assert get(f"http://127.0.0.1:{plain.port}/statusz")[0] == 404  # no status callback
    MetricsServer("127.0.0.1:0", lambda: b"", ready=lambda: True).close()  # close without start
