"""One root for the package's own exceptions (errors.KnpError), and what the CLI makes of it."""

from __future__ import annotations

import errno
import importlib
import inspect
import pkgutil

import pytest

import kube_network_policies
from kube_network_policies import cli
from kube_network_policies.dataplane.monitor import MonitorError
from kube_network_policies.dataplane.nfqueue import NfQueueError
from kube_network_policies.dataplane.ruleset import DataplaneError
from kube_network_policies.errors import InputError, KnpError
from kube_network_policies.model import ValidationError


def public_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(kube_network_policies.__path__, "kube_network_policies."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name and not name.startswith("_"):
                found.append(obj)
    return found


def test_every_public_exception_of_the_package_derives_from_knperror() -> None:
    classes = public_exceptions()
    assert len(classes) > 15  # the walk found them (model, sources, dataplane, agent, lab...)
    strays = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, KnpError)]
    assert not strays


def test_older_bases_still_catch() -> None:
    e = NfQueueError(errno.EPERM, "queue 100: needs CAP_NET_ADMIN")
    assert isinstance(e, OSError) and e.errno == errno.EPERM and str(e) == "[Errno 1] queue 100: needs CAP_NET_ADMIN"
    assert isinstance(MonitorError(errno.EPERM, "x"), OSError)
    assert issubclass(DataplaneError, RuntimeError)
    assert issubclass(ValidationError, ValueError) and issubclass(ValidationError, InputError)


@pytest.mark.parametrize(
    ("error", "status", "line"),
    [
        (DataplaneError("nft: table is busy"), 1, "error: nft: table is busy"),
        (InputError("objects.yaml: no such file"), 2, "error: objects.yaml: no such file"),
        (KeyError("generation"), 1, "internal error: KeyError: 'generation' (set KNP_DEBUG=1 for a traceback)"),
    ],
    ids=["ours", "ours-bad-input", "bug"],
)
def test_the_last_resort_tells_our_errors_from_bugs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception, status: int, line: str
) -> None:
    def cleanup(_args: object) -> int:
        raise error

    monkeypatch.delenv("KNP_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_cleanup", cleanup)
    assert cli.main(["cleanup"]) == status
    assert capsys.readouterr().err.strip() == line
