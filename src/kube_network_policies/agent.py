"""The agent: wiring, lifecycle, readiness and signals.

The control process (this module) reads sources, validates objects, keeps its own ClusterState to
know which local pod IPs need the userspace path, and keeps the nftables ruleset in step. Packet
workers (dataplane/worker.py), one per queue, hold replicas of the engine fed over pipes in the
messages of dataplane/protocol.py. Its parts: control/workers.py (the workers as replicas: the
apply barrier, restarts with the full state) and control/keeper.py (the ruleset in the kernel).

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
- the ruleset is kept in the kernel (control/keeper.py): while the kernel does not hold what the
  agent installed, /readyz fails;
- on SIGTERM a fail-closed agent keeps its rules unless it is being uninstalled (shutdown()).
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from kube_network_policies.control.keeper import CHECK_INTERVAL_S, RulesetKeeper, RulesetLike, SyncFailed
from kube_network_policies.control.workers import Workers
from kube_network_policies.dataplane.monitor import MonitorError, NftMonitor
from kube_network_policies.dataplane.nfqueue import read_queue_stats
from kube_network_policies.dataplane.nftables import Backend, RulesetConfig
from kube_network_policies.dataplane.pool import ProcessPool, WorkerError, WorkerPool
from kube_network_policies.dataplane.protocol import Generation, Key, apply_ops, coalesce
from kube_network_policies.dataplane.ruleset import DataplaneError, Ruleset, detect_backend, recent_pids
from kube_network_policies.dataplane.worker import WorkerConfig
from kube_network_policies.endpoints import MetricsServer
from kube_network_policies.engine import ClusterState, Features
from kube_network_policies.errors import KnpError
from kube_network_policies.metrics import Metrics
from kube_network_policies.model import ApiObject
from kube_network_policies.sources.base import Batch, Source, SourceError
from kube_network_policies.sources.files import ManifestSource

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1
BATCH_WINDOW_S = 0.005  # after the first change arrives, wait this long for more: one batch
SYNC_LOG_INTERVAL_S = 15.0
STALL_READY_S = 15.0  # a control loop stuck this long: not ready (changes are not being applied)
STALL_LIVE_S = 60.0  # ... this long: not alive either, so that the kubelet restarts the agent
RULESET_ON_EXIT = ("auto", "keep", "remove")

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


class Agent:
    """The control process. The ruleset and the worker pool may be given (tests: a recording
    ruleset, in-process workers; a given ruleset is checked periodically, without nf_tables
    notifications); otherwise start() makes the real ones from the config."""

    def __init__(
        self,
        config: AgentConfig,
        source: Source | None = None,
        *,
        ruleset: RulesetLike | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
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
        self.keeper = RulesetKeeper(ruleset, self._wanted, self.metrics.control) if ruleset is not None else None
        self.workers = Workers(pool, self.metrics) if pool is not None else None
        self._backend: Backend | None = None
        self._stop = threading.Event()
        self._server: MetricsServer | None = None
        self._lock = threading.Lock()  # guards what /statusz reads
        # Why what is enforced is not what was given ("apply", "source:<topic>"); with the
        # keeper's and the workers' problems, any entry makes /readyz fail.
        self._problems: dict[str, str] = {}
        self._heartbeat = time.monotonic()  # the control loop's last turn
        self._api_config: Any = None  # Kubernetes mode: the API, asked on exit

    @property
    def problems(self) -> dict[str, str]:
        """Why enforcement is not what the agent believes, by topic; empty when it is."""
        out = dict(self._problems)
        if self.keeper is not None:
            out.update(self.keeper.problems)
        if self.workers is not None:
            out.update(self.workers.problems)
        return out

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics, /healthz, /readyz and /statusz are served on once start() bound it
        (with port 0 in the address: the one the kernel chose)."""
        return self._server.port if self._server is not None else None

    def _wanted(self) -> frozenset[str]:
        return self.state.managed_ips(self.config.node)

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
        judged_mark = 0
        if self.keeper is None:
            try:
                self._backend = cfg.backend or detect_backend()
            except DataplaneError as exc:
                raise AgentError(f"nftables is not usable here (are we root, with nft and iptables installed?): {exc}") from None
            try:
                ruleset_config = RulesetConfig(
                    backend=self._backend, queue_id=cfg.queue_id, queue_count=cfg.queue_count, fail_open=cfg.fail_open, accept_cache=cfg.accept_cache
                )
            except ValueError as exc:
                raise AgentError(str(exc)) from None
            self.keeper = RulesetKeeper(Ruleset(ruleset_config), self._wanted, self.metrics.control)
            # The workers mark what the engine accepted with the ruleset's judged bit: the accept
            # cache takes only those (dataplane/nftables.py).
            judged_mark = ruleset_config.judged_mark if ruleset_config.accept_cache else 0
        if self.workers is None:
            wc = WorkerConfig(queue_num=cfg.queue_id, node=cfg.node, features=cfg.features, fail_open=cfg.fail_open, judged_mark=judged_mark)
            self.workers = Workers(ProcessPool(wc, range(cfg.queue_id, cfg.queue_id + cfg.queue_count)), self.metrics)
        try:
            self.workers.start()  # fork now: no thread of ours exists yet
        except WorkerError as exc:
            raise AgentError(str(exc)) from None
        if self._backend is not None:
            try:
                self.keeper.monitor = NftMonitor(watch_xt=self._backend is Backend.XT_NFQUEUE, own=recent_pids)
            except MonitorError as exc:
                log.warning("no nf_tables notifications (%s): the ruleset is checked every %.0f s only", exc, CHECK_INTERVAL_S)
        self._server.start()  # /healthz answers from here on; /readyz only once ready
        self.source.start()
        started = time.monotonic()
        if not self._wait_synced():
            return  # stopped before every source synced: never ready
        batch = self.source.take() or Batch()
        ops = coalesce(self.objects, ((c.key, c.new) for c in batch.changes))
        apply_ops(self.state, ops, self.objects)
        self.generation = 1
        self.workers.publish(self.generation, ops)
        self.workers.judge()
        if not self.workers.wait_applied(self.generation, self._pump):
            raise AgentError(f"workers did not apply the initial state within {self.workers.apply_timeout:.0f} s")
        try:
            self.keeper.first_sync()
        except SyncFailed as exc:
            raise AgentError(str(exc)) from None
        with self._lock:
            self.applied.update(batch.marks)
            self.applied_counts = self._applied_counts()
        # The objects of the initial state live as long as the agent: keep the collector from
        # scanning them again and again.
        gc.collect()
        gc.freeze()
        self.ready = True
        managed = self.keeper.managed
        log.info(
            "ready: node %s, %d objects, synced in %.2f s, %d local pod IPs diverted, queue %d-%d (%s)",
            cfg.node,
            len(self.objects),
            time.monotonic() - started,
            len(managed[0]) + len(managed[1]),
            cfg.queue_id,
            cfg.queue_id + cfg.queue_count - 1,
            self._backend.value if self._backend is not None else "given ruleset",
        )

    def is_ready(self) -> bool:
        """/readyz: started, the kernel holds what the agent believes, changes are being applied."""
        if not self.ready or self._problems or time.monotonic() - self._heartbeat >= STALL_READY_S:
            return False
        return not (self.keeper is not None and self.keeper.problems) and not (self.workers is not None and self.workers.problems)

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
        assert self.source is not None and self.keeper is not None
        while not self._stop.is_set():
            due = self.keeper.due() - time.monotonic()
            if self._pump(max(0.0, min(POLL_INTERVAL_S, due)), with_source=True):
                self._stop.wait(BATCH_WINDOW_S)  # the first change of a burst: let the rest arrive
            if self._stop.is_set():
                break
            self.step()

    def step(self) -> None:
        """One turn of the control loop after waiting: changes, workers, the ruleset."""
        assert self.source is not None and self.workers is not None and self.keeper is not None
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
                self._problems["apply"] = f"a change could not be applied ({type(exc).__name__}); see the log"
        self._source_problems()
        self.workers.replace_dead(self._full_state)
        if self.ready:
            self.keeper.maintain()

    def _source_problems(self) -> None:
        """Refused changes and unreadable objects: what is enforced is not what was given."""
        assert self.source is not None
        try:
            found = self.source.problems()
        except Exception as exc:  # noqa: BLE001 - a status bug must not end enforcement
            found = {"source": f"{type(exc).__name__}"}
        for key in [k for k in self._problems if k.startswith("source:") and k[7:] not in found]:
            del self._problems[key]
        for topic, message in found.items():
            if self._problems.get(f"source:{topic}") != message:
                self.metrics.control.error("source")
            self._problems[f"source:{topic}"] = message

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Stop the source and the workers; keep or remove the ruleset (exit_decision)."""
        self.ready = False
        if self.source is not None:
            self.source.stop()
        if self.workers is not None:
            self.workers.stop()
        if self.keeper is not None:
            keep, why = self.exit_decision()
            log.info("%s the ruleset on exit: %s", "keeping" if keep else "removing", why)
            self.keeper.shutdown(keep=keep)
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
        """Apply a batch of changes here and in every worker, then, once every worker judges
        with the new state (the barrier), flush the accept cache and sync the ruleset."""
        assert self.workers is not None and self.keeper is not None
        started = time.monotonic()
        ops = coalesce(self.objects, ((c.key, c.new) for c in batch.changes))
        if ops:
            apply_ops(self.state, ops, self.objects)
            self.generation += 1
            self.workers.publish(self.generation, ops)
            # A wedged worker is killed after the timeout (and restarted with the full state by
            # the next turn): the others judge with the new state, which must not wait for it.
            self.workers.wait_applied(self.generation, self._pump)
            self.keeper.flush_cache()  # forget what the old state accepted
            self.keeper.sync()
        self._problems.pop("apply", None)
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

    def _full_state(self) -> Generation:
        """For a new worker: everything applied so far, as the current generation."""
        return Generation(self.generation, coalesce({}, self.objects.items()))

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
        managed = self.keeper.managed if self.keeper is not None else (frozenset(), frozenset())
        with self._lock:
            out: dict[str, object] = {
                "ready": self.is_ready(),
                "node": self.config.node,
                "mode": "standalone" if self.config.manifests else "kubernetes",
                "generation": self.generation,
                "digest": self.applied.get("digest", ""),
                "diverted": {"ipv4": len(managed[0]), "ipv6": len(managed[1])},
                "objects": len(self.objects),
                "appliedObjects": dict(self.applied_counts),
                "problems": self.problems,
                "rulesetRestores": self.metrics.control.restores,
                "details": self.config.status_details,
            }
            if self.config.status_details:
                out["diverted_ipv4"] = sorted(managed[0])
                out["diverted_ipv6"] = sorted(managed[1])
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

    # ---- waiting -------------------------------------------------------------------------------

    def _pump(self, timeout: float, with_source: bool = False) -> bool:
        """Wait up to `timeout` and read what workers sent (acknowledgements, metrics) and
        nf_tables notifications. With `with_source`, also wake up when the source has changes
        waiting, and say so."""
        self._heartbeat = time.monotonic()
        conns: list[Any] = self.workers.pool.waitables() if self.workers is not None else []
        fd = self.source.fileno() if with_source and self.source is not None else None
        if fd is not None:
            conns.append(fd)
        monitor = self.keeper.monitor_fd() if self.keeper is not None else None
        if monitor is not None:
            conns.append(monitor)
        source_ready = False
        if conns:
            for ready in wait(conns, timeout):
                if isinstance(ready, int):
                    if ready == monitor:
                        assert self.keeper is not None
                        self.keeper.read_monitor()
                    else:  # the source's descriptor
                        source_ready = True
        else:
            self._stop.wait(timeout)
        if self.workers is not None:
            self.workers.receive()
        return source_ready


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
