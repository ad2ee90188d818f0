"""The Kubernetes API as a source: one informer per enabled resource, their changes queued for
the agent.

The parts: sources/kubeconfig.py (where the API is, credentials, TLS), sources/resources.py (what
is watched), sources/codecs.py (JSON to model objects), sources/informer.py (list, watch, relist,
backoff).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from kube_network_policies.sources.base import Batch, Change
from kube_network_policies.sources.informer import Informer
from kube_network_policies.sources.kubeconfig import ApiConfig
from kube_network_policies.sources.resources import Resource, resources_for


@dataclass
class KubernetesSource:
    """Every enabled resource's informer, their changes queued for the agent.

    `transport_factory` (tests) makes each informer's httpx transport, e.g. a wrapper around
    `config.transport()`; informer options (page_size, backoff_base, ...) go in `options`.
    """

    config: ApiConfig
    flags: frozenset[str] = frozenset()  # the agent flags that are on: kinds they enable are watched too
    transport_factory: Callable[[], httpx.BaseTransport] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    informers: list[Informer] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[Resource, list[Change], str]] = []
        self._signaled = False
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._closed = False
        for r in resources_for(self.flags):
            transport = self.transport_factory() if self.transport_factory else None
            self.informers.append(Informer(self.config, r, self._emit, transport=transport, **self.options))

    @property
    def name(self) -> str:
        return f"kubernetes ({self.config.origin or self.config.server})"

    def open(self) -> None:
        pass  # the configuration was checked when it was loaded

    def start(self) -> None:
        for informer in self.informers:
            informer.start()

    def synced(self) -> bool:
        return all(i.synced for i in self.informers)

    def _emit(self, resource: Resource, changes: list[Change], rv: str) -> None:
        with self._lock:
            self._pending.append((resource, changes, rv))
            if not self._signaled and not self._closed:
                self._signaled = True
                try:
                    os.write(self._wfd, b"!")
                except OSError:
                    pass

    def take(self) -> Batch | None:
        with self._lock:
            pending, self._pending = self._pending, []
            if self._signaled:
                self._signaled = False
                try:
                    while os.read(self._rfd, 64):
                        pass
                except OSError:
                    pass
        if not pending:
            return None
        batch = Batch()
        for resource, changes, rv in pending:
            batch.changes.extend(changes)
            if rv:
                batch.marks[resource.name] = rv
        return batch

    def fileno(self) -> int | None:
        return self._rfd

    def status(self) -> dict[str, object]:
        return {i.resource.name: i.status() for i in self.informers}

    def problems(self) -> dict[str, str]:
        """Objects the API holds that this agent cannot read: not enforced as written (a valid
        earlier version stays in force, or nothing)."""
        out = {}
        for i in self.informers:
            n = len(i.invalid_keys)
            if n:
                out[i.resource.name] = f"{n} object(s) cannot be read here and are not enforced as written (see the log)"
        return out

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop()
        for informer in self.informers:
            informer.join()
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._rfd)
                os.close(self._wfd)
