"""/statusz content: by default no pod IPs and no error texts (anyone who reaches the metrics
port reads it); with -status-details everything. Tools that wait on the agent (the lab, tests)
need only what the default keeps."""

from __future__ import annotations

from typing import Any

from agent_fakes import RecordingRuleset

from kube_network_policies.agent import Agent, AgentConfig
from kube_network_policies.cli import build_parser
from kube_network_policies.sources.base import Batch

SECRET_ERROR = "HTTP 403 Forbidden: pods is forbidden: User system:serviceaccount:kube-system:knp (server https://10.96.0.1:443)"


class FakeSource:
    name = "fake"

    def open(self) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def synced(self) -> bool:
        return True

    def take(self) -> Batch | None:
        return None

    def fileno(self) -> int | None:
        return None

    def status(self) -> dict[str, object]:
        return {
            "pods": {"synced": True, "resourceVersion": "42", "objects": 3, "errors": 2, "lastError": SECRET_ERROR, "lastList": {"seconds": 0.1}},
            "manifests": {"synced": True, "digest": "ab12", "objects": 1, "paths": ["/etc/knp/secret-dir"]},
        }


def agent(details: bool) -> Agent:
    a = Agent(AgentConfig(manifests=(), node="node-1", status_details=details), source=FakeSource(), ruleset=RecordingRuleset())  # type: ignore[arg-type]
    assert a.keeper is not None
    a.keeper.managed = (frozenset({"10.244.1.5", "10.244.1.6"}), frozenset({"fd00::5"}))
    a.applied = {"pods": "41", "digest": "ab12"}
    a.applied_counts = {"Pod": 3}
    a.generation = 7
    return a


def flat(doc: Any) -> str:
    return repr(doc)


def test_default_status_has_no_pod_ips_and_no_error_texts() -> None:
    st = agent(details=False).status()
    text = flat(st)
    for secret in ("10.244.1.5", "fd00::5", "403", "10.96.0.1", "secret-dir"):
        assert secret not in text, (secret, st)
    # What tools wait on stays.
    assert st["ready"] is False and st["generation"] == 7 and st["digest"] == "ab12" and st["appliedObjects"] == {"Pod": 3}
    assert st["diverted"] == {"ipv4": 2, "ipv6": 1} and st["details"] is False
    sources = st["sources"]
    assert isinstance(sources, dict)
    assert sources["pods"] == {"synced": True, "resourceVersion": "42", "appliedResourceVersion": "41", "objects": 3, "errors": 2}
    assert sources["manifests"] == {"synced": True, "digest": "ab12", "objects": 1}


def test_status_details_show_everything() -> None:
    st = agent(details=True).status()
    assert st["diverted_ipv4"] == ["10.244.1.5", "10.244.1.6"] and st["diverted_ipv6"] == ["fd00::5"]
    sources = st["sources"]
    assert isinstance(sources, dict)
    assert sources["pods"]["lastError"] == SECRET_ERROR and sources["manifests"]["paths"] == ["/etc/knp/secret-dir"]
    assert st["details"] is True


def test_status_details_flag() -> None:
    parse = build_parser().parse_args
    assert parse(["run"]).status_details is False
    assert parse(["run", "-status-details"]).status_details is True
    assert parse(["run", "--status-details=false"]).status_details is False
    assert parse(["run", "-status-details=true"]).status_details is True
