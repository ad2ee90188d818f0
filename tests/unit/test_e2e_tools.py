"""The helpers of scripts/e2e.sh that need no cluster: counting a suite's results
(hack/e2e/summary.py) and removing the SCTP servers from the conformance manifests
(hack/npapi/drop-sctp.py), plus e2e.sh's argument errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(path).stem.replace("-", "_"), REPO / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summary = load("hack/e2e/summary.py")
drop_sctp = load("hack/npapi/drop-sctp.py")

MANIFESTS = """\
apiVersion: v1
kind: Namespace
metadata:
  name: house
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: wizard
  namespace: house
spec:
  template:
    spec:
      containers:
        - name: wizard-client
          image: registry.k8s.io/e2e-test-images/agnhost:2.45
        - name: wizard-80
          image: registry.k8s.io/e2e-test-images/agnhost:2.45
          command: ["/bin/bash", "-c", "/agnhost serve-hostname --tcp --http=false --port 80"]
          ports:
            - containerPort: 80
              protocol: TCP
        - name: wizard-9003
          image: registry.k8s.io/e2e-test-images/agnhost:2.45
          command: ["/bin/bash", "-c", "/agnhost porter"]
          env:
          - name: SERVE_SCTP_PORT_9003
            value: "foo"
        - name: wizard-53
          image: registry.k8s.io/e2e-test-images/agnhost:2.45
          env:
          - name: OTHER
            value: "bar"
      nodeSelector:
        kubernetes.io/os: linux
"""


def test_drop_sctp_removes_only_the_sctp_servers() -> None:
    text, removed = drop_sctp.drop_sctp(MANIFESTS)
    assert removed == 1
    before, after = list(yaml.safe_load_all(MANIFESTS)), list(yaml.safe_load_all(text))
    assert after[0] == before[0]
    spec_before, spec_after = before[1]["spec"]["template"]["spec"], after[1]["spec"]["template"]["spec"]
    assert [c["name"] for c in spec_after["containers"]] == ["wizard-client", "wizard-80", "wizard-53"]
    assert spec_after["containers"] == [c for c in spec_before["containers"] if c["name"] != "wizard-9003"]
    assert spec_after["nodeSelector"] == spec_before["nodeSelector"]


def test_drop_sctp_says_when_it_finds_nothing(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("kind: Namespace\n")
    r = subprocess.run([sys.executable, REPO / "hack/npapi/drop-sctp.py", f], capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "no SCTP server container found" in r.stderr


def spec(texts: list[str], leaf: str, state: str, message: str = "") -> dict[str, object]:
    return {"LeafNodeType": "It", "ContainerHierarchyTexts": texts, "LeafNodeText": leaf, "State": state, "Failure": {"Message": message}}


def test_ginkgo_counts_the_focused_specs(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    specs = [
        spec(["[sig-network] Netpol", "NetworkPolicy between server and client"], "should support a default-deny-ingress policy", "passed"),
        spec(["[sig-network] Netpol", "NetworkPolicy between server and client"], "should enforce egress policy", "failed", "boom"),
        spec(["[sig-network] Netpol [Feature:SCTPConnectivity]", "x"], "should support SCTP", "skipped"),
        spec(["[sig-network] Netpol", "x"], "should time out", "timedout"),
        spec(["[sig-storage] Volumes"], "something else", "skipped"),
        {"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed"},
    ]
    report.write_text(json.dumps([{"SpecReports": specs}]))
    passed, failed, skipped = summary.ginkgo(report, "Netpol", r"\[Feature:SCTPConnectivity\]", "no SCTP")
    assert len(passed) == 1 and len(failed) == 2
    assert skipped == [("[sig-network] Netpol [Feature:SCTPConnectivity] x should support SCTP", "no SCTP")]


def test_gotest_counts_subtests_and_what_did_not_run(tmp_path: Path) -> None:
    log = tmp_path / "suite.log"
    log.write_text(
        "=== RUN   TestConformanceProfiles\n"
        "    --- PASS: TestConformanceProfiles/AdminNetworkPolicyEgressTCP (12.30s)\n"
        "        --- PASS: TestConformanceProfiles/AdminNetworkPolicyEgressTCP/Should_support (1.00s)\n"
        "    --- FAIL: TestConformanceProfiles/AdminNetworkPolicyGress (3.00s)\n"
        "    --- SKIP: TestConformanceProfiles/AdminNetworkPolicyEgressNamedPort (0.00s)\n"
        "--- FAIL: TestConformanceProfiles (20.00s)\n"
    )
    tests = tmp_path / "tests"
    tests.write_text(
        "AdminNetworkPolicyEgressTCP\nAdminNetworkPolicyGress\nAdminNetworkPolicyEgressNamedPort\nAdminNetworkPolicyEgressSCTP\nAdminNetworkPolicyPriorityField\n"
    )
    passed, failed, skipped = summary.gotest(log, tests, "TestConformanceProfiles", "SCTP", "no SCTP")
    assert passed == ["AdminNetworkPolicyEgressTCP"]
    assert failed == ["AdminNetworkPolicyGress", "AdminNetworkPolicyPriorityField (did not run)"]
    assert [name for name, _ in skipped] == ["AdminNetworkPolicyEgressNamedPort", "AdminNetworkPolicyEgressSCTP"]
    assert skipped[1][1] == "no SCTP"


def test_summary_closing_line_and_exit_status(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps([{"SpecReports": [spec(["Netpol"], "a", "passed"), spec(["Netpol"], "b", "passed")]}]))
    r = subprocess.run(
        [sys.executable, REPO / "hack/e2e/summary.py", "ginkgo", report, "--focus", "Netpol"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "2 passed, 0 failed, 0 skipped"
    r = subprocess.run(
        [sys.executable, REPO / "hack/e2e/summary.py", "ginkgo", tmp_path / "missing.json"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [[], ["nosuch"], ["netpol", "--nodes"]])
def test_e2e_script_rejects_bad_arguments(args: list[str]) -> None:
    r = subprocess.run(["bash", REPO / "scripts/e2e.sh", *args], capture_output=True, text=True, check=False)
    assert r.returncode == 2, r.stderr
    assert "scripts/e2e.sh SUITE" in r.stderr or "needs a number" in r.stderr
