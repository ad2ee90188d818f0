"""What every source gives the agent: typed changes, in order, and whether it has synced.

A source (manifest files, the Kubernetes API) turns what it reads into `Change`s of typed model
objects. The agent drains them in batches (`take`), applies them to its engine and its workers,
and then records the batch's `marks` (a manifest digest, the resourceVersion of each watched
resource) as *applied*. It judges no packet before every source has `synced()`: before that it
could only see part of the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from kube_network_policies.errors import KnpError
from kube_network_policies.model import ApiObject

Key = tuple[str, str, str]  # (kind, namespace, name), as model.object_key


class Change(NamedTuple):
    """One object added (old is None), updated (both set) or deleted (new is None)."""

    key: Key
    old: ApiObject | None
    new: ApiObject | None

    @property
    def type(self) -> str:
        return "add" if self.old is None else "delete" if self.new is None else "update"


@dataclass(slots=True)
class Batch:
    changes: list[Change] = field(default_factory=list)
    marks: dict[str, str] = field(default_factory=dict)  # e.g. {"pods": "12345"} or {"digest": "ab12..."}


class SourceError(KnpError):
    """A problem the user must fix before the source can start (bad files, bad kubeconfig)."""


class Source(Protocol):
    def open(self) -> None:
        """Check what can be checked before the agent starts its workers; raise SourceError.
        Starts no thread (the agent forks its workers after this)."""

    def start(self) -> None:
        """Begin reading (threads may start here)."""

    def synced(self) -> bool:
        """True once everything that existed at start has been delivered through `take`."""

    def take(self) -> Batch | None:
        """The changes since the last call, oldest first; None when there are none."""

    def fileno(self) -> int | None:
        """A descriptor that becomes readable when changes are waiting (None: poll `take`)."""

    def status(self) -> dict[str, object]:
        """For /statusz."""

    def problems(self) -> dict[str, str]:
        """Why what this source delivered is not what it was given, by topic (a refused change,
        objects that cannot be read); {} when nothing. Each makes the agent not ready."""

    def stop(self) -> None:
        """Stop reading; idempotent."""
