"""Where the Kubernetes API is and how to talk to it: in-cluster configuration, kubeconfig files,
credentials (bearer tokens, token files, exec credential plugins, client certificates) and TLS.

Configuration is in-cluster (service-account token, CA, KUBERNETES_SERVICE_HOST/PORT) or a
kubeconfig file (token, tokenFile, client certificates, CA file or data, insecure-skip-tls-verify,
tls-server-name, exec credential plugins). HTTP is httpx: HTTP/1.1, keep-alive, TCP keepalives,
connect and read timeouts; one client (one connection) per informer, so a long watch never waits
behind another resource's list.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from kube_network_policies.errors import KnpError
from kube_network_policies.sources.base import SourceError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
USER_AGENT = "kube-network-policies"
CONNECT_TIMEOUT_S = 10.0
LIST_TIMEOUT_S = 60.0  # per page: a read that stalls this long is a failed list
TOKEN_FILE_REREAD_S = 60.0  # in-cluster tokens are rotated by the kubelet; client-go re-reads each minute

_KEEPALIVE: list[tuple[int, int, int]] = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
if hasattr(socket, "TCP_KEEPIDLE"):
    _KEEPALIVE += [
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
    ]


class ConfigError(SourceError):
    """The API cannot be reached as configured: no in-cluster environment, a bad kubeconfig."""


class ApiError(KnpError):
    """The API server answered with an error status (an exec credential plugin that fails is
    reported as a 401 with reason ExecPluginFailed)."""

    def __init__(self, code: int, reason: str, message: str, retry_after: float | None = None) -> None:
        self.code = code
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"HTTP {code}{' ' + reason if reason else ''}: {message}")


@dataclass(frozen=True)
class ApiConfig:
    """Where the API is and how to talk to it."""

    server: str
    ssl_context: ssl.SSLContext | None = None  # None: plain HTTP (a local proxy)
    auth: httpx.Auth | None = None
    tls_server_name: str | None = None
    origin: str = ""  # for messages: "in-cluster service account", "kubeconfig PATH (context X)"

    def transport(self) -> httpx.HTTPTransport:
        """A new connection pool: HTTP/1.1, keep-alive, TCP keepalives, no retries of its own."""
        return httpx.HTTPTransport(
            verify=self.ssl_context if self.ssl_context is not None else True,
            http1=True,
            http2=False,
            retries=0,
            socket_options=_KEEPALIVE,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=60.0),
        )

    def client(self, transport: httpx.BaseTransport | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.rstrip("/"),
            auth=self.auth,
            transport=transport or self.transport(),
            headers={"Accept": "application/json", "User-Agent": USER_AGENT},
            timeout=httpx.Timeout(LIST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            follow_redirects=False,
            trust_env=False,
        )

    @property
    def extensions(self) -> dict[str, Any]:
        """Per-request httpx extensions: the TLS server name (SNI and certificate check)."""
        return {"sni_hostname": self.tls_server_name} if self.tls_server_name else {}


class BearerAuth(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token.strip()}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


class _RefreshingTokenAuth(httpx.Auth):
    """A bearer token read from somewhere that can change: after a 401, read it again once."""

    def _token_now(self, force: bool = False) -> str:
        raise NotImplementedError

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token_now()}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._token_now(force=True)}"
            yield request


class TokenFileAuth(_RefreshingTokenAuth):
    """A bearer token read from a file, re-read every minute and after a 401 (bound service
    account tokens are rotated by the kubelet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._token = ""
        self._read_at = -1e9
        self._token_now(force=True)  # a missing or unreadable file is a configuration error

    def _token_now(self, force: bool = False) -> str:
        with self._lock:
            if force or time.monotonic() - self._read_at > TOKEN_FILE_REREAD_S:
                try:
                    token = self.path.read_text().strip()
                except OSError as exc:
                    if not self._token:
                        raise ConfigError(f"cannot read the token file {self.path}: {exc.strerror or exc}") from None
                    log.warning("cannot re-read the token file %s (using the previous token): %s", self.path, exc)
                    token = self._token
                if not token:
                    raise ConfigError(f"the token file {self.path} is empty")
                self._token, self._read_at = token, time.monotonic()
            return self._token


class ExecAuth(_RefreshingTokenAuth):
    """A client-go credential plugin (kubeconfig `user.exec`): runs the command, uses the token
    it prints until its expirationTimestamp, and runs it again after a 401."""

    API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")

    def __init__(self, spec: dict[str, Any], base_dir: Path, where: str) -> None:
        api = spec.get("apiVersion")
        if api not in self.API_VERSIONS:
            raise ConfigError(f"{where}: exec apiVersion {api!r} is not supported (use {' or '.join(self.API_VERSIONS)})")
        command = spec.get("command")
        if not isinstance(command, str) or not command:
            raise ConfigError(f"{where}: exec.command is required")
        if os.sep in command and not os.path.isabs(command):
            command = str(base_dir / command)  # as client-go: relative to the kubeconfig
        args = spec.get("args") or []
        env = spec.get("env") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError(f"{where}: exec.args must be a list of strings")
        if not isinstance(env, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in env):
            raise ConfigError(f"{where}: exec.env must be a list of {{name, value}}")
        self.api_version: str = api
        self.argv = [command, *args]
        self.env = {e["name"]: str(e.get("value", "")) for e in env}
        self.where = where
        self._lock = threading.Lock()
        self._token = ""
        self._expires: float | None = None  # monotonic deadline

    def _token_now(self, force: bool = False) -> str:
        with self._lock:
            fresh = self._token and (self._expires is None or time.monotonic() < self._expires - 10)
            if force or not fresh:
                self._token, self._expires = self._run()
            return self._token

    def _run(self) -> tuple[str, float | None]:
        env = dict(os.environ, **self.env)
        env["KUBERNETES_EXEC_INFO"] = json.dumps({"apiVersion": self.api_version, "kind": "ExecCredential", "spec": {"interactive": False}})
        try:
            proc = subprocess.run(self.argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ApiError(401, "ExecPluginFailed", f"{self.where}: running {self.argv[0]}: {exc}") from None
        if proc.returncode != 0:
            raise ApiError(
                401,
                "ExecPluginFailed",
                f"{self.where}: {self.argv[0]} exited with {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[:500]}",
            )
        try:
            status = json.loads(proc.stdout)["status"]
            token = status["token"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(
                401,
                "ExecPluginFailed",
                f"{self.where}: {self.argv[0]} did not print an ExecCredential with status.token (client certificates from exec plugins are not supported)",
            ) from None
        expires: float | None = None
        stamp = status.get("expirationTimestamp")
        if isinstance(stamp, str) and stamp:
            try:
                when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
                expires = time.monotonic() + (when - dt.datetime.now(dt.UTC)).total_seconds()
            except ValueError:
                log.warning("%s: ignoring the unreadable expirationTimestamp %r", self.where, stamp)
        return str(token), expires


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be base64 text")
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what}: invalid base64: {exc}") from None


def _ssl_context(ca_file: Path | None, ca_data: bytes | None, insecure: bool, where: str) -> ssl.SSLContext:
    try:
        if insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(ca_file))
        elif ca_data is not None:
            ctx = ssl.create_default_context(cadata=ca_data.decode("ascii", errors="replace"))
        else:
            ctx = ssl.create_default_context()  # the system's CAs
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot load the certificate authority: {exc}") from None
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cert: Path | bytes, key: Path | bytes, where: str) -> None:
    """ssl loads certificates only from files: data is written to a private temporary file that is
    removed at once."""
    tmp: list[str] = []
    try:
        paths = []
        for item in (cert, key):
            if isinstance(item, bytes):
                fd, path = tempfile.mkstemp(prefix="knp-", suffix=".pem")
                with os.fdopen(fd, "wb") as f:
                    f.write(item)
                tmp.append(path)
                paths.append(path)
            else:
                paths.append(str(item))
        ctx.load_cert_chain(paths[0], paths[1])
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: cannot load the client certificate and key: {exc}") from None
    finally:
        for path in tmp:
            try:
                os.unlink(path)
            except OSError:
                pass


def in_cluster_config(sa_dir: Path = SERVICE_ACCOUNT_DIR) -> ApiConfig:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError("not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST/PORT are not set)")
    token_file = sa_dir / "token"
    if not token_file.exists():
        raise ConfigError(f"not running in a Kubernetes pod with a service account: {token_file} does not exist")
    if ":" in host:
        host = f"[{host}]"
    where = "in-cluster service account"
    ca = sa_dir / "ca.crt"
    ctx = _ssl_context(ca if ca.exists() else None, None, False, where)
    return ApiConfig(f"https://{host}:{port}", ctx, TokenFileAuth(token_file), None, where)


def kubeconfig_config(path: str | os.PathLike[str], context: str | None = None) -> ApiConfig:
    """The cluster and user of a kubeconfig's current (or given) context."""
    p = Path(path).expanduser()
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"kubeconfig {p}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"kubeconfig {p}: invalid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"kubeconfig {p}: not a kubeconfig (a mapping with clusters, users and contexts)")

    def named(section: str, inner: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for entry in doc.get(section) or []:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                value = entry.get(inner)
                out[entry["name"]] = value if isinstance(value, dict) else {}
        return out

    contexts, clusters, users = named("contexts", "context"), named("clusters", "cluster"), named("users", "user")
    name = context or doc.get("current-context")
    if not name:
        raise ConfigError(f"kubeconfig {p}: no current-context")
    if name not in contexts:
        raise ConfigError(f"kubeconfig {p}: context {name!r} not found (have: {', '.join(sorted(contexts)) or 'none'})")
    ctx_spec = contexts[name]
    where = f"kubeconfig {p} (context {name})"
    cluster = clusters.get(ctx_spec.get("cluster", ""))
    if cluster is None:
        raise ConfigError(f"{where}: cluster {ctx_spec.get('cluster')!r} not found")
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise ConfigError(f"{where}: cluster.server must be an https:// URL, got {server!r}")
    if cluster.get("proxy-url"):
        raise ConfigError(f"{where}: cluster.proxy-url is not supported")
    base = p.parent

    def file(value: object, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {what} must be a file name")
        f = Path(value).expanduser()
        return f if f.is_absolute() else base / f

    ssl_ctx: ssl.SSLContext | None = None
    if server.startswith("https://"):
        ca_file = file(cluster["certificate-authority"], "certificate-authority") if cluster.get("certificate-authority") else None
        ca_data = (
            _b64(cluster["certificate-authority-data"], f"{where}: certificate-authority-data") if cluster.get("certificate-authority-data") else None
        )
        ssl_ctx = _ssl_context(ca_file, ca_data, bool(cluster.get("insecure-skip-tls-verify")), where)

    user_name = ctx_spec.get("user")
    user: dict[str, Any] = {}
    if user_name:
        if user_name not in users:
            raise ConfigError(f"{where}: user {user_name!r} not found")
        user = users[user_name]
    auth: httpx.Auth | None = None
    if user.get("auth-provider"):
        raise ConfigError(f"{where}: user.auth-provider is not supported (use an exec credential plugin)")
    if user.get("token"):
        auth = BearerAuth(str(user["token"]))
    elif user.get("tokenFile"):
        auth = TokenFileAuth(file(user["tokenFile"], "tokenFile"))
    elif user.get("exec"):
        if not isinstance(user["exec"], dict):
            raise ConfigError(f"{where}: user.exec must be a mapping")
        auth = ExecAuth(user["exec"], base, where)
    elif user.get("username") and user.get("password"):
        auth = httpx.BasicAuth(str(user["username"]), str(user["password"]))
    cert: Path | bytes | None = None
    key: Path | bytes | None = None
    if user.get("client-certificate-data"):
        cert = _b64(user["client-certificate-data"], f"{where}: client-certificate-data")
    elif user.get("client-certificate"):
        cert = file(user["client-certificate"], "client-certificate")
    if user.get("client-key-data"):
        key = _b64(user["client-key-data"], f"{where}: client-key-data")
    elif user.get("client-key"):
        key = file(user["client-key"], "client-key")
    if (cert is None) != (key is None):
        raise ConfigError(f"{where}: a client certificate needs both the certificate and the key")
    if cert is not None and key is not None:
        if ssl_ctx is None:
            raise ConfigError(f"{where}: client certificates need an https:// server")
        _load_client_cert(ssl_ctx, cert, key, where)
    tls_name = cluster.get("tls-server-name")
    return ApiConfig(server, ssl_ctx, auth, tls_name if isinstance(tls_name, str) and tls_name else None, where)


def load_config(kubeconfig: str | None = None, context: str | None = None) -> ApiConfig:
    """--kubeconfig PATH if given; else in-cluster; else $KUBECONFIG (its first file)."""
    if kubeconfig:
        return kubeconfig_config(kubeconfig, context)
    try:
        return in_cluster_config()
    except ConfigError as in_cluster:
        env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        if env:
            return kubeconfig_config(env, context)
        raise ConfigError(f"{in_cluster}: pass --kubeconfig PATH (or --manifests PATH for standalone mode)") from None
