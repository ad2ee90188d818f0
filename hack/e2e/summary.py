#!/usr/bin/env python3
"""Counts of an upstream suite run, for scripts/e2e.sh: the failures by name, the skipped tests
with the reason they were skipped, and one closing line `N passed, M failed, K skipped`.

    summary.py ginkgo REPORT.json --focus REGEX [--skip REGEX --reason TEXT]
        a ginkgo JSON report (e2e.test): the specs whose full text matches --focus; those
        matching --skip are counted as skipped with --reason
    summary.py gotest LOG --tests FILE --parent NAME [--skip REGEX --reason TEXT]
        the -test.v output of a Go test binary: the subtests of NAME (one per line of FILE, the
        suite's test names); a test of FILE that matches --skip and did not run is counted as
        skipped with --reason; one that neither ran nor was skipped is counted as failed ("did
        not run": the suite stopped early)

Exit status: 0 when nothing failed, 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

FAILED_STATES = {"failed", "panicked", "timedout", "interrupted", "aborted"}


def ginkgo(report: Path, focus: str, skip: str | None, reason: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    suites = json.loads(report.read_text(encoding="utf-8"))
    passed: list[str] = []
    failed: list[str] = []
    skipped: list[tuple[str, str]] = []
    focus_re = re.compile(focus)
    skip_re = re.compile(skip) if skip else None
    for suite in suites:
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            name = " ".join([*spec.get("ContainerHierarchyTexts", []), spec.get("LeafNodeText", "")])
            if not focus_re.search(name):
                continue
            state = spec.get("State", "")
            if state == "passed":
                passed.append(name)
            elif state in FAILED_STATES:
                failed.append(name)
            elif skip_re is not None and skip_re.search(name):
                skipped.append((name, reason))
            else:
                message = (spec.get("Failure") or {}).get("Message", "") or state
                skipped.append((name, message.strip().splitlines()[0] if message.strip() else state))
    return passed, failed, skipped


def gotest(log: Path, tests: Path, parent: str, skip: str | None, reason: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    names = [n.strip() for n in tests.read_text(encoding="utf-8").splitlines() if n.strip()]
    result: dict[str, str] = {}
    line_re = re.compile(r"^\s*--- (PASS|FAIL|SKIP): " + re.escape(parent) + r"/([^/\s]+) \(")
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = line_re.match(line)
        if m:
            result[m.group(2)] = m.group(1)
    skip_re = re.compile(skip) if skip else None
    passed: list[str] = []
    failed: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in names:
        state = result.get(name)
        if state == "PASS":
            passed.append(name)
        elif state == "FAIL":
            failed.append(name)
        elif state == "SKIP":
            skipped.append((name, "skipped by the suite (a feature or profile not asked for)"))
        elif skip_re is not None and skip_re.search(name):
            skipped.append((name, reason))
        else:
            failed.append(f"{name} (did not run)")
    return passed, failed, skipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("ginkgo", "gotest"))
    ap.add_argument("report", type=Path)
    ap.add_argument("--focus", default=".")
    ap.add_argument("--tests", type=Path)
    ap.add_argument("--parent", default="TestConformanceProfiles")
    ap.add_argument("--skip")
    ap.add_argument("--reason", default="skipped")
    args = ap.parse_args()
    try:
        if args.kind == "ginkgo":
            passed, failed, skipped = ginkgo(args.report, args.focus, args.skip, args.reason)
        else:
            if args.tests is None:
                ap.error("gotest needs --tests FILE")
            passed, failed, skipped = gotest(args.report, args.tests, args.parent, args.skip, args.reason)
    except (OSError, ValueError, re.error) as exc:
        print(f"summary: cannot read {args.report}: {exc}", file=sys.stderr)
        return 2
    for name, why in skipped:
        print(f"skipped: {name}: {why}")
    for name in failed:
        print(f"FAILED: {name}")
    print(f"{len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
