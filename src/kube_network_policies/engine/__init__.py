"""The policy engine: pure, no I/O. ClusterState holds the cluster; evaluate() decides a Flow."""

from kube_network_policies.engine.facts import Fact, FactChange, ResolvedName
from kube_network_policies.engine.flow import Action, Decision, DirectionResult, Flow, Reason, Tier
from kube_network_policies.engine.state import ALL_FEATURES, ClusterState, Features

__all__ = [
    "ALL_FEATURES",
    "Action",
    "ClusterState",
    "Decision",
    "DirectionResult",
    "Fact",
    "FactChange",
    "Features",
    "Flow",
    "Reason",
    "ResolvedName",
    "Tier",
]
