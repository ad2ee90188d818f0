"""The Kubernetes API as a source: configuration, HTTP, and one informer per resource.

Configuration is in-cluster (service-account token, CA, KUBERNETES_SERVICE_HOST/PORT) or a
kubeconfig file (token, tokenFile, client certificates, CA file or data, insecure-skip-tls-verify,
tls-server-name, exec credential plugins). HTTP is httpx: HTTP/1.1, keep-alive, TCP keepalives,
connect and read timeouts; one client (one connection) per informer, so a long watch never waits
behind another resource's list.

An `Informer` is a reflector and its cache, for one resource:

    list (limit=500 + continue; 410 on a continue token: list again from the start)
      -> diff against the cache -> changes -> "synced" after the first complete list
    watch from the list's resourceVersion (allowWatchBookmarks, timeoutSeconds)
      -> ADDED / MODIFIED / DELETED update the cache and give changes; BOOKMARK moves the
         resourceVersion; the watch is resumed from the last resourceVersion seen
    410 Gone (HTTP status, or an ERROR event with code 410) -> list again, diff -> changes:
      whatever was created, changed or deleted while the watch was down, once each
    any other failure -> exponential backoff with jitter, then resume (watch) or list again

Changes carry typed model objects. An update whose model object equals the cached one (a pod's
status conditions, a node's heartbeat) gives no change at all. Pods are decoded with msgspec
straight into small structs holding only the fields enforcement needs, then into model.Pod;
the other kinds are few and go through the model's dict parsers. An object that fails
validation is logged (kind, namespace/name, field path) and skipped; if an earlier version of
it was valid, that version stays in force (as a bad manifest reload keeps the old state).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import os
import random
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import yaml

from kube_network_policies.errors import KnpError
from kube_network_policies.model import (
    ApiObject,
    FieldError,
    Pod,
    ValidationError,
    object_key,
)
from kube_network_policies.model.core import PROTOCOLS, ContainerPort
from kube_network_policies.model.ipnet import canonical_address
from kube_network_policies.model.parse import PARSERS
from kube_network_policies.model.selectors import LabelSet
from kube_network_policies.sources.base import Batch, Change, Key, SourceError

log = logging.getLogger(__name__)
# httpx logs every request at INFO: one line per watch and list. Ours say what matters.
logging.getLogger("httpx").setLevel(logging.WARNING)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
USER_AGENT = "kube-network-policies"

DEFAULT_PAGE_SIZE = 500
CONNECT_TIMEOUT_S = 10.0
LIST_TIMEOUT_S = 60.0  # per page: a read that stalls this long is a failed list
# The API server sends a bookmark about once a minute on an idle watch; two and a half minutes
# without a byte means the connection is dead (TCP keepalives catch most such cases sooner).
WATCH_READ_TIMEOUT_S = 150.0
WATCH_TIMEOUT_RANGE_S = (240, 480)  # timeoutSeconds, random: watches of many agents do not end together
# Reconnect backoff: exponential with jitter from BACKOFF_BASE_S, reset by a list or a watch that
# delivers; capped by what the failure says.
# - Unreachable (connection refused or cut, timeouts, 5xx, a watch that ends at once): the API
#   server is restarting or a network is healing; nothing on our side needs fixing, and the first
#   change after it returns must be enforced within a couple of seconds. At most
#   UNREACHABLE_CAP_S apart: a refused connect costs the server nothing, and the jitter (half
#   to all of the delay) spreads the reconnects of many agents.
# - Refused (401, 403, 404: credentials, RBAC, a CRD not installed; TLS verification): the same
#   request fails the same way until someone fixes the configuration. Up to BACKOFF_CAP_S apart,
#   so that thousands of agents do not hammer the server with it; its own counter, so that a
#   refusal during an API server's start-up does not inherit the outage's attempts.
# - 429 Too Many Requests: the server's Retry-After (at most BACKOFF_CAP_S), if longer.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
UNREACHABLE_CAP_S = 1.0
PRODUCTIVE_WATCH_S = 10.0  # a watch that lasted this long (or got events) resets the backoff
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
    """The API server answered with an error status."""

    def __init__(self, code: int, reason: str, message: str, retry_after: float | None = None) -> None:
        self.code = code
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"HTTP {code}{' ' + reason if reason else ''}: {message}")


class Expired(KnpError):
    """410 Gone: the resourceVersion (or continue token) is too old; list again."""


# ---- configuration ---------------------------------------------------------------------------


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


# ---- resources -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    group: str  # "" for the core API
    version: str
    plural: str
    flag: str = ""  # the agent flag that enables it (admin policy APIs)

    @property
    def path(self) -> str:
        if not self.group:
            return f"/api/{self.version}/{self.plural}"
        return f"/apis/{self.group}/{self.version}/{self.plural}"

    @property
    def name(self) -> str:
        """'pods', 'adminnetworkpolicies.policy.networking.k8s.io': also the CRD's name."""
        return f"{self.plural}.{self.group}" if self.group and self.flag else self.plural

    @property
    def namespaced(self) -> bool:
        return self.kind in ("Pod", "NetworkPolicy")


POLICY_GROUP = "policy.networking.k8s.io"
PODS = Resource("Pod", "", "v1", "pods")
NAMESPACES = Resource("Namespace", "", "v1", "namespaces")
NODES = Resource("Node", "", "v1", "nodes")
NETWORK_POLICIES = Resource("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies")
ADMIN_NETWORK_POLICIES = Resource("AdminNetworkPolicy", POLICY_GROUP, "v1alpha1", "adminnetworkpolicies", "admin-network-policy")
BASELINE_ADMIN_NETWORK_POLICIES = Resource(
    "BaselineAdminNetworkPolicy", POLICY_GROUP, "v1alpha1", "baselineadminnetworkpolicies", "baseline-admin-network-policy"
)
CLUSTER_NETWORK_POLICIES = Resource("ClusterNetworkPolicy", POLICY_GROUP, "v1alpha2", "clusternetworkpolicies", "cluster-network-policy")


def resources_for(
    admin_network_policy: bool = False, baseline_admin_network_policy: bool = False, cluster_network_policy: bool = False
) -> list[Resource]:
    out = [NAMESPACES, NODES, PODS, NETWORK_POLICIES]
    if admin_network_policy:
        out.append(ADMIN_NETWORK_POLICIES)
    if baseline_admin_network_policy:
        out.append(BASELINE_ADMIN_NETWORK_POLICIES)
    if cluster_network_policy:
        out.append(CLUSTER_NETWORK_POLICIES)
    return out


# ---- decoding --------------------------------------------------------------------------------
# gc=False: these structs are short-lived and never form cycles, so the collector need not track them.


class _Meta(msgspec.Struct, gc=False):
    name: str = ""
    namespace: str = ""
    resourceVersion: str = ""
    labels: dict[str, str] | None = None


class _Holder(msgspec.Struct, gc=False):
    metadata: _Meta = msgspec.field(default_factory=_Meta)


class _ListMeta(msgspec.Struct, gc=False):
    resourceVersion: str = ""
    continue_: str = msgspec.field(default="", name="continue")


class _RawList(msgspec.Struct, gc=False):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[msgspec.Raw] | None = None


class _Port(msgspec.Struct, gc=False):
    containerPort: int = 0
    name: str | None = None
    protocol: str | None = None


class _Container(msgspec.Struct, gc=False):
    ports: list[_Port] | None = None
    restartPolicy: str | None = None  # init containers: "Always" makes a sidecar


class _PodSpec(msgspec.Struct, gc=False):
    nodeName: str | None = None
    hostNetwork: bool | None = None
    containers: list[_Container] | None = None
    initContainers: list[_Container] | None = None


class _PodIP(msgspec.Struct, gc=False):
    ip: str | None = None


class _PodStatus(msgspec.Struct, gc=False):
    phase: str | None = None
    podIP: str | None = None
    podIPs: list[_PodIP] | None = None


class _Pod(msgspec.Struct, gc=False):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    spec: _PodSpec = msgspec.field(default_factory=_PodSpec)
    status: _PodStatus = msgspec.field(default_factory=_PodStatus)


class _PodList(msgspec.Struct, gc=False):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[_Pod] | None = None


class _Event(msgspec.Struct, gc=False):
    type: str = ""
    object: msgspec.Raw = msgspec.Raw(b"null")


class _Status(msgspec.Struct, gc=False):
    code: int = 0
    reason: str = ""
    message: str = ""


_intern = sys.intern
_PORT_TUPLES: dict[tuple[tuple[str, int, str], ...], tuple[ContainerPort, ...]] = {}
_PORT_TUPLES_MAX = 65536  # distinct port lists seen; past this, new ones are not shared


def _msgspec_error(subject: str, exc: msgspec.ValidationError) -> ValidationError:
    """'Expected `int`, got `str` - at `$.spec.containers[0].ports[0].containerPort`' as a field error."""
    text = str(exc)
    message, _, at = text.partition(" - at `$")
    path = at.rstrip("`").lstrip(".")
    return ValidationError(subject, [FieldError(path, message.replace("`", "").lower() if message else text)])


def _subject(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name or '<unnamed>'}"


def _canonical_ip(text: str) -> str:
    """canonical_address, with a fast path: glibc's inet_pton takes only canonical dotted quads
    (no leading zeros, no spaces), which are then already in canonical form."""
    try:
        _inet_pton(_AF_INET, text)
        return text
    except OSError:
        return canonical_address(text)


_inet_pton = socket.inet_pton
_AF_INET = socket.AF_INET


def pod_from_struct(p: _Pod) -> Pod:
    """model.Pod from the decoded struct, with parse_pod's defaults and checks."""
    meta, spec, status = p.metadata, p.spec, p.status
    errors: list[FieldError] = []
    if not meta.name:
        errors.append(FieldError("metadata.name", "required field is missing"))
    ips: list[str] = []
    raw = [e.ip for e in status.podIPs] if status.podIPs else [status.podIP] if status.podIP else ()
    for i, text in enumerate(raw):
        try:
            if not text:
                raise ValueError
            ip = _canonical_ip(text)
        except ValueError:
            path = f"status.podIPs[{i}].ip" if status.podIPs else "status.podIP"
            errors.append(FieldError(path, f"must be an IP address, got {text!r}" if not text else f"invalid IP address {text!r}"))
            continue
        if ip not in ips:
            ips.append(ip)
    key: list[tuple[str, int, str]] = []
    for base, containers in (("spec.containers", spec.containers), ("spec.initContainers", spec.initContainers)):
        if not containers:
            continue
        init = base == "spec.initContainers"
        for i, c in enumerate(containers):
            if not c.ports or (init and c.restartPolicy != "Always"):
                continue  # sidecars (restartPolicy Always) serve ports; other init containers do not
            for j, port in enumerate(c.ports):
                number = port.containerPort
                proto = port.protocol or "TCP"
                if 1 <= number <= 65535 and proto in PROTOCOLS:
                    key.append((port.name or "", number, proto))
                elif not 1 <= number <= 65535:
                    errors.append(FieldError(f"{base}[{i}].ports[{j}].containerPort", f"must be between 1 and 65535, got {number}"))
                else:
                    errors.append(FieldError(f"{base}[{i}].ports[{j}].protocol", f"unsupported protocol {proto!r} (expected TCP, UDP or SCTP)"))
    namespace = meta.namespace or "default"
    if errors:
        raise ValidationError(_subject("Pod", namespace, meta.name), errors)
    ports: tuple[ContainerPort, ...] = ()
    if key:
        k = tuple(key)
        cached = _PORT_TUPLES.get(k)
        if cached is None:
            cached = tuple(ContainerPort(_intern(n), num, _intern(proto)) for n, num, proto in k)
            if len(_PORT_TUPLES) < _PORT_TUPLES_MAX:
                _PORT_TUPLES[k] = cached
        ports = cached
    return Pod(
        namespace=_intern(namespace),
        name=meta.name,
        labels=LabelSet(meta.labels),
        ips=tuple(ips),
        node=_intern(spec.nodeName or ""),
        phase=_intern(status.phase or "Running"),
        host_network=bool(spec.hostNetwork),
        ports=ports,
    )


# An item: its key, the model object (None if invalid), its resourceVersion, the error (if invalid).
Item = tuple[Key | None, ApiObject | None, str, ValidationError | None]


class Codec:
    """Decodes one resource's list pages and watch event objects."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self._holder = msgspec.json.Decoder(_Holder)
        self._raw_list = msgspec.json.Decoder(_RawList)

    def key_of(self, raw: bytes | msgspec.Raw) -> tuple[Key | None, str]:
        """The object's key and resourceVersion; (None, "") when its metadata is unreadable."""
        try:
            meta = self._holder.decode(raw).metadata
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None, ""
        if not meta.name:
            return None, meta.resourceVersion
        ns = (meta.namespace or "default") if self.resource.namespaced else ""
        return (self.resource.kind, ns, meta.name), meta.resourceVersion

    def item(self, raw: bytes | msgspec.Raw) -> Item:
        r = self.resource
        try:
            obj = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            return None, None, "", ValidationError(r.kind, [FieldError("", f"invalid JSON: {exc}")])
        if not isinstance(obj, dict):
            return None, None, "", ValidationError(r.kind, [FieldError("", "must be an object")])
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        rv = meta.get("resourceVersion")
        rv = rv if isinstance(rv, str) else ""
        try:
            parsed: ApiObject = PARSERS[r.kind][1](obj)
        except ValidationError as exc:
            name, ns = meta.get("name"), meta.get("namespace")
            key = (
                (r.kind, (ns if isinstance(ns, str) and ns else "default") if r.namespaced else "", name) if isinstance(name, str) and name else None
            )
            return key, None, rv, exc
        return object_key(parsed), parsed, rv, None

    def page(self, data: bytes) -> tuple[str, str, Iterable[Item]]:
        """(resourceVersion, continue token, items) of one list page."""
        page = self._raw_list.decode(data)
        return page.metadata.resourceVersion, page.metadata.continue_, (self.item(raw) for raw in page.items or ())


class PodCodec(Codec):
    def __init__(self) -> None:
        super().__init__(PODS)
        self._pod = msgspec.json.Decoder(_Pod)
        self._pod_list = msgspec.json.Decoder(_PodList)

    def _convert(self, p: _Pod) -> Item:
        try:
            pod = pod_from_struct(p)
        except ValidationError as exc:
            key = ("Pod", p.metadata.namespace or "default", p.metadata.name) if p.metadata.name else None
            return key, None, p.metadata.resourceVersion, exc
        return ("Pod", pod.namespace, pod.name), pod, p.metadata.resourceVersion, None

    def item(self, raw: bytes | msgspec.Raw) -> Item:
        try:
            p = self._pod.decode(raw)
        except msgspec.ValidationError as exc:
            key, rv = self.key_of(raw)
            ns, name = (key[1], key[2]) if key else ("", "")
            return key, None, rv, _msgspec_error(_subject("Pod", ns, name), exc)
        return self._convert(p)

    def page(self, data: bytes) -> tuple[str, str, Iterable[Item]]:
        try:
            page = self._pod_list.decode(data)  # the fast path: the whole page at once
        except msgspec.ValidationError:
            return super().page(data)  # some item is malformed: item by item, to skip just that one
        return page.metadata.resourceVersion, page.metadata.continue_, (self._convert(p) for p in page.items or ())


class _NodeAddress(msgspec.Struct, gc=False):
    type: str | None = None
    address: str | None = None


class _NodeStatus(msgspec.Struct, gc=False):
    addresses: list[_NodeAddress] | None = None


class _Node(msgspec.Struct, gc=False):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    status: _NodeStatus = msgspec.field(default_factory=_NodeStatus)


class NodeCodec(Codec):
    """Nodes carry large statuses (images, conditions) and are updated often: decode only the
    name, labels and addresses, then let the model's parser check them."""

    def __init__(self) -> None:
        super().__init__(NODES)
        self._node = msgspec.json.Decoder(_Node)

    def item(self, raw: bytes | msgspec.Raw) -> Item:
        try:
            n = self._node.decode(raw)
        except msgspec.ValidationError as exc:
            key, rv = self.key_of(raw)
            return key, None, rv, _msgspec_error(_subject("Node", "", key[2] if key else ""), exc)
        slim = {
            "metadata": {"name": n.metadata.name, "labels": n.metadata.labels or {}},
            "status": {"addresses": [{"type": a.type, "address": a.address} for a in n.status.addresses or ()]},
        }
        try:
            node = PARSERS["Node"][1](slim)
        except ValidationError as exc:
            return (("Node", "", n.metadata.name) if n.metadata.name else None), None, n.metadata.resourceVersion, exc
        return ("Node", "", node.name), node, n.metadata.resourceVersion, None


def codec_for(resource: Resource) -> Codec:
    if resource.kind == "Pod":
        return PodCodec()
    if resource.kind == "Node":
        return NodeCodec()
    return Codec(resource)


# ---- the informer ----------------------------------------------------------------------------

Sink = Callable[["Resource", list[Change], str], None]


def backoff_delay(attempt: int, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S, rng: random.Random | None = None) -> float:
    """Exponential, capped, with jitter: uniformly between half and all of base * 2**attempt."""
    delay = min(cap, base * (1 << min(attempt, 30)))
    jitter: float = (rng or random).random()
    return delay * (0.5 + 0.5 * jitter)


def _tls_refused(exc: BaseException) -> bool:
    """A TLS handshake refused over certificates (not trusted, wrong name, our client
    certificate rejected) or TLS spoken to plain HTTP: configuration, not an outage. A handshake
    cut short (EOF, reset: a relay or load balancer without a backend) is an outage."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return True
        reason = str(getattr(cur, "reason", "") or "") if isinstance(cur, ssl.SSLError) else ""
        if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason or reason == "WRONG_VERSION_NUMBER":
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _api_error(response: httpx.Response) -> ApiError:
    reason, message = "", ""
    try:
        body = json.loads(response.content)
        if isinstance(body, dict):
            reason, message = str(body.get("reason") or ""), str(body.get("message") or "")
    except ValueError:
        message = response.text[:300]
    retry_after: float | None = None
    header = response.headers.get("Retry-After")
    if header and header.isdigit():
        retry_after = float(header)
    return ApiError(response.status_code, reason, message or response.reason_phrase, retry_after)


class Informer:
    """List and watch one resource; keep a cache of model objects; report changes to `sink`.

    `sink(resource, changes, resourceVersion)` is called from the informer's thread, in order:
    once per list (the diff against the cache, maybe empty) and for watch data (changes, or
    none for a bookmark). `synced` turns true after the first list has been delivered.
    """

    def __init__(
        self,
        config: ApiConfig,
        resource: Resource,
        sink: Sink,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        transport: httpx.BaseTransport | None = None,
        backoff_base: float = BACKOFF_BASE_S,
        backoff_cap: float = BACKOFF_CAP_S,
        unreachable_cap: float = UNREACHABLE_CAP_S,
        watch_timeout: tuple[int, int] = WATCH_TIMEOUT_RANGE_S,
        read_timeout: float = WATCH_READ_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.resource = resource
        self.codec = codec_for(resource)
        self.page_size = page_size
        self.cache: dict[Key, ApiObject] = {}
        self.resource_version = ""
        self.synced = False
        self.last_error: str | None = None
        self.counters = {"lists": 0, "relists": 0, "watches": 0, "events": 0, "invalid": 0, "errors": 0, "list_restarts": 0}
        self.invalid_keys: set[Key] = set()  # objects present now that did not decode or validate
        self.last_list: dict[str, float] = {}
        self._sink = sink
        self._transport = transport
        self._backoff = (backoff_base, backoff_cap)
        self._unreachable_cap = unreachable_cap
        self._failures = [0, 0]  # consecutive failures: [unreachable, refused]
        self._watch_timeout = watch_timeout
        self._read_timeout = read_timeout
        self._rng = random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: httpx.Client | None = None
        self._response: httpx.Response | None = None
        self._lock = threading.Lock()

    # ---- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._client = self.config.client(self._transport)
            self._thread = threading.Thread(target=self._run, name=f"informer-{self.resource.plural}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and break its current watch; see join()."""
        self._stop.set()
        with self._lock:
            response = self._response
        if response is not None:
            _shutdown_socket(response)

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict[str, object]:
        out: dict[str, object] = {
            "synced": self.synced,
            "resourceVersion": self.resource_version,
            "objects": len(self.cache),
            **self.counters,
        }
        if self.last_list:
            out["lastList"] = dict(self.last_list)
        if self.last_error:
            out["lastError"] = self.last_error
        return out

    # ---- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        name = self.resource.name
        need_list = True
        last_expiry = -1e9
        try:
            while not self._stop.is_set():
                refused = False  # see BACKOFF_BASE_S: which backoff applies
                try:
                    if need_list:
                        self._list()
                        need_list = False
                        self._reset_backoff()
                    if self._stop.is_set():
                        break
                    if self._watch():
                        self._reset_backoff()
                        continue
                    error: str = "the watch ended at once without events"
                    retry_after: float | None = None
                    level = logging.WARNING
                except Expired as exc:
                    need_list = True
                    self.counters["relists"] += 1
                    now = time.monotonic()
                    quick = now - last_expiry < 1.0
                    last_expiry = now
                    log.info("%s: %s: listing again (resourceVersion %s)", name, exc, self.resource_version)
                    if not quick:
                        continue
                    error, retry_after, level = f"expired again at once: {exc}", None, logging.WARNING
                except ApiError as exc:
                    error, retry_after = self._describe(exc), exc.retry_after
                    refused = 400 <= exc.code < 500 and exc.code not in (408, 429)
                    level = logging.ERROR if refused else logging.WARNING
                    if exc.code == 404:
                        need_list = True  # the resource went away (CRD deleted): list when it is back
                except httpx.HTTPError as exc:
                    error, retry_after, level = f"{type(exc).__name__}: {exc or 'connection failed'}", None, logging.WARNING
                    refused = _tls_refused(exc)
                except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                    error, retry_after, level = f"{type(exc).__name__}: {exc}", None, logging.WARNING
                except Exception as exc:  # a bug must not silently end the informer: log, back off, go on
                    log.exception("%s: unexpected error", name)
                    error, retry_after, level = f"unexpected {type(exc).__name__}: {exc}", None, logging.ERROR
                    refused = True  # it will most likely happen again: no quick loop over it
                if self._stop.is_set():
                    break
                delay = self._next_delay(refused, retry_after)
                self.counters["errors"] += 1
                self.last_error = error
                failures = self._failures[0] + self._failures[1]
                if level == logging.WARNING and failures >= 3 and failures % 10:
                    level = logging.DEBUG  # a long outage: the first failures, then every tenth
                log.log(level, "%s: %s; retrying in %.1f s%s", name, error, delay, "" if self.synced else " (not synced yet)")
                self._stop.wait(delay)
        finally:
            if self._client is not None:
                self._client.close()

    def _reset_backoff(self) -> None:
        self._failures = [0, 0]

    def _next_delay(self, refused: bool, retry_after: float | None) -> float:
        """The wait before the next attempt after a failure (see BACKOFF_BASE_S)."""
        base, cap = self._backoff
        attempt = self._failures[refused]
        self._failures[refused] = attempt + 1
        delay = backoff_delay(attempt, base, cap if refused else min(cap, self._unreachable_cap), rng=self._rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, cap))
        return delay

    def _describe(self, exc: ApiError) -> str:
        r = self.resource
        if exc.code == 404 and r.flag:
            return (
                f"the API server does not serve {r.group}/{r.version} {r.plural} (HTTP 404): is the CRD {r.name} installed? "
                f"(--{r.flag} is on; until it is served the agent is not ready)"
            )
        if exc.code in (401, 403):
            return f"{exc} (check the credentials and RBAC: the agent needs list and watch on {r.name})"
        return str(exc)

    # ---- list ----------------------------------------------------------------------------------

    def _get(self, params: dict[str, str], timeout: httpx.Timeout) -> httpx.Response:
        assert self._client is not None
        return self._client.get(self.resource.path, params=params, timeout=timeout, extensions=self.config.extensions)

    def _list(self) -> None:
        r = self.resource
        started = time.perf_counter()
        timeout = httpx.Timeout(LIST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        snapshot: dict[Key, ApiObject] = {}
        keep: set[Key] = set()  # invalid now, but present: a valid earlier version stays in force
        rv, cont, restarts, pages, decode_s = "", "", 0, 0, 0.0
        while True:
            params = {"limit": str(self.page_size)}
            if cont:
                params["continue"] = cont
            response = self._get(params, timeout)
            if response.status_code == 410 and cont:
                # The continue token outlived etcd's compaction: the pages so far are of a version
                # that can no longer be continued. Start again (a new, consistent snapshot).
                restarts += 1
                self.counters["list_restarts"] += 1
                if restarts > 3:
                    raise _api_error(response)
                log.warning("%s: the list's continue token expired (HTTP 410): listing again from the start", r.name)
                snapshot.clear()
                keep.clear()
                rv, cont = "", ""
                continue
            if response.status_code != 200:
                raise _api_error(response)
            t0 = time.perf_counter()
            page_rv, cont, items = self.codec.page(response.content)
            for key, obj, _, error in items:
                if obj is not None and key is not None:
                    snapshot[key] = obj
                elif error is not None:
                    self._invalid(error, key)
                    if key is not None:
                        keep.add(key)
            decode_s += time.perf_counter() - t0
            del response, items
            pages += 1
            rv = rv or page_rv
            if not cont:
                break
        changes: list[Change] = []
        cache = self.cache
        for key, new in snapshot.items():
            old = cache.get(key)
            if old is None or old != new:
                cache[key] = new
                changes.append(Change(key, old, new))
        for key in [k for k in cache if k not in snapshot and k not in keep]:
            changes.append(Change(key, cache.pop(key), None))
        self.resource_version = rv
        self.invalid_keys = set(keep)
        self._sink(r, changes, rv)
        first = not self.synced
        self.synced = True
        self.last_error = None
        self.counters["lists"] += 1
        elapsed = time.perf_counter() - started
        self.last_list = {
            "seconds": round(elapsed, 4),
            "decodeSeconds": round(decode_s, 4),
            "pages": pages,
            "objects": len(snapshot),
            "changes": len(changes),
        }
        log.info(
            "%s: %s %d objects in %d pages, %.0f ms (decoding %.0f ms), %d changes, resourceVersion %s",
            r.name,
            "listed" if first else "listed again",
            len(snapshot),
            pages,
            elapsed * 1000,
            decode_s * 1000,
            len(changes),
            rv,
        )

    def _invalid(self, error: ValidationError, key: Key | None) -> None:
        self.counters["invalid"] += 1
        kept = key is not None and key in self.cache
        log.error("%s: %s%s", self.resource.name, error.describe(), "; its previous version stays in force" if kept else "; skipped")

    # ---- watch ---------------------------------------------------------------------------------

    def _watch(self) -> bool:
        """Watch until the server ends it. True if it was productive (events, or long enough)."""
        r = self.resource
        assert self._client is not None
        seconds = self._rng.randint(*self._watch_timeout)
        params = {
            "watch": "1",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        timeout = httpx.Timeout(self._read_timeout, connect=CONNECT_TIMEOUT_S)
        started = time.monotonic()
        events = 0
        self.counters["watches"] += 1
        with self._client.stream("GET", r.path, params=params, timeout=timeout, extensions=self.config.extensions) as response:
            if response.status_code != 200:
                response.read()
                if response.status_code == 410:
                    raise Expired(f"watch from resourceVersion {self.resource_version}: HTTP 410 Gone")
                raise _api_error(response)
            with self._lock:
                self._response = response
            if self.last_error:
                log.info("%s: watching again from resourceVersion %s", r.name, self.resource_version)
                self.last_error = None
            try:
                if self._stop.is_set():
                    return True
                buffer = b""
                for chunk in response.iter_bytes():
                    buffer += chunk
                    if b"\n" not in buffer:
                        continue
                    *lines, buffer = buffer.split(b"\n")
                    changes: list[Change] = []
                    before = self.resource_version
                    try:
                        for line in lines:
                            if line.strip():
                                if not events:
                                    self._reset_backoff()  # the server delivers: whatever breaks next starts afresh
                                events += 1
                                self._event(line, changes)
                    finally:
                        if changes or self.resource_version != before:
                            self._sink(r, changes, self.resource_version)
                    self.last_error = None
            except (httpx.HTTPError, OSError):
                if self._stop.is_set():
                    return True
                raise
            finally:
                with self._lock:
                    self._response = None
        return events > 0 or time.monotonic() - started >= PRODUCTIVE_WATCH_S

    def _event(self, line: bytes, changes: list[Change]) -> None:
        event = _EVENT.decode(line)
        kind = event.type
        if kind == "BOOKMARK":
            rv = _HOLDER.decode(event.object).metadata.resourceVersion
            if rv:
                self.resource_version = rv
            return
        if kind == "ERROR":
            status = _STATUS.decode(event.object)
            if status.code == 410:
                raise Expired(f"watch from resourceVersion {self.resource_version}: {status.message or 'expired'} (410)")
            raise ApiError(status.code, status.reason, status.message)
        self.counters["events"] += 1
        cache = self.cache
        if kind == "DELETED":
            key, rv = self.codec.key_of(event.object)
            if key is not None:
                self.invalid_keys.discard(key)
                old = cache.pop(key, None)
                if old is not None:
                    changes.append(Change(key, old, None))
        elif kind in ("ADDED", "MODIFIED"):
            key, obj, rv, error = self.codec.item(event.object)
            if obj is not None and key is not None:
                self.invalid_keys.discard(key)
                old = cache.get(key)
                if old is None or old != obj:
                    cache[key] = obj
                    changes.append(Change(key, old, obj))
            elif error is not None:
                self._invalid(error, key)
                if key is not None:
                    self.invalid_keys.add(key)
        else:
            log.warning("%s: ignoring a watch event of unknown type %r", self.resource.name, kind)
            return
        if rv:
            self.resource_version = rv


_EVENT = msgspec.json.Decoder(_Event)
_HOLDER = msgspec.json.Decoder(_Holder)
_STATUS = msgspec.json.Decoder(_Status)


def _shutdown_socket(response: httpx.Response) -> None:
    """Wake a thread blocked reading this response: shut the socket down under it. The plain
    socket's shutdown, also for TLS: the TLS object stays with the reading thread."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


# ---- the source ------------------------------------------------------------------------------


@dataclass
class KubernetesSource:
    """Every enabled resource's informer, their changes queued for the agent.

    `transport_factory` (tests) makes each informer's httpx transport, e.g. a wrapper around
    `config.transport()`; informer options (page_size, backoff_base, ...) go in `options`.
    """

    config: ApiConfig
    admin_network_policy: bool = False
    baseline_admin_network_policy: bool = False
    cluster_network_policy: bool = False
    transport_factory: Callable[[], httpx.BaseTransport] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    informers: list[Informer] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[Resource, list[Change], str]] = []
        self._signaled = False
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._closed = False
        for r in resources_for(self.admin_network_policy, self.baseline_admin_network_policy, self.cluster_network_policy):
            transport = self.transport_factory() if self.transport_factory else None
            self.informers.append(Informer(self.config, r, self._emit, transport=transport, **self.options))

    @property
    def name(self) -> str:
        return f"kubernetes ({self.config.origin or self.config.server})"

    def open(self) -> None:
        pass  # the configuration was checked when it was loaded

    def start(self) -> None:
        for informer in self.informers:
            informer.start()

    def synced(self) -> bool:
        return all(i.synced for i in self.informers)

    def _emit(self, resource: Resource, changes: list[Change], rv: str) -> None:
        with self._lock:
            self._pending.append((resource, changes, rv))
            if not self._signaled and not self._closed:
                self._signaled = True
                try:
                    os.write(self._wfd, b"!")
                except OSError:
                    pass

    def take(self) -> Batch | None:
        with self._lock:
            pending, self._pending = self._pending, []
            if self._signaled:
                self._signaled = False
                try:
                    while os.read(self._rfd, 64):
                        pass
                except OSError:
                    pass
        if not pending:
            return None
        batch = Batch()
        for resource, changes, rv in pending:
            batch.changes.extend(changes)
            if rv:
                batch.marks[resource.name] = rv
        return batch

    def fileno(self) -> int | None:
        return self._rfd

    def status(self) -> dict[str, object]:
        return {i.resource.name: i.status() for i in self.informers}

    def problems(self) -> dict[str, str]:
        """Objects the API holds that this agent cannot read: not enforced as written (a valid
        earlier version stays in force, or nothing)."""
        out = {}
        for i in self.informers:
            n = len(i.invalid_keys)
            if n:
                out[i.resource.name] = f"{n} object(s) cannot be read here and are not enforced as written (see the log)"
        return out

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop()
        for informer in self.informers:
            informer.join()
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._rfd)
                os.close(self._wfd)
