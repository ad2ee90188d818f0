"""Notice, as it happens, when someone else changes the ruleset the agent installed.

`nft flush ruleset` (what restarting a node's nftables service or a firewalld reload does),
`nft delete table inet kube-network-policies` or `iptables -t mangle -F` turn enforcement off
without the agent doing anything; a policy edit would not even bring it back. The kernel announces
every nf_tables change on the netlink multicast group NFNLGRP_NFTABLES (iptables-nft's too, since
it drives nf_tables): one message per object created or deleted, then NEWGEN when the transaction
commits. Every message carries the netlink port id of the process that asked for the change, which
for nft and iptables is their pid: a transaction made by a command the agent ran itself
(`ruleset.recent_pids`) is not news.

:class:`NftMonitor` reads those messages without blocking and says whether a transaction of
someone else touched what the agent owns: its table (any object in it, except elements of the
accept-cache sets, which the kernel's packet path fills), and, with the xt-nfqueue backend, the
POSTROUTING and INPUT chains of the ip/ip6 mangle tables (or those tables as a whole). The agent
then checks and restores (agent.py); a periodic check covers what events cannot: a lost message
(receive buffer overrun, reported as a change), iptables-legacy (not nf_tables), a pid reused by a
foreign process.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable, Collection
from typing import Final

from kube_network_policies.dataplane.netns import entered
from kube_network_policies.dataplane.nftables import CACHE_V4, CACHE_V6, TABLE
from kube_network_policies.errors import KnpError

__all__ = ["MonitorError", "NftMonitor", "parse_events"]

log = logging.getLogger(__name__)

NETLINK_NETFILTER: Final = 12
SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1
NFNLGRP_NFTABLES: Final = 7
NFNL_SUBSYS_NFTABLES: Final = 10
SO_RCVBUFFORCE: Final = 33

# enum nf_tables_msg_types (linux/netfilter/nf_tables.h)
NFT_MSG_NEWTABLE: Final = 0
NFT_MSG_DELTABLE: Final = 2
NFT_MSG_NEWCHAIN: Final = 3
NFT_MSG_DELCHAIN: Final = 5
NFT_MSG_NEWRULE: Final = 6
NFT_MSG_DELRULE: Final = 8
NFT_MSG_NEWSET: Final = 9
NFT_MSG_DELSET: Final = 11
NFT_MSG_NEWSETELEM: Final = 12
NFT_MSG_DELSETELEM: Final = 14
NFT_MSG_NEWGEN: Final = 15
NFT_MSG_DESTROYTABLE: Final = 26
NFT_MSG_DESTROYCHAIN: Final = 27
NFT_MSG_DESTROYRULE: Final = 28
NFT_MSG_DESTROYSET: Final = 29
NFT_MSG_DESTROYSETELEM: Final = 30

_TABLE_MSGS: Final = frozenset((NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_DESTROYTABLE))
_CHAIN_MSGS: Final = frozenset((NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN, NFT_MSG_DESTROYCHAIN))
_RULE_MSGS: Final = frozenset((NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_DESTROYRULE))
_SET_MSGS: Final = frozenset((NFT_MSG_NEWSET, NFT_MSG_DELSET, NFT_MSG_DESTROYSET))
_ELEM_MSGS: Final = frozenset((NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_DESTROYSETELEM))

# Attribute numbers: the table's name is attribute 1 of every object message (NFTA_TABLE_NAME,
# NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_SET_ELEM_LIST_TABLE); the chain of a rule
# is NFTA_RULE_CHAIN (2), a chain's own name NFTA_CHAIN_NAME (3), the set of elements
# NFTA_SET_ELEM_LIST_SET (2).
_A_TABLE: Final = 1
_A_RULE_CHAIN: Final = 2
_A_CHAIN_NAME: Final = 3
_A_ELEM_SET: Final = 2

_INET: Final = 1  # NFPROTO_INET
_IPV4: Final = 2  # NFPROTO_IPV4
_IPV6: Final = 10  # NFPROTO_IPV6
_XT_CHAINS: Final = frozenset((b"POSTROUTING", b"INPUT"))
_TABLE_NAME: Final = TABLE.encode()
_CACHE_SETS: Final = frozenset((CACHE_V4.encode(), CACHE_V6.encode()))

_nlmsghdr = struct.Struct("=IHHII")
_nlattr = struct.Struct("=HH")


class MonitorError(KnpError, OSError):
    """The notification socket could not be opened (not root, no nf_tables)."""


def _attrs(data: bytes | memoryview, off: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        alen, atype = _nlattr.unpack_from(data, off)
        if alen < 4 or off + alen > end:
            break
        out[atype & 0x3FFF] = bytes(data[off + 4 : off + alen])  # without NLA_F_NESTED and friends
        off += (alen + 3) & ~3
    return out


def _name(raw: bytes | None) -> bytes:
    return raw.split(b"\0", 1)[0] if raw else b""


def touches_ours(msg: int, family: int, attrs: dict[int, bytes], watch_xt: bool) -> bool:
    """Whether one nf_tables notification concerns what the agent owns."""
    table = _name(attrs.get(_A_TABLE))
    if family == _INET and table == _TABLE_NAME:
        if msg in _ELEM_MSGS:
            return _name(attrs.get(_A_ELEM_SET)) not in _CACHE_SETS
        return True
    if watch_xt and family in (_IPV4, _IPV6) and table == b"mangle":
        if msg in _TABLE_MSGS:
            return True
        if msg in _CHAIN_MSGS:
            return _name(attrs.get(_A_CHAIN_NAME)) in _XT_CHAINS
        if msg in _RULE_MSGS:
            return _name(attrs.get(_A_RULE_CHAIN)) in _XT_CHAINS
    return False


def parse_events(data: bytes | memoryview, watch_xt: bool, pending: dict[int, bool]) -> list[int]:
    """Read one buffer of netlink messages; return the port ids of committed transactions that
    touched what the agent owns. `pending` carries "touched ours" per port id from one buffer to
    the next (a transaction's messages may span several reads; NEWGEN ends it)."""
    done: list[int] = []
    off, n = 0, len(data)
    while off + 16 <= n:
        mlen, mtype, _flags, _seq, portid = _nlmsghdr.unpack_from(data, off)
        if mlen < 16 or off + mlen > n:
            break
        if mtype >> 8 == NFNL_SUBSYS_NFTABLES and mlen >= 20:
            msg = mtype & 0xFF
            if msg == NFT_MSG_NEWGEN:
                if pending.pop(portid, False):
                    done.append(portid)
            else:
                family = data[off + 16]
                if touches_ours(msg, family, _attrs(data, off + 20, off + mlen), watch_xt):
                    pending[portid] = True
                else:
                    pending.setdefault(portid, False)
        off += (mlen + 3) & ~3
    if len(pending) > 1024:  # transactions whose NEWGEN we never saw (lost): forget them
        pending.clear()
    return done


class NftMonitor:
    """A non-blocking reader of nf_tables notifications in one network namespace.

    ``own``: returns the pids whose transactions are the agent's own (ruleset.recent_pids).
    ``netns``: open the socket in that named namespace (tests and tools); default: ours.
    """

    def __init__(self, *, watch_xt: bool, own: Callable[[], Collection[int]], netns: str | None = None, rcvbuf: int = 4 << 20) -> None:
        self.watch_xt = watch_xt
        self._own = own
        self._pending: dict[int, bool] = {}
        self.overruns = 0
        self.foreign = 0  # foreign transactions seen that touched what we own
        try:
            with entered(netns) if netns else contextlib.nullcontext():
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise MonitorError(exc.errno, f"cannot open a netfilter netlink socket: {exc.strerror}") from None
        try:
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            # A `flush ruleset` of a big kube-proxy ruleset is thousands of messages; an overrun
            # is not fatal (we check everything then), only slower.
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise MonitorError(exc.errno, f"cannot subscribe to nf_tables notifications: {exc.strerror}") from None
        self._sock = sock
        self._buf = bytearray(1 << 16)

    def fileno(self) -> int:
        return self._sock.fileno()

    def poll(self) -> bool:
        """Read every waiting notification; True if, since the last call, someone other than the
        agent changed what it owns, or notifications were lost (so a check is due)."""
        changed = False
        view = memoryview(self._buf)
        while True:
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    self._pending.clear()
                    changed = True
                    continue
                raise
            done = parse_events(view[:n], self.watch_xt, self._pending)
            if done:
                own = self._own()
                foreign = [p for p in done if p not in own]
                if foreign:
                    self.foreign += len(foreign)
                    changed = True
        return changed

    def close(self) -> None:
        self._sock.close()
