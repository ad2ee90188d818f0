"""The scenario runner: the project's suite in engine mode, malformed files, output format."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from kube_network_policies.lab.engine_mode import EngineMode
from kube_network_policies.lab.runner import run_paths
from kube_network_policies.lab.scenario import ScenarioError, find_scenario_files, load_scenario

ROOT = Path(__file__).resolve().parents[2]
SUITE = find_scenario_files([str(ROOT / "tests" / "scenarios")])


def test_suite_is_large_and_names_are_unique() -> None:
    assert len(SUITE) >= 80
    names = [load_scenario(p).name for p in SUITE]
    assert len(names) == len(set(names))
    for p in SUITE:
        s = load_scenario(p)
        assert p.stem == s.name, p
        assert s.source.strip(), p


@pytest.mark.parametrize("path", SUITE, ids=[p.stem for p in SUITE])
def test_scenario_engine_mode(path: Path) -> None:
    out = io.StringIO()
    status = run_paths([str(path)], EngineMode(), out=out)
    assert status == 0, out.getvalue()
    assert out.getvalue().strip().endswith("1 passed, 0 failed")


GOOD = """
name: tiny
source: "test"
cluster:
  pods:
    - {namespace: x, name: a, ip: 10.0.0.1}
    - {namespace: x, name: b, ip: 10.0.0.2}
steps:
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny, namespace: x}
        spec: {podSelector: {}}
    probes:
      - {protocol: TCP, port: 80, default: deny}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def run(paths: list[Path]) -> tuple[int, str]:
    out = io.StringIO()
    status = run_paths([str(p) for p in paths], EngineMode(), out=out)
    return status, out.getvalue()


def test_wrong_expectation_prints_truth_table(tmp_path: Path) -> None:
    p = write(tmp_path, "wrong.yaml", GOOD.replace("default: deny", "default: deny, except: [[x/a, x/b]]"))
    status, out = run([p])
    assert status == 1
    assert "FAIL  tiny" in out
    assert "step 1 TCP/80: 1 correct, 1 wrong" in out
    assert "X!" in out
    assert out.strip().splitlines()[-1] == "0 passed, 1 failed"


def test_malformed_scenarios_are_counted_and_the_run_goes_on(tmp_path: Path) -> None:
    bad_yaml = write(tmp_path, "a-bad-yaml.yaml", "name: [unclosed\n")
    bad_field = write(tmp_path, "b-bad-field.yaml", GOOD.replace("port: 80", "port: 99999"))
    bad_policy = write(
        tmp_path, "c-bad-policy.yaml", GOOD.replace("spec: {podSelector: {}}", "spec: {podSelector: {matchExpressions: [{key: a, operator: Maybe}]}}")
    )
    good = write(tmp_path, "d-good.yaml", GOOD)
    status, out = run([tmp_path])
    assert status == 1
    assert f"ERROR {bad_yaml}: invalid YAML: line 2" in out
    assert f"ERROR {bad_field}: steps[0].probes[0].port: must be between 1 and 65535, got 99999" in out
    assert "steps[0].apply[0]: NetworkPolicy x/deny: spec.podSelector.matchExpressions[0].operator: unknown operator 'Maybe'" in out
    assert str(bad_policy) in out and str(good) not in out
    assert out.strip().splitlines()[-1] == "1 passed, 3 failed"


def test_scenario_errors_name_fields(tmp_path: Path) -> None:
    text = GOOD.replace("{namespace: x, name: b, ip: 10.0.0.2}", "{namespace: x, name: b, ip: 10.0.0.1}").replace(
        "default: deny", "default: maybe, from: [x/zz]"
    )
    with pytest.raises(ScenarioError) as exc:
        load_scenario(write(tmp_path, "s.yaml", text))
    msg = str(exc.value)
    assert "steps[0].probes[0].default: must be allow or deny, got 'maybe'" in msg
    assert "steps[0].probes[0].from[0]: unknown pod 'x/zz'" in msg
    assert "address 10.0.0.1 of pod x/b is already used by pod x/a" in msg


def test_delete_of_an_unknown_kind_is_a_scenario_error(tmp_path: Path) -> None:
    """Deletes name kinds the registry knows, with a namespace where the kind has one: caught
    when the file loads, not when the engine is asked to delete it."""
    text = GOOD.replace(
        "    probes:", "    delete:\n      - {kind: Service, namespace: x, name: web}\n      - {kind: NetworkPolicy, name: deny}\n    probes:"
    )
    with pytest.raises(ScenarioError) as exc:
        load_scenario(write(tmp_path, "s.yaml", text))
    msg = str(exc.value)
    assert "steps[0].delete[0].kind: unsupported kind 'Service' (expected one of Namespace, Node, Pod, NetworkPolicy" in msg
    assert "steps[0].delete[1].namespace: required for a NetworkPolicy" in msg


def test_duplicate_names_and_empty_directory(tmp_path: Path) -> None:
    write(tmp_path, "one.yaml", GOOD)
    write(tmp_path, "two.yaml", GOOD)
    status, out = run([tmp_path])
    assert status == 1 and "scenario name 'tiny' is already used" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    status, out = run([empty])
    assert status == 1 and "no scenario files found" in out


def test_skipped_is_reported_with_reason(tmp_path: Path) -> None:
    class NoSctp(EngineMode):
        def unsupported(self, scenario):  # type: ignore[no-untyped-def]
            return "needs sctp, which this mode cannot check" if "sctp" in scenario.requires else None

    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD.replace("name: tiny", "name: tiny-sctp\nrequires: [sctp]"))
    out = io.StringIO()
    status = run_paths([str(tmp_path)], NoSctp(), out=out)
    assert status == 0
    assert out.getvalue().strip().splitlines()[-1] == "1 passed, 0 failed, 1 skipped (1: needs sctp, which this mode cannot check)"


def test_dual_stack_pairs_check_every_family(tmp_path: Path) -> None:
    text = """
name: ds
source: "test"
requires: [ipv6]
cluster:
  pods:
    - {namespace: x, name: a, ip: 10.0.0.1, ipv6: "fd00::1"}
    - {namespace: x, name: b, ip: 10.0.0.2, ipv6: "fd00::2"}
steps:
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: v4-only, namespace: x}
        spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24}}]}]}
    probes:
      - {protocol: TCP, port: 80, default: allow}
"""
    status, out = run([write(tmp_path, "ds.yaml", text)])
    assert status == 1
    assert "IPv4 and IPv6 disagree" in out and "?!" in out
