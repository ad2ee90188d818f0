"""The one protocol between the control process and the packet workers; both sides import it.

The control process turns a source's changes into `Ops` (`coalesce`), applies them to its own
engine replica and sends them to every worker in a `Generation`; each worker applies them to its
replica (`apply_ops`, the same function) and acknowledges the batch's generation (`Applied`).

control -> worker: Generation (a generation of changes), Ready (every source has synced: judge
packets from now on), Stop.
worker -> control: Started or Failed (once, after binding the queue), Applied (a generation is in
force in this worker), Stats (once a second: packet metrics and counts of packets not judged).

Messages are frozen, slotted dataclasses, dispatched on their class: a message of another type
cannot pass for one of these (a NamedTuple would compare equal to any tuple).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kube_network_policies.engine import ClusterState
from kube_network_policies.model import ApiObject, kinds, object_key

if TYPE_CHECKING:
    from kube_network_policies.dataplane.nfqueue import NfQueueCounters
    from kube_network_policies.metrics import PacketDelta

Key = tuple[str, str, str]  # (kind, namespace, name), as model.object_key


@dataclass(frozen=True, slots=True)
class Ops:
    """Changes to an engine replica: objects added or replaced (`puts`, in the registry's
    apply order: namespaces and nodes before the pods that need their labels, pods before the
    policies that select them), then the
    keys of objects deleted (`removes`). One entry per object at most."""

    puts: tuple[ApiObject, ...] = ()
    removes: tuple[Key, ...] = ()

    def __len__(self) -> int:
        return len(self.puts) + len(self.removes)


def coalesce(current: Mapping[Key, ApiObject], changes: Iterable[tuple[Key, ApiObject | None]]) -> Ops:
    """The Ops that bring a replica holding `current` to the state after `changes` (each a key
    and its new object, None for a deletion), oldest first: per object only the last change
    counts, and what `current` already holds is left out. The whole state of `objects` is
    coalesce({}, objects.items())."""
    final: dict[Key, ApiObject | None] = {}
    for key, new in changes:
        final[key] = new
    puts: list[tuple[Key, ApiObject]] = []
    removes: list[Key] = []
    for key, new in final.items():
        old = current.get(key)
        if new is None:
            if old is not None:
                removes.append(key)
        elif old is None or old != new:
            puts.append((key, new))
    puts.sort(key=lambda kv: kinds.apply_order(kv[0][0]))  # stable: arrival order within a kind
    return Ops(tuple(obj for _, obj in puts), tuple(removes))


def apply_ops(state: ClusterState, ops: Ops, objects: dict[Key, ApiObject] | None = None) -> None:
    """Apply `ops` to `state` in their order and, when given, keep `objects` (what the replica
    holds, by key) in step, one op at a time: if one fails, both hold what came before it."""
    apply, delete = state.apply, state.delete
    for obj in ops.puts:
        apply(obj)
        if objects is not None:
            objects[object_key(obj)] = obj
    for key in ops.removes:
        delete(key[0], key[1], key[2])
        if objects is not None:
            objects.pop(key, None)


# ---- control -> worker ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generation:
    """Apply `ops` and acknowledge `generation` (Applied)."""

    generation: int
    ops: Ops


@dataclass(frozen=True, slots=True)
class Ready:
    """Every source has synced and the state sent so far is complete: judge packets."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Exit (unbinding the queue)."""


# ---- worker -> control ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """The worker bound its queue."""

    queue_num: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The worker could not bind its queue and exits; the message says why."""

    message: str


@dataclass(frozen=True, slots=True)
class Applied:
    """Every Generation up to `generation` is in force in this worker."""

    generation: int


@dataclass(frozen=True, slots=True)
class Stats:
    """What the worker observed since its previous Stats."""

    queue_num: int
    packets: PacketDelta  # per-packet metrics (metrics.PacketMetrics.take_delta)
    errors: Mapping[str, int] = field(default_factory=dict)  # packets not judged, by reason
    counters: NfQueueCounters | None = None  # the queue's own counters (totals)


ToWorker = Generation | Ready | Stop
FromWorker = Started | Failed | Applied | Stats
