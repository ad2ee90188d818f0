"""Network-namespace helpers for tests that need the real kernel.

Import it from a test module in this directory (`import netns`; pytest puts the test file's
folder on sys.path). Typical use:

    import netns

    pytestmark = pytest.mark.kernel

    @pytest.fixture(scope="module")
    def pair():
        netns.require_kernel("ip", "iptables")     # skips, or fails when CI=true
        with netns.netns_pair() as pair:
            yield pair

    def test_something(pair):
        pair.server.run("iptables", "-A", "INPUT", ...)
        with pair.server.entered():                # this thread is now in the server namespace
            listener = socket.create_server((pair.server_ip4, 80))
        with pair.client.entered():
            conn = socket.create_connection((pair.server_ip4, 80), timeout=1)

Namespaces are named `<prefix>-<pid>-<n>-<role>` (prefix "knp-t" by default), so parallel
test runs never collide and leftovers of a dead run can be found (`remove_stale`). Everything a
context manager creates is deleted on exit, whatever happened inside.

Sockets belong to the namespace they were created in, whatever thread uses them later:
create them inside `entered()`, use them from anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

__all__ = [
    "Netns",
    "NetnsPair",
    "netns",
    "netns_pair",
    "remove_stale",
    "require_kernel",
    "setns",
    "skip_or_fail",
]

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
_counter = itertools.count()


def skip_or_fail(reason: str) -> None:
    """Skip the test, except under CI (CI=true) where a kernel test that cannot run is a failure:
    CI must never pass by silently skipping the tests that matter."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"kernel test cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_kernel(*tools: str) -> None:
    """Skip (or fail under CI) unless we are root and every tool is on PATH."""
    if os.geteuid() != 0:
        skip_or_fail("needs root: creates network namespaces and netfilter rules")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        skip_or_fail(f"needs {', '.join(missing)} on PATH")


def setns(path: str) -> None:
    """Move the calling thread into the network namespace at `path` (a /var/run/netns file or
    /proc/<pid>/task/<tid>/ns/net). Only this thread moves: other threads are unaffected."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns_fd(fd)
    finally:
        os.close(fd)


def _setns_fd(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Netns:
    """A named network namespace (as created by `ip netns add`)."""

    name: str

    @property
    def path(self) -> str:
        return f"{NETNS_DIR}/{self.name}"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (`ip netns exec`); raise on failure if check."""
        return _run(["ip", "netns", "exec", self.name, *args], check=check)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into this namespace for the duration of the block."""
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(self.path)
            try:
                yield
            finally:
                _setns_fd(back)
        finally:
            os.close(back)

    def read_proc(self, relative: str) -> str:
        """Read /proc/net/<relative> as seen from this namespace (e.g. "netfilter/nfnetlink_queue")."""
        with self.entered():
            # /proc/net follows the thread group leader's namespace, thread-self ours.
            with open(f"/proc/thread-self/net/{relative}", encoding="ascii") as f:
                return f.read()


@contextlib.contextmanager
def netns(role: str = "ns", prefix: str = "knp-t") -> Iterator[Netns]:
    """A fresh namespace with loopback up, deleted on exit."""
    ns = Netns(f"{prefix}-{os.getpid()}-{next(_counter)}-{role}")
    _run(["ip", "netns", "add", ns.name])
    try:
        _run(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        yield ns
    finally:
        _run(["ip", "netns", "del", ns.name], check=False)


@dataclass(frozen=True)
class NetnsPair:
    """Two namespaces joined by a veth pair, both ends named veth0, with IPv4 and IPv6."""

    client: Netns
    server: Netns
    client_ip4: str = "10.213.0.1"
    server_ip4: str = "10.213.0.2"
    client_ip6: str = "fd00:6b6e:70::1"
    server_ip6: str = "fd00:6b6e:70::2"


@contextlib.contextmanager
def netns_pair(prefix: str = "knp-t") -> Iterator[NetnsPair]:
    """A client and a server namespace linked by a veth, addressed /24 and /64, deleted on exit.

    The veth is created directly inside the namespaces, so no interface ever appears in the
    caller's namespace, and IPv6 addresses skip duplicate address detection (usable at once).
    """
    with netns("c", prefix) as client, netns("s", prefix) as server:
        pair = NetnsPair(client, server)
        _run(["ip", "-n", client.name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", server.name])
        for ns, ip4, ip6 in ((client, pair.client_ip4, pair.client_ip6), (server, pair.server_ip4, pair.server_ip6)):
            _run(["ip", "-n", ns.name, "addr", "add", f"{ip4}/24", "dev", "veth0"])
            _run(["ip", "-n", ns.name, "addr", "add", f"{ip6}/64", "dev", "veth0", "nodad"])
            _run(["ip", "-n", ns.name, "link", "set", "veth0", "up"])
        yield pair


def remove_stale(prefix: str = "knp-t") -> list[str]:
    """Delete namespaces left by test processes that no longer exist; returns their names."""
    removed: list[str] = []
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        parts = name[len(prefix) + 1 :].split("-", 1)
        if not name.startswith(prefix + "-") or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed
