"""scripts/cluster.sh deploys the agent from the install manifests with only the image replaced:
`cluster.sh manifest np|anp|cnp` prints what it applies. No cluster and no root needed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = {"np": "install.yaml", "anp": "install-anp.yaml", "cnp": "install-cnp.yaml"}


def render(agent: str, image: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "KNP_AGENT_IMAGE"}
    if image is not None:
        env["KNP_AGENT_IMAGE"] = image
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "cluster.sh"), "manifest", agent],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return proc.stdout


@pytest.mark.parametrize("agent", sorted(MANIFESTS))
def test_manifest_unchanged_without_an_image(agent: str) -> None:
    assert render(agent, None) == (REPO / MANIFESTS[agent]).read_text()


@pytest.mark.parametrize("agent", sorted(MANIFESTS))
def test_only_the_image_line_changes(agent: str) -> None:
    original = (REPO / MANIFESTS[agent]).read_text().splitlines()
    rendered = render(agent, "example.org/knp/agent:test").splitlines()
    assert len(rendered) == len(original)
    changed = [(a, b) for a, b in zip(original, rendered, strict=True) if a != b]
    assert len(changed) == 1
    before, after = changed[0]
    assert before.split() == ["image:", "registry.k8s.io/networking/kube-network-policies-python:v0.1.0"]
    assert after == before.replace(before.split()[1], "example.org/knp/agent:test")


def test_unknown_agent_is_refused() -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "cluster.sh"), "manifest", "xyz"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "np, anp or cnp" in proc.stderr
    assert "Traceback" not in proc.stderr
