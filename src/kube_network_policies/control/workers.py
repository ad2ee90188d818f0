"""The packet workers as replicas of the control process's engine state.

Every change reaches every worker as one numbered Generation (a generation, dataplane/protocol.py).
The apply barrier: what depends on every worker judging with the new state (flushing the accept
cache, diverting newly selected pods) waits until each live worker acknowledged the generation
(wait_applied). A worker that does not within the timeout is wedged: it is killed, and like any
worker that died it is replaced by a new one that first gets the whole current state
(replace_dead), and the barrier gives way rather than holding enforcement back for the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kube_network_policies.dataplane.pool import WorkerError, WorkerPool
from kube_network_policies.dataplane.protocol import Applied, Generation, Ops, Ready, Stats, ToWorker
from kube_network_policies.metrics import Metrics

log = logging.getLogger(__name__)

APPLY_TIMEOUT_S = 30.0
PUMP_S = 0.05  # how long one wait of the barrier lasts before it looks again


class Workers:
    def __init__(self, pool: WorkerPool, metrics: Metrics, apply_timeout: float = APPLY_TIMEOUT_S) -> None:
        self.pool = pool
        self.metrics = metrics
        self.apply_timeout = apply_timeout
        self.applied: dict[int, int] = {q: 0 for q in pool.queues}  # generation acknowledged, by queue
        # Why the workers are not all there ("workers"); any entry makes /readyz fail.
        self.problems: dict[str, str] = {}
        self._judging = False  # Ready was sent: a replacement is told so too

    def start(self) -> None:
        """Start every worker; raise WorkerError."""
        self.pool.start()

    def publish(self, generation: int, ops: Ops) -> None:
        """Send a generation of changes to every worker."""
        self._send_all(Generation(generation, ops))

    def judge(self) -> None:
        """Tell every worker that the state it holds is complete: judge packets from now on."""
        self._judging = True
        self._send_all(Ready())

    def _send_all(self, msg: ToWorker) -> None:
        for q in self.pool.queues:
            self.pool.send(q, msg)

    def receive(self) -> None:
        """Take in what the workers sent: acknowledgements and packet metrics."""
        metrics = self.metrics
        for q, msg in self.pool.receive():
            if isinstance(msg, Applied):
                self.applied[q] = msg.generation
            elif isinstance(msg, Stats):
                metrics.packets.merge_delta(msg.packets)
                metrics.record_errors(msg.errors)

    def pending(self, generation: int) -> list[int]:
        """The queues whose live worker has not acknowledged `generation` yet."""
        return [q for q in self.pool.queues if self.applied[q] < generation and self.pool.alive(q)]

    def wait_applied(self, generation: int, pump: Callable[[float], object]) -> bool:
        """Until every live worker acknowledged `generation` (True), calling pump(seconds) to wait
        and read what arrives (it must call receive()). A worker that takes longer than the
        timeout is wedged: it is killed (replace_dead restarts it) and False is returned."""
        deadline = time.monotonic() + self.apply_timeout
        while pending := self.pending(generation):
            if time.monotonic() > deadline:
                for q in pending:
                    log.error("worker for queue %d did not apply generation %d within %.0f s: restarting it", q, generation, self.apply_timeout)
                    self.metrics.control.error("worker_timeout")
                    self.pool.kill(q)
                return False
            pump(PUMP_S)
        return True

    def replace_dead(self, full_state: Callable[[], Generation]) -> None:
        """Replace each worker that died by a new one and give it the whole current state
        (`full_state()`, made once however many died), then, once the others judge, Ready."""
        batch: Generation | None = None
        pool = self.pool
        for q in pool.queues:
            if pool.alive(q):
                continue
            log.error("worker for queue %d exited (code %s); restarting it", q, pool.exitcode(q))
            try:
                pool.restart(q)
            except WorkerError as exc:
                log.error("%s", exc)
                self.problems["workers"] = f"the worker for queue {q} cannot be restarted"
                continue
            self.applied[q] = 0
            if batch is None:
                batch = full_state()
            pool.send(q, batch)
            if self._judging:
                pool.send(q, Ready())
            if all(pool.alive(x) for x in pool.queues):
                self.problems.pop("workers", None)

    def stop(self) -> None:
        self.pool.stop()
