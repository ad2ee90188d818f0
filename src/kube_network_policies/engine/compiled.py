"""Policies compiled for the packet path.

Everything here is built when a policy changes and only read per packet: peers and ports become
small matcher objects whose `match` does a few set or integer operations, and every rule carries
its prebuilt Reason so that a decision allocates nothing to explain itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from kube_network_policies.engine.flow import SCTP, TCP, UDP, Action, DirectionResult, Reason, Tier
from kube_network_policies.model import adminpolicy as ap
from kube_network_policies.model import kinds
from kube_network_policies.model.core import Pod
from kube_network_policies.model.ipnet import IPBlock
from kube_network_policies.model.networkpolicy import EGRESS, INGRESS, IPBlockPeer, NetworkPolicy, NetworkPolicyPort
from kube_network_policies.model.selectors import LabelSelector, LabelSet

PROTO = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}


class NamespaceEntry:
    """Mutable holder of a namespace's current labels, shared by its pods' entries, so that a
    namespace relabel is seen by every pod at once without touching them."""

    __slots__ = ("labels", "name")

    def __init__(self, name: str, labels: LabelSet) -> None:
        self.name = name
        self.labels = labels


class PodEntry:
    """The engine's view of a pod: the immutable Pod plus what the packet path reads."""

    __slots__ = ("group", "key", "labels", "named", "ns", "packed", "plans", "pod", "selected_by", "subject")

    def __init__(self, pod: Pod, ns: NamespaceEntry, named: frozenset[tuple[str, int, int]], packed: tuple[bytes, ...]) -> None:
        self.pod = pod
        self.key = pod.key
        self.ns = ns
        self.labels = pod.labels
        # Pods of one namespace with the same labels form a group: selectors are evaluated per
        # group when policies or labels change, so the packet path only asks "is my group in
        # this rule's set?".
        self.group = -1
        self.named = named  # (port name, protocol number, port number) of the ports it serves
        self.packed = packed  # its IPs, packed
        self.selected_by: frozenset[PolicyId] = frozenset()
        self.plans: Plans | None = None
        # hostNetwork and finished pods are never subjects (nor peers of selectors).
        self.subject = not pod.host_network and not pod.terminated


PolicyId = tuple[str, str, str]  # (kind, namespace, name)


class PodSelectorPeer:
    """Pods chosen by namespace and pod selectors; `namespace` pins the policy's own namespace.

    ClusterState interns these (rules of many policies share one object per distinct selector)
    and keeps `groups`, the pod groups it matches, current as pods, namespaces and policies change.
    """

    __slots__ = ("groups", "namespace", "ns_selector", "pod_selector", "users")

    def __init__(self, namespace: str | None, ns_selector: LabelSelector | None, pod_selector: LabelSelector | None) -> None:
        self.namespace = namespace
        self.ns_selector = None if ns_selector is None or ns_selector.matches_all else ns_selector
        self.pod_selector = None if pod_selector is None or pod_selector.matches_all else pod_selector
        self.groups: set[int] = set()
        self.users = 0  # rules referring to this interned selector

    @property
    def key(self) -> tuple[str | None, LabelSelector | None, LabelSelector | None]:
        return (self.namespace, self.ns_selector, self.pod_selector)

    def classify(self, group: int, namespace: str, ns_labels: LabelSet, pod_labels: LabelSet) -> None:
        """(Re)decide whether a pod group is matched."""
        if self.matches(namespace, ns_labels, pod_labels):
            self.groups.add(group)
        else:
            self.groups.discard(group)

    def matches(self, namespace: str, ns_labels: LabelSet, pod_labels: LabelSet) -> bool:
        if self.namespace is not None and namespace != self.namespace:
            return False
        if self.ns_selector is not None and not self.ns_selector.matches(ns_labels):
            return False
        return self.pod_selector is None or self.pod_selector.matches(pod_labels)


# ---- rules -----------------------------------------------------------------------------------

Range = tuple[int, int, int]  # (protocol, first port, last port), inclusive
Block = tuple[int, int, int, tuple[tuple[int, int], ...]]  # (family, network, mask, ((network, mask) excepted, ...))


class Rule:
    """One compiled rule: matches when a port matches and any peer matches.

    Peers are flattened by kind so that a match is a few inline operations: a set membership
    per pod selector (the set of pod groups it matches, kept current by ClusterState), integer
    masks for CIDRs, a dict look-up for node addresses.
    """

    __slots__ = ("action", "any_peer", "blocks", "names", "nodes", "nodes_by_ip", "ranges", "reason", "selectors")

    def __init__(
        self,
        *,
        ranges: tuple[Range, ...] | None,
        names: tuple[tuple[str, int | None], ...],
        any_peer: bool,
        selectors: tuple[PodSelectorPeer, ...],
        blocks: tuple[Block, ...],
        nodes: tuple[LabelSelector, ...],
        nodes_by_ip: dict[bytes, LabelSet] | None,
        action: Action,
        reason: Reason,
    ) -> None:
        self.ranges = ranges  # None: every protocol and port
        self.names = names  # named ports: (name, protocol or None for "the packet's")
        self.any_peer = any_peer
        self.selectors = selectors  # replaced by interned ones when the policy enters a ClusterState
        self.blocks = blocks
        self.nodes = nodes
        self.nodes_by_ip = nodes_by_ip
        self.action = action
        self.reason = reason

    def match(self, entry: PodEntry | None, family: int, address: int, packed: bytes, protocol: int, port: int, destination: PodEntry | None) -> bool:
        ranges = self.ranges
        if ranges is not None:
            for p, lo, hi in ranges:
                if p == protocol and lo <= port <= hi:
                    break
            else:
                if not self.names or destination is None:
                    return False
                named = destination.named
                for name, name_protocol in self.names:
                    # The destination must serve a port of this name, with this number and the packet's protocol.
                    if (name_protocol is None or name_protocol == protocol) and (name, protocol, port) in named:
                        break
                else:
                    return False
        if self.any_peer:
            return True
        if entry is not None:
            group = entry.group
            for sel in self.selectors:
                if group in sel.groups:
                    return True
        for fam, net, mask, excepts in self.blocks:
            if fam == family and address & mask == net:
                for enet, emask in excepts:
                    if address & emask == enet:
                        break
                else:
                    return True
        if self.nodes:
            labels = self.nodes_by_ip.get(packed) if self.nodes_by_ip is not None else None
            if labels is not None:
                for node_selector in self.nodes:
                    if node_selector.matches(labels):
                        return True
        return False


def _block(b: IPBlock) -> Block:
    return (b.cidr.family, b.cidr.network, b.cidr.mask, tuple((e.network, e.mask) for e in b.excepts))


def make_rule(
    *,
    ports: tuple[tuple[Range, ...], tuple[tuple[str, int | None], ...]] | None,
    any_peer: bool = False,
    selectors: list[PodSelectorPeer] | None = None,
    blocks: list[IPBlock] | None = None,
    nodes: list[LabelSelector] | None = None,
    nodes_by_ip: dict[bytes, LabelSet] | None = None,
    action: Action,
    reason: Reason,
) -> Rule:
    ranges, names = ports if ports is not None else (None, ())
    return Rule(
        ranges=ranges,
        names=names,
        any_peer=any_peer,
        selectors=() if any_peer else tuple(selectors or ()),
        blocks=() if any_peer else tuple(_block(b) for b in blocks or ()),
        nodes=() if any_peer else tuple(nodes or ()),
        nodes_by_ip=nodes_by_ip,
        action=action,
        reason=reason,
    )


PortSpec = tuple[tuple[Range, ...], tuple[tuple[str, int | None], ...]]


def np_ports(ports: tuple[NetworkPolicyPort, ...]) -> PortSpec | None:
    if not ports:
        return None
    ranges = []
    names = []
    for p in ports:
        proto = PROTO[p.protocol]
        if p.name is not None:
            names.append((p.name, proto))
        elif p.port is None:
            ranges.append((proto, 0, 65535))
        else:
            ranges.append((proto, p.port, p.end_port if p.end_port is not None else p.port))
    return tuple(ranges), tuple(names)


def admin_ports(ports: tuple[ap.AdminPort, ...] | None) -> PortSpec | None:
    if ports is None:
        return None
    ranges = []
    names: list[tuple[str, int | None]] = []
    for p in ports:
        if isinstance(p, ap.NamedPort):
            names.append((p.name, None))
        else:
            ranges.append((PROTO[p.protocol], p.start, p.end))
    return tuple(ranges), tuple(names)


@dataclass(frozen=True, slots=True)
class CompiledNetworkPolicy:
    id: PolicyId
    policy: NetworkPolicy
    ingress: tuple[Rule, ...] | None  # None: the policy does not apply to this direction
    egress: tuple[Rule, ...] | None

    def selects(self, entry: PodEntry) -> bool:
        return entry.subject and entry.ns.name == self.policy.namespace and self.policy.pod_selector.matches(entry.labels)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return (self.ingress or ()) + (self.egress or ())


def compile_network_policy(policy: NetworkPolicy) -> CompiledNetworkPolicy:
    def rules(direction: str) -> tuple[Rule, ...] | None:
        if direction not in policy.policy_types:
            return None
        raw = policy.ingress if direction == INGRESS else policy.egress
        out = []
        for i, r in enumerate(raw):
            selectors: list[PodSelectorPeer] = []
            blocks: list[IPBlock] = []
            for p in r.peers:
                if isinstance(p, IPBlockPeer):
                    blocks.append(p.block)
                elif p.namespace_selector is None:
                    selectors.append(PodSelectorPeer(policy.namespace, None, p.pod_selector))
                else:
                    selectors.append(PodSelectorPeer(None, p.namespace_selector, p.pod_selector))
            reason = Reason(Tier.NETWORK_POLICY, Action.ALLOW, policy.key, f"{direction.lower()} rule {i}")
            out.append(
                make_rule(ports=np_ports(r.ports), any_peer=not r.peers, selectors=selectors, blocks=blocks, action=Action.ALLOW, reason=reason)
            )
        return tuple(out)

    return CompiledNetworkPolicy(kinds.key(policy), policy, rules(INGRESS), rules(EGRESS))


_ACTION = {ap.ALLOW: Action.ALLOW, ap.DENY: Action.DENY, ap.PASS: Action.PASS}


@dataclass(frozen=True, slots=True)
class CompiledTieredPolicy:
    id: PolicyId
    policy: ap.TieredPolicy
    tier: Tier  # ADMIN or BASELINE
    order: tuple[int, int, str, int]  # sort key within the tier: (group, priority, name, kind)
    ingress: tuple[Rule, ...]
    egress: tuple[Rule, ...]
    # Whether a rule reads runtime facts (engine/facts.py): domainNames peers will, once they
    # match the names pods resolved; today they match nothing and no rule does.
    consults_facts: bool = False

    def selects(self, entry: PodEntry) -> bool:
        s = self.policy.subject
        return entry.subject and s.namespace_selector.matches(entry.ns.labels) and s.pod_selector.matches(entry.labels)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.ingress + self.egress


def compile_tiered_policy(policy: ap.TieredPolicy, nodes_by_ip: dict[bytes, LabelSet]) -> CompiledTieredPolicy:
    kind = kinds.of(policy)
    short = kind.short
    tier = Tier.ADMIN if policy.tier == ap.ADMIN_TIER else Tier.BASELINE
    priority: int | None = getattr(policy, "priority", None)
    if priority is None:
        # BaselineAdminNetworkPolicy has no priority: the singleton baseline comes after every
        # Baseline-tier ClusterNetworkPolicy (the newer API's policies are the more specific ones).
        order = (1, 0, policy.name, 0)
    else:
        # At equal priority and name, the kind registered first (AdminNetworkPolicy) goes first.
        order = (0, priority, policy.name, kinds.rank(kind.name))

    def rules(raw: tuple[ap.AdminRule, ...]) -> tuple[Rule, ...]:
        out = []
        for i, r in enumerate(raw):
            action = _ACTION[r.action]
            label = f"rule {i}" + (f" [{r.name}]" if r.name else "")
            unknown = next((p for p in r.peers if isinstance(p, ap.UnknownPeer)), None)
            if unknown is not None and action is not Action.ALLOW:
                # The API's fail-closed reading: a Deny or Pass rule with a peer we cannot read
                # becomes "Deny all" (ports included: what the rule restricts is unknown).
                reason = Reason(tier, Action.DENY, f"{short}/{policy.name}", f"{label} (fail closed: {unknown.reason})")
                out.append(make_rule(ports=None, any_peer=True, action=Action.DENY, reason=reason))
                continue
            selectors: list[PodSelectorPeer] = []
            blocks: list[IPBlock] = []
            nodes: list[LabelSelector] = []
            for p in r.peers:
                if isinstance(p, ap.PodsPeer):
                    selectors.append(PodSelectorPeer(None, p.namespace_selector, p.pod_selector))
                elif isinstance(p, ap.NetworksPeer):
                    blocks.extend(IPBlock(c, ()) for c in p.cidrs)
                elif isinstance(p, ap.NodesPeer):
                    nodes.append(p.node_selector)
                # Unknown peers of Allow rules (fail closed) and domainNames peers match nothing.
            reason = Reason(tier, action, f"{short}/{policy.name}", label)
            out.append(
                make_rule(
                    ports=admin_ports(r.ports), selectors=selectors, blocks=blocks, nodes=nodes, nodes_by_ip=nodes_by_ip, action=action, reason=reason
                )
            )
        return tuple(out)

    return CompiledTieredPolicy((kind.name, "", policy.name), policy, tier, order, rules(policy.ingress), rules(policy.egress))


def named_ports(pod: Pod) -> frozenset[tuple[str, int, int]]:
    return frozenset((p.name, PROTO[p.protocol], p.port) for p in pod.ports if p.name)


class DirectionPlan:
    """What decides one direction for the pods that share exactly the same selecting policies."""

    __slots__ = ("admin", "baseline", "default", "default_result", "network_policy", "np_deny", "trivial")

    def __init__(
        self,
        admin: tuple[Rule, ...],
        network_policy: tuple[Rule, ...] | None,
        np_deny: Reason | None,
        baseline: tuple[Rule, ...],
        default: Reason,
    ) -> None:
        self.admin = admin
        self.network_policy = network_policy  # None: no NetworkPolicy of this direction selects the pod
        self.np_deny = np_deny
        self.baseline = baseline
        self.default = default
        self.default_result = DirectionResult(True, (default,))  # shared: trivial plans allocate nothing
        self.trivial = not admin and network_policy is None and not baseline


class Plans:
    __slots__ = ("egress", "ingress", "managed")

    def __init__(self, ingress: DirectionPlan, egress: DirectionPlan) -> None:
        self.ingress = ingress
        self.egress = egress
        # The pod needs the userspace path when anything can decide one of its directions.
        self.managed = not (ingress.trivial and egress.trivial)
