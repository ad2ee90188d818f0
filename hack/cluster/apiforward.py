#!/usr/bin/env python3
"""Forwards TCP from a loopback port of the calling (root) network namespace to an address
reachable only inside another network namespace: scripts/cluster.sh uses it so that clients on
the machine (kubectl, e2e.test) reach the cluster's API server, which lives in the fabric
namespace, without any interface, route or rule being added to the root namespace.

    apiforward.py LISTEN_PORT NETNS_PATH TARGET_HOST TARGET_PORT

The listening socket is made first, in the caller's namespace; then the process enters
NETNS_PATH, so every upstream connection is made from there. Bytes are copied both ways as they
are (TLS stays end to end). Standard library only.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000


def enter_netns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        # Half-close so the other direction can still drain, then let both ends go.
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def serve(client: socket.socket, host: str, port: int) -> None:
    try:
        upstream = socket.create_connection((host, port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: apiforward.py LISTEN_PORT NETNS_PATH TARGET_HOST TARGET_PORT", file=sys.stderr)
        return 2
    listen_port, netns, host, target_port = int(argv[0]), argv[1], argv[2], int(argv[3])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listen_port))
    listener.listen(128)
    enter_netns(netns)  # a single-threaded process: every later socket is made in there
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client, host, target_port), daemon=True).start()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (OSError, ValueError) as e:
        print(f"apiforward: {e}", file=sys.stderr)
        sys.exit(1)
