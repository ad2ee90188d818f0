"""Engine mode: the policy engine alone answers every probe (no root, no kernel)."""

from __future__ import annotations

from kube_network_policies.engine import ClusterState, Features, Flow
from kube_network_policies.lab.runner import (
    Observation,
    Pair,
    ScenarioCluster,
    StepChanges,
    combine_families,
)
from kube_network_policies.lab.scenario import Scenario
from kube_network_policies.model import kinds, parse_object

CLIENT_PORT = 40000  # policies never match on the source port; any fixed value will do


def features_for(requires: tuple[str, ...] | list[str]) -> Features:
    """The kinds a scenario's `requires` enables: the features that are agent flags (model.kinds)."""
    return Features(frozenset(requires) & frozenset(kinds.flags()))


class EngineSession:
    def __init__(self, cluster: ScenarioCluster) -> None:
        self.cluster = cluster
        self.state = ClusterState(features_for(cluster.scenario.requires))
        for obj in cluster.initial_objects():
            self.state.apply(parse_object(obj))

    def apply(self, changes: StepChanges) -> None:
        for obj in changes.apply:
            self.state.apply(parse_object(obj))
        for ref in changes.delete:
            self.state.delete(ref.kind, ref.namespace, ref.name)
            if ref.kind == "Namespace":
                for pod in [p for p in self.state.pods() if p.namespace == ref.name]:
                    self.state.delete("Pod", pod.namespace, pod.name)

    def observe(self, protocol: str, port: int, pairs: list[Pair]) -> dict[Pair, Observation]:
        out: dict[Pair, Observation] = {}
        for pair in pairs:
            results = []
            for client_ip, server_ip in self.cluster.family_pairs(pair):
                d = self.state.evaluate(Flow.of(client_ip, server_ip, protocol, port, CLIENT_PORT))
                results.append(d.allowed)
            out[pair] = combine_families(results)
        return out

    def close(self) -> None:
        pass


class EngineMode:
    name = "engine"

    def unsupported(self, scenario: Scenario) -> str | None:
        return None  # the engine answers every feature the format names

    def open(self, cluster: ScenarioCluster) -> EngineSession:
        return EngineSession(cluster)
