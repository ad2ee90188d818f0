"""Facts learned at run time that policies may depend on, handed to the engine.

The engine never fetches anything: whoever learns a fact (the agent, from a DNS answer it saw a
pod receive) gives it to `ClusterState.learn`, with the time on its own clock. Every fact belongs
to one pod, has an identity (`key`: a newer fact with the same key replaces the older one) and
an expiry on the caller's clock; the store never reads a clock itself, so tests and replays
drive time explicitly.

The first kind of fact is `ResolvedName`: "pod P resolved name N to addresses A, valid until T",
for ClusterNetworkPolicy `domainNames` peers. Nothing consults facts yet (such peers match
nothing, see README), so the packet path is untouched: rules that need facts will read them from
the store, and only such rules.

Bounds: a pod chooses what it resolves, so a pod can make the agent learn without end; at most
MAX_FACTS_PER_POD facts are kept per pod, and a new one evicts the one that expires first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MAX_FACTS_PER_POD = 1024

FactKey = tuple[str, str]  # (type of fact, its subject): ("dns", "db.example.com")


@dataclass(frozen=True, slots=True)
class Fact:
    """Something true about one pod until `expires` (seconds on the caller's clock)."""

    pod: str  # "namespace/name"
    expires: float

    @property
    def key(self) -> FactKey:
        raise NotImplementedError

    def valid(self, now: float) -> bool:
        return now < self.expires


@dataclass(frozen=True, slots=True)
class ResolvedName(Fact):
    """A DNS answer the pod received: `name` (lower case, no trailing dot) is at `addresses`
    (packed, 4 or 16 bytes)."""

    name: str
    addresses: frozenset[bytes]

    @property
    def key(self) -> FactKey:
        return ("dns", self.name)

    @classmethod
    def of(cls, pod: str, name: str, addresses: Iterable[str], expires: float) -> ResolvedName:
        """From text (tools and tests); ValueError for an address that is not one."""
        return cls(pod, expires, name.rstrip(".").lower(), frozenset(ipaddress.ip_address(a).packed for a in addresses))


@dataclass(frozen=True, slots=True)
class FactChange:
    """What changed for one pod: `old` replaced by `new`; None on either side for an addition
    or a removal (forgotten, expired, evicted, or the pod deleted)."""

    pod: str
    key: FactKey
    old: Fact | None
    new: Fact | None


FactListener = Callable[[FactChange], None]


class FactStore:
    """The facts of each pod, by key. Every method that depends on time takes `now`."""

    def __init__(self) -> None:
        self._by_pod: dict[str, dict[FactKey, Fact]] = {}
        self._listeners: list[FactListener] = []

    def add_listener(self, listener: FactListener) -> None:
        self._listeners.append(listener)

    def _tell(self, change: FactChange) -> None:
        for listener in self._listeners:
            listener(change)

    def learn(self, fact: Fact, now: float) -> bool:
        """Store (or replace) a fact; False when it is already expired or equal to the stored one."""
        if not fact.valid(now):
            return False
        facts = self._by_pod.setdefault(fact.pod, {})
        key = fact.key
        old = facts.get(key)
        if old == fact:
            return False
        if old is None and len(facts) >= MAX_FACTS_PER_POD:
            self.expire(now, pod=fact.pod)
            if len(facts) >= MAX_FACTS_PER_POD:
                victim = min(facts.values(), key=lambda f: f.expires)
                del facts[victim.key]
                self._tell(FactChange(fact.pod, victim.key, victim, None))
        facts[key] = fact
        self._tell(FactChange(fact.pod, key, old, fact))
        return True

    def forget(self, pod: str, key: FactKey | None = None) -> int:
        """Remove one fact of a pod, or all of them (key None); how many were removed."""
        facts = self._by_pod.get(pod)
        if not facts:
            return 0
        keys = [key] if key is not None else list(facts)
        removed = 0
        for k in keys:
            old = facts.pop(k, None)
            if old is not None:
                removed += 1
                self._tell(FactChange(pod, k, old, None))
        if not facts:
            del self._by_pod[pod]
        return removed

    def expire(self, now: float, pod: str | None = None) -> int:
        """Remove the facts no longer valid at `now` (of one pod, or of all); how many."""
        removed = 0
        for p in [pod] if pod is not None else list(self._by_pod):
            facts = self._by_pod.get(p)
            if not facts:
                continue
            for k in [k for k, f in facts.items() if not f.valid(now)]:
                old = facts.pop(k)
                removed += 1
                self._tell(FactChange(p, k, old, None))
            if not facts and pod is None:
                del self._by_pod[p]
        return removed

    def get(self, pod: str, key: FactKey, now: float) -> Fact | None:
        """The fact if it is valid at `now` (an expired one is not returned, even before expire())."""
        fact = self._by_pod.get(pod, {}).get(key)
        return fact if fact is not None and fact.valid(now) else None

    def of_pod(self, pod: str, now: float) -> tuple[Fact, ...]:
        return tuple(f for f in self._by_pod.get(pod, {}).values() if f.valid(now))

    def count(self) -> int:
        return sum(len(f) for f in self._by_pod.values())
