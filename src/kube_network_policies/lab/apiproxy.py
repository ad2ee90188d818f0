"""A TCP relay that makes the test API server reachable from inside node namespaces.

The control plane listens on the host's loopback; an agent in a node namespace has its own
loopback. Rather than wiring the host into the lab's network (and adding the lab's addresses to
the serving certificate), the relay listens on the same loopback address and port inside each
node namespace and forwards every connection, bytes untouched (TLS passes through, so the
certificate for 127.0.0.1 stays valid and the agents use the lab's own kubeconfig).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from kube_network_policies.dataplane.netns import entered

BUFFER = 65536


class ApiProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._selector = selectors.DefaultSelector()
        self._listeners: list[socket.socket] = []
        self._peers: dict[socket.socket, socket.socket] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="knp-api-proxy", daemon=True)
        self._thread.start()

    def listen_in(self, netns: str) -> None:
        """Accept connections to the target's address and port inside `netns`."""
        with entered(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(self.target)
        sock.listen(64)
        sock.setblocking(False)
        with self._lock:
            self._listeners.append(sock)
            self._selector.register(sock, selectors.EVENT_READ, "listen")
        self._wake_w.send(b"x")

    def _loop(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        sock.recv(4096)
                elif key.data == "listen":
                    self._accept(sock)
                else:
                    self._relay(sock)

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._peers[client] = upstream
        self._peers[upstream] = client
        self._selector.register(client, selectors.EVENT_READ, "relay")
        self._selector.register(upstream, selectors.EVENT_READ, "relay")

    def _relay(self, sock: socket.socket) -> None:
        peer = self._peers.get(sock)
        try:
            data = sock.recv(BUFFER)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and peer is not None:
            try:
                # Small control-plane traffic: a blocking send of what was read keeps order simple.
                peer.setblocking(True)
                peer.sendall(data)
                peer.setblocking(False)
                return
            except OSError:
                pass
        self._close_pair(sock)

    def _close_pair(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._peers.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            s.close()

    def close(self) -> None:
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(2)
        for s in list(self._peers):
            self._close_pair(s)
        for s in self._listeners:
            s.close()
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()
