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
import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from kube_network_policies.dataplane import netns as _netns
from kube_network_policies.dataplane.netns import NETNS_DIR, netns_path
from skips import require_root, skip_or_fail  # tests/skips.py

__all__ = [
    "NETNS_DIR",
    "Netns",
    "NetnsPair",
    "netns",
    "netns_pair",
    "remove_stale",
    "require_kernel",
    "skip_or_fail",
]

_counter = itertools.count()


def require_kernel(*tools: str) -> None:
    """Skip (or fail under CI) unless we are root and every tool is on PATH."""
    require_root(*tools, why="creates network namespaces and netfilter rules")


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
        return netns_path(self.name)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (`ip netns exec`); raise on failure if check."""
        return _run(["ip", "netns", "exec", self.name, *args], check=check)

    def entered(self) -> contextlib.AbstractContextManager[None]:
        """Move the calling thread into this namespace for the duration of the block."""
        return _netns.entered(self.name)

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
