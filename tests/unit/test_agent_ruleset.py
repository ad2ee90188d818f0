"""The agent keeps its ruleset in the kernel and says when it cannot (no root: the ruleset is a
recording stand-in with the same interface; tests/kernel/test_agent_hardening.py runs the real one).

- a failed sync keeps the previous sets, makes /readyz fail, is retried with backoff and clears;
- the check runs when notifications say so and periodically without them; a difference is
  restored and counted; a failed restore makes /readyz fail and is retried;
- an address nft cannot hold is left out (the rest is still synced) and reported;
- nothing in a control-loop turn ends the agent: a source or apply failure is counted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
from agent_fakes import RecordingRuleset, changes, make_agent, start  # noqa: F401 (start is a fixture)

from kube_network_policies import agent as agent_module
from kube_network_policies.agent import Agent, AgentConfig
from kube_network_policies.control import keeper as keeper_module
from kube_network_policies.model import Namespace, Pod
from kube_network_policies.model.networkpolicy import NetworkPolicy
from kube_network_policies.model.selectors import LabelSet
from kube_network_policies.sources.base import Batch, Change


def running_agent(start: Callable[[Agent], Agent], **config: Any) -> tuple[Agent, RecordingRuleset]:
    """An agent past start() (ready) on a recording ruleset and in-process workers."""
    agent, rs, _ = make_agent(**config)
    start(agent)
    assert agent.ready and rs.synced == [([], [])]
    return agent, rs


class NoSource:
    def open(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def synced(self) -> bool:
        return True

    def take(self) -> Batch | None:
        return None

    def fileno(self) -> None:
        return None

    def status(self) -> dict[str, object]:
        return {}

    def problems(self) -> dict[str, str]:
        return {}


def pod(name: str, ip: str, node: str = "n1", app: str = "db") -> Pod:
    # Built directly, not parsed: the model's validation would refuse a bad IP (as it should).
    return Pod(namespace="ns", name=name, labels=LabelSet({"app": app}), ips=(ip,), node=node, phase="Running", host_network=False, ports=())


def namespace() -> Namespace:
    return Namespace("ns", LabelSet({"kubernetes.io/metadata.name": "ns"}))


def select_db() -> NetworkPolicy:
    from kube_network_policies.model import parse_object

    obj = parse_object(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "ns"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]},
        }
    )
    assert isinstance(obj, NetworkPolicy)
    return obj


def test_a_failed_sync_keeps_the_old_sets_fails_readiness_and_is_retried(start: Callable[[Agent], Agent]) -> None:
    agent, rs = running_agent(start)
    assert agent.is_ready()
    rs.fail_sync = True
    agent.apply(changes(namespace(), pod("a", "10.0.0.1"), select_db()))
    assert not agent.is_ready()
    assert "sync" in agent.problems
    assert agent.metrics.control.errors == {"ruleset_sync": 1}
    assert agent.metrics.control.in_sync is False
    assert agent.keeper.retry_at < math.inf
    rs.fail_sync = False
    agent.keeper.retry_at = 0.0  # the retry is due
    agent.keeper.maintain()
    assert rs.synced[-1] == (["10.0.0.1"], [])
    assert agent.is_ready() and agent.metrics.control.in_sync


def test_retries_back_off(start: Callable[[Agent], Agent]) -> None:
    agent, rs = running_agent(start)
    rs.fail_sync = True
    delays = []
    for _ in range(7):
        agent.keeper.retry_at = 0.0
        before = time.monotonic()
        agent.keeper.maintain()
        delays.append(round(agent.keeper.retry_at - before, 1))
    assert delays == [0.2, 0.5, 1.0, 2.0, 5.0, 5.0, 5.0]


def test_differences_are_restored_and_counted(start: Callable[[Agent], Agent]) -> None:
    agent, rs = running_agent(start)
    rs.problems = ["table inet kube-network-policies is missing"]
    agent.keeper.check_at = 0.0  # as after a notification
    agent.keeper.maintain()
    assert rs.restores == 1
    assert agent.metrics.control.restores == 1
    assert agent.is_ready()
    assert agent.keeper.check_at < math.inf  # a confirming check follows


def test_a_failed_restore_fails_readiness_until_one_succeeds(start: Callable[[Agent], Agent]) -> None:
    agent, rs = running_agent(start)
    rs.problems = ["chain postrouting is missing"]
    rs.fail_restore = True
    agent.keeper.check_at = 0.0
    agent.keeper.maintain()
    assert not agent.is_ready()
    assert agent.problems["ruleset"] == "restoring the ruleset failed"
    assert agent.metrics.control.errors == {"ruleset_restore": 1}
    retry = agent.keeper.check_at
    assert time.monotonic() < retry < time.monotonic() + 1.0
    rs.fail_restore = False
    agent.keeper.check_at = 0.0
    agent.keeper.maintain()
    assert agent.is_ready() and agent.metrics.control.restores == 1


def test_the_periodic_check_runs_without_notifications(start: Callable[[Agent], Agent]) -> None:
    agent, rs = running_agent(start)
    agent.keeper.maintain()
    assert rs.checks == 0  # not due yet
    agent.keeper.backstop_at = 0.0
    agent.keeper.maintain()
    assert rs.checks == 1
    assert agent.keeper.backstop_at > time.monotonic() + keeper_module.CHECK_INTERVAL_S - 1


def test_an_address_nft_cannot_hold_is_left_out_and_reported(start: Callable[[Agent], Agent]) -> None:
    """A zoned IPv6 address (which the model rejects) used to fail every later sync, so new
    policies were not enforced while /statusz said ready."""
    agent, rs = running_agent(start)
    agent.apply(changes(namespace(), pod("a", "10.0.0.1"), pod("z", "fd00::99%x"), select_db()))
    assert rs.synced[-1] == (["10.0.0.1"], [])
    assert "addresses" in agent.problems and not agent.is_ready()
    agent.apply(Batch([Change(("Pod", "ns", "z"), None, None)]))
    assert "addresses" not in agent.problems and agent.is_ready()


def test_nothing_in_a_turn_ends_the_agent(start: Callable[[Agent], Agent]) -> None:
    agent, _ = running_agent(start)

    class Broken(NoSource):
        def take(self) -> Batch | None:
            raise RecursionError("maximum recursion depth exceeded")

    agent.source = Broken()  # type: ignore[assignment]
    agent.step()
    assert agent.metrics.control.errors == {"source": 1}

    class Poison(NoSource):
        def take(self) -> Batch | None:
            return Batch([Change(("Pod", "ns", "p"), None, "not an object")])  # type: ignore[arg-type]

    agent.source = Poison()  # type: ignore[assignment]
    agent.step()
    assert agent.metrics.control.errors["apply"] == 1
    assert "apply" in agent.problems and not agent.is_ready()


def test_a_stalled_control_loop_is_not_ready_then_not_alive(start: Callable[[Agent], Agent]) -> None:
    agent, _ = running_agent(start)
    assert agent.is_ready() and agent.is_alive()
    agent._heartbeat -= agent_module.STALL_READY_S + 1
    assert not agent.is_ready() and agent.is_alive()
    agent._heartbeat -= agent_module.STALL_LIVE_S
    assert not agent.is_alive()


def test_exit_decision(start: Callable[[Agent], Agent]) -> None:
    def decision(**kw: Any) -> tuple[bool, str]:
        agent, _ = running_agent(start, **kw)
        return agent.exit_decision()

    assert decision(fail_open=True)[0] is True
    keep, why = decision()
    assert keep is False and "standalone" in why
    assert decision(ruleset_on_exit="keep") == (True, "--ruleset-on-exit=keep")
    assert decision(fail_open=True, ruleset_on_exit="remove") == (False, "--ruleset-on-exit=remove")
    with pytest.raises(ValueError, match="ruleset_on_exit"):
        Agent(AgentConfig(manifests=("x",), node="n", ruleset_on_exit="sometimes"))
    # Kubernetes mode without an API to ask (an injected source): keep, fail-closed.
    agent = Agent(dataclasses.replace(AgentConfig(manifests=(), node="n1")), source=NoSource())  # type: ignore[arg-type]
    assert agent.exit_decision()[0] is True


def test_a_fight_over_the_ruleset_is_reported(start: Callable[[Agent], Agent]) -> None:
    """Another agent or a firewall manager undoing the ruleset again and again: enforcement has
    gaps, so the agent goes on restoring but is not ready, and says why."""
    agent, rs = running_agent(start)
    for _ in range(keeper_module.FIGHT_RESTORES):
        rs.problems = ["table inet kube-network-policies is missing"]
        agent.keeper.check_at = 0.0
        agent.keeper.maintain()
        assert agent.is_ready()
    rs.problems = ["table inet kube-network-policies is missing"]
    agent.keeper.check_at = 0.0
    agent.keeper.maintain()
    assert rs.restores == keeper_module.FIGHT_RESTORES + 1
    assert not agent.is_ready() and "times in 60 s" in agent.problems["ruleset"]
    # Once the restores are old enough, a clean check makes it ready again.
    agent.keeper.restored_at = [t - keeper_module.FIGHT_WINDOW_S for t in agent.keeper.restored_at]
    agent.keeper.check_at = 0.0
    agent.keeper.maintain()
    assert agent.is_ready()


def test_a_refused_or_unreadable_input_makes_the_agent_not_ready(start: Callable[[Agent], Agent]) -> None:
    """A manifest change refused as a whole, or an object from the API this agent cannot read:
    the previous state stays in force, which is not what the operator asked for."""
    agent, _ = running_agent(start)

    class Refusing(NoSource):
        def __init__(self) -> None:
            self.found = {"manifests": "the manifest files changed but were refused"}

        def problems(self) -> dict[str, str]:
            return dict(self.found)

    source = Refusing()
    agent.source = source  # type: ignore[assignment]
    agent.step()
    assert not agent.is_ready() and agent.problems == {"source:manifests": "the manifest files changed but were refused"}
    agent.step()
    assert agent.metrics.control.errors == {"source": 1}  # counted once, not once per turn
    source.found = {}
    agent.step()
    assert agent.is_ready() and agent.problems == {}
