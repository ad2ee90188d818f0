"""The agent's HTTP endpoints: /metrics, /healthz, /readyz and /statusz.

The metric families are metrics.py's; the server (bounded connections, sizes and client time)
is httpserver.py's; this module routes between them and the agent's callbacks.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Mapping

from kube_network_policies.httpserver import HttpServer, Response, ServerLimits, parse_bind_address
from kube_network_policies.metrics import CONTENT_TYPE, Metrics

__all__ = ["MetricsServer"]

log = logging.getLogger(__name__)


class MetricsServer:
    """/metrics, /healthz (200 while the process serves and `alive()`, when given, is true),
    /readyz (200 iff ready()) and, when a status callback is given, /statusz (its JSON).

    The constructor only binds, so a bad or busy address fails early (ValueError for a bad
    address, OSError naming it when the port cannot be bound) and no thread exists yet (the
    agent forks its workers after binding); start() serves from one thread, close() stops.
    As a context manager it starts on entry. Connections, request sizes and how long a client
    may take are bounded (httpserver.ServerLimits).
    """

    def __init__(
        self,
        address: str,
        metrics: Metrics | Callable[[], bytes],
        ready: Callable[[], bool],
        status: Callable[[], Mapping[str, object]] | None = None,
        limits: ServerLimits | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        bind = parse_bind_address(address)
        host = bind.host or ("::" if bind.family == socket.AF_INET6 else "0.0.0.0")
        self._metrics = metrics.exposition if isinstance(metrics, Metrics) else metrics
        self._ready = ready
        self._alive = alive
        self._status = status
        try:
            self._server = HttpServer(host, bind.port, bind.family, self._route, limits)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {address} for metrics: {e.strerror}") from None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._server.port

    @property
    def server(self) -> HttpServer:
        return self._server

    def _route(self, path: str) -> Response:
        text = "text/plain; charset=utf-8"
        if path == "/metrics":
            return 200, self._metrics(), CONTENT_TYPE
        if path == "/healthz":
            return (200, b"ok\n", text) if self._check(self._alive, "liveness") else (503, b"not alive\n", text)
        if path == "/readyz":
            return (200, b"ok\n", text) if self._check(self._ready, "readiness") else (503, b"not ready\n", text)
        if path == "/statusz" and self._status is not None:
            body = json.dumps(self._status(), indent=2, sort_keys=True, default=str) + "\n"
            return 200, body.encode(), "application/json"
        return 404, b"not found\n", text

    @staticmethod
    def _check(check: Callable[[], bool] | None, what: str) -> bool:
        if check is None:
            return True
        try:
            return bool(check())
        except Exception as e:  # noqa: BLE001 - a broken check means no
            log.warning("%s check failed: %s", what, e)
            return False

    def start(self) -> None:
        """Serve from a daemon thread; idempotent."""
        self._server.start()

    def close(self) -> None:
        self._server.close()

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
