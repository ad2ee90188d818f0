"""Applying the ruleset of :mod:`.nftables` to the kernel, and keeping it there.

Every :meth:`Ruleset.sync` is one ``nft -f -`` run, i.e. one atomic kernel transaction that
re-declares table, sets and base chains with the idempotent ``add``, then ``flush chain`` +
re-adds the rules and ``flush set`` + re-adds the elements. It never deletes the table or a
base chain: unregistering a hook makes the kernel drop every packet waiting in every queue of
the network namespace. (One exception, on the first sync only: a chain left by a previous
agent with a different hook or priority cannot be changed in place and is replaced.)
"""

from __future__ import annotations

import json
import logging
import shlex
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kube_network_policies.dataplane.nftables import (
    PRIO_MANGLE,
    SET_V4,
    SET_V6,
    TABLE,
    Address,
    Backend,
    RulesetConfig,
    XtRule,
    base_chains,
    canonical_addresses,
    flush_cache_commands,
    render,
    xt_rules,
)
from kube_network_policies.errors import KnpError

__all__ = [
    "CommandError",
    "CommandResult",
    "DataplaneError",
    "Ruleset",
    "Runner",
    "cleanup",
    "detect_backend",
    "recent_pids",
    "run_checked",
    "run_command",
]

log = logging.getLogger(__name__)

# Per nft run; a 100k-element sync takes a few seconds, so this only catches a wedged nft.
COMMAND_TIMEOUT_S = 120.0
XT_RECHECK_S = 10.0  # how often a sync re-verifies the iptables queue rules


# --- running commands -----------------------------------------------------------------------


class DataplaneError(KnpError, RuntimeError):
    """Base of the errors this module raises (besides ValueError for bad input)."""


class CommandError(DataplaneError):
    """A command failed; the message names the command and quotes its stderr (trimmed)."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"`{shlex.join(self.argv)}` failed (exit {returncode}): {_trim(stderr)}")


def _trim(text: str, max_lines: int = 12, max_line: int = 240) -> str:
    # nft echoes the offending input line, which may hold thousands of set elements.
    lines = [ln if len(ln) <= max_line else ln[:max_line] + "..." for ln in text.strip().splitlines()]
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines)"]
    return "\n".join(lines) or "(no error output)"


@dataclass(frozen=True, slots=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str], str | None], CommandResult]
"""Runs argv with optional stdin text and returns its result (raises CommandError only if it
cannot run at all). Injectable so tests can record commands without root."""


# Process ids of the commands run_command started lately. nf_tables reports every change with the
# netlink port id of the process that made it, which for nft and iptables is their pid: the
# monitor (dataplane/monitor.py) tells our own transactions from everyone else's with this.
_recent_pids: deque[int] = deque(maxlen=256)
_recent_lock = threading.Lock()


def recent_pids() -> frozenset[int]:
    """Pids of the last commands run by :func:`run_command` (this process, any thread)."""
    with _recent_lock:
        return frozenset(_recent_pids)


def run_command(argv: Sequence[str], stdin: str | None = None) -> CommandResult:
    """The default Runner: subprocess, no shell, captured text output, bounded time."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except FileNotFoundError:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    except PermissionError as e:
        raise CommandError(argv, 126, str(e)) from None
    with _recent_lock:
        _recent_pids.append(proc.pid)
    try:
        out, err = proc.communicate(stdin, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CommandError(argv, -1, f"timed out after {COMMAND_TIMEOUT_S:.0f}s") from None
    return CommandResult(proc.returncode, out, err)


def _prefix(netns: str | None) -> tuple[str, ...]:
    return ("ip", "netns", "exec", netns) if netns else ()


def run_checked(runner: Runner, argv: Sequence[str], stdin: str | None = None) -> CommandResult:
    result = runner(argv, stdin)
    if result.returncode != 0:
        raise CommandError(argv, result.returncode, result.stderr)
    return result


# --- backend detection ----------------------------------------------------------------------

_PROBE_TABLE = "kube-network-policies-probe"


def _probe_script(statement: str) -> str:
    # A regular (hook-less) chain: the kernel resolves the expression type (this is where a
    # missing nft_queue fails) without registering any hook, so probing cannot disturb queued
    # packets; check mode (-c) then aborts the transaction.
    t = f"inet {_PROBE_TABLE}"
    return f"add table {t}\nadd chain {t} probe\nadd rule {t} probe {statement}\n"


def detect_backend(*, runner: Runner = run_command, netns: str | None = None) -> Backend:
    """NFT_QUEUE if the kernel accepts an nft ``queue`` rule, else XT_NFQUEUE.

    Probes with ``nft -c`` (check mode), which sends the batch to the kernel and aborts it:
    kernel-side expression validation runs, nothing is committed (verified with nft 1.0.6:
    the queue probe fails with the kernel's ENOENT where nft_queue is missing). A control probe with a plain ``counter`` tells "no nft_queue" from "nft unusable" (not
    root, no nf_tables): the latter raises CommandError instead of guessing.
    """
    nft = (*_prefix(netns), "nft", "-c", "-f", "-")
    if runner(nft, _probe_script("queue num 0 bypass")).returncode == 0:
        return Backend.NFT_QUEUE
    run_checked(runner, nft, _probe_script("counter"))
    for binary in ("iptables", "ip6tables"):
        run_checked(runner, (*_prefix(netns), binary, "--version"))
    log.info("kernel lacks the nft queue expression: using iptables NFQUEUE for queueing")
    return Backend.XT_NFQUEUE


# --- the ruleset ----------------------------------------------------------------------------


@dataclass(slots=True)
class _State:
    synced: bool = False  # a sync succeeded: stale chains were reconciled
    closed: bool = False  # shutdown() or remove() ran: syncs are ignored
    xt_ok: set[XtRule] = field(default_factory=set)  # verified to be the only rule of ours
    xt_before: bool = False  # the table had the xt-nfqueue layout when we started
    xt_checked_at: float = 0.0  # monotonic time of the last -C check of the iptables rules
    # What the kernel should hold, for check(): the pod IPs last synced (canonical) and the
    # table's structure (chains, rules, set definitions) as read back after our first sync.
    desired: tuple[frozenset[str], frozenset[str]] | None = None
    structure: list[dict[str, object]] | None = None


class Ruleset:
    """The agent's nftables (and, for xt-nfqueue, iptables) state on one node.

    ``netns``: run every command inside that network namespace (``ip netns exec``); for
    tests and the lab. Thread-safe: sync and shutdown serialize on a lock.
    """

    def __init__(self, config: RulesetConfig, *, runner: Runner = run_command, netns: str | None = None) -> None:
        self._config = config
        self._runner = runner
        self._prefix = _prefix(netns)
        self._lock = threading.Lock()
        self._state = _State()

    @property
    def config(self) -> RulesetConfig:
        return self._config

    def sync(self, v4: Iterable[Address], v6: Iterable[Address]) -> None:
        """Make the kernel divert new connections of exactly these pod IPs.

        One atomic nft transaction. ValueError for bad addresses (nothing applied),
        CommandError if nft or iptables refuse. After :meth:`shutdown` this does nothing, so a
        late sync cannot re-install rules a fail-closed shutdown removed.
        """
        v4, v6 = list(v4), list(v6)
        text = render(self._config, v4, v6)  # validates: ValueError before anything is applied
        desired = (
            frozenset(canonical_addresses(v4, socket.AF_INET, "IPv4")),
            frozenset(canonical_addresses(v6, socket.AF_INET6, "IPv6")),
        )
        with self._lock:
            if self._state.closed:
                log.debug("ruleset sync after shutdown ignored")
                return
            first = not self._state.synced
            stale, xt_before = self._stale_chain_commands() if first else ("", False)
            run_checked(self._runner, (*self._prefix, "nft", "-f", "-"), stale + text)
            self._state.xt_before |= xt_before
            if first and xt_before and self._config.backend is not Backend.XT_NFQUEUE:
                # An xt-nfqueue agent ran before (its unmark chains were there): drop its
                # iptables rules. Only then, so nft-queue nodes never need iptables.
                self._remove_xt(tolerate_missing_iptables=True)
            self._state.synced = True
            self._state.desired = desired
            if first:
                self._state.structure = self._read_structure()
            # After nft: a queue rule without marking chains would just be idle, never wrong.
            self._ensure_xt()

    def flush_cache(self) -> None:
        """Forget every accepted tuple (both families, one transaction): call after every change
        of the engine's state, once every worker has applied it, so that no tuple accepted under
        the old state skips userspace any longer. Does nothing without the accept cache, before
        the first sync (the sets do not exist yet; the sync creates them empty) and after
        shutdown. CommandError if nft refuses (the entries then still expire within
        ACCEPT_CACHE_TIMEOUT_S).
        """
        commands = flush_cache_commands(self._config)
        if not commands:
            return
        with self._lock:
            if self._state.closed or not self._state.synced:
                return
            run_checked(self._runner, (*self._prefix, "nft", "-f", "-"), "".join(c + "\n" for c in commands))

    def shutdown(self, *, keep: bool) -> None:
        """Stop managing the ruleset and keep it (`keep`) or remove it. Later syncs do nothing.

        Keeping is right for fail-open (the queue rules carry ``bypass`` / ``--queue-bypass``:
        with no agent listening the kernel accepts diverted packets, and the next agent takes
        over with a plain sync, without re-registering a hook, which would drop queued packets)
        and for a fail-closed agent that restarts (new connections of policy-selected pods wait
        or drop until the next agent is ready: nothing passes unjudged). Removing is right when
        the agent is uninstalled: a fail-closed ruleset with no agent would blackhole every new
        connection of every policy-selected pod on the node for good. The agent decides which
        (agent.py, README "Restarts and uninstall").
        """
        with self._lock:
            if self._state.closed:
                return
            self._state.closed = True
            if keep:
                log.info(
                    "keeping the ruleset for the next agent (%s)",
                    "bypass: packets flow meanwhile" if self._config.fail_open else "fail-closed: new connections of selected pods wait for it",
                )
                return
            log.info("removing the ruleset")
            xt = self._config.backend is Backend.XT_NFQUEUE or self._state.xt_before
            self._remove(sweep_xt=xt)

    def check(self) -> list[str]:
        """What differs between the kernel and what this ruleset installed, one line per problem
        ([] when nothing does, before the first sync and after shutdown).

        Compared: the table's structure (base chains with hook, priority and policy; every rule;
        set definitions) with what was read back after the first sync, the pod-IP sets with the
        addresses last synced, and for xt-nfqueue our iptables rules (present, alone, first in
        their chain: an earlier ACCEPT in mangle would skip them). The accept-cache sets' elements
        are not compared: the kernel changes them all the time. Costs 3 nft runs (+ 8 iptables
        runs for xt-nfqueue); raises CommandError when nft itself fails.
        """
        with self._lock:
            if self._state.closed or not self._state.synced or self._state.desired is None:
                return []
            problems: list[str] = []
            structure = self._read_structure()
            if structure is None:
                problems.append(f"table inet {TABLE} is missing")
            else:
                problems += _structure_problems(self._state.structure or [], structure)
                have_sets = {body.get("name") for i in structure for kind, body in i.items() if kind == "set" and isinstance(body, dict)}
                for name, want in ((SET_V4, self._state.desired[0]), (SET_V6, self._state.desired[1])):
                    if name in have_sets:
                        problems += _element_problems(name, want, self._read_elements(name))
            problems += self._xt_problems()
            return problems

    def restore(self) -> None:
        """Install the whole ruleset again for the addresses last synced: one nft transaction that
        re-creates whatever is missing and replaces chains left with another hook or priority,
        then our iptables rules, first in their chains again. Nothing before the first sync or
        after shutdown. CommandError if nft or iptables refuse.
        """
        with self._lock:
            if self._state.closed or not self._state.synced or self._state.desired is None:
                return
            v4, v6 = (sorted(d) for d in self._state.desired)
            stale, _ = self._stale_chain_commands()
            run_checked(self._runner, (*self._prefix, "nft", "-f", "-"), stale + render(self._config, v4, v6))
            self._state.structure = self._read_structure()
            self._ensure_xt(force=True)

    def remove(self) -> None:
        """Remove the table and our iptables rules whatever the fail-open setting (uninstall)."""
        with self._lock:
            self._state.closed = True
            self._remove(sweep_xt=True)

    # -- internals --

    def _read_structure(self) -> list[dict[str, object]] | None:
        """The table as nft lists it without set elements (-t), handles dropped (they change on
        every sync), in nft's order; None when the table does not exist."""
        argv = (*self._prefix, "nft", "-j", "-t", "list", "table", "inet", TABLE)
        result = self._runner(argv, None)
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                return None
            raise CommandError(argv, result.returncode, result.stderr)
        out: list[dict[str, object]] = []
        for item in _nft_items(argv, result.stdout):
            for kind, body in item.items():
                if kind != "metainfo" and isinstance(body, dict):
                    out.append({kind: {k: v for k, v in body.items() if k not in ("handle", "elem")}})
        return out

    def _read_elements(self, name: str) -> list[object]:
        argv = (*self._prefix, "nft", "-j", "list", "set", "inet", TABLE, name)
        result = run_checked(self._runner, argv)
        for item in _nft_items(argv, result.stdout):
            body = item.get("set")
            if isinstance(body, dict):
                elems = body.get("elem", [])
                return list(elems) if isinstance(elems, list) else [elems]
        return []

    def _remove(self, *, sweep_xt: bool) -> None:
        """Delete the table and our iptables rules; tries both, then raises the first error."""
        errors: list[CommandError] = []
        try:
            # `add` first makes the delete succeed when the table is already gone (one transaction).
            script = f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
            run_checked(self._runner, (*self._prefix, "nft", "-f", "-"), script)
        except CommandError as e:
            errors.append(e)
        try:
            if sweep_xt:
                self._remove_xt(tolerate_missing_iptables=self._config.backend is not Backend.XT_NFQUEUE)
        except CommandError as e:
            errors.append(e)
        if errors:
            raise errors[0]

    def _stale_chain_commands(self) -> tuple[str, bool]:
        """Commands replacing chains a previous agent left with another hook or priority, and
        whether that agent used the xt-nfqueue layout.

        A base chain's hook and priority cannot be changed in place (``add chain`` fails), so
        after an upgrade or a backend switch with rules kept (fail-open) the chain must be
        replaced. Runs before the first sync only, in the same transaction as the re-adds.
        ``list chains`` does not read set elements, so this stays cheap at any set size.
        """
        result = self._runner((*self._prefix, "nft", "-j", "list", "chains", "inet"), None)
        if result.returncode != 0:
            return "", False  # e.g. nf_tables never used here; the sync reports real errors
        try:
            items = json.loads(result.stdout).get("nftables", [])
        except (ValueError, AttributeError):
            return "", False
        wanted = {c.name: c for c in base_chains(self._config)}
        out = []
        xt_before = False
        for item in items:
            chain = item.get("chain") if isinstance(item, dict) else None
            if not chain or chain.get("table") != TABLE:
                continue
            # The xt layout's unmark chains sit at mangle + 5 (nft-queue's, with the accept
            # cache, around srcnat).
            xt_before |= str(chain.get("name", "")).endswith("-unmark") and chain.get("prio") == PRIO_MANGLE + 5
            want = wanted.get(chain.get("name", ""))
            if want and (chain.get("type"), chain.get("hook"), chain.get("prio")) == ("filter", want.hook, want.priority):
                continue
            name = chain.get("name")
            log.warning("replacing stale chain %s (%s %s) left by a previous agent", name, chain.get("hook"), chain.get("prio"))
            out += [f"flush chain inet {TABLE} {name}", f"delete chain inet {TABLE} {name}"]
        return "".join(line + "\n" for line in out), xt_before

    def _xt(self, rule: XtRule, op: str, *extra: str) -> tuple[str, ...]:
        # -w: wait for the xtables lock when iptables is the legacy flavour (ignored by -nft).
        return (*self._prefix, rule.binary, "-w", "-t", "mangle", op, rule.chain, *extra, *rule.args)

    def _chain_rules(self, binary: str, chain: str) -> list[list[str]]:
        """The rules of a mangle chain, in order, as printed by -S (tokens after ``-A CHAIN``)."""
        result = run_checked(self._runner, (*self._prefix, binary, "-w", "-t", "mangle", "-S", chain))
        rules = []
        for line in result.stdout.splitlines():
            tokens = shlex.split(line)
            if tokens[:2] == ["-A", chain]:
                rules.append(tokens[2:])
        return rules

    def _ours(self, binary: str, chain: str) -> list[tuple[str, ...]]:
        """Rule specs (as printed by -S, minus ``-A CHAIN``) of our rules in a mangle chain."""
        return [tuple(r) for r in self._chain_rules(binary, chain) if _has_comment(r, TABLE)]

    def _delete_xt(self, binary: str, chain: str, spec: Sequence[str]) -> None:
        run_checked(self._runner, (*self._prefix, binary, "-w", "-t", "mangle", "-D", chain, *spec))

    def _xt_rule_state(self, rule: XtRule) -> tuple[bool, list[int]]:
        """Whether the desired rule is in its chain, and the 1-based positions of our rules."""
        present = self._runner(self._xt(rule, "-C"), None).returncode == 0
        rules = self._chain_rules(rule.binary, rule.chain)
        return present, [i for i, r in enumerate(rules, start=1) if _has_comment(r, TABLE)]

    def _xt_problems(self) -> list[str]:
        problems = []
        for rule in xt_rules(self._config):
            present, ours = self._xt_rule_state(rule)
            where = f"{rule.binary} -t mangle {rule.chain}"
            if not present:
                problems.append(f"{where}: the queue rule is missing" + (" (a stale one of ours is there)" if ours else ""))
            elif len(ours) > 1:
                problems.append(f"{where}: {len(ours)} queue rules of ours instead of one")
            elif ours != [1]:
                problems.append(f"{where}: the queue rule is rule {ours[0]}, not the first (a rule before it may accept packets unjudged)")
        return problems

    def _ensure_xt(self, *, force: bool = False) -> None:
        """Exactly one rule of ours per (binary, chain), equal to the desired one, first in it.

        On syncs, re-checked at most every XT_RECHECK_S seconds (a sync is on the path from a
        policy change to its enforcement; :meth:`check` and :meth:`restore` are the thorough
        path). A repair inserts the desired rule at the top (an earlier ACCEPT in mangle must
        not skip it) before deleting the others of ours by position, bottom up, so there is
        never a moment without a queue rule.
        """
        now = time.monotonic()
        if not force and self._state.xt_ok and now - self._state.xt_checked_at < XT_RECHECK_S:
            return
        self._state.xt_checked_at = now
        for rule in xt_rules(self._config):
            present, ours = self._xt_rule_state(rule)
            if present and ours == [1]:
                self._state.xt_ok.add(rule)
                continue
            log.info("installing %s mangle %s queue rule", rule.binary, rule.chain)
            run_checked(self._runner, self._xt(rule, "-I", "1"))
            for position in sorted(ours, reverse=True):
                run_checked(self._runner, (*self._prefix, rule.binary, "-w", "-t", "mangle", "-D", rule.chain, str(position + 1)))
            self._state.xt_ok.add(rule)

    def _remove_xt(self, *, tolerate_missing_iptables: bool = False) -> None:
        self._state.xt_ok.clear()
        for binary in ("iptables", "ip6tables"):
            for chain in ("POSTROUTING", "INPUT"):
                try:
                    specs = self._ours(binary, chain)
                except CommandError:
                    if tolerate_missing_iptables:
                        continue  # nft-queue nodes need not have a working iptables
                    raise
                for spec in specs:
                    self._delete_xt(binary, chain, spec)


def _has_comment(tokens: Sequence[str], comment: str) -> bool:
    return any(tokens[i] == "--comment" and tokens[i + 1] == comment for i in range(len(tokens) - 1))


def _structure_problems(want: list[dict[str, object]], have: list[dict[str, object]]) -> list[str]:
    """Differences between two normalized table listings (see Ruleset._read_structure)."""
    if want == have:
        return []

    def index(items: list[dict[str, object]]) -> dict[tuple[str, str], list[object]]:
        out: dict[tuple[str, str], list[object]] = {}
        for item in items:
            ((kind, body),) = item.items()
            b = body if isinstance(body, dict) else {}
            if kind == "rule":
                out.setdefault(("rules of chain", str(b.get("chain"))), []).append(body)
            elif kind in ("set", "chain", "map"):
                out.setdefault((kind, str(b.get("name"))), []).append(body)
        return out

    w, h = index(want), index(have)
    problems = [f"{kind} {name} is missing" for kind, name in w if (kind, name) not in h and kind != "rules of chain"]
    problems += [f"{kind} {name} is not ours" for kind, name in h if (kind, name) not in w and kind != "rules of chain"]
    for key in w.keys() | h.keys():
        kind, name = key
        if key in w and key in h and w[key] != h[key]:
            problems.append(f"{kind} {name} differs" if kind != "rules of chain" else f"the rules of chain {name} differ")
        elif kind == "rules of chain" and (key in w) != (key in h) and ("chain", name) in w and ("chain", name) in h:
            problems.append(f"the rules of chain {name} differ")
    return sorted(problems) or ["the table differs"]


def _element_problems(name: str, want: frozenset[str], have: list[object]) -> list[str]:
    got = {e if isinstance(e, str) else json.dumps(e, sort_keys=True) for e in have}
    missing, extra = len(want - got), len(got - want)
    if not missing and not extra:
        return []
    return [f"set {name}: {missing} pod IPs missing, {extra} not ours"]


def cleanup(*, runner: Runner = run_command, netns: str | None = None) -> list[str]:
    """Remove what any agent left on this node, whatever its configuration (manual uninstall):
    the ``inet kube-network-policies`` table and every iptables/ip6tables mangle rule carrying our
    comment. Returns one line per thing removed; raises CommandError when nft fails. Missing
    iptables binaries are fine (nft-queue nodes need none)."""
    prefix = _prefix(netns)
    done = []
    listed = runner((*prefix, "nft", "list", "table", "inet", TABLE), None)
    if listed.returncode == 0:
        run_checked(runner, (*prefix, "nft", "-f", "-"), f"add table inet {TABLE}\ndelete table inet {TABLE}\n")
        done.append(f"nft table inet {TABLE}")
    for binary in ("iptables", "ip6tables"):
        for chain in ("POSTROUTING", "INPUT"):
            try:
                result = runner((*prefix, binary, "-w", "-t", "mangle", "-S", chain), None)
            except CommandError:
                continue  # the binary is not installed
            if result.returncode != 0:
                continue
            for line in result.stdout.splitlines():
                tokens = shlex.split(line)
                if tokens[:2] == ["-A", chain] and _has_comment(tokens, TABLE):
                    run_checked(runner, (*prefix, binary, "-w", "-t", "mangle", "-D", chain, *tokens[2:]))
                    done.append(f"{binary} -t mangle {' '.join(tokens)}")
    return done


def _nft_items(argv: Sequence[str], stdout: str) -> list[dict[str, object]]:
    try:
        items = json.loads(stdout).get("nftables", [])
    except (ValueError, AttributeError):
        raise CommandError(argv, 0, f"unexpected output: {stdout[:200]!r}") from None
    return [i for i in items if isinstance(i, dict)]
