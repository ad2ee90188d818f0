"""ClusterState: the cluster as the engine sees it, kept indexed for the packet path.

Every change (add, update, delete of any kind) does its work at once: it recomputes which policies
select the affected pods and gives each pod a shared, precomputed plan per direction. A decision
then costs two dictionary look-ups for the pods and a short walk over the rules of their plans.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kube_network_policies.engine.compiled import (
    CompiledNetworkPolicy,
    CompiledTieredPolicy,
    DirectionPlan,
    NamespaceEntry,
    Plans,
    PodEntry,
    PodSelectorPeer,
    PolicyId,
    Rule,
    compile_network_policy,
    compile_tiered_policy,
    named_ports,
)
from kube_network_policies.engine.facts import Fact, FactKey, FactListener, FactStore
from kube_network_policies.engine.flow import (
    SCTP,
    TCP,
    UDP,
    Action,
    Decision,
    DirectionResult,
    Flow,
    Reason,
    Tier,
)
from kube_network_policies.model import adminpolicy as ap
from kube_network_policies.model import kinds
from kube_network_policies.model.core import NAMESPACE_NAME_LABEL, Namespace, Node, Pod
from kube_network_policies.model.kinds import ApiObject, Role
from kube_network_policies.model.networkpolicy import NetworkPolicy
from kube_network_policies.model.selectors import LabelSelector, LabelSet


@dataclass(frozen=True, slots=True)
class Features:
    """Which kinds the engine enforces, as the agent flags that are on (model.kinds: Kind.flag,
    the Go agent's names: "admin-network-policy", ...). Kinds without a flag always are; objects
    of a kind that is off are kept aside in `ClusterState.ignored`."""

    flags: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.flags) - set(kinds.flags()))
        if unknown:
            raise ValueError(f"unknown feature flag(s) {', '.join(unknown)} (known: {', '.join(kinds.flags())})")

    @classmethod
    def of(cls, *flags: str) -> Features:
        return cls(frozenset(flags))

    @classmethod
    def all(cls) -> Features:
        """Every kind the registry knows enabled."""
        return cls(frozenset(kinds.flags()))

    def enabled(self, kind: str) -> bool:
        """Whether objects of `kind` (a registered kind's name) are enforced."""
        return kinds.enabled(kinds.require(kind), self.flags)


ALL_FEATURES = Features.all()

_NOT_SUBJECT = DirectionResult(True, ())

ManagedListener = Callable[[str], None]

DEAD_GROUP_SWEEP = 1024

# Any protocol but TCP, UDP and SCTP, for allowed_some_port(): rules treat them all alike.
_OTHER_PROTOCOL = 255


class ClusterState:
    def __init__(self, features: Features = Features()) -> None:
        self.features = features
        self._namespaces: dict[str, NamespaceEntry] = {}
        self._namespace_objects: dict[str, Namespace] = {}
        self._nodes: dict[str, Node] = {}
        self.nodes_by_ip: dict[bytes, LabelSet] = {}  # read live by compiled nodes peers
        self._pods: dict[str, PodEntry] = {}  # "ns/name" -> entry
        self._pods_by_ns: dict[str, dict[str, PodEntry]] = {}
        self._ip_owners: dict[bytes, list[PodEntry]] = {}
        self.pods_by_ip: dict[bytes, PodEntry] = {}
        self._network_policies: dict[PolicyId, CompiledNetworkPolicy] = {}
        self._np_by_ns: dict[str, dict[PolicyId, CompiledNetworkPolicy]] = {}
        self._tiered: dict[PolicyId, CompiledTieredPolicy] = {}
        self._plans: dict[frozenset[PolicyId], Plans] = {}
        self._managed: dict[str, dict[str, int]] = {}  # node -> local pod IPs needing the userspace path
        self._published: dict[str, frozenset[str]] = {}
        self._touched: set[str] = set()
        self._listeners: list[ManagedListener] = []
        self.ignored: dict[PolicyId, str] = {}  # objects of disabled APIs, with the reason
        # Pod groups: (namespace, pod labels) -> id, with member counts (see PodEntry.group).
        self._groups: dict[tuple[str, LabelSet], int] = {}
        self._group_key: dict[int, tuple[str, LabelSet]] = {}
        self._group_members: dict[int, int] = {}
        self._groups_by_ns: dict[str, set[int]] = {}
        self._next_group = 0
        self._dead_groups: set[int] = set()
        self._selectors: dict[tuple[str | None, LabelSelector | None, LabelSelector | None], PodSelectorPeer] = {}
        self._facts = FactStore()

    # ---- reading ---------------------------------------------------------------------------

    def pods(self) -> list[Pod]:
        return [e.pod for e in self._pods.values()]

    def pod(self, namespace: str, name: str) -> Pod | None:
        e = self._pods.get(f"{namespace}/{name}")
        return e.pod if e else None

    def pod_by_ip(self, ip: str) -> Pod | None:
        e = self.pods_by_ip.get(ipaddress.ip_address(ip).packed)
        return e.pod if e else None

    def namespaces(self) -> list[Namespace]:
        return list(self._namespace_objects.values())

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def managed_ips(self, node: str) -> frozenset[str]:
        """Local pod IPs of `node` that need the userspace path (selected by any enabled policy)."""
        return frozenset(self._managed.get(node, ()))

    def add_listener(self, listener: ManagedListener) -> None:
        """`listener(node)` is called whenever the managed IPs of `node` change."""
        self._listeners.append(listener)

    # ---- runtime facts ---------------------------------------------------------------------
    # The one way in for what is learned at run time (engine/facts.py): the caller owns the I/O
    # and the clock and passes `now`. evaluate() reads facts only through rules that consult
    # them; while `uses_facts` is False no verdict depends on any fact.

    def learn(self, fact: Fact, now: float) -> bool:
        """Store a fact about a pod the state holds, replacing its fact of the same key. False
        when nothing changed: an unknown pod (nothing is kept for addresses no pod owns), an
        expired fact, or the same fact again."""
        if fact.pod not in self._pods:
            return False
        return self._facts.learn(fact, now)

    def forget(self, pod: str, key: FactKey | None = None) -> int:
        """Remove one fact of a pod ("namespace/name"), or all of them; how many were removed."""
        return self._facts.forget(pod, key)

    def expire_facts(self, now: float) -> int:
        """Remove every fact no longer valid at `now`; how many. (Expired facts are never read,
        whether or not this ran: this only frees them and tells the listeners.)"""
        return self._facts.expire(now)

    def fact(self, pod: str, key: FactKey, now: float) -> Fact | None:
        return self._facts.get(pod, key, now)

    def facts(self, pod: str, now: float) -> tuple[Fact, ...]:
        return self._facts.of_pod(pod, now)

    def add_fact_listener(self, listener: FactListener) -> None:
        """`listener(change)` is called for every change of the stored facts (learned, replaced,
        forgotten, expired, evicted, or gone with the pod). A change can alter a verdict only
        while `uses_facts`: the agent need not flush its accept cache otherwise."""
        self._facts.add_listener(listener)

    @property
    def uses_facts(self) -> bool:
        """Whether a policy in force consults runtime facts (none does yet: domainNames peers
        match nothing)."""
        return any(c.consults_facts for c in self._tiered.values())

    # ---- changes ---------------------------------------------------------------------------

    def apply(self, obj: ApiObject) -> None:
        """Add or replace an object."""
        self._apply(obj)
        self._publish()

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Remove an object; False when it was not there."""
        found = self._delete(kind, namespace, name)
        self._publish()
        return found

    def _apply(self, obj: ApiObject) -> None:
        if isinstance(obj, Pod):
            self._set_pod(obj)
        elif isinstance(obj, NetworkPolicy):
            self._set_network_policy(obj)
        elif isinstance(obj, Namespace):
            self._set_namespace(obj)
        elif isinstance(obj, Node):
            self._set_node(obj)
        else:
            self._set_tiered(obj)

    def _delete(self, kind: str, namespace: str, name: str) -> bool:
        role = kinds.require(kind).role  # ValueError for a kind the registry does not know
        if role is Role.TIERED:
            pid = (kind, "", name)
            self.ignored.pop(pid, None)
            old = self._tiered.pop(pid, None)
            if old is None:
                return False
            self._release_selectors(old.rules)
            self._reselect(self._pods.values(), pid, None)
            return True
        if role is Role.NETWORK_POLICY:
            return self._delete_network_policy((kind, namespace, name))
        if kind == "Pod":
            return self._delete_pod(f"{namespace}/{name}")
        if kind == "Namespace":
            return self._delete_namespace(name)
        if kind == "Node":
            return self._delete_node(name)
        raise ValueError(f"no engine support for {kind!r}")

    # namespaces

    def _namespace_entry(self, name: str) -> NamespaceEntry:
        entry = self._namespaces.get(name)
        if entry is None:
            # A pod can arrive before its namespace: the API server's implied label is all we know.
            entry = NamespaceEntry(name, LabelSet({NAMESPACE_NAME_LABEL: name}))
            self._namespaces[name] = entry
        return entry

    def _set_namespace(self, ns: Namespace) -> None:
        self._namespace_objects[ns.name] = ns
        entry = self._namespace_entry(ns.name)
        if entry.labels is ns.labels:
            return
        self._set_namespace_labels(ns.name, ns.labels)

    def _delete_namespace(self, name: str) -> bool:
        ns = self._namespace_objects.pop(name, None)
        if ns is None:
            return False
        self._set_namespace_labels(name, LabelSet({NAMESPACE_NAME_LABEL: name}))
        return True

    def _set_namespace_labels(self, name: str, labels: LabelSet) -> None:
        entry = self._namespace_entry(name)
        if entry.labels is not labels:
            entry.labels = labels
            # Namespace labels change which namespaceSelector peers match its pod groups, and
            # which tiered policies select its pods.
            for gid in self._groups_by_ns.get(name, ()):
                pod_labels = self._group_key[gid][1]
                for sel in self._selectors.values():
                    sel.classify(gid, name, labels, pod_labels)
            self._refresh(self._pods_by_ns.get(name, {}).values())

    # nodes

    def _set_node(self, node: Node) -> None:
        self._delete_node(node.name)
        self._nodes[node.name] = node
        for a in node.addresses:
            self.nodes_by_ip[ipaddress.ip_address(a).packed] = node.labels

    def _delete_node(self, name: str) -> bool:
        old = self._nodes.pop(name, None)
        if old is None:
            return False
        for a in old.addresses:
            self.nodes_by_ip.pop(ipaddress.ip_address(a).packed, None)
        return True

    # pods

    def _set_pod(self, pod: Pod) -> None:
        key = pod.key
        old = self._pods.get(key)
        if old is not None:
            self._unindex_pod(old)
        entry = PodEntry(pod, self._namespace_entry(pod.namespace), named_ports(pod), tuple(ipaddress.ip_address(i).packed for i in pod.ips))
        self._pods[key] = entry
        self._pods_by_ns.setdefault(pod.namespace, {})[key] = entry
        if entry.subject:
            entry.group = self._acquire_group(entry)
            for packed in entry.packed:
                self._ip_owners.setdefault(packed, []).append(entry)
                self._resolve_ip(packed)
        self._refresh((entry,))

    def _delete_pod(self, key: str) -> bool:
        entry = self._pods.pop(key, None)
        if entry is None:
            return False
        self._unindex_pod(entry)
        self._facts.forget(key)  # an update keeps them; a pod of that name created later starts afresh
        return True

    def _unindex_pod(self, entry: PodEntry) -> None:
        by_ns = self._pods_by_ns.get(entry.pod.namespace)
        if by_ns is not None:
            by_ns.pop(entry.key, None)
        for packed in entry.packed:
            owners = self._ip_owners.get(packed)
            if owners and entry in owners:
                owners.remove(entry)
                if not owners:
                    del self._ip_owners[packed]
                self._resolve_ip(packed)
        if entry.plans is not None and entry.plans.managed:
            self._contribute(entry, -1)
        entry.plans = None
        if entry.group >= 0:
            self._release_group(entry.group)
            entry.group = -1

    # pod groups

    def _intern_selectors(self, rules: Iterable[Rule]) -> None:
        """Make a new policy's rules share one selector object per distinct selector, so that a
        new pod group is classified once per distinct selector, not once per rule."""
        for rule in rules:
            shared = []
            for sel in rule.selectors:
                known = self._selectors.get(sel.key)
                if known is None:
                    known = sel
                    self._selectors[sel.key] = sel
                    self._classify_selector(sel)
                known.users += 1
                shared.append(known)
            rule.selectors = tuple(shared)

    def _release_selectors(self, rules: Iterable[Rule]) -> None:
        for rule in rules:
            for sel in rule.selectors:
                sel.users -= 1
                if sel.users <= 0:
                    self._selectors.pop(sel.key, None)

    def _classify_selector(self, sel: PodSelectorPeer) -> None:
        """Fill a new selector's groups: namespaces first, then the groups of those that match."""
        if sel.namespace is not None:
            namespaces: Iterable[str] = (sel.namespace,)
        else:
            namespaces = [n for n, e in self._namespaces.items() if sel.ns_selector is None or sel.ns_selector.matches(e.labels)]
        for ns in namespaces:
            for gid in self._groups_by_ns.get(ns, ()):
                if sel.pod_selector is None or sel.pod_selector.matches(self._group_key[gid][1]):
                    sel.groups.add(gid)

    def _acquire_group(self, entry: PodEntry) -> int:
        key = (entry.ns.name, entry.labels)
        gid = self._groups.get(key)
        if gid is None:
            gid = self._next_group
            self._next_group += 1
            self._groups[key] = gid
            self._group_key[gid] = key
            self._group_members[gid] = 0
            self._groups_by_ns.setdefault(entry.ns.name, set()).add(gid)
            ns_labels = entry.ns.labels
            for sel in self._selectors.values():
                if sel.matches(entry.ns.name, ns_labels, entry.labels):
                    sel.groups.add(gid)
        self._group_members[gid] += 1
        return gid

    def _release_group(self, gid: int) -> None:
        self._group_members[gid] -= 1
        if self._group_members[gid] > 0:
            return
        key = self._group_key.pop(gid)
        del self._group_members[gid]
        del self._groups[key]
        self._groups_by_ns[key[0]].discard(gid)
        # Ids are never reused, so a dead id left in a rule's set matches no pod. Sweeping them
        # out in batches keeps a pod update cheap while label churn cannot grow the sets forever.
        self._dead_groups.add(gid)
        if len(self._dead_groups) >= DEAD_GROUP_SWEEP:
            dead, self._dead_groups = self._dead_groups, set()
            for sel in self._selectors.values():
                sel.groups -= dead

    def _resolve_ip(self, packed: bytes) -> None:
        """Several pods may claim an address (a new pod reusing a finished pod's IP, or status lag):
        prefer a Running pod, then the most recently seen one."""
        owners = self._ip_owners.get(packed)
        if not owners:
            self.pods_by_ip.pop(packed, None)
            return
        best = owners[-1]
        for e in reversed(owners):
            if e.pod.phase == "Running":
                best = e
                break
        self.pods_by_ip[packed] = best

    # policies

    def _set_network_policy(self, policy: NetworkPolicy) -> None:
        compiled = compile_network_policy(policy)
        self._intern_selectors(compiled.rules)
        old = self._network_policies.get(compiled.id)
        if old is not None:
            self._release_selectors(old.rules)
        self._network_policies[compiled.id] = compiled
        self._np_by_ns.setdefault(policy.namespace, {})[compiled.id] = compiled
        self._reselect(self._pods_by_ns.get(policy.namespace, {}).values(), compiled.id, compiled)

    def _delete_network_policy(self, pid: PolicyId) -> bool:
        old = self._network_policies.pop(pid, None)
        if old is None:
            return False
        self._release_selectors(old.rules)
        self._np_by_ns.get(pid[1], {}).pop(pid, None)
        self._reselect(self._pods_by_ns.get(pid[1], {}).values(), pid, None)
        return True

    def _set_tiered(self, policy: ap.TieredPolicy) -> None:
        pid: PolicyId = (policy.kind, "", policy.name)
        if not self.features.enabled(policy.kind):
            self.ignored[pid] = f"{policy.kind} support is not enabled"
            return
        compiled = compile_tiered_policy(policy, self.nodes_by_ip)
        self._intern_selectors(compiled.rules)
        old = self._tiered.get(pid)
        if old is not None:
            self._release_selectors(old.rules)
        self._tiered[pid] = compiled
        self._reselect(self._pods.values(), pid, compiled)

    # ---- selection and plans ---------------------------------------------------------------

    def _reselect(self, entries: Iterable[PodEntry], pid: PolicyId, compiled: CompiledNetworkPolicy | CompiledTieredPolicy | None) -> None:
        """One policy changed: update membership for the pods it may select and drop cached plans
        that were built from its previous version."""
        self._plans = {k: v for k, v in self._plans.items() if pid not in k}
        for e in entries:
            was = pid in e.selected_by
            now = compiled is not None and compiled.selects(e)
            if now:
                e.selected_by = e.selected_by | {pid} if not was else e.selected_by
            elif was:
                e.selected_by = e.selected_by - {pid}
            if was or now:
                self._assign_plans(e)

    def _refresh(self, entries: Iterable[PodEntry]) -> None:
        """Pods whose labels or namespace changed: recompute what selects them from scratch."""
        for e in entries:
            selected: set[PolicyId] = set()
            if e.subject:
                for pid, c in self._np_by_ns.get(e.ns.name, {}).items():
                    if c.selects(e):
                        selected.add(pid)
                for pid, t in self._tiered.items():
                    if t.selects(e):
                        selected.add(pid)
            e.selected_by = frozenset(selected)
            self._assign_plans(e)

    def _assign_plans(self, e: PodEntry) -> None:
        plans = self._plans.get(e.selected_by)
        if plans is None:
            plans = self._build_plans(e.selected_by)
            self._plans[e.selected_by] = plans
        was_managed = e.plans is not None and e.plans.managed
        e.plans = plans
        if plans.managed != was_managed:
            self._contribute(e, 1 if plans.managed else -1)

    def _build_plans(self, selected: frozenset[PolicyId]) -> Plans:
        nps = sorted((self._network_policies[p] for p in selected if p in self._network_policies), key=lambda c: c.id)
        tiered = sorted((self._tiered[p] for p in selected if p in self._tiered), key=lambda c: c.order)
        return Plans(self._direction_plan(nps, tiered, "ingress"), self._direction_plan(nps, tiered, "egress"))

    @staticmethod
    def _direction_plan(nps: list[CompiledNetworkPolicy], tiered: list[CompiledTieredPolicy], direction: str) -> DirectionPlan:
        admin: list[Rule] = []
        baseline: list[Rule] = []
        for t in tiered:
            (admin if t.tier is Tier.ADMIN else baseline).extend(getattr(t, direction))
        np_rules: list[Rule] | None = None
        names = []
        for c in nps:
            rules = getattr(c, direction)
            if rules is not None:
                np_rules = (np_rules or []) + list(rules)
                names.append(c.policy.key)
        np_deny = None
        if np_rules is not None:
            np_deny = Reason(Tier.NETWORK_POLICY, Action.DENY, detail=f"selected by {', '.join(names)}; no {direction} rule matches")
        if admin or baseline:
            default = Reason(Tier.DEFAULT, Action.ALLOW, detail="no admin or baseline rule matched")
        else:
            default = Reason(Tier.DEFAULT, Action.ALLOW, detail=f"no policy selects the pod for {direction}")
        return DirectionPlan(tuple(admin), None if np_rules is None else tuple(np_rules), np_deny, tuple(baseline), default)

    def _contribute(self, e: PodEntry, sign: int) -> None:
        """Count a managed pod's IPs in (or out of) its node's set. Counting, not a plain set,
        because two live pods may briefly claim one address while status catches up."""
        refs = self._managed.setdefault(e.pod.node, {})
        for ip in e.pod.ips:
            n = refs.get(ip, 0) + sign
            if n > 0:
                refs[ip] = n
            else:
                refs.pop(ip, None)
        self._touched.add(e.pod.node)

    def _publish(self) -> None:
        """Tell listeners about nodes whose managed set differs from what they were last told."""
        touched, self._touched = self._touched, set()
        for node in touched:
            current = frozenset(self._managed.get(node, ()))
            if current != self._published.get(node, frozenset()):
                self._published[node] = current
                for listener in self._listeners:
                    listener(node)

    # ---- the decision ----------------------------------------------------------------------

    def evaluate(self, flow: Flow, node: str | None = None) -> Decision:
        """Is this new connection allowed, and which rules decided?

        With `node`, only the directions of pods local to that node are judged (the agent on each
        node enforces its own pods' egress and ingress); otherwise both are.
        """
        src_packed = flow.src_ip
        dst_packed = flow.dst_ip
        src = self.pods_by_ip.get(src_packed)
        dst = self.pods_by_ip.get(dst_packed)
        family = 4 if len(src_packed) == 4 else 6
        protocol = flow.protocol
        port = flow.dst_port

        if src is None or (node is not None and src.pod.node != node):
            egress = _NOT_SUBJECT
        else:
            plans = src.plans
            plan = plans.egress if plans is not None else None
            if plan is None:
                egress = _NOT_SUBJECT
            elif plan.trivial:
                egress = plan.default_result
            else:
                egress = _judge(plan, dst, family, int.from_bytes(dst_packed, "big"), dst_packed, protocol, port, dst)
        if dst is None or (node is not None and dst.pod.node != node):
            ingress = _NOT_SUBJECT
        else:
            plans = dst.plans
            plan = plans.ingress if plans is not None else None
            if plan is None:
                ingress = _NOT_SUBJECT
            elif plan.trivial:
                ingress = plan.default_result
            else:
                ingress = _judge(plan, src, family, int.from_bytes(src_packed, "big"), src_packed, protocol, port, dst)
        return Decision(egress.allowed and ingress.allowed, egress, ingress)

    def allowed(self, flow: Flow, node: str | None = None) -> bool:
        """Only the verdict (the packet path's question)."""
        return self.evaluate(flow, node).allowed

    def allowed_some_port(self, src_packed: bytes, dst_packed: bytes, protocol: int | None, node: str | None = None) -> bool:
        """Would any new connection from src to dst be allowed: to some destination port of
        `protocol`, or, with None, of any protocol? For packets whose transport header cannot be
        read (the dataplane's fail-open path), so that not knowing the port never lets through
        what the addresses alone already deny.

        Exact, not an approximation: for one protocol a rule's port condition is a union of
        ranges [lo, hi] and single named ports of the destination, so the verdict as a function
        of the port only changes at some lo, hi + 1, named port or named port + 1. Evaluating
        port 0 and each of those points (with the rules of both plans, whichever directions
        `node` judges) visits every piece. Rules cannot tell protocols other than TCP, UDP and
        SCTP apart (they have no ports, and rules with ports name only those three), so "any
        protocol" is those three plus one stand-in for the rest. Costs one evaluate() per
        point: the slow path only.
        """
        src = self.pods_by_ip.get(src_packed)
        dst = self.pods_by_ip.get(dst_packed)
        rules: list[Rule] = []
        for entry, direction in ((src, "egress"), (dst, "ingress")):
            plan = getattr(entry.plans, direction) if entry is not None and entry.plans is not None else None
            if plan is not None:
                rules += plan.admin
                rules += plan.network_policy or ()
                rules += plan.baseline
        protocols = (TCP, UDP, SCTP, _OTHER_PROTOCOL) if protocol is None else (protocol,)
        evaluate = self.evaluate
        for proto in protocols:
            points = {0}
            for rule in rules:
                for p, lo, hi in rule.ranges or ():
                    if p == proto:
                        points.add(lo)
                        points.add(hi + 1)
            if dst is not None:
                for _name, p, port in dst.named:
                    if p == proto:
                        points.add(port)
                        points.add(port + 1)
            for port in sorted(points):
                if port <= 0xFFFF and evaluate(Flow(src_packed, dst_packed, proto, 0, port), node).allowed:
                    return True
        return False


def _judge(
    plan: DirectionPlan,
    peer: PodEntry | None,
    family: int,
    address: int,
    packed: bytes,
    protocol: int,
    port: int,
    destination: PodEntry | None,
) -> DirectionResult:
    """The tier pipeline for one direction: Admin -> NetworkPolicy -> Baseline -> default allow."""
    passed: Reason | None = None
    for rule in plan.admin:
        if rule.match(peer, family, address, packed, protocol, port, destination):
            if rule.action is Action.PASS:
                passed = rule.reason
                break
            return DirectionResult(rule.action is Action.ALLOW, (rule.reason,))
    np_rules = plan.network_policy
    if np_rules is not None:
        for rule in np_rules:
            if rule.match(peer, family, address, packed, protocol, port, destination):
                return DirectionResult(True, (passed, rule.reason) if passed else (rule.reason,))
        deny = plan.np_deny
        return DirectionResult(False, (passed, deny) if passed else (deny,))  # type: ignore[arg-type]
    for rule in plan.baseline:
        if rule.match(peer, family, address, packed, protocol, port, destination):
            allowed = rule.action is not Action.DENY  # Pass at the last tier falls to the default: allow
            return DirectionResult(allowed, (passed, rule.reason) if passed else (rule.reason,))
    return DirectionResult(True, (passed, plan.default) if passed else (plan.default,))
