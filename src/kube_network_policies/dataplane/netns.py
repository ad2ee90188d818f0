"""Entering a network namespace from Python, for one thread at a time.

The agent itself runs in its node's namespace and never needs this; tests, the lab and tools that
drive a namespace from outside do (a netlink socket made inside a namespace stays in it for life).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

__all__ = ["CLONE_NEWNET", "NETNS_DIR", "entered", "netns_path", "setns_fd"]

NETNS_DIR = "/var/run/netns"  # where `ip netns add` puts its bind mounts
CLONE_NEWNET = 0x40000000

_libc: ctypes.CDLL | None = None


def setns_fd(fd: int) -> None:
    """Move the calling thread (only) into the network namespace open at `fd`."""
    # Python 3.11 has no os.setns (3.12+): call libc directly.
    global _libc
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name: str) -> str:
    return f"{NETNS_DIR}/{name}"


@contextlib.contextmanager
def entered(fd_or_name: int | str) -> Iterator[None]:
    """Run the block with the calling thread inside a network namespace (a name under
    /var/run/netns or an open namespace fd), then move it back, whatever happens. Sockets created
    inside stay in that namespace for their whole life."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if isinstance(fd_or_name, int):
            setns_fd(fd_or_name)
        else:
            fd = os.open(netns_path(fd_or_name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns_fd(fd)
            finally:
                os.close(fd)
        try:
            yield
        finally:
            setns_fd(home)  # if this fails the thread is lost in the namespace: let it raise
    finally:
        os.close(home)
