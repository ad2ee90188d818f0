"""The packet workers as the control process sees them: one process per queue, reached by the
messages of dataplane/protocol.py.

`WorkerPool` is all the control process needs (control/workers.py builds the generations, the
apply barrier and restarts on it); `ProcessPool` is the real one: forked processes and pipes.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, Protocol

from kube_network_policies.dataplane.protocol import Failed, FromWorker, Started, Stop, ToWorker
from kube_network_policies.dataplane.worker import WorkerConfig, worker_main
from kube_network_policies.errors import KnpError

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 10.0


class WorkerError(KnpError):
    """A worker could not be started (its queue cannot be bound); the message says why."""


class WorkerPool(Protocol):
    """One packet worker per queue number."""

    @property
    def queues(self) -> Sequence[int]:
        """The queue numbers, one worker each."""

    def start(self) -> None:
        """Start every worker (before the process starts any thread); raise WorkerError."""

    def waitables(self) -> list[Any]:
        """What becomes readable when a worker sent something (multiprocessing.connection.wait)."""

    def send(self, queue: int, msg: ToWorker) -> bool:
        """Send `msg` to the worker of `queue`; False when it is gone."""

    def receive(self) -> list[tuple[int, FromWorker]]:
        """Every message the workers sent since the last call, by queue, without waiting."""

    def alive(self, queue: int) -> bool: ...

    def exitcode(self, queue: int) -> int | None:
        """How the worker of `queue` ended (None while it runs)."""

    def kill(self, queue: int) -> None:
        """End the worker of `queue` at once (it is wedged)."""

    def restart(self, queue: int) -> None:
        """Replace the (dead) worker of `queue` by a new one, which holds no state; raise WorkerError."""

    def stop(self) -> None:
        """Ask every worker to exit and wait for them a little; end the rest."""


@dataclass(slots=True)
class _Process:
    process: multiprocessing.process.BaseProcess
    conn: Connection


class ProcessPool:
    """Forked worker processes (dataplane/worker.py), one pipe each.

    fork: the workers start in milliseconds and inherit the imported modules; start() must run
    before this process starts any thread.
    """

    def __init__(self, config: WorkerConfig, queues: Sequence[int]) -> None:
        self._config = config  # queue_num is set per worker
        self._queues = tuple(queues)
        self._workers: dict[int, _Process] = {}
        self._ctx = multiprocessing.get_context("fork")

    @property
    def queues(self) -> Sequence[int]:
        return self._queues

    def start(self) -> None:
        for q in self._queues:
            self._workers[q] = self._spawn(q)

    def _spawn(self, queue: int) -> _Process:
        parent, child = self._ctx.Pipe()
        # The child must not keep our ends of the pipes (its own and other workers'): if this
        # process dies without a shutdown, the worker has to see EOF and exit, unbinding its queue.
        inherited = [parent, *(w.conn for w in self._workers.values())]
        p = self._ctx.Process(
            target=_worker_entry, args=(child, replace(self._config, queue_num=queue), inherited), name=f"knp-queue-{queue}", daemon=True
        )
        p.start()
        child.close()
        if not parent.poll(WORKER_START_TIMEOUT_S):
            p.terminate()
            raise WorkerError(f"the worker for queue {queue} did not start")
        try:
            msg = parent.recv()
        except (EOFError, OSError):
            msg = Failed(f"queue {queue}: the worker exited")
        if not isinstance(msg, Started):
            p.join(1.0)
            why = msg.message if isinstance(msg, Failed) else f"queue {queue}"
            raise WorkerError(f"cannot bind NFQUEUE {why} (is another agent running, and are we root?)")
        return _Process(p, parent)

    def waitables(self) -> list[Any]:
        return [w.conn for w in self._workers.values()]

    def send(self, queue: int, msg: ToWorker) -> bool:
        try:
            self._workers[queue].conn.send(msg)
        except OSError as exc:
            log.error("worker for queue %d is gone: %s", queue, exc)
            return False
        return True

    def receive(self) -> list[tuple[int, FromWorker]]:
        out: list[tuple[int, FromWorker]] = []
        for q, w in self._workers.items():
            try:
                while w.conn.poll():
                    out.append((q, w.conn.recv()))
            except (EOFError, OSError):
                pass  # a dead worker: alive() says so
        return out

    def alive(self, queue: int) -> bool:
        return self._workers[queue].process.is_alive()

    def exitcode(self, queue: int) -> int | None:
        return self._workers[queue].process.exitcode

    def kill(self, queue: int) -> None:
        p = self._workers[queue].process
        p.kill()
        p.join(1.0)

    def restart(self, queue: int) -> None:
        old = self._workers[queue]
        new = self._spawn(queue)
        old.conn.close()
        self._workers[queue] = new

    def stop(self) -> None:
        for q in self._workers:
            try:
                self._workers[q].conn.send(Stop())
            except OSError:
                pass
        for w in self._workers.values():
            w.process.join(2.0)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(1.0)


def _worker_entry(conn: Connection, config: WorkerConfig, inherited: list[Connection]) -> None:
    """A forked worker's first step: close the control process's pipe ends it inherited."""
    for c in inherited:
        c.close()
    worker_main(conn, config)
