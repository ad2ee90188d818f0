"""The informer: list and watch one resource, keep a cache of model objects, report changes.

    list (limit=500 + continue; 410 on a continue token: list again from the start)
      -> diff against the cache -> changes -> "synced" after the first complete list
    watch from the list's resourceVersion (allowWatchBookmarks, timeoutSeconds)
      -> ADDED / MODIFIED / DELETED update the cache and give changes; BOOKMARK moves the
         resourceVersion; the watch is resumed from the last resourceVersion seen
    410 Gone (HTTP status, or an ERROR event with code 410) -> list again, diff -> changes:
      whatever was created, changed or deleted while the watch was down, once each
    any other failure -> exponential backoff with jitter, then resume (watch) or list again

Changes carry typed model objects. An update whose model object equals the cached one (a pod's
status conditions, a node's heartbeat) gives no change at all. An object that fails validation
is logged (kind, namespace/name, field path) and skipped; if an earlier version of it was valid,
that version stays in force (as a bad manifest reload keeps the old state).
"""

from __future__ import annotations

import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable

import httpx
import msgspec

from kube_network_policies.errors import KnpError
from kube_network_policies.model import ApiObject, ValidationError
from kube_network_policies.sources.base import Change, Key
from kube_network_policies.sources.codecs import codec_for, decode_event, decode_status, resource_version_of
from kube_network_policies.sources.kubeconfig import CONNECT_TIMEOUT_S, LIST_TIMEOUT_S, ApiConfig, ApiError
from kube_network_policies.sources.resources import Resource

log = logging.getLogger(__name__)
# httpx logs every request at INFO: one line per watch and list. Ours say what matters.
logging.getLogger("httpx").setLevel(logging.WARNING)

DEFAULT_PAGE_SIZE = 500
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


class Expired(KnpError):
    """410 Gone: the resourceVersion (or continue token) is too old; list again."""


Sink = Callable[[Resource, list[Change], str], None]


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
        kind, raw = decode_event(line)
        if kind == "BOOKMARK":
            rv = resource_version_of(raw)
            if rv:
                self.resource_version = rv
            return
        if kind == "ERROR":
            code, reason, message = decode_status(raw)
            if code == 410:
                raise Expired(f"watch from resourceVersion {self.resource_version}: {message or 'expired'} (410)")
            raise ApiError(code, reason, message)
        self.counters["events"] += 1
        cache = self.cache
        if kind == "DELETED":
            key, rv = self.codec.key_of(raw)
            if key is not None:
                self.invalid_keys.discard(key)
                old = cache.pop(key, None)
                if old is not None:
                    changes.append(Change(key, old, None))
        elif kind in ("ADDED", "MODIFIED"):
            key, obj, rv, error = self.codec.item(raw)
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
