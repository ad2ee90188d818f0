"""Markers by directory, so that a plain `pytest` runs only the fast tests.

- tests/kernel: ``kernel`` (root, network namespaces, nftables, NFQUEUE);
- tests/integration: ``controlplane`` (a real kube-apiserver + etcd, built by
  hack/controlplane/build.sh).

pyproject's addopts deselect both; `bash scripts/test.sh` (what CI runs) selects everything with
``-m ""``; `bash scripts/test.sh --fast` is the plain run plus the engine-mode scenarios.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
MARKERS = {HERE / "kernel": "kernel", HERE / "integration": "controlplane"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        for directory, marker in MARKERS.items():
            if directory in path.parents:
                item.add_marker(getattr(pytest.mark, marker))
