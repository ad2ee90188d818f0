"""Restart or uninstall? What a fail-closed agent asks the API when it is told to stop.

On SIGTERM a fail-closed agent must choose. Removing its ruleset lets connections of
policy-selected pods pass unjudged until the next agent is ready (a rolling update, a restart:
the common case). Keeping it makes those connections wait for the next agent, the right thing
unless no next agent will ever come (the DaemonSet was deleted, or no longer runs on this node):
then the node would be blackholed for good. So the agent keeps its ruleset unless the API says
that no DaemonSet will run an agent on this node again:

- its pod (POD_NAMESPACE/POD_NAME, from the downward API) is owned by no DaemonSet: nothing will
  restart it;
- that DaemonSet is gone, or has a deletionTimestamp (being deleted);
- it no longer selects this node (nodeSelector, required node affinity, untolerated
  NoSchedule/NoExecute taints other than the node lifecycle's transient node.kubernetes.io/
  ones), as when it is taken off some nodes.

When the API cannot answer (down, unreachable, forbidden), the agent keeps the ruleset and says
how to remove it by hand (`kube-network-policies cleanup`). A DaemonSet that was deleted and
re-created under the same name counts as present: its new agent takes over the ruleset.

Read-only RBAC: get pods, nodes, and daemonsets in the agent's namespace (install*.yaml).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from kube_network_policies.sources.kubeconfig import ApiConfig

__all__ = ["ExitDecision", "exit_decision", "node_selected"]

log = logging.getLogger(__name__)

TIMEOUT_S = 3.0  # per request; the kubelet's grace period (30 s by default) bounds the whole
CLEANUP_HINT = "run `kube-network-policies cleanup` on the node if this is an uninstall"

# Taints under this prefix are the node lifecycle's (not-ready, unreachable, *-pressure,
# unschedulable, network-unavailable): they come and go, and the DaemonSet places its pod again
# once they are gone, so they never mean "uninstalled".
_TRANSIENT_TAINTS = "node.kubernetes.io/"


@dataclass(frozen=True, slots=True)
class ExitDecision:
    keep: bool
    reason: str


class _Unanswered(Exception):
    """The API did not give an answer we can act on."""


def exit_decision(
    config: ApiConfig, namespace: str | None, pod: str | None, node: str, *, transport: httpx.BaseTransport | None = None
) -> ExitDecision:
    """Keep the ruleset unless the API shows that no agent will run on `node` again."""
    if not namespace or not pod:
        return ExitDecision(True, f"POD_NAMESPACE and POD_NAME are not set, so the agent cannot tell a restart from an uninstall; {CLEANUP_HINT}")
    try:
        with config.client(transport) as client:
            return _decide(client, config, namespace, pod, node)
    except _Unanswered as exc:
        return ExitDecision(True, f"{exc}; {CLEANUP_HINT}")
    except httpx.HTTPError as exc:
        return ExitDecision(True, f"the API server did not answer ({type(exc).__name__}: {str(exc)[:200]}); {CLEANUP_HINT}")


def _get(client: httpx.Client, config: ApiConfig, path: str, what: str) -> dict[str, Any] | None:
    """The object, or None when it does not exist; _Unanswered for any other answer."""
    response = client.get(path, timeout=TIMEOUT_S, extensions=config.extensions)
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise _Unanswered(f"reading {what} failed: HTTP {response.status_code} {response.text[:200]}")
    try:
        body = response.json()
    except ValueError:
        raise _Unanswered(f"reading {what}: the answer is not JSON") from None
    if not isinstance(body, dict):
        raise _Unanswered(f"reading {what}: the answer is not an object")
    return body


def _decide(client: httpx.Client, config: ApiConfig, namespace: str, pod: str, node: str) -> ExitDecision:
    ns = quote(namespace, safe="")
    me = _get(client, config, f"/api/v1/namespaces/{ns}/pods/{quote(pod, safe='')}", f"pod {namespace}/{pod}")
    if me is None:
        raise _Unanswered(f"the agent's own pod {namespace}/{pod} is not in the API, so its DaemonSet is unknown")
    owners = me.get("metadata", {}).get("ownerReferences") or []
    owner = next((o for o in owners if isinstance(o, dict) and o.get("controller") and o.get("kind") == "DaemonSet"), None)
    if owner is None:
        return ExitDecision(False, f"pod {namespace}/{pod} is not run by a DaemonSet: nothing will start another agent here")
    name = str(owner.get("name", ""))
    ds = _get(client, config, f"/apis/apps/v1/namespaces/{ns}/daemonsets/{quote(name, safe='')}", f"DaemonSet {namespace}/{name}")
    if ds is None:
        return ExitDecision(False, f"DaemonSet {namespace}/{name} was deleted (uninstall)")
    if ds.get("metadata", {}).get("deletionTimestamp"):
        return ExitDecision(False, f"DaemonSet {namespace}/{name} is being deleted (uninstall)")
    node_obj = _get(client, config, f"/api/v1/nodes/{quote(node, safe='')}", f"node {node}")
    if node_obj is None:
        return ExitDecision(False, f"node {node} is not in the API any more")
    spec = ds.get("spec", {}).get("template", {}).get("spec", {})
    why_not = node_selected(spec if isinstance(spec, dict) else {}, node_obj)
    if why_not:
        return ExitDecision(False, f"DaemonSet {namespace}/{name} no longer runs on node {node}: {why_not}")
    return ExitDecision(True, f"DaemonSet {namespace}/{name} exists and runs on node {node}: the next agent takes over")


def node_selected(pod_spec: Mapping[str, Any], node: Mapping[str, Any]) -> str:
    """Why a pod with this spec would not be placed on this node by a DaemonSet ("" if it
    would): nodeSelector, required node affinity, and NoSchedule/NoExecute taints."""
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    for key, value in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return f"nodeSelector {key}={value} does not match"
    affinity = ((pod_spec.get("affinity") or {}).get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = affinity.get("nodeSelectorTerms") or []
    if terms and not any(_term_matches(t, labels, str(meta.get("name", ""))) for t in terms if isinstance(t, dict)):
        return "no required node affinity term matches"
    tolerations = [t for t in pod_spec.get("tolerations") or [] if isinstance(t, dict)]
    for taint in (node.get("spec") or {}).get("taints") or []:
        if not isinstance(taint, dict) or taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if str(taint.get("key", "")).startswith(_TRANSIENT_TAINTS):
            continue
        if not any(_tolerates(t, taint) for t in tolerations):
            return f"taint {taint.get('key')}:{taint.get('effect')} is not tolerated"
    return ""


def _term_matches(term: Mapping[str, Any], labels: Mapping[str, str], name: str) -> bool:
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False  # an empty term matches nothing
    return all(_requirement(e, labels) for e in expressions if isinstance(e, dict)) and all(
        _requirement(f, {"metadata.name": name}) for f in fields if isinstance(f, dict)
    )


def _requirement(req: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op, values = req.get("key"), req.get("operator"), [str(v) for v in req.get("values") or []]
    present = key in labels
    value = labels.get(str(key))
    if op == "In":
        return present and value in values
    if op == "NotIn":
        return not present or value not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and len(values) == 1:
        try:
            have, bound = int(str(value)), int(values[0])
        except ValueError:
            return False
        return have > bound if op == "Gt" else have < bound
    return False


def _tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    effect = toleration.get("effect")
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key")
    if toleration.get("operator") == "Exists":
        return not key or key == taint.get("key")
    return key == taint.get("key") and (toleration.get("value") or "") == (taint.get("value") or "")
