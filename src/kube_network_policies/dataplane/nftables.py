"""The nftables ruleset that diverts new connections of policy-selected pods to NFQUEUE.

One ``inet kube-network-policies`` table holds two sets of local policy-selected pod IPs
(``podips-v4``, ``podips-v6``) and the base chains that send the first packet of every new
connection of those IPs (as client or as server) to userspace. Everything after that first
packet stays in the kernel: conntrack accepts established and related traffic.

Two queueing backends, chosen once at start-up by :func:`detect_backend`:

``nft-queue``
    ``queue num N [bypass]`` straight in the nft rules. Needs the kernel's ``nft_queue``.
``xt-nfqueue``
    For kernels without ``nft_queue`` (``CONFIG_NFT_QUEUE`` off; the nft ``queue`` statement
    then fails with a misleading "No such file or directory"). nft still classifies, but
    instead of queueing it ORs one mark bit into ``meta mark``; ONE iptables(-nft) rule per
    family and hook in the ``mangle`` table (``-m mark --mark B/B -j NFQUEUE``) queues the
    marked packets. iptables chains run at their table's fixed priority (mangle = -150), so
    the marking chains run at mangle - 5 and a second pair of chains at mangle + 5 clears the
    bit again (see :class:`RulesetConfig` ``mark``).

The accept cache (``RulesetConfig.accept_cache``, on by default): the engine's verdict depends
only on (source IP, destination IP, protocol, destination port) and the engine's state, so a
tuple userspace accepted once can be accepted in the kernel until that state changes. Per family a
dynamic set (``accepted-v4``, ``accepted-v6``: ``src . dst . l4proto . dport``, timeout
ACCEPT_CACHE_TIMEOUT_S, at most ACCEPT_CACHE_SIZE entries) is looked up in the diverting chains
right before the diverts; a hit is accepted without userspace. Every diverted packet carries the
queueing mark bit (and has the judged bit cleared); the ``-unmark`` chains right after the
queueing hook see the packets that came back accepted (dropped ones never come back) and ``add``
the TCP/UDP/SCTP tuple of those that also carry the judged bit, then clear both bits. Only the
worker sets the judged bit (``RulesetConfig.judged_mark``, through the verdict's NFQA_MARK), and
only on packets the engine accepted on their full tuple: what the kernel accepts without a
verdict (fail-open bypass with no listener, a full queue or socket with NFQA_CFG_F_FAIL_OPEN, a
missing iptables queue rule) and what the worker accepts without judging the tuple (fail-open
defaults, unreadable transport headers) comes back with the queueing bit only and is never
cached. Other protocols (ICMP, ...) are never cached: ``th dport`` would read their checksum. The
agent empties both sets (:meth:`Ruleset.flush_cache`, one transaction) after every change of the
engine's state, once every worker has applied it; every sync empties them too. ``add`` (not
``update``) never extends an entry, so every entry leaves within the timeout even while the
tuple stays in use. A full set only means more packets go to userspace.

Hook priorities, and why:

postrouting (nft-queue: srcnat - 5 = 95, unmark srcnat - 4; xt-nfqueue: mangle - 5 = -155,
unmark mangle + 5)
    Sees every packet leaving through the node: forwarded pod traffic, locally originated
    traffic, and IPVS traffic (IPVS DNATs in LOCAL_IN and re-sends through LOCAL_OUT, so it
    skips FORWARD). The destination is already DNATed (Service VIP -> pod IP) and the source
    not yet SNATed (srcnat = 100), so both ends are real pod IPs.
input (nft-queue: srcnat + 1 = 101, unmark srcnat + 2; xt-nfqueue: mangle - 5 = -155, unmark
mangle + 5)
    Pod-to-own-node traffic never reaches postrouting. srcnat + 1, as in the Go agent, runs
    after IPVS's LOCAL_IN hooks (srcnat - 2 and srcnat - 1): a pod -> ClusterIP packet that
    IPVS steals there is judged later in postrouting with its real backend, and only true
    local deliveries reach this chain. With xt-nfqueue no iptables hook runs after IPVS
    (mangle INPUT is -150), so the chain must run before it: under kube-proxy IPVS mode a
    pod -> ClusterIP flow is then judged here with the VIP as destination (a known
    limitation of that backend; iptables/nftables kube-proxy DNAT in prerouting, unaffected).

``meta skuid 0 accept`` (traffic the node itself originates: kubelet probes, system daemons)
sits in the postrouting chain, the one chain on the output path that diverts. An nft
``accept`` only ends the base chain it is in, so an accept in a separate output chain would
not stop postrouting from diverting the packet. In postrouting ``skuid`` matches only
locally generated packets (forwarded pod packets carry no socket; a pod's socket is orphaned
when its packet leaves the pod's namespace), so root processes inside pods are not exempted.
It is NOT in the input chain: there the socket (if early demux found one) is the receiving
one. Replies to the node's connections need no rule: a reply is never ``ct state new``.

Every :meth:`Ruleset.sync` is one ``nft -f -`` run, i.e. one atomic kernel transaction that
re-declares table, sets and base chains with the idempotent ``add``, then ``flush chain`` +
re-adds the rules and ``flush set`` + re-adds the elements. It never deletes the table or a
base chain: unregistering a hook makes the kernel drop every packet waiting in every queue of
the network namespace. (One exception, on the first sync only: a chain left by a previous
agent with a different hook or priority cannot be changed in place and is replaced.)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import random
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "ACCEPT_CACHE_SIZE",
    "ACCEPT_CACHE_TIMEOUT_S",
    "CACHE_V4",
    "CACHE_V6",
    "DEFAULT_JUDGED_MARK",
    "DEFAULT_MARK",
    "Address",
    "TABLE",
    "Backend",
    "BaseChain",
    "CommandError",
    "CommandResult",
    "DataplaneError",
    "Ruleset",
    "RulesetConfig",
    "Runner",
    "XtRule",
    "base_chains",
    "detect_backend",
    "flush_cache_commands",
    "render",
    "run_command",
    "xt_rules",
]

log = logging.getLogger(__name__)

TABLE = "kube-network-policies"
SET_V4 = "podips-v4"
SET_V6 = "podips-v6"
CACHE_V4 = "accepted-v4"
CACHE_V6 = "accepted-v6"
# Bounds the life of any entry (see the module docstring): a hot tuple is judged again once per
# timeout. Also bounds the damage of a missed flush.
ACCEPT_CACHE_TIMEOUT_S = 30
ACCEPT_CACHE_SIZE = 65536  # per family; when full, new tuples simply keep going to userspace

# Bit 13. Chosen to avoid the marks other node components are known to use: kube-proxy's
# masquerade (0x4000) and drop (0x8000) bits, Cilium's 0x0f00 nibble, Istio's 0x539, the AWS
# VPC CNI's 0x80, kube-router's 0x10000/0x20000, Tailscale's 0xff0000. Calico claims
# 0xffff0000 but Calico also enforces policy and would not run next to us. Configurable.
DEFAULT_MARK = 0x2000
# Bit 12, next to it and outside the same list of marks known to be taken. Configurable.
DEFAULT_JUDGED_MARK = 0x1000

# Netfilter hook priorities (include/uapi/linux/netfilter_ipv4.h).
PRIO_MANGLE = -150  # NF_IP_PRI_MANGLE: where iptables' mangle chains run
PRIO_SRCNAT = 100  # NF_IP_PRI_NAT_SRC

# Per nft run; a 100k-element sync takes a few seconds, so this only catches a wedged nft.
COMMAND_TIMEOUT_S = 120.0
XT_RECHECK_S = 10.0  # how often a sync re-verifies the iptables queue rules
# Elements per ``add element`` command: keeps each input line (which nft echoes back in
# error messages) bounded without measurable cost.
ELEMENT_CHUNK = 4096

_ND_TYPES = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect"


class Backend(Enum):
    """How packets reach the NFQUEUE."""

    NFT_QUEUE = "nft-queue"
    XT_NFQUEUE = "xt-nfqueue"


@dataclass(frozen=True, slots=True, kw_only=True)
class RulesetConfig:
    """What to render. Validated on construction (ValueError with the offending value).

    mark: the single ``meta mark`` bit set on diverted packets: by the xt-nfqueue backend to tell
    iptables which packets to queue, and by both backends when the accept cache is on, so that
    the chain after the queue recognises the packets userspace accepted. It is cleared again
    right after the queueing hook (xt: mangle + 5), because the bit would otherwise travel with
    the packet through SNAT, policy routing and tc/eBPF programs of other components, which may
    interpret it (kube-proxy masquerades on 0x4000, for instance). Unused by the nft-queue
    backend without the accept cache.
    judged_mark: with the accept cache, the bit the worker adds (through its verdict) to packets
    the engine accepted on their full tuple; only those are cached (module docstring). Must
    differ from ``mark``; the worker is given the same value (WorkerConfig.judged_mark). Cleared
    on every diverted packet before the queue and again with ``mark`` after it, so both bits
    must be ours alone.
    accept_cache: remember accepted (src, dst, protocol, dst port) tuples in the kernel so that
    later connections of the same tuple skip userspace (module docstring).
    cpu_fanout: with several queues, pick the queue by CPU instead of by address hash. The
    hash (the default) spreads load even when one CPU receives all packets.
    """

    backend: Backend
    queue_id: int = 100
    queue_count: int = 1
    fail_open: bool = False
    mark: int = DEFAULT_MARK
    cpu_fanout: bool = False
    accept_cache: bool = True
    judged_mark: int = DEFAULT_JUDGED_MARK

    def __post_init__(self) -> None:
        if not isinstance(self.backend, Backend):
            raise ValueError(f"backend must be a Backend, got {self.backend!r}")
        if not 0 <= self.queue_id <= 0xFFFF:
            raise ValueError(f"queue_id must be within 0..65535, got {self.queue_id}")
        if self.queue_count < 1 or self.queue_id + self.queue_count - 1 > 0xFFFF:
            raise ValueError(
                f"queue_count must be >= 1 and queue_id + queue_count - 1 <= 65535, "
                f"got queue_id={self.queue_id} queue_count={self.queue_count}"
            )
        if not 0 < self.mark <= 0xFFFFFFFF or self.mark.bit_count() != 1:
            raise ValueError(f"mark must be a single bit of a 32-bit mark, got {self.mark:#x}")
        if not 0 < self.judged_mark <= 0xFFFFFFFF or self.judged_mark.bit_count() != 1:
            raise ValueError(f"judged_mark must be a single bit of a 32-bit mark, got {self.judged_mark:#x}")
        if self.judged_mark == self.mark:
            raise ValueError(f"judged_mark and mark must be different bits, both are {self.mark:#x}")

    @property
    def queue_last(self) -> int:
        return self.queue_id + self.queue_count - 1


@dataclass(frozen=True, slots=True)
class BaseChain:
    name: str
    hook: str
    priority: int


@dataclass(frozen=True, slots=True)
class XtRule:
    """One iptables rule: ``<binary> -t mangle <-I|-C|-D> <chain> <args...>``."""

    binary: str  # "iptables" or "ip6tables"
    chain: str  # "POSTROUTING" or "INPUT"
    args: tuple[str, ...]


def base_chains(config: RulesetConfig) -> tuple[BaseChain, ...]:
    """The base chains of the table for this config (see the module docstring for priorities)."""
    if config.backend is Backend.NFT_QUEUE:
        chains: tuple[BaseChain, ...] = (
            BaseChain("postrouting", "postrouting", PRIO_SRCNAT - 5),
            BaseChain("input", "input", PRIO_SRCNAT + 1),
        )
        if config.accept_cache:  # after the queue, before SNAT (postrouting) / after it (input)
            chains += (
                BaseChain("postrouting-unmark", "postrouting", PRIO_SRCNAT - 4),
                BaseChain("input-unmark", "input", PRIO_SRCNAT + 2),
            )
        return chains
    return (
        BaseChain("postrouting", "postrouting", PRIO_MANGLE - 5),
        BaseChain("input", "input", PRIO_MANGLE - 5),
        BaseChain("postrouting-unmark", "postrouting", PRIO_MANGLE + 5),
        BaseChain("input-unmark", "input", PRIO_MANGLE + 5),
    )


def xt_rules(config: RulesetConfig) -> tuple[XtRule, ...]:
    """The iptables rules the xt-nfqueue backend needs (none for nft-queue)."""
    if config.backend is not Backend.XT_NFQUEUE:
        return ()
    if config.queue_count == 1:
        queue: tuple[str, ...] = ("--queue-num", str(config.queue_id))
    else:
        queue = ("--queue-balance", f"{config.queue_id}:{config.queue_last}")
        if config.cpu_fanout:
            queue += ("--queue-cpu-fanout",)
    if config.fail_open:
        queue += ("--queue-bypass",)
    mark = f"{config.mark:#x}/{config.mark:#x}"
    # The comment identifies our rules so a later agent can find and replace stale ones.
    args = ("-m", "mark", "--mark", mark, "-m", "comment", "--comment", TABLE, "-j", "NFQUEUE") + queue
    return tuple(
        XtRule(binary, chain, args)
        for binary in ("iptables", "ip6tables")
        for chain in ("POSTROUTING", "INPUT")
    )


def _set_mark(config: RulesetConfig) -> str:
    """Set the queueing bit; with the accept cache also clear the judged bit, so that only the
    worker's verdict can set it (a packet arriving with it set must not count as judged)."""
    if config.accept_cache:
        keep = 0xFFFFFFFF & ~config.judged_mark
        return f"meta mark set meta mark and {keep:#010x} or {config.mark:#010x}"
    return f"meta mark set meta mark or {config.mark:#010x}"


def _divert(config: RulesetConfig) -> str:
    """The statement that sends a packet to userspace."""
    if config.backend is Backend.XT_NFQUEUE:
        # `accept` only ends this chain; the iptables mangle rule then queues the packet.
        return f"{_set_mark(config)} accept"
    mark = f"{_set_mark(config)} " if config.accept_cache else ""
    if config.queue_count == 1:
        stmt = f"{mark}queue num {config.queue_id}"
    else:
        stmt = f"{mark}queue num {config.queue_id}-{config.queue_last}"
    flags = [f for f, on in (("bypass", config.fail_open), ("fanout", config.cpu_fanout and config.queue_count > 1)) if on]
    return f"{stmt} {','.join(flags)}" if flags else stmt


Address = str | ipaddress.IPv4Address | ipaddress.IPv6Address


def _canonical(ips: Iterable[Address], family: int, what: str) -> list[str]:
    """Validated, canonical, de-duplicated addresses, in first-seen order.

    Validation is strict because the text goes to nft verbatim: a bad element would fail the
    whole transaction (blocking every later update) or, worse, inject nft syntax.
    inet_pton/inet_ntop cost ~0.5 µs per address (ipaddress: 3-8 µs).
    """
    out: dict[str, None] = {}
    for ip in ips:
        text = ip if isinstance(ip, str) else str(ip)
        try:
            out[socket.inet_ntop(family, socket.inet_pton(family, text))] = None
        except (OSError, ValueError):
            raise ValueError(f"not an {what} address: {text!r}") from None
    return list(out)


def render(config: RulesetConfig, v4: Iterable[Address], v6: Iterable[Address]) -> str:
    """The nft script for one sync: pure, deterministic for a given input order.

    v4 / v6: the local policy-selected pod IPs (strings or ipaddress objects). Raises
    ValueError for an address of the wrong family or a malformed one. The script never
    contains ``delete`` or ``flush ruleset``: table, sets and base chains are (re)declared
    with ``add`` (a no-op when they exist) and only their contents are replaced.
    """
    v4_ips = _canonical(v4, socket.AF_INET, "IPv4")
    v6_ips = _canonical(v6, socket.AF_INET6, "IPv6")
    t = f"inet {TABLE}"
    chains = base_chains(config)
    lines = [
        f"add table {t}",
        f"add set {t} {SET_V4} {{ type ipv4_addr; }}",
        f"add set {t} {SET_V6} {{ type ipv6_addr; }}",
    ]
    if config.accept_cache:
        flags = f"flags dynamic, timeout; timeout {ACCEPT_CACHE_TIMEOUT_S}s; size {ACCEPT_CACHE_SIZE};"
        lines += [
            f"add set {t} {CACHE_V4} {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service; {flags} }}",
            f"add set {t} {CACHE_V6} {{ type ipv6_addr . ipv6_addr . inet_proto . inet_service; {flags} }}",
        ]
    for c in chains:
        lines.append(f"add chain {t} {c.name} {{ type filter hook {c.hook} priority {c.priority}; policy accept; }}")
    lines += [f"flush chain {t} {c.name}" for c in chains]
    for name, ips in ((SET_V4, v4_ips), (SET_V6, v6_ips)):
        lines.append(f"flush set {t} {name}")
        for i in range(0, len(ips), ELEMENT_CHUNK):
            lines.append(f"add element {t} {name} {{ {', '.join(ips[i:i + ELEMENT_CHUNK])} }}")
    lines += flush_cache_commands(config)  # the state may have changed: forget every tuple

    divert = _divert(config)
    post = f"add rule {t} postrouting"
    inp = f"add rule {t} input"
    # Accept-cache lookups: after the exemptions, before the diverts. Only TCP/UDP/SCTP tuples are
    # ever added, so other protocols cannot match (their `th dport` would be a checksum).
    cached: list[str] = []
    if config.accept_cache:
        cached = [
            f'ip saddr . ip daddr . meta l4proto . th dport @{CACHE_V4} accept comment "accepted before (accept cache)"',
            f'ip6 saddr . ip6 daddr . meta l4proto . th dport @{CACHE_V6} accept comment "accepted before (accept cache)"',
        ]
    lines += [
        # IPv6 neighbour discovery (ICMPv6 133-137) must never wait for userspace.
        f'{post} icmpv6 type {{ {_ND_TYPES} }} accept comment "IPv6 neighbour discovery"',
        f'{post} oif "lo" accept comment "loopback"',
        # Only the first packet of a connection is judged; replies are never "new".
        f"{post} ct state != new accept",
        f'{post} meta skuid 0 accept comment "node-originated traffic (root sockets: kubelet probes)"',
        *(f"{post} {rule}" for rule in cached),
        f'{post} ip saddr @{SET_V4} {divert} comment "egress of selected pods"',
        f'{post} ip daddr @{SET_V4} {divert} comment "ingress of selected pods"',
        f'{post} ip6 saddr @{SET_V6} {divert} comment "egress of selected pods"',
        f'{post} ip6 daddr @{SET_V6} {divert} comment "ingress of selected pods"',
        f'{inp} icmpv6 type {{ {_ND_TYPES} }} accept comment "IPv6 neighbour discovery"',
        # `iif` compares an ifindex (lo is always 1 and cannot be deleted): cheaper than iifname.
        f'{inp} iif "lo" accept comment "loopback"',
        f"{inp} ct state != new accept",
        *(f"{inp} {rule}" for rule in cached),
        f'{inp} ip saddr @{SET_V4} {divert} comment "selected pods to this node"',
        f'{inp} ip6 saddr @{SET_V6} {divert} comment "selected pods to this node"',
    ]
    if config.backend is Backend.XT_NFQUEUE or config.accept_cache:
        ours = config.mark | config.judged_mark if config.accept_cache else config.mark
        keep = 0xFFFFFFFF & ~ours
        marked = f"meta mark and {config.mark:#010x} == {config.mark:#010x}"
        judged = f"meta mark and {ours:#010x} == {ours:#010x}"
        cleared = "clear the queueing and judged mark bits" if config.accept_cache else "clear the queueing mark bit"
        for c in chains:
            if c.name.endswith("-unmark"):
                if config.accept_cache:
                    # Packets seen here with both bits came back from userspace with a verdict of
                    # the engine on their tuple. Separate rules: when a set is full its `add`
                    # fails and ends its rule, not the unmarking.
                    for name, key in ((CACHE_V4, "ip saddr . ip daddr"), (CACHE_V6, "ip6 saddr . ip6 daddr")):
                        lines.append(
                            f"add rule {t} {c.name} {judged} meta l4proto {{ tcp, udp, sctp }} "
                            f'add @{name} {{ {key} . meta l4proto . th dport }} comment "judged and accepted by the agent: remember"'
                        )
                lines.append(f'add rule {t} {c.name} {marked} meta mark set meta mark and {keep:#010x} comment "{cleared}"')
    return "\n".join(lines) + "\n"


def flush_cache_commands(config: RulesetConfig) -> list[str]:
    """The commands that empty both accept-cache sets (none without the cache)."""
    if not config.accept_cache:
        return []
    return [f"flush set inet {TABLE} {name}" for name in (CACHE_V4, CACHE_V6)]


# --- running commands -----------------------------------------------------------------------


class DataplaneError(RuntimeError):
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


def run_command(argv: Sequence[str], stdin: str | None = None) -> CommandResult:
    """The default Runner: subprocess, no shell, captured text output, bounded time."""
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from None
    except PermissionError as e:
        raise CommandError(argv, 126, str(e)) from None
    except subprocess.TimeoutExpired:
        raise CommandError(argv, -1, f"timed out after {COMMAND_TIMEOUT_S:.0f}s") from None
    return CommandResult(proc.returncode, proc.stdout, proc.stderr)


def _prefix(netns: str | None) -> tuple[str, ...]:
    return ("ip", "netns", "exec", netns) if netns else ()


def _check(runner: Runner, argv: Sequence[str], stdin: str | None = None) -> CommandResult:
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
    _check(runner, nft, _probe_script("counter"))
    for binary in ("iptables", "ip6tables"):
        _check(runner, (*_prefix(netns), binary, "--version"))
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
        text = render(self._config, v4, v6)
        with self._lock:
            if self._state.closed:
                log.debug("ruleset sync after shutdown ignored")
                return
            first = not self._state.synced
            stale, xt_before = self._stale_chain_commands() if first else ("", False)
            _check(self._runner, (*self._prefix, "nft", "-f", "-"), stale + text)
            self._state.xt_before |= xt_before
            if first and xt_before and self._config.backend is not Backend.XT_NFQUEUE:
                # An xt-nfqueue agent ran before (its unmark chains were there): drop its
                # iptables rules. Only then, so nft-queue nodes never need iptables.
                self._remove_xt(tolerate_missing_iptables=True)
            self._state.synced = True
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
            _check(self._runner, (*self._prefix, "nft", "-f", "-"), "".join(c + "\n" for c in commands))

    def shutdown(self) -> None:
        """Stop managing the ruleset, keeping or removing it according to fail-open.

        fail-open keeps the rules: the queue rules carry ``bypass`` / ``--queue-bypass``, so
        while no agent listens the kernel accepts diverted packets, and the next agent takes
        over with a plain sync, without re-registering any hook (which would drop queued
        packets) and without a window in which policies are not even diverted.

        fail-closed removes the table and our iptables rules: without ``bypass`` a queue with
        no listener drops, so leaving the rules would blackhole every new connection of every
        policy-selected pod on the node until an agent comes back, which may be never
        (uninstall). A fail-closed agent that dies without a shutdown keeps its rules and so
        does drop until it restarts.
        """
        with self._lock:
            if self._state.closed:
                return
            self._state.closed = True
            if self._config.fail_open:
                log.info("fail-open: keeping the ruleset so traffic flows (bypass) until the next agent")
                return
            log.info("fail-closed: removing the ruleset so pods are not blackholed while no agent runs")
            xt = self._config.backend is Backend.XT_NFQUEUE or self._state.xt_before
            self._remove(sweep_xt=xt)

    def remove(self) -> None:
        """Remove the table and our iptables rules whatever the fail-open setting (uninstall)."""
        with self._lock:
            self._state.closed = True
            self._remove(sweep_xt=True)

    # -- internals --

    def _remove(self, *, sweep_xt: bool) -> None:
        """Delete the table and our iptables rules; tries both, then raises the first error."""
        errors: list[CommandError] = []
        try:
            # `add` first makes the delete succeed when the table is already gone (one transaction).
            script = f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
            _check(self._runner, (*self._prefix, "nft", "-f", "-"), script)
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

    def _ours(self, binary: str, chain: str) -> list[tuple[str, ...]]:
        """Rule specs (as printed by -S, minus ``-A CHAIN``) of our rules in a mangle chain."""
        result = _check(self._runner, (*self._prefix, binary, "-w", "-t", "mangle", "-S", chain))
        specs = []
        for line in result.stdout.splitlines():
            tokens = shlex.split(line)
            if tokens[:2] == ["-A", chain] and _has_comment(tokens, TABLE):
                specs.append(tuple(tokens[2:]))
        return specs

    def _delete_xt(self, binary: str, chain: str, spec: Sequence[str]) -> None:
        _check(self._runner, (*self._prefix, binary, "-w", "-t", "mangle", "-D", chain, *spec))

    def _ensure_xt(self) -> None:
        """Exactly one rule of ours per (binary, chain), equal to the desired one.

        Re-checked with ``-C`` (one iptables run per rule) at most every XT_RECHECK_S seconds,
        so a firewall reload that flushed mangle gets repaired without putting four process
        runs on every sync: a sync is on the path from a policy change to its enforcement. A
        repair inserts the desired rule at the top (an earlier ACCEPT in mangle must not skip
        it) before deleting stale ones (another queue number, bypass flag or mark), so there is
        never a moment without a queue rule.
        """
        now = time.monotonic()
        if self._state.xt_ok and now - self._state.xt_checked_at < XT_RECHECK_S:
            return
        self._state.xt_checked_at = now
        for rule in xt_rules(self._config):
            present = self._runner(self._xt(rule, "-C"), None).returncode == 0
            if present and rule in self._state.xt_ok:
                continue
            ours = self._ours(rule.binary, rule.chain)
            if not (present and len(ours) == 1):
                log.info("installing %s mangle %s queue rule", rule.binary, rule.chain)
                _check(self._runner, self._xt(rule, "-I", "1"))
                for spec in ours:
                    # -D deletes the first match: if spec equals the desired rule, that is the
                    # one just inserted and the old identical one stays. Either way one remains.
                    self._delete_xt(rule.binary, rule.chain, spec)
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


# --- bench ----------------------------------------------------------------------------------


def _random_v4(n: int, rng: random.Random) -> list[str]:
    return [str(ipaddress.IPv4Address(a)) for a in rng.sample(range(0x0A000000, 0x0B000000), n)]


def _random_v6(n: int, rng: random.Random) -> list[str]:
    return [str(ipaddress.IPv6Address((0xFD00 << 112) | a)) for a in rng.sample(range(1 << 32), n)]


def _bench(sizes: Sequence[int], backend: Backend | None) -> int:
    if os.geteuid() != 0:
        print("the nftables bench needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    netns = f"knp-bench-{os.getpid()}"
    _check(run_command, ("ip", "netns", "add", netns))
    try:
        chosen = backend or detect_backend(netns=netns)
        config = RulesetConfig(backend=chosen)
        print(f"backend: {chosen.value}; nft in a throwaway netns ({netns}); both sets hold N elements")
        rng = random.Random(1)
        for n in sizes:
            ruleset = Ruleset(config, netns=netns)
            v4, v6 = _random_v4(n, rng), _random_v6(n, rng)
            t0 = time.perf_counter()
            text = render(config, v4, v6)
            t_render = time.perf_counter() - t0
            t0 = time.perf_counter()
            ruleset.sync(v4, v6)
            t_first = time.perf_counter() - t0
            # The steady state: 1% churn, everything re-applied (flush + re-add).
            k = max(1, n // 100)
            v4b, v6b = v4[k:] + _random_v4(k, rng), v6[k:] + _random_v6(k, rng)
            t0 = time.perf_counter()
            ruleset.sync(v4b, v6b)
            t_resync = time.perf_counter() - t0
            print(
                f"N={n:>7}: render {t_render * 1e3:7.1f} ms ({len(text) / 1e6:.1f} MB), "
                f"first sync {t_first * 1e3:7.1f} ms, re-sync (1% changed) {t_resync * 1e3:7.1f} ms"
            )
            ruleset.remove()
    finally:
        run_command(("ip", "netns", "del", netns))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kube_network_policies.dataplane.nftables")
    parser.add_argument("--bench", action="store_true", help="time syncs of large sets (root; throwaway netns)")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated set sizes (default: %(default)s)")
    parser.add_argument("--backend", choices=[b.value for b in Backend], help="default: detect")
    parser.add_argument("--render", action="store_true", help="print the script for a small example and exit")
    args = parser.parse_args(argv)
    try:
        backend = Backend(args.backend) if args.backend else None
        if args.render:
            config = RulesetConfig(backend=backend or Backend.NFT_QUEUE)
            sys.stdout.write(render(config, ["10.244.1.2", "10.244.1.3"], ["fd00:10:244:1::2"]))
            return 0
        if args.bench:
            return _bench([int(s) for s in args.sizes.split(",") if s.strip()], backend)
    except (DataplaneError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
