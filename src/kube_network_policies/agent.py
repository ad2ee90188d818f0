"""The agent: wiring, lifecycle, readiness and signals.

The control process (this module) reads sources, validates objects, keeps its own ClusterState to
know which local pod IPs need the userspace path, and keeps the nftables ruleset in step. Packet
workers (dataplane/worker.py), one per queue, hold replicas of the engine fed over pipes.

Order of start-up, so that no packet is judged on partial state:
  load every source -> fork workers -> send them the full state, then "ready" -> wait until they
  applied it -> install the ruleset (packets are diverted only now) -> report ready.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from kube_network_policies.dataplane.nftables import Backend, DataplaneError, Ruleset, RulesetConfig, detect_backend
from kube_network_policies.dataplane.worker import WorkerConfig, worker_main
from kube_network_policies.engine import ClusterState, Features
from kube_network_policies.metrics import Metrics, MetricsServer
from kube_network_policies.model import ApiObject, object_key
from kube_network_policies.sources.files import ManifestError, ManifestWatcher, load_objects, manifest_digest

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
WORKER_START_TIMEOUT_S = 10.0
APPLY_TIMEOUT_S = 30.0

Key = tuple[str, str, str]
Op = tuple[Any, ...]


class AgentError(Exception):
    """A start-up problem the user must fix (bad files, no queue, no nftables): exit status 2."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    manifests: tuple[str, ...]
    node: str
    features: Features = Features()
    fail_open: bool = False
    queue_id: int = 100
    queue_count: int = 1
    metrics_bind_address: str = ":9080"
    backend: Backend | None = None  # None: probe the kernel


@dataclass(slots=True)
class _Worker:
    queue_num: int
    process: multiprocessing.process.BaseProcess
    conn: Connection
    applied: int = 0  # generation last acknowledged


def diff(old: dict[Key, ApiObject], new: dict[Key, ApiObject]) -> list[Op]:
    """Operations that turn `old` into `new`: namespaces and nodes first so that pods and
    policies see their labels, deletions last."""
    order = {"Namespace": 0, "Node": 1, "Pod": 2}
    ops: list[Op] = []
    for key in sorted(new, key=lambda k: (order.get(k[0], 3), k)):
        if old.get(key) != new[key]:
            ops.append(("apply", new[key]))
    for key in old:
        if key not in new:
            ops.append(("delete", key[0], key[1], key[2]))
    return ops


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state = ClusterState(config.features)
        self.objects: dict[Key, ApiObject] = {}
        self.generation = 0
        self.digest = ""
        self.ready = False
        self.metrics = Metrics()
        self._workers: list[_Worker] = []
        self._ruleset: Ruleset | None = None
        self._managed: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        self._stop = threading.Event()
        self._server: MetricsServer | None = None
        self._watcher = ManifestWatcher(list(config.manifests))
        self._lock = threading.Lock()  # guards what /statusz reads

    # ---- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to ready; raises AgentError with a clear message."""
        cfg = self.config
        try:
            self._server = MetricsServer(cfg.metrics_bind_address, self.metrics, ready=lambda: self.ready, status=self.status)
        except (ValueError, OSError) as exc:
            raise AgentError(f"-metrics-bind-address {cfg.metrics_bind_address}: {exc}") from None
        self._watcher.changed()
        try:
            objects = load_objects(list(cfg.manifests))
        except ManifestError as exc:
            raise AgentError(str(exc)) from None
        digest = manifest_digest(list(cfg.manifests))
        new = {object_key(o): o for o in objects}
        ops = diff({}, new)
        for op in ops:
            self._apply_local(op)
        self.objects = new
        backend = cfg.backend or detect_backend()
        try:
            ruleset_config = RulesetConfig(backend=backend, queue_id=cfg.queue_id, queue_count=cfg.queue_count, fail_open=cfg.fail_open)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        self._ruleset = Ruleset(ruleset_config)
        self._start_workers()
        self.generation = 1
        self._send_all(("batch", self.generation, ops))
        self._send_all(("ready",))
        self._wait_applied(self.generation)
        self._sync_ruleset(force=True)
        with self._lock:
            self.digest = digest
        self.ready = True
        self._server.start()
        log.info(
            "ready: node %s, %d objects, %d local pod IPs diverted, queue %d-%d (%s)",
            cfg.node, len(new), sum(len(s) for s in self._managed), cfg.queue_id, cfg.queue_id + cfg.queue_count - 1, backend.value,
        )

    def run(self) -> None:
        """Watch sources and workers until stop()."""
        while not self._stop.is_set():
            self._pump(POLL_INTERVAL_S)
            if self._stop.is_set():
                break
            if self._watcher.changed():
                self.reload()
            self._check_workers()

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Stop workers; keep (fail-open) or remove (fail-closed) the ruleset."""
        self.ready = False
        for w in self._workers:
            try:
                w.conn.send(("stop",))
            except OSError:
                pass
        for w in self._workers:
            w.process.join(2.0)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(1.0)
        if self._ruleset is not None:
            try:
                self._ruleset.shutdown()
            except DataplaneError as exc:
                log.error("removing the ruleset failed: %s", exc)
        if self._server is not None:
            self._server.close()

    # ---- changes -------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the manifests; an invalid set is refused as a whole (the old state stays)."""
        try:
            objects = load_objects(list(self.config.manifests))
        except ManifestError as exc:
            log.error("manifests not applied, the previous state stays in force:\n%s", exc)
            return False
        digest = manifest_digest(list(self.config.manifests))
        new = {object_key(o): o for o in objects}
        ops = diff(self.objects, new)
        started = time.monotonic()
        if ops:
            for op in ops:
                self._apply_local(op)
            self.objects = new
            self.generation += 1
            self._send_all(("batch", self.generation, ops))
            self._wait_applied(self.generation)
            self._sync_ruleset()
        with self._lock:
            self.digest = digest
        log.info("applied %d changes in %.1f ms (generation %d)", len(ops), (time.monotonic() - started) * 1000, self.generation)
        return True

    def _apply_local(self, op: Op) -> None:
        if op[0] == "apply":
            self.state.apply(op[1])
        else:
            self.state.delete(op[1], op[2], op[3])

    def _sync_ruleset(self, force: bool = False) -> None:
        ips = self.state.managed_ips(self.config.node)
        v4 = frozenset(ip for ip in ips if ":" not in ip)
        v6 = frozenset(ip for ip in ips if ":" in ip)
        if not force and (v4, v6) == self._managed:
            return
        assert self._ruleset is not None
        try:
            self._ruleset.sync(sorted(v4), sorted(v6))
        except (DataplaneError, ValueError) as exc:
            if force:
                raise AgentError(f"installing the nftables ruleset failed: {exc}") from None
            log.error("nftables sync failed, will retry on the next change: %s", exc)
            return
        self._managed = (v4, v6)

    def status(self) -> dict[str, object]:
        with self._lock:
            return {
                "ready": self.ready,
                "node": self.config.node,
                "generation": self.generation,
                "digest": self.digest,
                "diverted_ipv4": sorted(self._managed[0]),
                "diverted_ipv6": sorted(self._managed[1]),
                "objects": len(self.objects),
            }

    # ---- workers -------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        cfg = self.config
        # fork: the workers start in milliseconds and inherit the imported modules; it happens
        # before this process starts any thread.
        ctx = multiprocessing.get_context("fork")
        for q in range(cfg.queue_id, cfg.queue_id + cfg.queue_count):
            self._workers.append(self._spawn(ctx, q))

    def _spawn(self, ctx: Any, queue_num: int) -> _Worker:
        cfg = self.config
        parent, child = ctx.Pipe()
        wc = WorkerConfig(queue_num=queue_num, node=cfg.node, features=cfg.features, fail_open=cfg.fail_open)
        p = ctx.Process(target=worker_main, args=(child, wc), name=f"knp-queue-{queue_num}", daemon=True)
        p.start()
        child.close()
        if not parent.poll(WORKER_START_TIMEOUT_S):
            p.terminate()
            raise AgentError(f"the worker for queue {queue_num} did not start")
        msg = parent.recv()
        if msg[0] != "started":
            p.join(1.0)
            raise AgentError(f"cannot bind NFQUEUE {msg[1]} (is another agent running, and are we root?)")
        return _Worker(queue_num, p, parent)

    def _send_all(self, msg: tuple[Any, ...]) -> None:
        for w in self._workers:
            try:
                w.conn.send(msg)
            except OSError as exc:
                log.error("worker for queue %d is gone: %s", w.queue_num, exc)

    def _wait_applied(self, generation: int) -> None:
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        while any(w.applied < generation and w.process.is_alive() for w in self._workers):
            if time.monotonic() > deadline:
                raise AgentError(f"workers did not apply generation {generation} within {APPLY_TIMEOUT_S:.0f} s")
            self._pump(0.05)

    def _pump(self, timeout: float) -> None:
        """Read what workers sent: acknowledgements and metrics."""
        conns = [w.conn for w in self._workers]
        if not conns:
            self._stop.wait(timeout)
            return
        for ready in wait(conns, timeout):
            w = next(x for x in self._workers if x.conn is ready)
            conn = w.conn
            try:
                while conn.poll():
                    msg = conn.recv()
                    if msg[0] == "applied":
                        w.applied = msg[1]
                    elif msg[0] == "stats":
                        self.metrics.packets.merge_delta(msg[2])
                        self.metrics.record_errors(msg[3])
            except (EOFError, OSError):
                pass

    def _check_workers(self) -> None:
        """A worker that died is replaced and given the whole current state."""
        ctx = multiprocessing.get_context("fork")
        for i, w in enumerate(self._workers):
            if w.process.is_alive():
                continue
            log.error("worker for queue %d exited (code %s); restarting it", w.queue_num, w.process.exitcode)
            try:
                nw = self._spawn(ctx, w.queue_num)
            except AgentError as exc:
                log.error("%s", exc)
                continue
            self._workers[i] = nw
            nw.conn.send(("batch", self.generation, diff({}, self.objects)))
            nw.conn.send(("ready",))


def run_agent(config: AgentConfig) -> int:
    """The `run` command: start, serve until SIGTERM/SIGINT, shut down. Exit status 2 on bad input."""
    agent = Agent(config)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except AgentError as exc:
        log.error("%s", exc)
        agent.shutdown()
        return 2
    try:
        agent.run()
    finally:
        agent.shutdown()
    return 0

