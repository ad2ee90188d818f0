"""Skip a test that cannot run here, except under CI (CI=true), where that is a failure.

Shared by the kernel tests (tests/kernel/netns.py's require_kernel) and the control-plane tests
(tests/integration/conftest.py): CI must never pass by silently skipping the tests that matter.
Import it as `from skips import skip_or_fail` (tests/conftest.py's directory is on sys.path).
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["in_ci", "require_root", "skip_or_fail"]


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> None:
    """Skip the test with `reason`; under CI=true fail it instead."""
    if in_ci():
        pytest.fail(f"cannot run under CI (CI=true): {reason}", pytrace=False)
    pytest.skip(reason)


def require_root(*tools: str, why: str) -> None:
    """skip_or_fail unless we are root and every tool is on PATH; `why` says what needs them."""
    if os.geteuid() != 0:
        skip_or_fail(f"needs root: {why}")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"needs {', '.join(missing)} on PATH: {why}")
