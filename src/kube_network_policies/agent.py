"""The agent: wiring, lifecycle, readiness and signals.

The control process (this module) reads sources, validates objects, keeps its own ClusterState to
know which local pod IPs need the userspace path, and keeps the nftables ruleset in step. Packet
workers (dataplane/worker.py), one per queue, hold replicas of the engine fed over pipes.

A source gives typed changes: the manifest files (standalone mode) or the Kubernetes API (an
informer per resource, in threads of this process, so that decoding never runs in a worker).
Changes are gathered for a few milliseconds, coalesced per object and sent to every worker as one
batch, like a manifest reload.

Order of start-up, so that no packet is judged on partial state:
  open the source (read the manifests) -> fork workers (before any thread exists) -> serve
  /healthz -> start the source -> wait until EVERY source has synced (a complete list of every
  enabled resource) -> send the workers the full state, then "ready" -> wait until they applied
  it -> install the ruleset (packets are diverted only now) -> report ready.
Until then the workers are not ready (they would answer the default verdict) and no packet is
diverted to them at all.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from kube_network_policies.dataplane.nftables import (
    Backend,
    DataplaneError,
    Ruleset,
    RulesetConfig,
    detect_backend,
)
from kube_network_policies.dataplane.worker import WorkerConfig, worker_main
from kube_network_policies.engine import ClusterState, Features
from kube_network_policies.metrics import Metrics, MetricsServer
from kube_network_policies.model import ApiObject
from kube_network_policies.sources.base import Batch, Change, Source, SourceError
from kube_network_policies.sources.files import ManifestSource

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
BATCH_WINDOW_S = 0.005  # after the first change arrives, wait this long for more: one batch
SYNC_LOG_INTERVAL_S = 15.0
WORKER_START_TIMEOUT_S = 10.0
APPLY_TIMEOUT_S = 30.0

Key = tuple[str, str, str]
Op = tuple[Any, ...]


class AgentError(Exception):
    """A start-up problem the user must fix (bad files, no queue, no nftables): exit status 2."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    manifests: tuple[str, ...]  # standalone mode; empty: the Kubernetes API
    node: str
    features: Features = Features()
    fail_open: bool = False
    queue_id: int = 100
    queue_count: int = 1
    metrics_bind_address: str = ":9080"
    backend: Backend | None = None  # None: probe the kernel
    kubeconfig: str | None = None  # Kubernetes mode: None means in-cluster configuration
    accept_cache: bool = True  # remember accepted tuples in the kernel (dataplane/nftables.py)


def make_source(config: AgentConfig) -> Source:
    """The manifest files when given, else the Kubernetes API (raises SourceError)."""
    if config.manifests:
        return ManifestSource(list(config.manifests))
    from kube_network_policies.sources.kubernetes import KubernetesSource, load_config

    f = config.features
    return KubernetesSource(load_config(config.kubeconfig), f.admin_network_policy, f.baseline_admin_network_policy, f.cluster_network_policy)


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
    def __init__(self, config: AgentConfig, source: Source | None = None) -> None:
        self.config = config
        self.source = source  # None: made from the config by start()
        self.state = ClusterState(config.features)
        self.objects: dict[Key, ApiObject] = {}
        self.generation = 0
        self.applied: dict[str, str] = {}  # marks of the last applied batches: digest, resourceVersions
        # Objects per kind once enforced everywhere (workers, accept cache flushed, ruleset): set
        # with the marks, so /statusz never reports a change before it is enforced.
        self.applied_counts: dict[str, int] = {}
        self.ready = False
        self.metrics = Metrics()
        self._workers: list[_Worker] = []
        self._ruleset: Ruleset | None = None
        self._managed: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        self._stop = threading.Event()
        self._server: MetricsServer | None = None
        self._lock = threading.Lock()  # guards what /statusz reads

    # ---- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to ready; raises AgentError with a clear message."""
        cfg = self.config
        try:
            self._server = MetricsServer(cfg.metrics_bind_address, self.metrics, ready=lambda: self.ready, status=self.status)
        except (ValueError, OSError) as exc:
            raise AgentError(f"-metrics-bind-address {cfg.metrics_bind_address}: {exc}") from None
        try:
            if self.source is None:
                self.source = make_source(cfg)
            self.source.open()
        except SourceError as exc:
            raise AgentError(str(exc)) from None
        try:
            backend = cfg.backend or detect_backend()
        except DataplaneError as exc:
            raise AgentError(f"nftables is not usable here (are we root, with nft and iptables installed?): {exc}") from None
        try:
            ruleset_config = RulesetConfig(backend=backend, queue_id=cfg.queue_id, queue_count=cfg.queue_count, fail_open=cfg.fail_open, accept_cache=cfg.accept_cache)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        self._ruleset = Ruleset(ruleset_config)
        self._start_workers()  # fork now: no thread of ours exists yet
        self._server.start()  # /healthz answers from here on; /readyz only once ready
        self.source.start()
        started = time.monotonic()
        if not self._wait_synced():
            return  # stopped before every source synced: never ready
        batch = self.source.take() or Batch()
        ops = self._ops(batch.changes)
        for op in ops:
            self._apply_local(op)
        self.generation = 1
        self._send_all(("batch", self.generation, ops))
        self._send_all(("ready",))
        self._wait_applied(self.generation)
        self._sync_ruleset(force=True)
        with self._lock:
            self.applied.update(batch.marks)
            self.applied_counts = self._applied_counts()
        # The objects of the initial state live as long as the agent: keep the collector from
        # scanning them again and again.
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info(
            "ready: node %s, %d objects, synced in %.2f s, %d local pod IPs diverted, queue %d-%d (%s)",
            cfg.node, len(self.objects), time.monotonic() - started, sum(len(s) for s in self._managed),
            cfg.queue_id, cfg.queue_id + cfg.queue_count - 1, backend.value,
        )

    def _wait_synced(self) -> bool:
        """Until every source has synced (True) or stop() (False); serves the workers meanwhile."""
        assert self.source is not None
        next_log = time.monotonic() + SYNC_LOG_INTERVAL_S
        while not self._stop.is_set():
            if self.source.synced():
                return True
            self._pump(0.05)
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + SYNC_LOG_INTERVAL_S
                waiting = sorted(n for n, st in self.source.status().items() if isinstance(st, dict) and not st.get("synced"))
                log.warning("not ready: waiting for %s to sync", ", ".join(waiting) or "the sources")
        return False

    def run(self) -> None:
        """Apply the source's changes and serve the workers until stop()."""
        assert self.source is not None
        while not self._stop.is_set():
            if self._pump(POLL_INTERVAL_S, with_source=True):
                self._stop.wait(BATCH_WINDOW_S)  # the first change of a burst: let the rest arrive
            if self._stop.is_set():
                break
            batch = self.source.take()
            if batch is not None:
                self.apply(batch)
            self._check_workers()

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Stop the source and the workers; keep (fail-open) or remove (fail-closed) the ruleset."""
        self.ready = False
        if self.source is not None:
            self.source.stop()
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

    def apply(self, batch: Batch) -> None:
        """Apply a batch of changes here and in every worker, then bring the ruleset in step."""
        started = time.monotonic()
        ops = self._ops(batch.changes)
        if ops:
            for op in ops:
                self._apply_local(op)
            self.generation += 1
            self._send_all(("batch", self.generation, ops))
            self._wait_applied(self.generation)
            try:  # every worker judges with the new state now: forget what the old one accepted
                assert self._ruleset is not None
                self._ruleset.flush_cache()
            except DataplaneError as exc:
                log.error("flushing the accept cache failed (its entries expire within their timeout): %s", exc)
            self._sync_ruleset()
        with self._lock:
            self.applied.update(batch.marks)
            self.applied_counts = self._applied_counts()
        if ops or "digest" in batch.marks:
            log.log(
                logging.INFO if "digest" in batch.marks else logging.DEBUG,
                "applied %d changes in %.1f ms (generation %d)", len(ops), (time.monotonic() - started) * 1000, self.generation,
            )

    def _ops(self, changes: list[Change]) -> list[Op]:
        """Worker operations for `changes`, coalesced per object (the last change wins) and
        checked against what is applied; namespaces and nodes first so that pods and policies
        see their labels, deletions last. Updates self.objects."""
        final: dict[Key, ApiObject | None] = {}
        for change in changes:
            final[change.key] = change.new
        order = {"Namespace": 0, "Node": 1, "Pod": 2}
        applies: list[tuple[Key, ApiObject]] = []
        deletes: list[Key] = []
        for key, new in final.items():
            current = self.objects.get(key)
            if new is None:
                if current is not None:
                    deletes.append(key)
            elif current is None or current != new:
                applies.append((key, new))
        applies.sort(key=lambda kv: order.get(kv[0][0], 3))
        ops: list[Op] = []
        for key, obj in applies:
            self.objects[key] = obj
            ops.append(("apply", obj))
        for key in deletes:
            del self.objects[key]
            ops.append(("delete", key[0], key[1], key[2]))
        return ops

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

    def _applied_counts(self) -> dict[str, int]:
        """Objects of each kind in the applied state: a barrier for tools that delete objects
        (a deletion has no resourceVersion to wait for)."""
        counts: dict[str, int] = {}
        for kind, _, _ in self.objects:
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def status(self) -> dict[str, object]:
        """For /statusz: readiness, what is applied, and per source (each watched resource) its
        sync state, the resourceVersion seen and the one applied (in every worker)."""
        with self._lock:
            out: dict[str, object] = {
                "ready": self.ready,
                "node": self.config.node,
                "mode": "standalone" if self.config.manifests else "kubernetes",
                "generation": self.generation,
                "digest": self.applied.get("digest", ""),
                "diverted_ipv4": sorted(self._managed[0]),
                "diverted_ipv6": sorted(self._managed[1]),
                "objects": len(self.objects),
                "appliedObjects": dict(self.applied_counts),
            }
            applied = dict(self.applied)
        sources = self.source.status() if self.source is not None else {}
        for name, st in sources.items():
            if isinstance(st, dict) and name in applied:
                st["appliedResourceVersion"] = applied[name]
        out["sources"] = sources
        return out

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
        # The worker marks what the engine accepted with the ruleset's judged bit: the accept cache
        # takes only those (dataplane/nftables.py).
        rc = self._ruleset.config if self._ruleset is not None else None
        judged = rc.judged_mark if rc is not None and rc.accept_cache else 0
        wc = WorkerConfig(queue_num=queue_num, node=cfg.node, features=cfg.features, fail_open=cfg.fail_open, judged_mark=judged)
        # The child must not keep our ends of the pipes (its own and other workers'): if this
        # process dies without a shutdown, the worker has to see EOF and exit, unbinding its queue.
        inherited = [parent, *(w.conn for w in self._workers)]
        p = ctx.Process(target=_worker_entry, args=(child, wc, inherited), name=f"knp-queue-{queue_num}", daemon=True)
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

    def _pump(self, timeout: float, with_source: bool = False) -> bool:
        """Read what workers sent: acknowledgements and metrics. With `with_source`, also wake
        up when the source has changes waiting, and say so."""
        conns: list[Any] = [w.conn for w in self._workers]
        fd = self.source.fileno() if with_source and self.source is not None else None
        if fd is not None:
            conns.append(fd)
        if not conns:
            self._stop.wait(timeout)
            return False
        source_ready = False
        for ready in wait(conns, timeout):
            if isinstance(ready, int):  # the source's descriptor
                source_ready = True
                continue
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
        return source_ready

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


def _worker_entry(conn: Connection, config: WorkerConfig, inherited: list[Connection]) -> None:
    """A forked worker's first step: close the control process's pipe ends it inherited."""
    for c in inherited:
        c.close()
    worker_main(conn, config)


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

