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

Applying it to the kernel, checking it and restoring it: :mod:`.ruleset`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "ACCEPT_CACHE_SIZE",
    "ACCEPT_CACHE_TIMEOUT_S",
    "CACHE_V4",
    "CACHE_V6",
    "DEFAULT_JUDGED_MARK",
    "DEFAULT_MARK",
    "TABLE",
    "Address",
    "Backend",
    "BaseChain",
    "RulesetConfig",
    "XtRule",
    "base_chains",
    "canonical_addresses",
    "flush_cache_commands",
    "render",
    "xt_rules",
]

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
        if not isinstance(self.backend, Backend):  # every bad setting is a ValueError to callers
            raise ValueError(f"backend must be a Backend, got {self.backend!r}")  # noqa: TRY004
        if not 0 <= self.queue_id <= 0xFFFF:
            raise ValueError(f"queue_id must be within 0..65535, got {self.queue_id}")
        if self.queue_count < 1 or self.queue_id + self.queue_count - 1 > 0xFFFF:
            raise ValueError(
                f"queue_count must be >= 1 and queue_id + queue_count - 1 <= 65535, got queue_id={self.queue_id} queue_count={self.queue_count}"
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
    return tuple(XtRule(binary, chain, args) for binary in ("iptables", "ip6tables") for chain in ("POSTROUTING", "INPUT"))


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


def canonical_addresses(ips: Iterable[Address], family: int, what: str) -> list[str]:
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
    v4_ips = canonical_addresses(v4, socket.AF_INET, "IPv4")
    v6_ips = canonical_addresses(v6, socket.AF_INET6, "IPv6")
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
            lines.append(f"add element {t} {name} {{ {', '.join(ips[i : i + ELEMENT_CHUNK])} }}")
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
