"""Runs scenario files against a mode (the engine alone, or a real dataplane) and reports.

The runner owns everything that is the same in every mode: loading, the cluster as the scenario
describes it step by step (which pods exist, their current labels), which pairs each probe covers,
comparison with the expectation, truth tables and the closing count. A mode only applies changes
and observes connections.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from kube_network_policies.lab.scenario import (
    NamespaceSpec,
    NodeSpec,
    ObjectRef,
    PodSpec,
    Probe,
    Scenario,
    ScenarioError,
    Step,
    find_scenario_files,
    load_scenario,
)

Pair = tuple[str, str]  # (client, server): "ns/pod" or a literal IP


@dataclass(frozen=True, slots=True)
class Observation:
    allowed: bool | None  # None: the families disagreed or the pair could not be probed
    detail: str = ""


def combine_families(results: list[bool]) -> Observation:
    """One pair's observation from its per-family results: every family must agree."""
    if not results:
        return Observation(None, "no address family in common")
    if all(results) or not any(results):
        return Observation(results[0])
    return Observation(None, "IPv4 and IPv6 disagree")


@dataclass(slots=True)
class StepChanges:
    apply: list[dict[str, Any]] = field(default_factory=list)  # API objects, in order
    delete: list[ObjectRef] = field(default_factory=list)


class ScenarioCluster:
    """The cluster a scenario describes, as it stands after each step."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.nodes: dict[str, NodeSpec] = {n.name: n for n in scenario.nodes}
        self.namespaces: dict[str, NamespaceSpec] = {n.name: n for n in scenario.namespaces}
        self.pods: dict[str, PodSpec] = {p.key: p for p in scenario.pods}

    def initial_objects(self) -> list[dict[str, Any]]:
        return self.scenario.initial_objects()

    def changes(self, step: Step) -> StepChanges:
        """The API changes of a step; updates this model (pods deleted, labels replaced)."""
        out = StepChanges()
        for obj in step.apply:
            out.apply.append(obj)
            if obj.get("kind") == "Namespace":
                meta = obj.get("metadata") or {}
                name = str(meta.get("name"))
                self.namespaces[name] = NamespaceSpec(name, dict(meta.get("labels") or {}))
        for ref in step.delete:
            out.delete.append(ref)
            if ref.kind == "Pod":
                self.pods.pop(f"{ref.namespace}/{ref.name}", None)
            elif ref.kind == "Namespace":
                self.namespaces.pop(ref.name, None)
                for key in [k for k, p in self.pods.items() if p.namespace == ref.name]:
                    del self.pods[key]  # deleting a namespace deletes its pods
        for r in step.relabel:
            if r.ref.kind == "Pod":
                key = f"{r.ref.namespace}/{r.ref.name}"
                pod = self.pods.get(key)
                if pod is not None:
                    pod = PodSpec(pod.namespace, pod.name, dict(r.labels), pod.ips, pod.node, pod.host_network, pod.ports)
                    self.pods[key] = pod
                    out.apply.append(pod.to_object())
            elif r.ref.kind == "Namespace":
                ns = NamespaceSpec(r.ref.name, dict(r.labels))
                self.namespaces[ns.name] = ns
                out.apply.append(ns.to_object())
            else:
                node = self.nodes[r.ref.name]
                node = NodeSpec(node.name, dict(r.labels), node.ips)
                self.nodes[node.name] = node
                out.apply.append(node.to_object())
        return out

    def addresses(self, endpoint: str) -> tuple[str, ...]:
        pod = self.pods.get(endpoint)
        if pod is not None:
            return pod.ips
        if "/" in endpoint:
            return ()
        return (endpoint,)

    def pairs(self, probe: Probe) -> list[Pair]:
        pods = list(self.pods)
        clients = [c for c in probe.clients if "/" not in c or c in self.pods] if probe.clients is not None else pods
        servers = [s for s in probe.servers if "/" not in s or s in self.pods] if probe.servers is not None else pods
        return [(c, s) for c in clients for s in servers if c != s]

    def family_pairs(self, pair: Pair) -> list[tuple[str, str]]:
        """(client IP, server IP) in every address family both ends have."""
        out = []
        for s in self.addresses(pair[1]):
            version = ipaddress.ip_address(s).version
            for c in self.addresses(pair[0]):
                if ipaddress.ip_address(c).version == version:
                    out.append((c, s))
                    break
        return out


class Session(Protocol):
    def apply(self, changes: StepChanges) -> None: ...

    def observe(self, protocol: str, port: int, pairs: list[Pair]) -> dict[Pair, Observation]: ...

    def close(self) -> None: ...


def session_notes(session: Session) -> list[str]:
    """Optional lines a mode reports about a scenario (e.g. how long changes took to apply)."""
    notes = getattr(session, "notes", None)
    return list(notes()) if callable(notes) else []


class Mode(Protocol):
    name: str

    def unsupported(self, scenario: Scenario) -> str | None:
        """Why this mode cannot check the scenario (it is then skipped), or None."""
        ...

    def open(self, cluster: ScenarioCluster) -> Session: ...


@dataclass(slots=True)
class ProbeStepResult:
    step: int
    probe: Probe
    pairs: list[Pair]
    expected: dict[Pair, bool]
    observed: dict[Pair, Observation]

    @property
    def wrong(self) -> list[Pair]:
        return [p for p in self.pairs if self.observed[p].allowed is not self.expected[p]]


@dataclass(slots=True)
class ScenarioResult:
    path: str
    name: str
    status: str  # passed, failed, skipped, error
    probes: list[ProbeStepResult] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def run_scenario(scenario: Scenario, mode: Mode) -> ScenarioResult:
    reason = mode.unsupported(scenario)
    if reason:
        return ScenarioResult(scenario.path, scenario.name, "skipped", message=reason)
    started = time.monotonic()
    cluster = ScenarioCluster(scenario)
    result = ScenarioResult(scenario.path, scenario.name, "passed")
    session = mode.open(cluster)
    try:
        for i, step in enumerate(scenario.steps, start=1):
            session.apply(cluster.changes(step))
            for probe in step.probes:
                pairs = cluster.pairs(probe)
                expected = {p: (p in probe.exceptions) != probe.default_allow for p in pairs}
                observed = session.observe(probe.protocol, probe.port, pairs) if pairs else {}
                pr = ProbeStepResult(i, probe, pairs, expected, observed)
                result.probes.append(pr)
                if pr.wrong:
                    result.status = "failed"
        result.notes = session_notes(session)
    finally:
        session.close()
    result.seconds = time.monotonic() - started
    return result


def truth_table(pr: ProbeStepResult) -> str:
    """One matrix per probe: rows are clients, columns servers.
    '.' allow, 'X' deny, '?' families disagree or not probeable, '-' not probed, '!' unexpected."""
    # One order for rows and columns (first appearance), so the diagonal lines up.
    order = list(dict.fromkeys(x for pair in pr.pairs for x in pair))
    client_set = {c for c, _ in pr.pairs}
    server_set = {s for _, s in pr.pairs}
    clients = [x for x in order if x in client_set]
    servers = [x for x in order if x in server_set]
    width = max(len(x) for x in clients + servers) if pr.pairs else 1
    col = max(width, 2) + 1
    lines = [f"step {pr.step} {pr.probe.protocol}/{pr.probe.port}: {len(pr.pairs) - len(pr.wrong)} correct, {len(pr.wrong)} wrong"]
    lines.append(" " * (width + 3) + "".join(f"{s:<{col}}" for s in servers).rstrip())
    for c in clients:
        cells = []
        for s in servers:
            if (c, s) not in pr.observed:
                cells.append(f"{'-':<{col}}")
                continue
            o = pr.observed[(c, s)]
            mark = "?" if o.allowed is None else ("." if o.allowed else "X")
            if o.allowed is not pr.expected[(c, s)]:
                mark += "!"
            cells.append(f"{mark:<{col}}")
        lines.append(f"  {c:<{width}} " + "".join(cells).rstrip())
    notes = [f"  {c} -> {s}: {pr.observed[(c, s)].detail}" for c, s in pr.wrong if pr.observed[(c, s)].detail]
    return "\n".join(lines + notes)


def run_paths(paths: Iterable[str], mode: Mode, out: TextIO = sys.stdout, verbose: bool = False, tables: bool = False) -> int:
    """Run every scenario under `paths`; print results and `N passed, M failed[, K skipped]`.
    Returns the exit status: 0 only when nothing failed."""
    passed = failed = skipped = 0
    try:
        files = find_scenario_files(list(paths))
    except ScenarioError as exc:  # a path that cannot be listed: no suite passes without it
        print(f"ERROR {exc.describe()}", file=out)
        files, failed = [], 1
    skip_reasons: dict[str, int] = {}
    names: dict[str, str] = {}
    if not files and not failed:
        print("no scenario files found", file=out)
        failed += 1
    for path in files:
        try:
            scenario = load_scenario(path)
        except ScenarioError as exc:
            print(f"ERROR {exc.describe()}", file=out)
            failed += 1
            continue
        if scenario.name in names:
            print(f"ERROR {path}: name: scenario name {scenario.name!r} is already used by {names[scenario.name]}", file=out)
            failed += 1
            continue
        names[scenario.name] = str(path)
        try:
            result = run_scenario(scenario, mode)
        except Exception as exc:  # noqa: BLE001 - a mode failure must not end the run: count it and go on
            print(f"ERROR {scenario.name} ({path}): {mode.name} mode failed: {type(exc).__name__}: {exc}", file=out)
            failed += 1
            continue
        if result.status == "skipped":
            skipped += 1
            skip_reasons[result.message] = skip_reasons.get(result.message, 0) + 1
            print(f"SKIP  {result.name}: {result.message}", file=out)
        elif result.status == "passed":
            passed += 1
            if verbose or tables:
                print(f"PASS  {result.name} ({result.seconds * 1000:.0f} ms)", file=out)
                for note in result.notes:
                    print(f"      {note}", file=out)
            if tables:
                _print_tables(scenario, result, out)
        else:
            failed += 1
            print(f"FAIL  {result.name} ({path})", file=out)
            for note in result.notes:
                print(f"      {note}", file=out)
            if tables:
                _print_tables(scenario, result, out)
            else:
                for pr in result.probes:
                    if pr.wrong:
                        print(truth_table(pr), file=out)
    summary = f"{passed} passed, {failed} failed"
    if skipped:
        summary += f", {skipped} skipped"
        summary += " (" + "; ".join(f"{n}: {reason}" for reason, n in skip_reasons.items()) + ")"
    print(summary, file=out)
    return 0 if failed == 0 else 1


def _print_tables(scenario: Scenario, result: ScenarioResult, out: TextIO) -> None:
    for pr in result.probes:
        step = scenario.steps[pr.step - 1]
        if step.description:
            print(f"# step {pr.step}: {step.description}", file=out)
        print(truth_table(pr), file=out)
