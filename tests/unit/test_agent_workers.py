"""The control process and its workers, without root: a real Agent and ClusterState on in-process
fake workers (each applying batches to its own real ClusterState with the worker's apply_ops) and
a recording ruleset (tests/unit/agent_fakes.py).

- a burst of changes becomes one batch with one op per object, in dependency order;
- the apply barrier: the accept cache is flushed and the ruleset synced only once every worker
  acknowledged the generation; a late worker delays both; a wedged one is killed after the
  timeout, the flush still happens, and the worker comes back with the whole state;
- a worker that dies is restarted with the whole current state, then told to judge;
- nothing is ready before every source synced and the first sync succeeded.
"""

from __future__ import annotations

import http.client
import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest
from agent_fakes import FakePool, ListSource, RecordingRuleset, changes, make_agent, start  # noqa: F401 (start is a fixture)

from kube_network_policies.agent import Agent, AgentError
from kube_network_policies.dataplane.protocol import Generation, Ops, Ready, coalesce
from kube_network_policies.engine import ClusterState, Flow
from kube_network_policies.model import ApiObject, object_key, parse_object

Start = Callable[[Agent], Agent]


def namespace(name: str = "ns", **labels: str) -> ApiObject:
    return parse_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})


def node(name: str = "n1") -> ApiObject:
    return parse_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"zone": "a"}}})


def pod(name: str, ip: str, app: str = "db", on: str = "n1") -> ApiObject:
    return parse_object(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "labels": {"app": app}},
            "spec": {"nodeName": on, "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip},
        }
    )


def policy(name: str = "db", app: str = "db", from_app: str = "web") -> ApiObject:
    """Pods `app` accept TCP 5432 from pods `from_app` only."""
    return parse_object(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {
                "podSelector": {"matchLabels": {"app": app}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from_app}}}], "ports": [{"port": 5432}]}],
            },
        }
    )


def verdicts(state: ClusterState, ips: list[str]) -> dict[tuple[str, str, int], bool]:
    """What `state` decides between every pair of `ips` on a few ports, as node n1 judges."""
    return {(a, b, port): state.evaluate(Flow.of(a, b, "TCP", port), "n1").allowed for a, b in itertools.permutations(ips, 2) for port in (80, 5432)}


def same_as_agent(agent: Agent, replica: ClusterState) -> bool:
    ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.9.9.9"]
    return replica.managed_ips("n1") == agent.state.managed_ips("n1") and verdicts(replica, ips) == verdicts(agent.state, ips)


def kinds(ops: Ops) -> list[str]:
    return [type(o).__name__ for o in ops.puts]


# ---- coalescing ----------------------------------------------------------------------------------


def test_coalesce_keeps_the_last_change_per_object_in_dependency_order() -> None:
    a1, a2, a3 = pod("a", "10.0.0.1", app="v1"), pod("a", "10.0.0.1", app="v2"), pod("a", "10.0.0.1", app="db")
    b, gone, kept = pod("b", "10.0.0.2"), pod("gone", "10.0.0.3"), pod("kept", "10.0.0.4")
    current = {object_key(gone): gone, object_key(kept): kept}
    burst: list[tuple[Any, Any]] = [
        (object_key(gone), None),  # deletions come last, whatever their place in the burst
        (object_key(a1), a1),
        (object_key(policy()), policy()),
        (object_key(a2), a2),
        (object_key(b), b),
        (object_key(b), None),  # added and deleted within the burst: nothing to do
        (object_key(kept), kept),  # what the replica holds already: nothing to do
        (object_key(node()), node()),
        (object_key(namespace()), namespace()),
        (object_key(a3), a3),
    ]
    ops = coalesce(current, burst)
    assert kinds(ops) == ["Namespace", "Node", "Pod", "NetworkPolicy"]
    assert ops.puts[2] is a3 and ops.removes == (object_key(gone),) and len(ops) == 5
    # The whole state of a replica, as a new worker gets it: the same order.
    full = coalesce({}, {object_key(o): o for o in (policy(), a3, namespace(), node())}.items())
    assert kinds(full) == ["Namespace", "Node", "Pod", "NetworkPolicy"] and full.removes == ()


def test_a_burst_of_changes_is_one_batch_with_one_op_per_object(start: Start) -> None:
    source = ListSource(changes(namespace(), pod("old", "10.0.0.3")))
    agent, rs, pool = make_agent(source)
    start(agent)
    worker = pool.workers[100]
    assert [m.generation for m in worker.batches()] == [1]
    # Many changes to one pod, a policy, a new namespace label and a deletion, in one take().
    source.push(*(pod("a", "10.0.0.1", app=f"v{i}") for i in range(50)))
    source.push(policy(), pod("a", "10.0.0.1", app="db"), namespace(team="x"), deleted=[("Pod", "ns", "old")])
    agent.step()
    batches = worker.batches()
    assert [m.generation for m in batches] == [1, 2] and agent.generation == 2
    ops = batches[-1].ops
    assert kinds(ops) == ["Namespace", "Pod", "NetworkPolicy"] and ops.removes == (("Pod", "ns", "old"),)
    assert ops.puts[1] == pod("a", "10.0.0.1", app="db")
    assert same_as_agent(agent, worker.state) and agent.state.managed_ips("n1") == {"10.0.0.1"}
    assert rs.synced[-1] == (["10.0.0.1"], [])
    # Changes that leave everything as it is send nothing.
    source.push(pod("a", "10.0.0.1", app="db"))
    agent.step()
    assert len(worker.batches()) == 2 and agent.generation == 2


# ---- the apply barrier ---------------------------------------------------------------------------


def two_workers(start: Start, acks: str = "prompt", apply_timeout: float | None = None) -> tuple[Agent, RecordingRuleset, FakePool, ListSource]:
    """A started agent with workers on queues 100 and 101 and a pod of its node; the worker of
    queue 101 acknowledges later batches as `acks` says."""
    events: list[str] = []
    pool = FakePool(queues=(100, 101), events=events)
    source = ListSource(changes(namespace(), pod("a", "10.0.0.1"), pod("web", "10.0.0.2", app="web")))
    agent, rs, _ = make_agent(source, pool=pool, ruleset=RecordingRuleset(events), queue_count=2)
    start(agent)
    assert agent.workers is not None
    if apply_timeout is not None:
        agent.workers.apply_timeout = apply_timeout
    pool.workers[101].acks = acks
    events.clear()
    return agent, rs, pool, source


def test_flush_and_sync_wait_until_every_worker_acknowledged(start: Start) -> None:
    agent, rs, _, source = two_workers(start)
    source.push(policy())  # selects pod a: it is diverted from now on
    agent.step()
    assert sorted(rs.events[:2]) == ["applied 100 2", "applied 101 2"]
    assert rs.events[2:] == ["flush", "sync"] and rs.synced[-1] == (["10.0.0.1"], [])


def test_a_late_worker_delays_flush_and_sync(start: Start) -> None:
    agent, rs, _, source = two_workers(start, acks="late")
    source.push(policy())
    began = time.monotonic()
    agent.step()
    assert rs.events == ["applied 100 2", "applied 101 2", "flush", "sync"]
    assert time.monotonic() - began >= 0.1  # it waited (the fake answers after three waits)
    assert agent.is_ready() and agent.metrics.control.errors == {}


def test_a_wedged_worker_is_killed_the_flush_still_happens_and_it_comes_back(start: Start) -> None:
    agent, rs, pool, source = two_workers(start, acks="never", apply_timeout=0.3)
    wedged = pool.workers[101]
    source.push(policy())
    began = time.monotonic()
    agent.step()
    assert time.monotonic() - began >= 0.3
    # Killed at the timeout; the flush and the sync go ahead for the workers that judge; within
    # the same turn the worker is replaced and given the whole state.
    assert rs.events == ["applied 100 2", "kill 101", "flush", "sync", "restart 101"]
    assert agent.metrics.control.errors == {"worker_timeout": 1}
    assert not wedged.alive and pool.workers[101] is not wedged
    fresh = pool.workers[101]
    assert [type(m) for m in fresh.received] == [Generation, Ready]
    assert fresh.batches()[0].generation == 2 and same_as_agent(agent, fresh.state)
    assert agent.is_ready()
    # ... and it acknowledges what comes next like the others.
    source.push(pod("web", "10.0.0.2", app="other"))
    agent.step()
    assert rs.events[5:] == ["applied 101 2", "applied 100 3", "applied 101 3", "flush"]  # the same pods diverted: no sync
    assert agent.workers is not None and agent.workers.applied == {100: 3, 101: 3}


# ---- restarts ------------------------------------------------------------------------------------


def test_a_dead_worker_is_restarted_with_the_full_state_then_ready(start: Start) -> None:
    source = ListSource(changes(namespace(), node(), pod("a", "10.0.0.1"), pod("web", "10.0.0.2", app="web"), policy()))
    agent, _, pool = make_agent(source)
    start(agent)
    source.push(pod("b", "10.0.0.3"), deleted=[("Pod", "ns", "web")])
    agent.step()
    assert agent.generation == 2
    first = pool.workers[100]
    pool.die(100)
    agent.step()
    fresh = pool.workers[100]
    assert fresh is not first and len(pool.started[100]) == 2
    assert [type(m) for m in fresh.received] == [Generation, Ready]  # the whole state first, then judge
    full = fresh.batches()[0]
    assert full.generation == agent.generation == 2
    assert kinds(full.ops) == ["Namespace", "Node", "Pod", "Pod", "NetworkPolicy"] and full.ops.removes == ()
    assert {object_key(o) for o in full.ops.puts} == set(agent.objects)
    assert same_as_agent(agent, fresh.state) and fresh.judging
    assert agent.workers is not None and agent.is_ready()
    agent.workers.receive()  # what the control loop's next wait reads
    assert agent.workers.applied[100] == 2


def test_a_worker_that_cannot_be_restarted_makes_the_agent_not_ready(start: Start) -> None:
    agent, _, pool = make_agent(ListSource(changes(namespace(), pod("a", "10.0.0.1"))))
    start(agent)
    pool.die(100)
    pool.fail_restart = True
    agent.step()
    assert not agent.is_ready() and agent.problems == {"workers": "the worker for queue 100 cannot be restarted"}
    pool.fail_restart = False
    agent.step()
    assert agent.is_ready() and agent.problems == {}
    assert same_as_agent(agent, pool.workers[100].state)


# ---- readiness before the first complete load ----------------------------------------------------


def readyz(agent: Agent) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", agent.metrics_port or 0, timeout=5)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status
    finally:
        conn.close()


def test_not_ready_until_every_source_synced_and_the_ruleset_is_installed(start: Start) -> None:
    source = ListSource(changes(namespace(), pod("a", "10.0.0.1"), pod("web", "10.0.0.2", app="web"), policy()), synced_after=3)
    agent, rs, pool = make_agent(source)
    seen: list[tuple[bool, int, int, int]] = []

    def while_syncing() -> None:
        w = pool.workers[100]
        seen.append((agent.is_ready(), readyz(agent), len(w.received), len(rs.synced)))

    source.while_syncing = while_syncing
    start(agent)
    # While the source had not synced: not ready (and /readyz said so), the workers were sent
    # nothing (they answer the default verdict), nothing was diverted.
    assert seen == [(False, 503, 0, 0)] * 3
    # Then: the whole state, Ready, every acknowledgement, the ruleset installed; ready.
    worker = pool.workers[100]
    assert [type(m) for m in worker.received] == [Generation, Ready] and worker.batches()[0].generation == 1
    assert same_as_agent(agent, worker.state)
    assert rs.events == ["applied 100 1", "sync"] and rs.synced == [(["10.0.0.1"], [])]
    assert agent.is_ready() and readyz(agent) == 200


def test_a_failed_first_sync_never_makes_the_agent_ready(start: Start) -> None:
    agent, rs, _ = make_agent(ListSource(changes(namespace(), pod("a", "10.0.0.1"), policy())))
    rs.fail_sync = True
    with pytest.raises(AgentError, match="installing the nftables ruleset failed"):
        start(agent)
    assert not agent.ready and not agent.is_ready() and readyz(agent) == 503


def test_workers_that_do_not_apply_the_initial_state_fail_the_start(start: Start) -> None:
    agent, _, _ = make_agent(ListSource(changes(namespace(), pod("a", "10.0.0.1"))), pool=FakePool(acks="never"))
    assert agent.workers is not None
    agent.workers.apply_timeout = 0.2
    with pytest.raises(AgentError, match="did not apply the initial state"):
        start(agent)
    assert not agent.is_ready()


def test_stopped_before_the_sources_synced_is_never_ready(start: Start) -> None:
    source = ListSource(synced_after=1_000_000)
    agent, rs, pool = make_agent(source)
    source.while_syncing = agent.stop
    start(agent)
    assert not agent.ready and not agent.is_ready() and rs.synced == [] and pool.workers[100].received == []
