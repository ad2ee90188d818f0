"""The ruleset kept in the kernel, and the truth about it (README "Hardening").

- sync(): the kernel's pod-IP sets follow the engine; a failed sync keeps the previous sets, makes
  /readyz fail (problems) and is retried with backoff;
- flush_cache(): after the workers judge with a new state, the accept cache forgets what the old
  state accepted;
- the kernel's ruleset is checked when nf_tables notifications say someone else changed it (after
  a short debounce) and periodically without them; a difference is restored in one transaction
  (ruleset_restores_total); while the kernel does not hold what was installed, or while someone
  keeps undoing it, /readyz fails.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from kube_network_policies.dataplane.monitor import NftMonitor
from kube_network_policies.dataplane.nftables import canonical_addresses
from kube_network_policies.dataplane.ruleset import DataplaneError
from kube_network_policies.errors import KnpError
from kube_network_policies.metrics import ControlCounters

log = logging.getLogger(__name__)

CHECK_DEBOUNCE_S = 0.02  # after a foreign nf_tables change: let a multi-command edit settle first
CHECK_INTERVAL_S = 5.0  # the periodic check (the backstop of the events)
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # a failed sync, check or restore is retried after these
# More restores than this within FIGHT_WINDOW_S: something keeps changing the ruleset (another
# agent, a firewall manager that owns the whole ruleset). Enforcement flickers: say so.
FIGHT_RESTORES = 5
FIGHT_WINDOW_S = 60.0

Managed = tuple[frozenset[str], frozenset[str]]  # diverted pod IPs: IPv4, IPv6


class RulesetLike(Protocol):
    """What the keeper needs of dataplane.ruleset.Ruleset; every call may raise DataplaneError."""

    def sync(self, v4: list[str], v6: list[str]) -> None: ...
    def flush_cache(self) -> None: ...
    def check(self) -> list[str]: ...
    def restore(self) -> None: ...
    def shutdown(self, *, keep: bool) -> None: ...


class SyncFailed(KnpError):
    """The first sync failed: the ruleset could not be installed (the message says why)."""


class RulesetKeeper:
    def __init__(
        self, ruleset: RulesetLike, wanted: Callable[[], Iterable[str]], control: ControlCounters, monitor: NftMonitor | None = None
    ) -> None:
        self.ruleset = ruleset
        self._wanted = wanted  # the local pod IPs to divert now
        self.control = control
        self.monitor = monitor
        self.managed: Managed = (frozenset(), frozenset())  # what the kernel's sets hold
        # Why the kernel does not hold what the agent believes, by topic ("sync", "ruleset",
        # "addresses"); empty when it does.
        self.problems: dict[str, str] = {}
        self.retry_at = math.inf  # a failed sync is retried then
        self.check_at = math.inf  # a check of the kernel's ruleset is due then (events)
        self.backstop_at = math.inf  # ... and then at the latest (periodic)
        self.running = False  # past the first sync: retries and checks are on
        self.restored_at: list[float] = []  # monotonic times of the recent restores
        self._failures = 0  # consecutive failed syncs/checks/restores: picks the retry delay

    def due(self) -> float:
        """When maintain() has something to do next (monotonic time; inf: nothing planned)."""
        return min(self.check_at, self.retry_at) if self.running else math.inf

    def _managed_now(self) -> Managed:
        """The local pod IPs to divert, split by family; addresses nft cannot hold (the model
        rejects them; this is the last line) are left out and reported, so that one bad address
        cannot block every later sync."""
        v4: set[str] = set()
        v6: set[str] = set()
        bad = 0
        for ip in self._wanted():
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

    def first_sync(self) -> None:
        """Install the ruleset with the sets of now: it must succeed (SyncFailed). From here on
        failures are retried and the kernel is checked."""
        self.sync(first=True)
        self.running = True
        self.backstop_at = time.monotonic() + CHECK_INTERVAL_S
        self.control.in_sync = True

    def sync(self, first: bool = False, retry: bool = False) -> None:
        """Bring the kernel's pod-IP sets in step with the engine. A failure after the first
        keeps the previous sets, makes /readyz fail and is retried."""
        v4, v6 = self._managed_now()
        if not (first or retry) and (v4, v6) == self.managed and "sync" not in self.problems:
            return
        try:
            self.ruleset.sync(sorted(v4), sorted(v6))
        except (DataplaneError, ValueError) as exc:
            if first:
                raise SyncFailed(f"installing the nftables ruleset failed: {exc}") from None
            self._failed("sync", "ruleset_sync", f"updating the ruleset failed, the previous one stays in force: {exc}")
            return
        self.managed = (v4, v6)
        if self.problems.pop("sync", None) is not None:
            log.info("ruleset updated again")
        self.retry_at = math.inf
        self._ok()

    def flush_cache(self) -> None:
        """Forget what the accept cache learnt (every worker judges with a new state now)."""
        try:
            self.ruleset.flush_cache()
        except DataplaneError as exc:
            log.error("flushing the accept cache failed (its entries expire within their timeout): %s", exc)
            self.control.error("cache_flush")

    def _failed(self, topic: str, operation: str, message: str) -> None:
        delay = RETRY_S[min(self._failures, len(RETRY_S) - 1)]
        self._failures += 1
        log.error("%s (retrying in %.1f s)", message, delay)
        self.control.error(operation)
        self.control.in_sync = False
        self.problems[topic] = message.split(":", 1)[0]
        if topic == "sync":
            self.retry_at = time.monotonic() + delay
        else:
            self.check_at = min(self.check_at, time.monotonic() + delay)

    def _ok(self) -> None:
        if "sync" not in self.problems and "ruleset" not in self.problems:
            self._failures = 0
            self.control.in_sync = True

    # ---- the kernel's copy ---------------------------------------------------------------------

    def monitor_fd(self) -> int | None:
        return self.monitor.fileno() if self.monitor is not None else None

    def read_monitor(self) -> None:
        """Read nf_tables notifications (monitor_fd() is readable): someone else's change makes a
        check due shortly."""
        assert self.monitor is not None
        try:
            changed = self.monitor.poll()
        except OSError as exc:
            log.error("nf_tables notifications failed (%s): the ruleset is checked every %.0f s only", exc, CHECK_INTERVAL_S)
            self.monitor.close()
            self.monitor = None
            return
        if changed:
            self.check_at = min(self.check_at, time.monotonic() + CHECK_DEBOUNCE_S)

    def maintain(self) -> None:
        """Retry a failed sync; check the kernel when an event or the period says so."""
        if not self.running:
            return
        now = time.monotonic()
        if now >= self.retry_at:
            self.sync(retry=True)
        if now >= self.check_at or now >= self.backstop_at:
            self._reconcile()

    def _reconcile(self) -> None:
        """Compare the kernel's ruleset with what was installed; restore it if it differs."""
        started = time.monotonic()
        self.check_at = math.inf
        self.backstop_at = started + CHECK_INTERVAL_S
        try:
            found = self.ruleset.check()
        except DataplaneError as exc:
            self._failed("ruleset", "ruleset_check", f"checking the ruleset failed: {exc}")
            return
        if not found:
            self.restored_at = [t for t in self.restored_at if started - t < FIGHT_WINDOW_S]
            if len(self.restored_at) <= FIGHT_RESTORES and self.problems.pop("ruleset", None) is not None:
                log.info("the ruleset is in place again")
            self._ok()
            return
        log.warning("the ruleset was changed by someone else (%s): installing it again", "; ".join(found))
        try:
            self.ruleset.restore()
        except DataplaneError as exc:
            self._failed("ruleset", "ruleset_restore", f"restoring the ruleset failed: {exc}")
            return
        self.control.restored()
        now = time.monotonic()
        self.restored_at = [t for t in self.restored_at if now - t < FIGHT_WINDOW_S] + [now]
        log.info("ruleset restored in %.0f ms", (now - started) * 1000)
        self.check_at = now + 1.0  # and make sure it stays
        if len(self.restored_at) > FIGHT_RESTORES:
            # Restoring goes on (at most once a second: the confirming check above), but
            # enforcement has gaps while someone keeps undoing it: not ready, and say why.
            message = f"the ruleset was changed by someone else {len(self.restored_at)} times in {FIGHT_WINDOW_S:.0f} s (another agent or firewall manager?)"
            if self.problems.get("ruleset") != message:
                log.error("%s", message)
            self.problems["ruleset"] = message
            self.control.in_sync = False
            return
        self.problems.pop("ruleset", None)
        self._ok()

    def shutdown(self, keep: bool) -> None:
        """Stop watching; keep the ruleset in the kernel or remove it."""
        self.running = False
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        try:
            self.ruleset.shutdown(keep=keep)
        except DataplaneError as exc:
            log.error("removing the ruleset failed: %s", exc)
