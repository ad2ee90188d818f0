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

Once running, nothing turns enforcement off silently (README "Hardening"):
- a change that cannot be read or applied keeps the previous state in force; it is logged, counted
  (control_errors_total) and, where it leaves enforcement stale, makes /readyz fail;
- the ruleset is kept in the kernel: nf_tables notifications (dataplane/monitor.py) tell within
  milliseconds when someone else flushed or edited it, a periodic check covers the rest, and a
  difference is restored in one transaction (ruleset_restores_total); while the kernel does not
  hold what the agent installed, /readyz fails;
- on SIGTERM a fail-closed agent keeps its rules unless it is being uninstalled (shutdown()).
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from kube_network_policies.dataplane.monitor import MonitorError, NftMonitor
from kube_network_policies.dataplane.nfqueue import read_queue_stats
from kube_network_policies.dataplane.nftables import Backend, RulesetConfig, canonical_addresses
from kube_network_policies.dataplane.ruleset import DataplaneError, Ruleset, detect_backend, recent_pids
from kube_network_policies.dataplane.worker import WorkerConfig, worker_main
from kube_network_policies.endpoints import MetricsServer
from kube_network_policies.engine import ClusterState, Features
from kube_network_policies.errors import KnpError
from kube_network_policies.metrics import Metrics
from kube_network_policies.model import ApiObject
from kube_network_policies.sources.base import Batch, Change, Source, SourceError
from kube_network_policies.sources.files import ManifestSource

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
BATCH_WINDOW_S = 0.005  # after the first change arrives, wait this long for more: one batch
SYNC_LOG_INTERVAL_S = 15.0
WORKER_START_TIMEOUT_S = 10.0
APPLY_TIMEOUT_S = 30.0
CHECK_DEBOUNCE_S = 0.02  # after a foreign nf_tables change: let a multi-command edit settle first
CHECK_INTERVAL_S = 5.0  # the periodic check (the backstop of the events)
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # a failed sync, check or restore is retried after these
STALL_READY_S = 15.0  # a control loop stuck this long: not ready (changes are not being applied)
STALL_LIVE_S = 60.0  # ... this long: not alive either, so that the kubelet restarts the agent
RULESET_ON_EXIT = ("auto", "keep", "remove")
# More restores than this within FIGHT_WINDOW_S: something keeps changing the ruleset (another
# agent, a firewall manager that owns the whole ruleset). Enforcement flickers: say so.
FIGHT_RESTORES = 5
FIGHT_WINDOW_S = 60.0

Key = tuple[str, str, str]
Op = tuple[Any, ...]

# Per-source /statusz fields shown without -status-details: what tools wait on, and counters.
_PUBLIC_SOURCE_STATUS = frozenset(
    {
        "synced",
        "resourceVersion",
        "appliedResourceVersion",
        "digest",
        "objects",
        "lists",
        "relists",
        "watches",
        "events",
        "invalid",
        "errors",
    }
)


class AgentError(KnpError):
    """A start-up problem the user must fix (bad files, no queue, no nftables): exit status 2."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    manifests: tuple[str, ...]  # standalone mode; empty: the Kubernetes API
    node: str
    features: Features = field(default_factory=Features)
    fail_open: bool = False
    queue_id: int = 100
    queue_count: int = 1
    metrics_bind_address: str = ":9080"
    backend: Backend | None = None  # None: probe the kernel
    kubeconfig: str | None = None  # Kubernetes mode: None means in-cluster configuration
    accept_cache: bool = True  # remember accepted tuples in the kernel (dataplane/nftables.py)
    # On a graceful exit: "keep" the ruleset, "remove" it, or "auto" (see Agent.exit_decision).
    ruleset_on_exit: str = "auto"
    pod_namespace: str | None = None  # the agent's own pod, to find its DaemonSet on exit
    pod_name: str | None = None
    status_details: bool = False  # /statusz with diverted pod IPs and error texts (status())


def make_source(config: AgentConfig) -> Source:
    """The manifest files when given, else the Kubernetes API (raises SourceError)."""
    if config.manifests:
        return ManifestSource(list(config.manifests))
    from kube_network_policies.sources.kubeconfig import load_config
    from kube_network_policies.sources.kubernetes import KubernetesSource

    return KubernetesSource(load_config(config.kubeconfig), config.features.flags)


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
        if config.ruleset_on_exit not in RULESET_ON_EXIT:
            raise ValueError(f"ruleset_on_exit must be one of {', '.join(RULESET_ON_EXIT)}, not {config.ruleset_on_exit!r}")
        self.config = config
        self.source = source  # None: made from the config by start()
        self.state = ClusterState(config.features)
        self.objects: dict[Key, ApiObject] = {}
        self.generation = 0
        self.applied: dict[str, str] = {}  # marks of the last applied batches: digest, resourceVersions
        # Objects per kind once enforced everywhere (workers, accept cache flushed, ruleset): set
        # with the marks, so /statusz never reports a change before it is enforced.
        self.applied_counts: dict[str, int] = {}
        self.ready = False  # start() completed: every source synced, the ruleset installed once
        self.metrics = Metrics(queue_reader=read_queue_stats)
        self._workers: list[_Worker] = []
        self._ruleset: Ruleset | None = None
        self._monitor: NftMonitor | None = None
        self._managed: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        self._stop = threading.Event()
        self._server: MetricsServer | None = None
        self._lock = threading.Lock()  # guards what /statusz reads
        # Why enforcement is not what the agent believes, by topic ("sync", "ruleset", "apply",
        # "addresses", "workers"); empty when it is. Any entry makes /readyz fail.
        self.problems: dict[str, str] = {}
        self._sync_retry_at = math.inf  # a failed ruleset sync is retried then
        self._check_at = math.inf  # a check of the kernel's ruleset is due then (events)
        self._backstop_at = math.inf  # ... and then at the latest (periodic)
        self._failures = 0  # consecutive failed syncs/checks/restores: picks the retry delay
        self._heartbeat = time.monotonic()  # the control loop's last turn
        self._api_config: Any = None  # Kubernetes mode: the API, asked on exit
        self._restored_at: list[float] = []  # monotonic times of the recent restores

    # ---- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Everything up to ready; raises AgentError with a clear message."""
        cfg = self.config
        try:
            self._server = MetricsServer(cfg.metrics_bind_address, self.metrics, ready=self.is_ready, status=self.status, alive=self.is_alive)
        except (ValueError, OSError) as exc:
            raise AgentError(f"-metrics-bind-address {cfg.metrics_bind_address}: {exc}") from None
        try:
            if self.source is None:
                self.source = make_source(cfg)
                self._api_config = getattr(self.source, "config", None)
            self.source.open()
        except SourceError as exc:
            raise AgentError(str(exc)) from None
        try:
            backend = cfg.backend or detect_backend()
        except DataplaneError as exc:
            raise AgentError(f"nftables is not usable here (are we root, with nft and iptables installed?): {exc}") from None
        try:
            ruleset_config = RulesetConfig(
                backend=backend, queue_id=cfg.queue_id, queue_count=cfg.queue_count, fail_open=cfg.fail_open, accept_cache=cfg.accept_cache
            )
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        self._ruleset = Ruleset(ruleset_config)
        self._start_workers()  # fork now: no thread of ours exists yet
        try:
            self._monitor = NftMonitor(watch_xt=backend is Backend.XT_NFQUEUE, own=recent_pids)
        except MonitorError as exc:
            log.warning("no nf_tables notifications (%s): the ruleset is checked every %.0f s only", exc, CHECK_INTERVAL_S)
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
        if not self._wait_applied(self.generation):
            raise AgentError(f"workers did not apply the initial state within {APPLY_TIMEOUT_S:.0f} s")
        self._sync_ruleset(first=True)
        with self._lock:
            self.applied.update(batch.marks)
            self.applied_counts = self._applied_counts()
        # The objects of the initial state live as long as the agent: keep the collector from
        # scanning them again and again.
        gc.collect()
        gc.freeze()
        self._backstop_at = time.monotonic() + CHECK_INTERVAL_S
        self.metrics.control.in_sync = True
        self.ready = True
        log.info(
            "ready: node %s, %d objects, synced in %.2f s, %d local pod IPs diverted, queue %d-%d (%s)",
            cfg.node,
            len(self.objects),
            time.monotonic() - started,
            sum(len(s) for s in self._managed),
            cfg.queue_id,
            cfg.queue_id + cfg.queue_count - 1,
            backend.value,
        )

    def is_ready(self) -> bool:
        """/readyz: started, the kernel holds what the agent believes, changes are being applied."""
        return self.ready and not self.problems and time.monotonic() - self._heartbeat < STALL_READY_S

    def is_alive(self) -> bool:
        """/healthz: the control loop turns (a wedged agent gets restarted by the kubelet)."""
        return time.monotonic() - self._heartbeat < STALL_LIVE_S

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
        """Apply the source's changes, keep the ruleset in the kernel and serve the workers until
        stop(). Nothing that goes wrong in here ends the agent: the previous state stays in force."""
        assert self.source is not None
        while not self._stop.is_set():
            due = min(self._check_at, self._sync_retry_at) - time.monotonic()
            if self._pump(max(0.0, min(POLL_INTERVAL_S, due)), with_source=True):
                self._stop.wait(BATCH_WINDOW_S)  # the first change of a burst: let the rest arrive
            if self._stop.is_set():
                break
            self._step()

    def _step(self) -> None:
        """One turn of the control loop after waiting: changes, workers, the ruleset."""
        assert self.source is not None
        try:
            batch = self.source.take()
        except Exception as exc:  # a source bug must not end enforcement
            log.error("reading changes failed, the previous state stays in force: %s: %.300s", type(exc).__name__, exc)
            log.debug("reading changes failed", exc_info=True)
            self.metrics.control.error("source")
            batch = None
        if batch is not None:
            try:
                self.apply(batch)
            except Exception as exc:  # an engine bug must not end enforcement either
                log.error("applying a change failed: %s: %.300s", type(exc).__name__, exc)
                log.debug("applying a change failed", exc_info=True)
                self.metrics.control.error("apply")
                self.problems["apply"] = f"a change could not be applied ({type(exc).__name__}); see the log"
        self._source_problems()
        self._check_workers()
        self._maintain_ruleset()

    def _source_problems(self) -> None:
        """Refused changes and unreadable objects: what is enforced is not what was given."""
        assert self.source is not None
        try:
            found = self.source.problems()
        except Exception as exc:  # noqa: BLE001 - a status bug must not end enforcement
            found = {"source": f"{type(exc).__name__}"}
        for key in [k for k in self.problems if k.startswith("source:") and k[7:] not in found]:
            del self.problems[key]
        for topic, message in found.items():
            if self.problems.get(f"source:{topic}") != message:
                self.metrics.control.error("source")
            self.problems[f"source:{topic}"] = message

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Stop the source and the workers; keep or remove the ruleset (exit_decision)."""
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
        if self._monitor is not None:
            self._monitor.close()
        if self._ruleset is not None:
            keep, why = self.exit_decision()
            log.info("%s the ruleset on exit: %s", "keeping" if keep else "removing", why)
            try:
                self._ruleset.shutdown(keep=keep)
            except DataplaneError as exc:
                log.error("removing the ruleset failed: %s", exc)
        if self._server is not None:
            self._server.close()

    def exit_decision(self) -> tuple[bool, str]:
        """Keep the ruleset on a graceful exit (True) or remove it, and why.

        fail-open keeps it: its queue rules bypass while no agent listens. A fail-closed agent
        keeps it across restarts (connections of selected pods then wait for the next agent
        instead of passing unjudged) and removes it when uninstalled (a ruleset with no agent
        would blackhole those pods for good): in Kubernetes mode the API says which
        (sources/daemonset.py); in standalone mode nothing can tell, and it is removed.
        --ruleset-on-exit=keep|remove overrides all of this.
        """
        cfg = self.config
        if cfg.ruleset_on_exit != "auto":
            return cfg.ruleset_on_exit == "keep", f"--ruleset-on-exit={cfg.ruleset_on_exit}"
        if cfg.fail_open:
            return True, "fail-open: the queue rules let packets through while no agent listens"
        if cfg.manifests:
            return False, "standalone mode, fail-closed: nothing will restart the agent for sure (--ruleset-on-exit=keep keeps it)"
        if self._api_config is None:
            return True, "fail-closed, and no API to ask whether this is an uninstall"
        from kube_network_policies.sources.daemonset import exit_decision

        decision = exit_decision(self._api_config, cfg.pod_namespace, cfg.pod_name, cfg.node)
        return decision.keep, decision.reason

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
                self.metrics.control.error("cache_flush")
            self._sync_ruleset()
        self.problems.pop("apply", None)
        with self._lock:
            self.applied.update(batch.marks)
            self.applied_counts = self._applied_counts()
        if ops or "digest" in batch.marks:
            log.log(
                logging.INFO if "digest" in batch.marks else logging.DEBUG,
                "applied %d changes in %.1f ms (generation %d)",
                len(ops),
                (time.monotonic() - started) * 1000,
                self.generation,
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

    # ---- the ruleset ---------------------------------------------------------------------------

    def _managed_now(self) -> tuple[frozenset[str], frozenset[str]]:
        """The local pod IPs to divert, split by family; addresses nft cannot hold (the model
        rejects them; this is the last line) are left out and reported, so that one bad address
        cannot block every later sync."""
        v4: set[str] = set()
        v6: set[str] = set()
        bad = 0
        for ip in self.state.managed_ips(self.config.node):
            six = ":" in ip
            try:
                canonical_addresses([ip], socket.AF_INET6 if six else socket.AF_INET, "IPv6" if six else "IPv4")
            except ValueError as exc:
                bad += 1
                if "addresses" not in self.problems:
                    log.error("a local pod IP cannot be diverted and its pod is not enforced: %s", exc)
                continue
            (v6 if six else v4).add(ip)
        if bad:
            self.problems["addresses"] = f"{bad} local pod IP(s) cannot be put in nftables sets: their pods are not enforced (see the log)"
        else:
            self.problems.pop("addresses", None)
        return frozenset(v4), frozenset(v6)

    def _sync_ruleset(self, first: bool = False, retry: bool = False) -> None:
        """Bring the kernel's pod-IP sets in step with the engine. The first sync must succeed
        (AgentError); a later failure keeps the previous sets, makes /readyz fail and is retried."""
        v4, v6 = self._managed_now()
        if not (first or retry) and (v4, v6) == self._managed and "sync" not in self.problems:
            return
        assert self._ruleset is not None
        try:
            self._ruleset.sync(sorted(v4), sorted(v6))
        except (DataplaneError, ValueError) as exc:
            if first:
                raise AgentError(f"installing the nftables ruleset failed: {exc}") from None
            self._ruleset_failed("sync", "ruleset_sync", f"updating the ruleset failed, the previous one stays in force: {exc}")
            return
        self._managed = (v4, v6)
        if self.problems.pop("sync", None) is not None:
            log.info("ruleset updated again")
        self._sync_retry_at = math.inf
        self._ruleset_ok()

    def _ruleset_failed(self, topic: str, operation: str, message: str) -> None:
        delay = RETRY_S[min(self._failures, len(RETRY_S) - 1)]
        self._failures += 1
        log.error("%s (retrying in %.1f s)", message, delay)
        self.metrics.control.error(operation)
        self.metrics.control.in_sync = False
        self.problems[topic] = message.split(":", 1)[0]
        if topic == "sync":
            self._sync_retry_at = time.monotonic() + delay
        else:
            self._check_at = min(self._check_at, time.monotonic() + delay)

    def _ruleset_ok(self) -> None:
        if "sync" not in self.problems and "ruleset" not in self.problems:
            self._failures = 0
            self.metrics.control.in_sync = True

    def _maintain_ruleset(self) -> None:
        """Retry a failed sync; check the kernel when an event or the period says so."""
        if self._ruleset is None or not self.ready:
            return
        now = time.monotonic()
        if now >= self._sync_retry_at:
            self._sync_ruleset(retry=True)
        if now >= self._check_at or now >= self._backstop_at:
            self._reconcile()

    def _reconcile(self) -> None:
        """Compare the kernel's ruleset with what was installed; restore it if it differs."""
        assert self._ruleset is not None
        started = time.monotonic()
        self._check_at = math.inf
        self._backstop_at = started + CHECK_INTERVAL_S
        try:
            problems = self._ruleset.check()
        except DataplaneError as exc:
            self._ruleset_failed("ruleset", "ruleset_check", f"checking the ruleset failed: {exc}")
            return
        if not problems:
            self._restored_at = [t for t in self._restored_at if started - t < FIGHT_WINDOW_S]
            if len(self._restored_at) <= FIGHT_RESTORES and self.problems.pop("ruleset", None) is not None:
                log.info("the ruleset is in place again")
            self._ruleset_ok()
            return
        log.warning("the ruleset was changed by someone else (%s): installing it again", "; ".join(problems))
        try:
            self._ruleset.restore()
        except DataplaneError as exc:
            self._ruleset_failed("ruleset", "ruleset_restore", f"restoring the ruleset failed: {exc}")
            return
        self.metrics.control.restored()
        now = time.monotonic()
        self._restored_at = [t for t in self._restored_at if now - t < FIGHT_WINDOW_S] + [now]
        log.info("ruleset restored in %.0f ms", (now - started) * 1000)
        self._check_at = now + 1.0  # and make sure it stays
        if len(self._restored_at) > FIGHT_RESTORES:
            # Restoring goes on (at most once a second: the confirming check above), but
            # enforcement has gaps while someone keeps undoing it: not ready, and say why.
            message = f"the ruleset was changed by someone else {len(self._restored_at)} times in {FIGHT_WINDOW_S:.0f} s (another agent or firewall manager?)"
            if self.problems.get("ruleset") != message:
                log.error("%s", message)
            self.problems["ruleset"] = message
            self.metrics.control.in_sync = False
            return
        self.problems.pop("ruleset", None)
        self._ruleset_ok()

    def _applied_counts(self) -> dict[str, int]:
        """Objects of each kind in the applied state: a barrier for tools that delete objects
        (a deletion has no resourceVersion to wait for)."""
        counts: dict[str, int] = {}
        for kind, _, _ in self.objects:
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def status(self) -> dict[str, object]:
        """For /statusz: readiness, what is applied, and per source (each watched resource) its
        sync state, the resourceVersion seen and the one applied (in every worker).

        /statusz answers whoever reaches the metrics port. Unless status_details is set it
        leaves out what tells an outsider about the cluster: the diverted pod IPs (counts
        instead), error texts (API server addresses, RBAC names, file paths) and anything else
        not in the lists below; tools that wait on the agent need only these."""
        with self._lock:
            out: dict[str, object] = {
                "ready": self.is_ready(),
                "node": self.config.node,
                "mode": "standalone" if self.config.manifests else "kubernetes",
                "generation": self.generation,
                "digest": self.applied.get("digest", ""),
                "diverted": {"ipv4": len(self._managed[0]), "ipv6": len(self._managed[1])},
                "objects": len(self.objects),
                "appliedObjects": dict(self.applied_counts),
                "problems": dict(self.problems),
                "rulesetRestores": self.metrics.control.restores,
                "details": self.config.status_details,
            }
            if self.config.status_details:
                out["diverted_ipv4"] = sorted(self._managed[0])
                out["diverted_ipv6"] = sorted(self._managed[1])
            applied = dict(self.applied)
        sources = self.source.status() if self.source is not None else {}
        for name, st in sources.items():
            if isinstance(st, dict):
                if name in applied:
                    st["appliedResourceVersion"] = applied[name]
                if not self.config.status_details:
                    sources[name] = {k: v for k, v in st.items() if k in _PUBLIC_SOURCE_STATUS}
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

    def _wait_applied(self, generation: int) -> bool:
        """Until every live worker acknowledged `generation` (True). A worker that takes longer
        than APPLY_TIMEOUT_S is wedged: it is killed (and restarted with the full state by
        _check_workers), and False is returned."""
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        while any(w.applied < generation and w.process.is_alive() for w in self._workers):
            if time.monotonic() > deadline:
                for w in self._workers:
                    if w.applied < generation and w.process.is_alive():
                        log.error(
                            "worker for queue %d did not apply generation %d within %.0f s: restarting it", w.queue_num, generation, APPLY_TIMEOUT_S
                        )
                        self.metrics.control.error("worker_timeout")
                        w.process.kill()
                        w.process.join(1.0)
                return False
            self._pump(0.05)
        return True

    def _pump(self, timeout: float, with_source: bool = False) -> bool:
        """Read what workers sent (acknowledgements, metrics) and nf_tables notifications. With
        `with_source`, also wake up when the source has changes waiting, and say so."""
        self._heartbeat = time.monotonic()
        conns: list[Any] = [w.conn for w in self._workers]
        fd = self.source.fileno() if with_source and self.source is not None else None
        if fd is not None:
            conns.append(fd)
        monitor = self._monitor.fileno() if self._monitor is not None else None
        if monitor is not None:
            conns.append(monitor)
        if not conns:
            self._stop.wait(timeout)
            return False
        source_ready = False
        for ready in wait(conns, timeout):
            if isinstance(ready, int):
                if ready == monitor:
                    self._read_monitor()
                else:  # the source's descriptor
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

    def _read_monitor(self) -> None:
        assert self._monitor is not None
        try:
            changed = self._monitor.poll()
        except OSError as exc:
            log.error("nf_tables notifications failed (%s): the ruleset is checked every %.0f s only", exc, CHECK_INTERVAL_S)
            self._monitor.close()
            self._monitor = None
            return
        if changed:
            self._check_at = min(self._check_at, time.monotonic() + CHECK_DEBOUNCE_S)

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
                self.problems["workers"] = f"the worker for queue {w.queue_num} cannot be restarted"
                continue
            self._workers[i] = nw
            nw.conn.send(("batch", self.generation, diff({}, self.objects)))
            nw.conn.send(("ready",))
            if all(x.process.is_alive() for x in self._workers):
                self.problems.pop("workers", None)


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
