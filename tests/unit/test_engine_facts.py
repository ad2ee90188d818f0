"""Runtime facts (engine/facts.py) through ClusterState: stored per pod, replaced by key, expired
on the caller's clock, gone with their pod, bounded, and not read by the packet path."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from kube_network_policies.engine import ALL_FEATURES, ClusterState, FactChange, Flow, ResolvedName
from kube_network_policies.engine import facts as facts_module
from kube_network_policies.model import parse_object

ENGINE = Path(facts_module.__file__).parent


def pod(name: str, ip: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "x", "labels": labels or {"app": name}},
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Running", "podIP": ip},
    }


def state_with_pods() -> tuple[ClusterState, list[FactChange]]:
    state = ClusterState(ALL_FEATURES)
    for obj in (pod("web", "10.0.0.1"), pod("db", "10.0.0.2")):
        state.apply(parse_object(obj))
    changes: list[FactChange] = []
    state.add_fact_listener(changes.append)
    return state, changes


def answer(name: str = "db.example.com.", *addresses: str, expires: float = 100.0, pod_key: str = "x/web") -> ResolvedName:
    return ResolvedName.of(pod_key, name, addresses or ("192.0.2.7",), expires)


def test_a_fact_is_stored_and_replaced_by_key() -> None:
    state, changes = state_with_pods()
    first = answer()
    assert first.key == ("dns", "db.example.com") and first.addresses == {bytes([192, 0, 2, 7])}
    assert state.learn(first, now=10.0)
    assert state.fact("x/web", ("dns", "db.example.com"), now=10.0) == first
    assert state.facts("x/web", now=10.0) == (first,) and state.facts("x/db", now=10.0) == ()
    assert changes == [FactChange("x/web", first.key, None, first)]
    assert not state.learn(first, now=11.0)  # the same fact again: nothing changes, nobody is told
    assert len(changes) == 1
    second = answer("DB.example.com", "192.0.2.8", "2001:db8::8", expires=200.0)
    assert state.learn(second, now=12.0)
    assert state.facts("x/web", now=12.0) == (second,)
    assert changes[-1] == FactChange("x/web", first.key, first, second)
    other = answer("cache.example.com")
    assert state.learn(other, now=12.0)
    assert set(state.facts("x/web", now=12.0)) == {second, other}


def test_facts_expire_on_the_callers_clock() -> None:
    state, changes = state_with_pods()
    fact = answer(expires=50.0)
    assert not state.learn(answer(expires=50.0), now=50.0)  # already expired: not stored
    assert state.learn(fact, now=10.0)
    assert state.fact("x/web", fact.key, now=49.9) == fact
    assert state.fact("x/web", fact.key, now=50.0) is None  # never read once expired, even before expire_facts
    assert state.facts("x/web", now=60.0) == ()
    assert state.expire_facts(now=49.0) == 0
    assert state.expire_facts(now=50.0) == 1
    assert changes[-1] == FactChange("x/web", fact.key, fact, None)
    assert state.expire_facts(now=1e9) == 0


def test_facts_go_with_their_pod() -> None:
    state, changes = state_with_pods()
    fact = answer()
    assert state.learn(fact, now=1.0)
    # A pod update (labels, status) keeps what the pod learned.
    state.apply(parse_object(pod("web", "10.0.0.1", app="web", version="2")))
    assert state.facts("x/web", now=2.0) == (fact,)
    assert state.delete("Pod", "x", "web")
    assert state.facts("x/web", now=2.0) == ()
    assert changes[-1] == FactChange("x/web", fact.key, fact, None)
    state.apply(parse_object(pod("web", "10.0.0.1")))  # a new pod of that name starts afresh
    assert state.facts("x/web", now=2.0) == ()


def test_nothing_is_kept_for_unknown_pods_and_forget_removes() -> None:
    state, changes = state_with_pods()
    assert not state.learn(answer(pod_key="x/nobody"), now=1.0)
    assert state.facts("x/nobody", now=1.0) == () and changes == []
    a, b = answer("a.example.com"), answer("b.example.com")
    assert state.learn(a, now=1.0) and state.learn(b, now=1.0)
    assert state.forget("x/web", a.key) == 1 and state.facts("x/web", now=1.0) == (b,)
    assert state.forget("x/web") == 1 and state.forget("x/web") == 0
    assert [c.new is None for c in changes[-2:]] == [True, True]


def test_facts_per_pod_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(facts_module, "MAX_FACTS_PER_POD", 3)
    state, changes = state_with_pods()
    for i, expires in enumerate((30.0, 10.0, 20.0)):
        assert state.learn(answer(f"n{i}.example.com", expires=expires), now=1.0)
    assert state.learn(answer("n3.example.com", expires=40.0), now=1.0)
    names = sorted(f.key[1] for f in state.facts("x/web", now=1.0))
    assert names == ["n0.example.com", "n2.example.com", "n3.example.com"]  # the one expiring first went
    assert FactChange("x/web", ("dns", "n1.example.com"), answer("n1.example.com", expires=10.0), None) in changes
    # Replacing a known name is not a new entry: nothing is evicted.
    assert state.learn(answer("n3.example.com", "192.0.2.9", expires=50.0), now=1.0)
    assert len(state.facts("x/web", now=1.0)) == 3


def test_no_verdict_depends_on_facts_yet() -> None:
    """domainNames peers match nothing: learning that web resolved the name to db's address
    changes no decision, and no policy in force consults facts."""
    state, _ = state_with_pods()
    cnp = {
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "web-egress"},
        "spec": {
            "tier": "Baseline",
            "priority": 1,
            "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}},
            "egress": [
                {"name": "dns-db", "action": "Accept", "to": [{"domainNames": ["db.example.com"]}]},
                {"name": "rest", "action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]},
            ],
        },
    }
    state.apply(parse_object(cnp))
    flow = Flow.of("10.0.0.1", "10.0.0.2", "TCP", 5432, 40000)
    before = state.evaluate(flow)
    assert not before.allowed and not state.uses_facts
    assert state.learn(answer("db.example.com", "10.0.0.2"), now=1.0)
    assert state.evaluate(flow) == before


def test_the_engine_does_no_io_and_reads_no_clock() -> None:
    """The engine is given time and facts; it imports nothing that reaches the outside."""
    banned = {"time", "os", "socket", "subprocess", "threading", "datetime", "random", "select"}
    for path in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"
