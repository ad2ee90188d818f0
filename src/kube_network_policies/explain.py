"""`kube-network-policies explain`: would this connection be allowed, and why?"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from kube_network_policies.engine import ClusterState, Decision, DirectionResult, Features, Flow
from kube_network_policies.errors import InputError
from kube_network_policies.model import ApiObject, kinds
from kube_network_policies.model.ipnet import canonical_address


class ExplainError(InputError):
    """A question explain cannot answer (unknown pod, no IP...)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    label: str  # "ns/pod" or the IP
    ips: tuple[str, ...]
    pod: str | None


def features_for_objects(objects: list[ApiObject], base: Features) -> Features:
    """Enable the kinds whose objects the user handed over: explaining them is the point."""
    return Features(base.flags | {flag for o in objects if (flag := kinds.of(o).flag)})


def resolve(state: ClusterState, text: str, role: str) -> Endpoint:
    if "/" in text and not _is_ip(text):
        ns, _, name = text.partition("/")
        pod = state.pod(ns, name)
        if pod is None:
            raise ExplainError(f"--{role} {text}: no such pod in the manifests")
        if pod.host_network:
            return Endpoint(text, pod.ips, None) if pod.ips else _no_ip(role, text)
        if not pod.ips:
            _no_ip(role, text)
        return Endpoint(text, pod.ips, text)
    try:
        ip = canonical_address(text, strict=True)  # no zones, leading zeros or IPv4-mapped forms
    except ValueError as exc:
        raise ExplainError(f"--{role}: expected NAMESPACE/POD or an IP address: {exc}") from None
    pod = state.pod_by_ip(ip)
    return Endpoint(ip, (ip,), pod.key if pod else None)


def _no_ip(role: str, text: str) -> Endpoint:
    raise ExplainError(f"--{role} {text}: the pod has no IP (status.podIP / status.podIPs) in the manifests")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def explain(state: ClusterState, source: str, destination: str, protocol: str, port: int) -> list[tuple[Flow, Endpoint, Endpoint, Decision]]:
    src = resolve(state, source, "from")
    dst = resolve(state, destination, "to")
    out = []
    for s in src.ips:
        for d in dst.ips:
            if ipaddress.ip_address(s).version == ipaddress.ip_address(d).version:
                flow = Flow.of(s, d, protocol, port, 40000)
                out.append((flow, src, dst, state.evaluate(flow)))
    if not out:
        raise ExplainError(f"{source} and {destination} have no address family in common")
    return out


def _direction_text(name: str, ep: Endpoint, r: DirectionResult) -> str:
    if not r.chain:
        return f"{name} {ep.label}: not a pod here, no policy applies"
    return f"{name} {ep.label}: {r.describe()}"


def render_text(results: list[tuple[Flow, Endpoint, Endpoint, Decision]]) -> str:
    lines = []
    for flow, src, dst, d in results:
        lines.append(f"{flow.describe()}: {'ALLOW' if d.allowed else 'DENY'}")
        lines.append("  " + _direction_text("egress", src, d.egress))
        lines.append("  " + _direction_text("ingress", dst, d.ingress))
    return "\n".join(lines)


def render_json(results: list[tuple[Flow, Endpoint, Endpoint, Decision]]) -> str:
    def direction(ep: Endpoint, r: DirectionResult) -> dict[str, object]:
        return {"endpoint": ep.label, "pod": ep.pod, "allowed": r.allowed, "chain": [x.to_json() for x in r.chain]}

    flows = []
    for flow, src, dst, d in results:
        flows.append(
            {
                "source": str(ipaddress.ip_address(flow.src_ip)),
                "destination": str(ipaddress.ip_address(flow.dst_ip)),
                "protocol": flow.describe().split()[0],
                "port": flow.dst_port,
                "verdict": "allow" if d.allowed else "deny",
                "egress": direction(src, d.egress),
                "ingress": direction(dst, d.ingress),
            }
        )
    verdict = "allow" if all(f["verdict"] == "allow" for f in flows) else "deny"
    return json.dumps({"verdict": verdict, "flows": flows}, indent=2)
