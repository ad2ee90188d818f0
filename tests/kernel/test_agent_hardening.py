"""Enforcement must not switch off silently: the agent end to end (as in test_agent.py, whose lab
and fixtures this module shares) against an operator's bad day.

- the ruleset removed or edited behind the agent's back (`nft flush ruleset`, `nft delete table`,
  `iptables -t mangle -F`, a foreign rule in our chain or above our queue rule, a pod IP removed
  from our set) is noticed from nf_tables notifications and restored within a second, counted in
  ruleset_restores_total; the denied pair is denied again;
- a manifest that cannot be read never takes the agent down: the previous state stays enforced
  and /readyz fails until the files are fixed;
- --ruleset-on-exit=keep keeps a fail-closed agent's rules across a restart, and
  `kube-network-policies cleanup` removes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from test_agent import (  # noqa: F401 (lab and start are fixtures)
    SRC,
    TABLE,
    AgentProcess,
    Backend,
    Lab,
    lab,
    sample,
    samples,
    start,
    wait_for,
    write,
)

pytestmark = pytest.mark.kernel

RESTORE_WITHIN_S = 1.0


def restores(agent: AgentProcess) -> float:
    return sample(samples(agent.get("/metrics")[1]), "ruleset_restores_total") or 0.0


def restored_in(lab: Lab, agent: AgentProcess, *command: str) -> float:
    """Run a command in the node namespace that tampers with the ruleset; seconds until the agent
    counted a restore and the table is back."""
    before = restores(agent)
    t0 = time.monotonic()
    lab.topo.run(lab.node_ns, *command)
    wait_for(
        f"the agent to restore the ruleset after `{' '.join(command)}`",
        lambda: restores(agent) > before and lab.nft_table().returncode == 0,
        timeout=10.0,
        detail=lambda: agent.log[-3000:],
    )
    return time.monotonic() - t0


TAMPERING = {
    "flush-ruleset": ("nft", "flush", "ruleset"),
    "delete-table": ("nft", "delete", "table", "inet", TABLE),
    "flush-chain": ("nft", "flush", "chain", "inet", TABLE, "postrouting"),
    "foreign-rule": ("nft", "insert", "rule", "inet", TABLE, "postrouting", "accept"),
    "pod-ip-removed": ("nft", "delete", "element", "inet", TABLE, "podips-v4", "{ 10.244.1.3 }"),
    "mangle-flushed": ("iptables", "-t", "mangle", "-F"),
    "accept-above-queue-rule": ("iptables", "-t", "mangle", "-I", "POSTROUTING", "1", "-j", "ACCEPT"),
}


@pytest.mark.parametrize("tampering", list(TAMPERING))
def test_ruleset_changed_behind_the_agents_back_is_restored(lab: Lab, start: Callable[..., AgentProcess], tampering: str) -> None:
    command = TAMPERING[tampering]
    if command[0] == "iptables" and lab.backend is not Backend.XT_NFQUEUE:
        pytest.skip("the nft-queue backend uses no iptables rules")
    agent = start(allow=True)
    assert lab.probe(("a4", "b4", 80), ("a4", "b4", 81), ("a6", "b6", 81)) == [True, False, False]
    elapsed = restored_in(lab, agent, *command)
    print(f"{tampering}: restored after {elapsed * 1000:.0f} ms")
    assert elapsed <= RESTORE_WITHIN_S, f"{tampering}: restored only after {elapsed:.2f} s"
    lab.flush_accept_cache()
    assert lab.probe(("a4", "b4", 80), ("a4", "b4", 81), ("a6", "b6", 81)) == [True, False, False]
    assert len(lab.our_xt_rules()) == lab.xt_rules
    if tampering == "accept-above-queue-rule":
        first = lab.topo.run(lab.node_ns, "iptables", "-w", "-t", "mangle", "-S", "POSTROUTING").stdout.splitlines()[1]
        assert TABLE in first, f"our queue rule is not first again: {first}"
    assert agent.get("/readyz")[0] == 200
    assert "the ruleset was changed by someone else" in agent.log
    assert agent.terminate() == 0


def test_unreadable_manifests_keep_the_previous_state_in_force(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    """Deeply nested YAML used to raise RecursionError out of the reload path: the agent exited
    and, fail-closed, removed its rules, so denied pairs flowed."""
    agent = start()
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80)) == [False, False]
    write(agent.manifests / "bomb.yaml", "a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    big_int = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {n: '1'}}\nspec: {n: " + "9" * 5000 + "}\n"
    write(agent.manifests / "int.yaml", big_int)
    wait_for("the agent to report the refusal", lambda: agent.get("/readyz")[0] == 503, detail=lambda: agent.log[-3000:])
    assert agent.process.poll() is None, f"the agent exited:\n{agent.log[-3000:]}"
    assert "source:manifests" in (agent.status() or {}).get("problems", {})
    assert lab.nft_table().returncode == 0
    assert lab.probe(("a4", "b4", 80), ("a6", "b6", 80)) == [False, False]
    assert "Traceback" not in agent.log
    # Fixed: enforced and ready again.
    (agent.manifests / "bomb.yaml").unlink()
    (agent.manifests / "int.yaml").unlink()
    wait_for("the agent to be ready again", lambda: agent.get("/readyz")[0] == 200, detail=lambda: agent.log[-3000:])
    assert agent.terminate() == 0


def test_keep_on_exit_then_cleanup(lab: Lab, start: Callable[..., AgentProcess]) -> None:
    """--ruleset-on-exit=keep: a fail-closed restart never lets a connection pass unjudged; the
    next agent takes the rules over; `cleanup` removes everything by hand (uninstall)."""
    agent = start("--ruleset-on-exit=keep", allow=True)
    assert lab.probe(("a4", "b4", 80), ("a4", "b4", 81)) == [True, False]
    assert agent.terminate() == 0
    assert "keeping the ruleset on exit: --ruleset-on-exit=keep" in agent.log
    assert lab.nft_table().returncode == 0 and len(lab.our_xt_rules()) == lab.xt_rules
    lab.flush_accept_cache()
    # No agent: nothing passes unjudged (the queue has no listener and no bypass).
    assert lab.probe(("a4", "b4", 80), ("a4", "b4", 81)) == [False, False]
    again = start("--ruleset-on-exit=keep", allow=True)
    assert lab.probe(("a4", "b4", 80), ("a4", "b4", 81)) == [True, False]
    again.kill()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        ["ip", "netns", "exec", lab.node_ns, sys.executable, "-m", "kube_network_policies", "cleanup"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f"removed nft table inet {TABLE}" in out.stdout
    assert lab.nft_table().returncode != 0 and lab.our_xt_rules() == []
    assert lab.probe(("a4", "b4", 81)) == [True]  # no rules, no agent: nothing is blackholed
    out = subprocess.run(
        ["ip", "netns", "exec", lab.node_ns, sys.executable, "-m", "kube_network_policies", "cleanup"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0 and "nothing to remove" in out.stdout
