"""A cluster in a box: network namespaces standing for the nodes, pods and external hosts of a
scenario, wired like a routed (bridge-less) CNI on a kind-style node network.

    pod netns ── eth0 ═veth═ vpN ── node netns ── eth0 ═veth═ vnN ──┐
    (pod /32 /128, default via             (forwarding, /32 route   │  fabric netns: br0
     169.254.1.1 and fe80::1)               per local pod, routes   │
                                            to remote pods via the  │
                                            remote node's IP)       │
    external netns ── eth0 ═veth═ vxN ──────────────────────────────┘

* A hostNetwork pod IS its node's namespace.
* Every interface lives only inside our namespaces (veths are created with their peer directly in
  the target namespace), so nothing ever appears in the caller's namespace and short fixed
  interface names (eth0, vp3, vn0, ...) cannot clash with anything.
* Addresses are host routes (/32, /128) plus explicit on-link routes, so node and external
  addresses need not share a subnet (a scenario may use 172.18.0.2 next to 203.0.113.5).
* Every MAC address is assigned by us and every neighbour entry is installed `permanent`: no
  ARP/NDP ever runs, so the first packet of a burst of hundreds of probes is never held in (or
  dropped from) an unresolved neighbour's queue, and IPv6 needs no DAD/NDP wait. DAD is also
  disabled (accept_dad=0) so addresses are usable at once.
* Dual-stack pods work on single-stack nodes: IPv6 pod routes go via the node's fixed uplink
  link-local address (fe80::6b6e:N); IPv4 pod routes behind an IPv6-only node use that same
  next hop (RFC 5549 `via inet6`).

Namespaces are named `<prefix><role><index>-<name>` with a run prefix `knp<pid>-<n>-`, so
`Topology.cleanup_stale()` can find and remove what a crashed (SIGKILLed) run left behind.

Teardown: `close()` (idempotent; also the context manager exit and an atexit hook) kills every
process inside the namespaces, closes attached probers and deletes the namespaces. SIGTERM's
default action skips atexit and `finally`: a program that must clean up on SIGTERM calls
`exit_on_sigterm()` (turns SIGTERM into SystemExit) in its main thread.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType

from kube_network_policies.dataplane.netns import NETNS_DIR, entered, netns_path
from kube_network_policies.errors import KnpError

PREFIX_ROOT = "knp"
GATEWAY4 = "169.254.1.1"  # the pods' default gateway; never assigned, only a permanent neighbour
GATEWAY6 = "fe80::1"  # assigned to every node-side pod veth, link-local so it may repeat
FABRIC_NETNS = "fabric"

_run_counter = itertools.count()


class TopologyError(KnpError):
    """The topology cannot be built or torn down; the message says why."""


class IpCommandError(TopologyError):
    """An external command failed; names the command (and batch line) and its stderr."""

    def __init__(self, command: str, returncode: int, stderr: str) -> None:
        self.command = command
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"`{command}` failed (exit {returncode}): {stderr or 'no error output'}")


# --- value types ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PodConfig:
    key: str  # "namespace/name"
    node: str
    ips: tuple[str, ...]
    host_network: bool


@dataclass(frozen=True, slots=True)
class Link:
    """One veth end as we configure it: its namespace, name and MAC."""

    netns: str
    ifname: str
    mac: str


def _write_sysctls(netns: str, values: dict[str, str]) -> None:
    # /proc/sys/net is resolved against the opening thread's namespace: writing from inside the
    # namespace costs a few µs instead of one `ip netns exec sysctl` process per namespace.
    with entered(netns):
        for key, value in values.items():
            path = "/proc/sys/" + key.replace(".", "/")
            try:
                with open(path, "w", encoding="ascii") as f:
                    f.write(value)
            except OSError as exc:
                raise TopologyError(f"cannot set {key}={value} in netns {netns}: {exc.strerror or exc}") from None


# --- running ip --------------------------------------------------------------------------


def _ip_binary() -> str:
    ip = shutil.which("ip")
    if ip is None:
        raise TopologyError("`ip` (iproute2) not found on PATH")
    return ip


def _start_batch(netns: str | None, lines: Sequence[str], force: bool = False) -> tuple[list[str], subprocess.Popen[bytes]]:
    argv = [_ip_binary()]
    if netns is not None:
        argv += ["-n", netns]
    if force:
        argv.append("-force")  # go on after a failed line (teardown); errors still reach stderr
    argv += ["-batch", "-"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return argv, proc


def run_batches(batches: Sequence[tuple[str | None, Sequence[str]]], force: bool = False) -> None:
    """Run `ip [-n NETNS] -batch -` once per (netns, lines), all in parallel. A failure raises
    IpCommandError naming the namespace, the failing batch line and ip's message."""
    started = [(netns, lines, *_start_batch(netns, lines, force)) for netns, lines in batches if lines]
    errors: list[IpCommandError] = []
    for _netns, lines, argv, proc in started:
        _, err = proc.communicate("".join(line + "\n" for line in lines).encode())
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()
            errors.append(IpCommandError(_failed_line(argv, lines, text), proc.returncode, _strip_position(text)))
    if errors:
        raise errors[0]


def _failed_line(argv: list[str], lines: Sequence[str], stderr: str) -> str:
    # ip reports "Command failed -:7": name that line so the message reads as one command.
    m = re.search(r"Command failed -:(\d+)", stderr)
    prefix = " ".join(["ip"] + argv[1:-2])
    if m and 0 < int(m.group(1)) <= len(lines):
        return f"{prefix} {lines[int(m.group(1)) - 1]}"
    return " ".join(["ip"] + argv[1:])


def _strip_position(stderr: str) -> str:
    return "; ".join(line for line in stderr.splitlines() if not line.startswith("Command failed -:")) or stderr


# --- processes inside namespaces ----------------------------------------------------------


def _netns_inodes(names: Iterable[str]) -> dict[tuple[int, int], str]:
    out: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(netns_path(name))
        except OSError:
            continue
        out[(st.st_dev, st.st_ino)] = name
    return out


def pids_in(names: Iterable[str]) -> dict[int, str]:
    """Processes whose (main thread's) network namespace is one of `names`, like `ip netns pids`,
    for all namespaces in one scan of /proc. Our own process is never listed."""
    inodes = _netns_inodes(names)
    found: dict[int, str] = {}
    if not inodes:
        return found
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone, or a kernel thread
        name = inodes.get((st.st_dev, st.st_ino))
        if name is not None:
            found[int(entry)] = name
    return found


def _kill_all(names: Iterable[str], wait: float = 1.0) -> None:
    pids = pids_in(list(names))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline:
        # A killed process still pins its namespace until it is gone: wait briefly.
        pids = {p: n for p, n in pids.items() if os.path.exists(f"/proc/{p}/ns/net")}
        if pids:
            time.sleep(0.005)


def delete_netns(names: Sequence[str]) -> None:
    """Kill the processes inside, then delete the namespaces (one `ip -batch` for all)."""
    names = [n for n in names if os.path.exists(netns_path(n))]
    if not names:
        return
    _kill_all(names)
    try:
        run_batches([(None, [f"netns del {n}" for n in names])], force=True)
    except IpCommandError as exc:
        left = [n for n in names if os.path.exists(netns_path(n))]
        if left:
            raise TopologyError(f"cannot delete network namespaces {', '.join(left)}: {exc}") from None


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143) in the main thread, so `with Topology...`, `finally` and
    atexit run as on Ctrl-C. Call it from the main thread of a program that builds topologies."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# --- the topology --------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text.replace("/", "."))[:40]


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def _host(ip: str) -> str:
    return f"{ip}/{32 if _family(ip) == 4 else 128}"


def _mac(n: int) -> str:
    # Locally administered unicast (02:...), "kn" in the second and third bytes, a 24-bit serial.
    return f"02:6b:6e:{(n >> 16) & 0xFF:02x}:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"


def _node_lla(index: int) -> str:
    """A fixed link-local address on node `index`'s uplink: the next hop for pods of a family
    the node has no address of."""
    return f"fe80::6b6e:{index + 1:x}"


def _route(ip: str, rest: str) -> str:
    # No -6 here: ip takes no options inside a batch; the address itself sets the family.
    return f"route add {_host(ip)} {rest}"


def _neigh(ip: str, mac: str, dev: str) -> str:
    return f"neigh replace {ip} lladdr {mac} dev {dev} nud permanent"


def _addr(ip: str, dev: str) -> str:
    # nodad: usable at once (accept_dad=0 is set too, this is belt and braces for IPv6).
    return f"addr add {_host(ip)} dev {dev}" + (" nodad" if _family(ip) == 6 else "")


def _canonical(ip: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise TopologyError(f"{what}: invalid IP address {ip!r}") from None


def new_prefix(root: str = PREFIX_ROOT) -> str:
    """A run prefix `knp<pid>-<n>-`: unique per topology, and `cleanup_stale` can read the owner."""
    return f"{root}{os.getpid()}-{next(_run_counter)}-"


class Topology:
    """Network namespaces for one scenario cluster. Build with `Topology.build(...)`; use as a
    context manager (or call `close()`) so that everything is removed on every exit path."""

    def __init__(self, prefix: str, nodes: tuple[NodeConfig, ...], pods: tuple[PodConfig, ...], external_ips: tuple[str, ...]) -> None:
        self.prefix = prefix
        self.nodes: dict[str, NodeConfig] = {n.name: n for n in nodes}
        self.pods: dict[str, PodConfig] = {p.key: p for p in pods}
        self.external_ips = external_ips
        self.fabric = prefix + FABRIC_NETNS
        self._node_ns = {n.name: f"{prefix}n{i}-{_slug(n.name)}" for i, n in enumerate(nodes)}
        self._pod_ns = {p.key: f"{prefix}p{i}-{_slug(p.key)}" for i, p in enumerate(pods) if not p.host_network}
        self._ext_ns = {ip: f"{prefix}x{i}-{_slug(ip)}" for i, ip in enumerate(external_ips)}
        self._by_ip: dict[str, str] = {}
        for n in nodes:
            self._by_ip.update((ip, self._node_ns[n.name]) for ip in n.ips)
        for p in pods:
            if not p.host_network:
                self._by_ip.update((ip, self._pod_ns[p.key]) for ip in p.ips)
        self._by_ip.update((ip, ns) for ip, ns in self._ext_ns.items())
        self._closers: list[Callable[[], None]] = []
        self._closed = False
        self._created: list[str] = []
        self.build_seconds = 0.0

    # -- construction --

    @classmethod
    def build(
        cls,
        nodes: Iterable[tuple[str, Iterable[str]]],
        pods: Iterable[tuple[str, str, Iterable[str], bool]],
        external_ips: Iterable[str] = (),
        prefix: str | None = None,
    ) -> Topology:
        """Create and wire every namespace. `nodes`: (name, ips); `pods`: ("ns/name", node, ips,
        host_network) (a hostNetwork pod's ips are its node's, whatever is given); `external_ips`:
        literal addresses probes use (one namespace each; addresses that already belong to a node
        or pod are skipped). `prefix` defaults to a fresh `knp<pid>-<n>-`."""
        topo = cls(prefix or new_prefix(), *cls._validate(nodes, pods, external_ips))
        started = time.monotonic()
        atexit.register(topo._close_at_exit)
        try:
            topo._create()
        except BaseException:  # KeyboardInterrupt too: never leave half a topology behind
            with contextlib.suppress(Exception):
                topo.close()
            raise
        topo.build_seconds = time.monotonic() - started
        return topo

    @staticmethod
    def _validate(
        nodes: Iterable[tuple[str, Iterable[str]]],
        pods: Iterable[tuple[str, str, Iterable[str], bool]],
        external_ips: Iterable[str],
    ) -> tuple[tuple[NodeConfig, ...], tuple[PodConfig, ...], tuple[str, ...]]:
        owner: dict[str, str] = {}

        def claim(ip: str, who: str) -> str:
            ip = _canonical(ip, who)
            if ip in owner:
                raise TopologyError(f"address {ip} is used by {owner[ip]} and {who}")
            if ip == GATEWAY4:
                raise TopologyError(f"{who}: {ip} is reserved for the pods' default gateway")
            owner[ip] = who
            return ip

        node_list: list[NodeConfig] = []
        for name, ips in nodes:
            node_ips = tuple(claim(ip, f"node {name}") for ip in ips)
            if not node_ips:
                raise TopologyError(f"node {name} has no IP address")
            if name in (n.name for n in node_list):
                raise TopologyError(f"duplicate node {name}")
            node_list.append(NodeConfig(name, node_ips))
        if not node_list:
            raise TopologyError("a topology needs at least one node")
        by_name = {n.name: n for n in node_list}
        pod_list: list[PodConfig] = []
        for key, node, ips, host_network in pods:
            if "/" not in key:
                raise TopologyError(f"pod key {key!r} is not namespace/name")
            if node not in by_name:
                raise TopologyError(f"pod {key}: unknown node {node!r}")
            if key in (p.key for p in pod_list):
                raise TopologyError(f"duplicate pod {key}")
            if host_network:
                pod_ips = by_name[node].ips
            else:
                pod_ips = tuple(claim(ip, f"pod {key}") for ip in ips)
                if not pod_ips:
                    raise TopologyError(f"pod {key} has no IP address")
            pod_list.append(PodConfig(key, node, pod_ips, bool(host_network)))
        ext: list[str] = []
        for raw_ip in external_ips:
            ip = _canonical(raw_ip, "external IP")
            if ip not in owner and ip not in ext:  # a node's or pod's own address needs no host
                ext.append(ip)
        return tuple(node_list), tuple(pod_list), tuple(ext)

    def _create(self) -> None:
        nodes = list(self.nodes.values())
        local_pods = [p for p in self.pods.values() if not p.host_network]
        all_ns = [self.fabric, *self._node_ns.values(), *self._pod_ns.values(), *self._ext_ns.values()]
        if any(len(n) > 200 for n in all_ns):
            raise TopologyError(f"netns prefix {self.prefix!r} is too long")
        existing = [n for n in all_ns if os.path.exists(netns_path(n))]
        if existing:
            raise TopologyError(f"network namespace {existing[0]} already exists (prefix {self.prefix!r} in use?)")

        # 1. All namespaces in one ip process.
        self._created = list(all_ns)
        run_batches([(None, [f"netns add {n}" for n in all_ns])])

        # 2. Sysctls before any interface exists, so per-interface values inherit "default".
        common = {
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
            "net.ipv4.conf.all.rp_filter": "0",  # asymmetric paths (pod->ext via node) are fine
            "net.ipv4.conf.default.rp_filter": "0",
            "net.ipv6.conf.default.accept_ra": "0",
        }
        router = {**common, "net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
        for n in all_ns:
            _write_sysctls(n, router if n in self._node_ns.values() else common)

        # 3. Links: the fabric creates every uplink, each node its pods' veths (in parallel).
        serial = itertools.count(1)
        uplink: dict[str, tuple[Link, Link]] = {}  # node name or ext IP -> (fabric port, host end)
        fabric = ["link add br0 type bridge mcast_snooping 0", "link set br0 up", "link set lo up"]
        hosts = [(name, "vn", i, self._node_ns[name]) for i, name in enumerate(self.nodes)]
        hosts += [(ip, "vx", i, ns) for i, (ip, ns) in enumerate(self._ext_ns.items())]
        for key, kind, i, ns in hosts:
            port = Link(self.fabric, f"{kind}{i}", _mac(next(serial)))
            end = Link(ns, "eth0", _mac(next(serial)))
            uplink[key] = (port, end)
            fabric.append(f"link add {port.ifname} address {port.mac} type veth peer name eth0 address {end.mac} netns {ns}")
            fabric.append(f"link set {port.ifname} master br0 up")
        podlink: dict[str, tuple[Link, Link]] = {}  # pod key -> (node side, pod side)
        node_links: dict[str, list[str]] = {n.name: [] for n in nodes}
        for i, p in enumerate(local_pods):
            node_side = Link(self._node_ns[p.node], f"vp{i}", _mac(next(serial)))
            pod_side = Link(self._pod_ns[p.key], "eth0", _mac(next(serial)))
            podlink[p.key] = (node_side, pod_side)
            node_links[p.node].append(
                f"link add {node_side.ifname} address {node_side.mac} type veth peer name eth0 address {pod_side.mac} netns {pod_side.netns}"
            )
        run_batches([(self.fabric, fabric)] + [(self._node_ns[name], lines) for name, lines in node_links.items()])

        # 4. Addresses, routes and permanent neighbours, every namespace in parallel.
        batches: list[tuple[str | None, Sequence[str]]] = []
        for node in nodes:
            batches.append((self._node_ns[node.name], self._node_config(node, uplink, podlink)))
        for p in local_pods:
            node_side, pod_side = podlink[p.key]
            lines = ["link set lo up", "link set eth0 up"]
            lines += [_addr(ip, "eth0") for ip in p.ips]
            if any(_family(ip) == 4 for ip in p.ips):
                lines += [
                    f"route add {GATEWAY4}/32 dev eth0 scope link",
                    f"route add default via {GATEWAY4} dev eth0",
                    _neigh(GATEWAY4, node_side.mac, "eth0"),
                ]
            if any(_family(ip) == 6 for ip in p.ips):
                lines += [f"route add ::/0 via {GATEWAY6} dev eth0", _neigh(GATEWAY6, node_side.mac, "eth0")]
            batches.append((pod_side.netns, lines))
        for ip, ns in self._ext_ns.items():
            batches.append((ns, self._external_config(ip, uplink)))
        run_batches(batches)

    def _remote_routes(self, family: int, dev: str, uplink: dict[str, tuple[Link, Link]], skip_node: str | None, skip_ext: str | None) -> list[str]:
        """On-link routes and neighbours to the other nodes and externals, routes to remote pods
        via their node. family 0: both families (a node), else only that one (an external)."""
        lines: list[str] = []

        def wanted(ip: str) -> bool:
            return family == 0 or _family(ip) == family

        for index, node in enumerate(self.nodes.values()):
            if node.name == skip_node:
                continue
            mac = uplink[node.name][1].mac
            lla = _node_lla(index)
            lines.append(_neigh(lla, mac, dev))
            for ip in node.ips:
                lines.append(_neigh(ip, mac, dev))
                if wanted(ip):
                    lines.append(_route(ip, f"dev {dev} scope link"))
            for p in self.pods.values():
                if p.node != node.name or p.host_network:
                    continue
                for ip in filter(wanted, p.ips):
                    same = [v for v in node.ips if _family(v) == _family(ip)]
                    if same:
                        gateway = f"via {same[0]}"
                    elif _family(ip) == 6:
                        gateway = f"via {lla}"  # the node has no IPv6 address: its link-local
                    else:
                        gateway = f"via inet6 {lla}"  # no IPv4 address: RFC 5549 next hop
                    lines.append(_route(ip, f"{gateway} dev {dev}"))
        for ip in self._ext_ns:
            if ip != skip_ext and wanted(ip):
                lines += [_route(ip, f"dev {dev} scope link"), _neigh(ip, uplink[ip][1].mac, dev)]
        return lines

    def _node_config(self, node: NodeConfig, uplink: dict[str, tuple[Link, Link]], podlink: dict[str, tuple[Link, Link]]) -> list[str]:
        lines = ["link set lo up", "link set eth0 up"]
        lines += [_addr(ip, "eth0") for ip in node.ips]
        lines.append(f"addr add {_node_lla(list(self.nodes).index(node.name))}/64 dev eth0 nodad")
        src = {_family(ip): ip for ip in reversed(node.ips)}  # first address of each family
        for p in self.pods.values():
            if p.node != node.name or p.host_network:
                continue
            node_side, pod_side = podlink[p.key]
            dev = node_side.ifname
            lines += [f"link set {dev} up", f"addr add {GATEWAY6}/64 dev {dev} nodad"]
            for ip in p.ips:
                # src: the node's own traffic to its pods leaves from the node IP (kubelet-like).
                hint = f" src {src[_family(ip)]}" if _family(ip) in src else ""
                lines += [_route(ip, f"dev {dev} scope link{hint}"), _neigh(ip, pod_side.mac, dev)]
        lines += self._remote_routes(0, "eth0", uplink, skip_node=node.name, skip_ext=None)
        return lines

    def _external_config(self, ip: str, uplink: dict[str, tuple[Link, Link]]) -> list[str]:
        lines = ["link set lo up", "link set eth0 up", _addr(ip, "eth0")]
        return lines + self._remote_routes(_family(ip), "eth0", uplink, skip_node=None, skip_ext=ip)

    # -- queries --

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this topology (fabric, nodes, pods, externals)."""
        return [self.fabric, *self._node_ns.values(), *self._pod_ns.values(), *self._ext_ns.values()]

    def node_netns(self, node: str) -> str:
        try:
            return self._node_ns[node]
        except KeyError:
            raise TopologyError(f"unknown node {node!r}") from None

    def netns_of(self, endpoint: str) -> str:
        """The namespace of "ns/pod" (its node's for a hostNetwork pod), a node name, or any
        address of the topology (node, pod or external IP)."""
        pod = self.pods.get(endpoint)
        if pod is not None:
            return self._node_ns[pod.node] if pod.host_network else self._pod_ns[pod.key]
        if endpoint in self._node_ns:
            return self._node_ns[endpoint]
        with contextlib.suppress(ValueError):
            ns = self._by_ip.get(str(ipaddress.ip_address(endpoint)))
            if ns is not None:
                return ns
        raise TopologyError(f"unknown endpoint {endpoint!r} (expected ns/pod, a node name or an address of the topology)")

    def ips_of(self, endpoint: str) -> tuple[str, ...]:
        """Addresses of "ns/pod" (a hostNetwork pod has its node's), a node, or a literal IP."""
        pod = self.pods.get(endpoint)
        if pod is not None:
            return pod.ips
        node = self.nodes.get(endpoint)
        if node is not None:
            return node.ips
        self.netns_of(endpoint)  # raises for an unknown address
        return (str(ipaddress.ip_address(endpoint)),)

    def run(self, netns: str, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command inside one of our namespaces (`ip netns exec`), e.g. iptables; raises
        IpCommandError if check and it fails."""
        cmd = [_ip_binary(), "netns", "exec", netns, *argv]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IpCommandError(" ".join(["ip", *cmd[1:]]), -1, str(exc)) from None
        if check and proc.returncode != 0:
            raise IpCommandError(" ".join(["ip", *cmd[1:]]), proc.returncode, proc.stderr.strip())
        return proc

    # -- teardown --

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run callback first in close() (probers close their sockets and namespace fds here:
        an open fd would keep a deleted namespace alive)."""
        self._closers.append(callback)

    def close(self) -> None:
        """Kill processes inside, close attached probers, delete every namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self._close_at_exit)
        problems: list[str] = []
        for callback in reversed(self._closers):
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                problems.append(f"{type(exc).__name__}: {exc}")
        self._closers.clear()
        try:
            delete_netns(self._created)
        except (TopologyError, OSError) as exc:
            problems.append(str(exc))
        if problems:
            raise TopologyError("teardown incomplete: " + "; ".join(problems))

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except TopologyError as err:  # a warning, not an "Exception ignored" traceback
            print(f"warning: {err}", file=sys.stderr)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.close()
        except TopologyError as err:
            if exc is None:
                raise
            print(f"warning: {err}", file=sys.stderr)  # do not hide the error already raised

    # -- leftovers of dead runs --

    @staticmethod
    def cleanup_stale(prefix_root: str = PREFIX_ROOT) -> list[str]:
        """Delete namespaces named `<prefix_root><pid>-...` whose pid is not alive (a run that was
        SIGKILLed or crashed before teardown), killing processes inside. Returns their names.
        Caveat: a recycled pid keeps its dead predecessor's namespaces until it exits."""
        pattern = re.compile(rf"^{re.escape(prefix_root)}(\d+)-")
        try:
            names = sorted(os.listdir(NETNS_DIR))
        except FileNotFoundError:
            return []
        stale = []
        for name in names:
            m = pattern.match(name)
            if m is None:
                continue
            pid = int(m.group(1))
            if pid == os.getpid() or _alive(pid):
                continue
            stale.append(name)
        delete_netns(stale)
        return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
