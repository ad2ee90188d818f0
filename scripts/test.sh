#!/usr/bin/env bash
# The project's tests (after scripts/setup.sh).
#
#   bash scripts/test.sh          everything, as CI runs it:
#     1. the scenario suite in engine mode (the policy engine alone);
#     2. the scenario suite in lab mode (real agents, nftables, NFQUEUE, network namespaces) and
#        in lab mode through a real kube-apiserver, when running as root;
#     3. pytest: unit, kernel (root) and integration (real kube-apiserver + etcd) tests;
#     4. mypy --strict on the package and hack/images/oci.py, ruff (lint and format) on those and the tests.
#   bash scripts/test.sh --fast   the developers' loop: what needs neither root nor the control
#                                 plane (engine-mode scenarios, unit tests, mypy, ruff); under a minute.
#
# Kernel and integration tests skip with a reason when they cannot run, except with CI=true,
# where they fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."
knp=.venv/bin/kube-network-policies
fast=false
case "${1:-}" in
  "") ;;
  --fast) fast=true ;;
  *) echo "usage: $0 [--fast]" >&2; exit 2 ;;
esac
status=0
echo "== scenarios, engine mode"
"$knp" lab run --engine-only tests/scenarios || status=1
if $fast; then
  echo "== pytest (fast: no root, no control plane)"
  .venv/bin/python -m pytest -q || status=1
else
  if [ "$(id -u)" = 0 ]; then
    echo "== scenarios, lab mode (real kernel)"
    "$knp" lab run tests/scenarios || status=1
    echo "== scenarios, lab mode through a real API server"
    "$knp" lab run --apiserver tests/scenarios || status=1
  elif [ "${CI:-}" = true ]; then
    echo "lab mode needs root, and CI must run it" >&2
    status=1
  else
    echo "== scenarios, lab mode: skipped (needs root)"
  fi
  echo "== pytest (all: unit, kernel, control plane)"
  .venv/bin/python -m pytest -q -m "" || status=1
fi
echo "== mypy --strict, ruff"
.venv/bin/python -m mypy --strict src hack/images/oci.py || status=1
.venv/bin/ruff check src tests hack/images || status=1
.venv/bin/ruff format --check src tests hack/images || status=1
exit $status
