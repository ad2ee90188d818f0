"""Stand-ins for what the agent drives through its interfaces, for tests without root: a recording
ruleset (dataplane.ruleset.Ruleset's interface), a pool of in-process workers (each holding a real
ClusterState fed through the same dataplane.protocol.apply_ops as the real worker), and sources
that deliver what the test gives them. `events` (a list shared by the ruleset and the pool)
records the order in which things happened across them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from kube_network_policies.agent import Agent, AgentConfig
from kube_network_policies.dataplane.pool import WorkerError
from kube_network_policies.dataplane.protocol import Applied, FromWorker, Generation, Ready, Stop, ToWorker, apply_ops
from kube_network_policies.dataplane.ruleset import CommandError
from kube_network_policies.engine import ClusterState, Features
from kube_network_policies.model import object_key
from kube_network_policies.sources.base import Batch as SourceBatch
from kube_network_policies.sources.base import Change


class RecordingRuleset:
    """Ruleset's interface: records syncs; check() answers `problems`; failures on demand."""

    def __init__(self, events: list[str] | None = None) -> None:
        self.events = events if events is not None else []
        self.synced: list[tuple[list[str], list[str]]] = []
        self.fail_sync = False
        self.fail_restore = False
        self.problems: list[str] = []
        self.checks = 0
        self.restores = 0
        self.flushes = 0
        self.kept: bool | None = None  # shutdown(keep=...)

    def sync(self, v4: list[str], v6: list[str]) -> None:
        if self.fail_sync:
            raise CommandError(("nft", "-f", "-"), 1, "Error: Could not process rule: Device or resource busy")
        self.synced.append((list(v4), list(v6)))
        self.events.append("sync")

    def flush_cache(self) -> None:
        self.flushes += 1
        self.events.append("flush")

    def check(self) -> list[str]:
        self.checks += 1
        return list(self.problems)

    def restore(self) -> None:
        if self.fail_restore:
            raise CommandError(("nft", "-f", "-"), 1, "Error: out of memory")
        self.restores += 1
        self.problems = []

    def shutdown(self, *, keep: bool) -> None:
        self.kept = keep


@dataclass
class FakeWorker:
    """One worker process, in-process: what it was sent, and its replica of the engine."""

    features: Features
    state: ClusterState = field(init=False)
    received: list[ToWorker] = field(default_factory=list)
    judging: bool = False  # got Ready
    alive: bool = True
    exitcode: int | None = None
    # How it acknowledges a Generation: "prompt", "late" (after `late_pumps` receive() calls) or
    # "never" (wedged).
    acks: str = "prompt"
    late_pumps: int = 3

    def __post_init__(self) -> None:
        self.state = ClusterState(self.features)

    def batches(self) -> list[Generation]:
        return [m for m in self.received if isinstance(m, Generation)]


class FakePool:
    """WorkerPool with FakeWorkers. Every worker ever started stays in `started[queue]`."""

    def __init__(
        self, queues: Sequence[int] = (100,), events: list[str] | None = None, features: Features | None = None, acks: str = "prompt"
    ) -> None:
        self._queues = tuple(queues)
        self.acks = acks  # how new workers acknowledge (FakeWorker.acks)
        self.events = events if events is not None else []
        self.features = features or Features()
        self.workers: dict[int, FakeWorker] = {}
        self.started: dict[int, list[FakeWorker]] = {q: [] for q in self._queues}
        self.fail_restart = False
        self._held: list[tuple[int, int, FromWorker]] = []  # (queue, receive() calls to wait, message)
        self._outbox: list[tuple[int, FromWorker]] = []

    @property
    def queues(self) -> Sequence[int]:
        return self._queues

    def _new(self, q: int) -> None:
        w = FakeWorker(self.features, acks=self.acks)
        self.workers[q] = w
        self.started[q].append(w)

    def start(self) -> None:
        for q in self._queues:
            self._new(q)

    def waitables(self) -> list[Any]:
        return []

    def send(self, queue: int, msg: ToWorker) -> bool:
        w = self.workers[queue]
        if not w.alive:
            return False
        w.received.append(msg)
        if isinstance(msg, Generation):
            apply_ops(w.state, msg.ops)
            if w.acks == "prompt":
                self._outbox.append((queue, Applied(msg.generation)))
            elif w.acks == "late":
                self._held.append((queue, w.late_pumps, Applied(msg.generation)))
        elif isinstance(msg, Ready):
            w.judging = True
        elif isinstance(msg, Stop):
            w.alive, w.exitcode = False, 0
        return True

    def receive(self) -> list[tuple[int, FromWorker]]:
        held = []
        for q, wait, msg in self._held:
            if wait <= 1:
                self._outbox.append((q, msg))
            else:
                held.append((q, wait - 1, msg))
        self._held = held
        out, self._outbox = self._outbox, []
        for q, msg in out:
            if isinstance(msg, Applied) and self.workers[q].alive:
                self.events.append(f"applied {q} {msg.generation}")
        return [(q, m) for q, m in out if self.workers[q].alive]

    def alive(self, queue: int) -> bool:
        return self.workers[queue].alive

    def exitcode(self, queue: int) -> int | None:
        return self.workers[queue].exitcode

    def kill(self, queue: int) -> None:
        self.workers[queue].alive, self.workers[queue].exitcode = False, -9
        self.events.append(f"kill {queue}")

    def die(self, queue: int) -> None:
        """The worker crashes (as a bug or the OOM killer would end it)."""
        self.workers[queue].alive, self.workers[queue].exitcode = False, 1

    def restart(self, queue: int) -> None:
        if self.fail_restart:
            raise WorkerError(f"cannot bind NFQUEUE queue {queue}: [Errno 16] Device or resource busy")
        self._new(queue)
        self.events.append(f"restart {queue}")

    def stop(self) -> None:
        for q in self._queues:
            self.send(q, Stop())


class ListSource:
    """A source that delivers the batches the test pushes; synced once `synced_after` calls of
    synced() said no (each such call first runs `while_syncing`, when given)."""

    name = "list"

    def __init__(self, *batches: SourceBatch, synced_after: int = 0) -> None:
        self.batches = list(batches)
        self.synced_after = synced_after
        self.while_syncing: Any = None
        self.found: dict[str, str] = {}

    def open(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...

    def synced(self) -> bool:
        if self.synced_after > 0:
            self.synced_after -= 1
            if self.while_syncing is not None:
                self.while_syncing()
            return False
        return True

    def push(self, *objs: Any, deleted: Sequence[tuple[str, str, str]] = ()) -> None:
        self.batches.append(changes(*objs, deleted=deleted))

    def take(self) -> SourceBatch | None:
        if not self.batches:
            return None
        out = SourceBatch()
        for b in self.batches:
            out.changes.extend(b.changes)
            out.marks.update(b.marks)
        self.batches = []
        return out

    def fileno(self) -> int | None:
        return None

    def status(self) -> dict[str, object]:
        return {}

    def problems(self) -> dict[str, str]:
        return dict(self.found)


def changes(*objs: Any, deleted: Sequence[tuple[str, str, str]] = ()) -> SourceBatch:
    """A source batch that adds or updates `objs` and deletes the keys `deleted`, in this order."""
    return SourceBatch([Change(object_key(o), None, o) for o in objs] + [Change(k, None, None) for k in deleted])


def make_agent(
    source: Any = None, *, pool: FakePool | None = None, ruleset: RecordingRuleset | None = None, **config: Any
) -> tuple[Agent, RecordingRuleset, FakePool]:
    """An agent (not started) on a recording ruleset and fake workers, serving on a free port of
    127.0.0.1. Standalone mode unless manifests=() is given."""
    rs = ruleset or RecordingRuleset()
    pool = pool or FakePool(events=rs.events)
    config.setdefault("manifests", ("unused",))
    config.setdefault("metrics_bind_address", "127.0.0.1:0")
    agent = Agent(AgentConfig(node="n1", **config), source=source if source is not None else ListSource(), ruleset=rs, pool=pool)
    return agent, rs, pool


@pytest.fixture
def start() -> Iterator[Callable[[Agent], Agent]]:
    """start(agent): agent.start(), and its shutdown() at the end of the test (its HTTP server)."""
    started: list[Agent] = []

    def go(agent: Agent) -> Agent:
        started.append(agent)
        agent.start()
        return agent

    yield go
    for agent in started:
        agent.shutdown()
