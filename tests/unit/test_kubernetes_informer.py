"""The Kubernetes source without an API server: pod decoding (msgspec structs -> model.Pod, the same
result as the model's dict parser), invalid objects, kubeconfig parsing and authentication, and
the informer's list/watch/relist logic against scripted HTTP responses (httpx.MockTransport).
The same code against a real kube-apiserver: tests/integration/test_kubernetes_source.py."""

from __future__ import annotations

import copy
import json
import os
import ssl
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

import builders  # tests/builders.py
from kube_network_policies.model import LabelSet, Namespace, Pod, ValidationError
from kube_network_policies.model.core import parse_pod
from kube_network_policies.sources.base import Change
from kube_network_policies.sources.codecs import PodCodec, _Pod, pod_from_struct
from kube_network_policies.sources.informer import Expired, Informer, backoff_delay
from kube_network_policies.sources.kubeconfig import ApiConfig, ConfigError, ExecAuth, kubeconfig_config
from kube_network_policies.sources.resources import NAMESPACES, PODS, Resource

BASE_POD: dict[str, Any] = {
    "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "7", "labels": {"app": "web", "tier": "front"}, "uid": "u"},
    "spec": {
        "nodeName": "node-a",
        "containers": [
            {"name": "main", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]},
            {"name": "extra"},
        ],
        "initContainers": [
            {"name": "setup", "ports": [{"name": "never", "containerPort": 1}]},
            {"name": "sidecar", "restartPolicy": "Always", "ports": [{"name": "proxy", "containerPort": 15001, "protocol": "SCTP"}]},
        ],
    },
    "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "FD00::0005"}], "conditions": []},
}


def variant(**changes: Any) -> dict[str, Any]:
    pod = copy.deepcopy(BASE_POD)
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = pod
        for p in parents:
            target = target[p]
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    return pod


VARIANTS = {
    "full": variant(),
    "single-ip": variant(status__podIPs=None),
    "no-ip": variant(status__podIPs=None, status__podIP=None, status__phase="Pending"),
    "host-network": variant(spec__hostNetwork=True),
    "no-phase": variant(status__phase=None),
    "no-labels": variant(metadata__labels=None),
    "no-namespace": variant(metadata__namespace=None),
    "no-containers": variant(spec__containers=None, spec__initContainers=None),
    "succeeded": variant(status__phase="Succeeded"),
    "duplicate-ip": variant(status__podIPs=[{"ip": "10.0.0.5"}, {"ip": "10.0.0.5"}]),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_pod_decoding_matches_the_model_parser(name: str) -> None:
    raw = VARIANTS[name]
    decoded = pod_from_struct(msgspec.json.decode(json.dumps(raw).encode(), type=_Pod))
    assert decoded == parse_pod(raw)
    if name == "full":
        assert decoded.ips == ("10.0.0.5", "fd00::5")
        assert [(p.name, p.port, p.protocol) for p in decoded.ports] == [("http", 8080, "TCP"), ("", 53, "UDP"), ("proxy", 15001, "SCTP")]
        assert decoded.labels is LabelSet({"app": "web", "tier": "front"})  # interned


def item(codec: PodCodec, pod: dict[str, Any]) -> tuple[Any, Any, str, ValidationError | None]:
    return codec.item(json.dumps(pod).encode())


@pytest.mark.parametrize(
    ("pod", "path", "message"),
    [
        (variant(status__podIPs=[{"ip": "10.0.0.300"}]), "status.podIPs[0].ip", "invalid IP address '10.0.0.300'"),
        (variant(status__podIPs=None, status__podIP="bad"), "status.podIP", "invalid IP address 'bad'"),
        (
            variant(spec__containers=[{"name": "m", "ports": [{"containerPort": 70000}]}]),
            "spec.containers[0].ports[0].containerPort",
            "between 1 and 65535",
        ),
        (
            variant(spec__containers=[{"name": "m", "ports": [{"containerPort": 80, "protocol": "ICMP"}]}]),
            "spec.containers[0].ports[0].protocol",
            "unsupported protocol",
        ),
        (
            variant(spec__containers=[{"name": "m", "ports": [{"containerPort": "eighty"}]}]),
            "spec.containers[0].ports[0].containerPort",
            "expected int, got str",
        ),
    ],
    ids=["bad-ip", "bad-single-ip", "port-range", "protocol", "port-type"],
)
def test_invalid_pods_name_object_and_field(pod: dict[str, Any], path: str, message: str) -> None:
    key, obj, rv, error = item(PodCodec(), pod)
    assert obj is None and key == ("Pod", "shop", "web-1") and rv == "7"
    assert error is not None and error.subject == "Pod shop/web-1"
    assert [e.path for e in error.errors] == [path]
    assert message in error.errors[0].message


def test_a_page_with_one_bad_pod_keeps_the_others() -> None:
    good = [variant(metadata__name=f"p{i}") for i in range(3)]
    bad = variant(metadata__name="bad", spec__containers=[{"name": "m", "ports": [{"containerPort": "x"}]}])
    page = json.dumps({"metadata": {"resourceVersion": "9", "continue": "c"}, "items": [good[0], bad, good[1], good[2]]}).encode()
    rv, cont, items = PodCodec().page(page)
    got = list(items)
    assert (rv, cont) == ("9", "c")
    assert [k[2] for k, obj, _, _ in got if obj is not None] == ["p0", "p1", "p2"]
    assert [(k, e is not None) for k, obj, _, e in got if obj is None] == [(("Pod", "shop", "bad"), True)]


def test_backoff_grows_is_capped_and_jittered() -> None:
    for attempt in range(12):
        d = backoff_delay(attempt, 0.5, 30.0)
        full = min(30.0, 0.5 * 2**attempt)
        assert full / 2 <= d <= full
    assert len({round(backoff_delay(3), 6) for _ in range(20)}) > 1


class RecordedWaits(threading.Event):
    """The informer's stop event: records each backoff wait instead of sleeping, and stops the
    loop after `n` of them."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.delays: list[float] = []
        self.n = n

    def wait(self, timeout: float | None = None) -> bool:
        self.delays.append(float(timeout or 0))
        if len(self.delays) >= self.n:
            self.set()
        return self.is_set()


def test_backoff_is_short_while_unreachable_long_when_refused_and_reset_by_success() -> None:
    """After an outage the informer must be back within about a second (a 30 s backoff once
    delayed the first change after a 20 s outage by 23.8 s); refusals that need a fix back off
    longer; 429's Retry-After is honoured; a list or a delivering watch resets both."""
    refused_tls = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]")
    refused_tls.__cause__ = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cut_tls = httpx.ConnectError("[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol")
    cut_tls.__cause__ = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")  # a relay without a backend
    plan: list[Callable[[httpx.Request], httpx.Response]] = []

    def fail(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
        def raise_(request: httpx.Request) -> httpx.Response:
            raise exc

        return raise_

    def status(code: int, **headers: str) -> Callable[[httpx.Request], httpx.Response]:
        return lambda r: httpx.Response(code, headers=headers, json={"kind": "Status", "code": code, "message": "no"})

    plan += [fail(httpx.ConnectError("connection refused"))] * 10  # waits 0-9
    plan += [status(403)] * 6  # waits 10-15
    plan += [status(429, **{"Retry-After": "7"})]  # wait 16
    plan += [status(503)] * 3  # waits 17-19
    plan += [
        lambda r: httpx.Response(200, json={"metadata": {"resourceVersion": "5"}, "items": [ns_obj("a", 5)]}),
        lambda r: httpx.Response(200, content=event("BOOKMARK", {"metadata": {"resourceVersion": "6"}})),
    ]
    plan += [fail(httpx.RemoteProtocolError("Server disconnected"))]  # wait 20: reset by the watch
    plan += [status(401)]  # wait 21: reset too
    plan += [fail(refused_tls)] * 4  # waits 22-25
    plan += [fail(cut_tls)] * 3  # waits 26-28
    script = Script()
    script.responses = plan
    inf, rec = informer(script)
    waits = RecordedWaits(29)
    inf._stop = waits
    inf._run()
    d = waits.delays
    assert len(d) == 29 and rec.names() == {"a"}
    assert all(x <= 1.0 for x in d[:10]) and 0.25 <= d[0] <= 0.5, d[:10]  # unreachable: at most 1 s
    assert 0.25 <= d[10] <= 0.5 and 8 <= d[15] <= 16, d[10:16]  # refused: its own counter, growing
    assert d[16] >= 7  # Retry-After
    assert all(x <= 1.0 for x in d[17:20]), d[17:20]  # 5xx: unreachable
    assert 0.25 <= d[20] <= 0.5 and 0.25 <= d[21] <= 0.5, d[20:22]  # reset by the list and the watch
    assert 4 <= d[25] <= 8, d[22:26]  # TLS refused: continues past 1 s
    assert all(x <= 1.0 for x in d[26:]), d[26:]  # a handshake cut short: unreachable
    assert len({round(x, 6) for x in d[1:10]}) > 1  # jittered


# ---- kubeconfig ------------------------------------------------------------------------------


def write_kubeconfig(tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None, name: str = "kc") -> Path:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}, {"name": "other", "context": {"cluster": "c"}}],
        "current-context": "ctx",
    }
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def auth_header(config: ApiConfig, status: int = 200) -> list[str]:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization", ""))
        return httpx.Response(status if len(seen) == 1 else 200, json={})

    with config.client(httpx.MockTransport(handler)) as client:
        client.get("/api")
    return seen


def test_kubeconfig_token_and_context(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path, {"token": "abc"})
    config = kubeconfig_config(path)
    assert config.server == "https://127.0.0.1:6443"
    assert auth_header(config) == ["Bearer abc"]
    assert "context ctx" in config.origin
    assert auth_header(kubeconfig_config(path, "other")) == [""]  # no user: anonymous
    with pytest.raises(ConfigError, match="context 'nope' not found"):
        kubeconfig_config(path, "nope")


def test_kubeconfig_token_file_is_relative_to_the_kubeconfig_and_reread_on_401(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("one\n")
    config = kubeconfig_config(write_kubeconfig(tmp_path, {"tokenFile": "tok"}))
    assert auth_header(config) == ["Bearer one"]
    (tmp_path / "tok").write_text("two\n")
    assert auth_header(config, status=401) == ["Bearer one", "Bearer two"]


def test_kubeconfig_exec_plugin(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.sh"
    counter = tmp_path / "runs"
    plugin.write_text(
        "#!/bin/sh\n"
        f"echo run >> {counter}\n"
        'test "$MY_ENV" = set || exit 3\n'
        'echo "$KUBERNETES_EXEC_INFO" | grep -q ExecCredential || exit 4\n'
        'printf \'{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"from-exec","expirationTimestamp":"2999-01-01T00:00:00Z"}}\'\n'
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": "./plugin.sh",
            "env": [{"name": "MY_ENV", "value": "set"}],
            "interactiveMode": "Never",
        }
    }
    config = kubeconfig_config(write_kubeconfig(tmp_path, user))
    assert isinstance(config.auth, ExecAuth)
    assert auth_header(config) == ["Bearer from-exec"]
    assert auth_header(config) == ["Bearer from-exec"]
    assert counter.read_text().count("run") == 1  # cached until it expires
    assert auth_header(config, status=401) == ["Bearer from-exec", "Bearer from-exec"]
    assert counter.read_text().count("run") == 2  # a 401 runs the plugin again


@pytest.mark.parametrize(
    ("user", "cluster", "message"),
    [
        ({"auth-provider": {"name": "gcp"}}, None, "auth-provider is not supported"),
        ({"client-certificate": "c.pem"}, None, "needs both the certificate and the key"),
        ({"exec": {"apiVersion": "client.authentication.k8s.io/v1alpha1", "command": "x"}}, None, "exec apiVersion"),
        ({}, {"server": "ftp://x"}, "must be an https:// URL"),
        ({}, {"server": "https://x", "certificate-authority-data": "bm90IGEgY2VydA=="}, "cannot load the certificate authority"),
        ({"tokenFile": "missing"}, None, "cannot read the token file"),
    ],
    ids=["auth-provider", "cert-without-key", "exec-version", "bad-server", "bad-ca", "missing-token-file"],
)
def test_kubeconfig_errors_are_clear(tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any] | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kubeconfig_config(write_kubeconfig(tmp_path, user, cluster))


def test_kubeconfig_tls_server_name(tmp_path: Path) -> None:
    config = kubeconfig_config(
        write_kubeconfig(tmp_path, {}, {"server": "https://10.1.1.1", "insecure-skip-tls-verify": True, "tls-server-name": "kubernetes"})
    )
    assert config.extensions == {"sni_hostname": "kubernetes"}


# ---- the informer against scripted responses ------------------------------------------------------


def ns_obj(name: str, rv: int, **labels: str) -> dict[str, Any]:
    return builders.namespace(name, {"kubernetes.io/metadata.name": name, **labels}, resourceVersion=str(rv))


def event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


class Script:
    """Answers list and watch requests from a queue of responses; records the requests."""

    def __init__(self) -> None:
        self.responses: list[Callable[[httpx.Request], httpx.Response]] = []
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.responses.pop(0)(request)

    def listing(self, rv: int, items: list[dict[str, Any]], cont: str = "") -> None:
        meta = {"resourceVersion": str(rv), **({"continue": cont} if cont else {})}
        self.responses.append(lambda r: httpx.Response(200, json={"metadata": meta, "items": items}))

    def watch(self, *lines: bytes) -> None:
        self.responses.append(lambda r: httpx.Response(200, content=b"".join(lines)))

    def status(self, code: int, reason: str = "") -> None:
        self.responses.append(lambda r: httpx.Response(code, json={"kind": "Status", "code": code, "reason": reason, "message": reason}))


class Recorder:
    """A sink that checks every change against what it was told before: an add for a new key,
    an update or delete whose `old` is what it holds. A lost or duplicated event fails here."""

    def __init__(self) -> None:
        self.objects: dict[Any, Any] = {}
        self.changes: list[Change] = []
        self.versions: list[str] = []

    def __call__(self, resource: Resource, changes: list[Change], rv: str) -> None:
        for c in changes:
            assert self.objects.get(c.key) == c.old, f"{c.type} of {c.key}: expected old {self.objects.get(c.key)}, got {c.old}"
            if c.new is None:
                del self.objects[c.key]
            else:
                self.objects[c.key] = c.new
        self.changes.extend(changes)
        self.versions.append(rv)

    def names(self) -> set[str]:
        return {k[2] for k in self.objects}


def informer(script: Script, resource: Resource = NAMESPACES, **kw: Any) -> tuple[Informer, Recorder]:
    rec = Recorder()
    config = ApiConfig("http://api.invalid")
    inf = Informer(config, resource, rec, transport=httpx.MockTransport(script), **kw)
    inf._client = config.client(httpx.MockTransport(script))
    return inf, rec


def test_list_pages_then_watch_events_bookmarks_and_relist_on_410() -> None:
    s = Script()
    s.listing(10, [ns_obj("a", 1), ns_obj("b", 2)], cont="next")
    s.listing(10, [ns_obj("c", 3)])
    inf, rec = informer(s, page_size=2)
    inf._list()
    assert inf.synced and inf.resource_version == "10" and rec.names() == {"a", "b", "c"}
    assert [r.url.params.get("limit") for r in s.requests] == ["2", "2"]
    assert s.requests[1].url.params["continue"] == "next"

    s.watch(
        event("ADDED", ns_obj("d", 11)),
        event("MODIFIED", ns_obj("a", 12)),  # same labels: no change to report
        event("MODIFIED", ns_obj("b", 13, team="x")),
        event("DELETED", ns_obj("c", 14)),
        event("BOOKMARK", {"kind": "Namespace", "apiVersion": "v1", "metadata": {"resourceVersion": "20"}}),
    )
    inf._watch()
    watch = s.requests[-1].url.params
    assert (watch["watch"], watch["resourceVersion"], watch["allowWatchBookmarks"]) == ("1", "10", "true")
    assert rec.names() == {"a", "b", "d"} and inf.resource_version == "20"
    assert [(c.type, c.key[2]) for c in rec.changes[3:]] == [("add", "d"), ("update", "b"), ("delete", "c")]

    # The watch resumes from the bookmark; the server says 410: list again, report the diff.
    s.watch(event("ERROR", {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 20 (30)"}))
    with pytest.raises(Expired):
        inf._watch()
    assert s.requests[-1].url.params["resourceVersion"] == "20"
    s.listing(30, [ns_obj("a", 12), ns_obj("b", 25, team="y"), ns_obj("e", 26)])
    before = len(rec.changes)
    inf._list()
    assert sorted((c.type, c.key[2]) for c in rec.changes[before:]) == [("add", "e"), ("delete", "d"), ("update", "b")]
    assert rec.objects == inf.cache and inf.resource_version == "30"


def test_watch_410_as_http_status() -> None:
    s = Script()
    s.listing(5, [])
    inf, _ = informer(s)
    inf._list()
    s.status(410, "Expired")
    with pytest.raises(Expired):
        inf._watch()


def test_expired_continue_token_restarts_the_list() -> None:
    s = Script()
    s.listing(10, [ns_obj("a", 1)], cont="old")
    s.status(410, "Expired")
    s.listing(12, [ns_obj("a", 1)], cont="new")
    s.listing(12, [ns_obj("b", 11)])
    inf, rec = informer(s, page_size=1)
    inf._list()
    assert rec.names() == {"a", "b"} and inf.resource_version == "12"
    assert inf.counters["list_restarts"] == 1
    assert "continue" not in s.requests[2].url.params  # started again from the first page


def test_invalid_update_keeps_the_previous_version() -> None:
    s = Script()
    good = variant()
    s.listing(10, [good])
    inf, rec = informer(s, PODS)
    inf._list()
    bad = variant(status__podIPs=[{"ip": "nope"}])
    bad["metadata"]["resourceVersion"] = "11"
    s.watch(event("MODIFIED", bad))
    inf._watch()
    assert inf.counters["invalid"] == 1 and inf.resource_version == "11"
    pod = rec.objects[("Pod", "shop", "web-1")]
    assert isinstance(pod, Pod) and pod.ips == ("10.0.0.5", "fd00::5")
    assert inf.invalid_keys == {("Pod", "shop", "web-1")}  # the agent reports it (not ready)
    # Listed again while still invalid: kept, not deleted.
    s.listing(12, [bad])
    inf._list()
    assert ("Pod", "shop", "web-1") in rec.objects
    assert inf.invalid_keys == {("Pod", "shop", "web-1")}
    # Fixed: no longer a problem. Invalid, then deleted: neither.
    fixed = variant()
    fixed["metadata"]["resourceVersion"] = "13"
    s.watch(event("MODIFIED", fixed), event("MODIFIED", bad), event("DELETED", bad))
    inf._watch()
    assert inf.invalid_keys == set()


def test_missing_crd_is_an_api_error_with_a_clear_message() -> None:
    from kube_network_policies.sources.kubeconfig import ApiError
    from kube_network_policies.sources.resources import resource

    s = Script()
    s.status(404, "NotFound")
    inf, _ = informer(s, resource("AdminNetworkPolicy"))
    with pytest.raises(ApiError) as err:
        inf._list()
    text = inf._describe(err.value)
    assert "is the CRD adminnetworkpolicies.policy.networking.k8s.io installed?" in text
    assert "--admin-network-policy" in text and not inf.synced


def test_namespace_change_is_typed() -> None:
    s = Script()
    s.listing(1, [ns_obj("a", 1, team="x")])
    inf, rec = informer(s)
    inf._list()
    (change,) = rec.changes
    assert change.type == "add" and isinstance(change.new, Namespace) and change.new.labels.get("team") == "x"


def test_in_cluster_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kube_network_policies.sources.kubeconfig import in_cluster_config

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="not running in a Kubernetes pod"):
        in_cluster_config(tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(ConfigError, match="service account"):
        in_cluster_config(tmp_path)
    (tmp_path / "token").write_text("sa-token")
    config = in_cluster_config(tmp_path)
    assert config.server == "https://[fd00::1]:443"
    assert auth_header(config) == ["Bearer sa-token"]
    assert os.environ["KUBERNETES_SERVICE_PORT"] == "443"


def test_node_decoding_matches_the_model_parser() -> None:
    from kube_network_policies.model.core import parse_node
    from kube_network_policies.sources.codecs import codec_for
    from kube_network_policies.sources.resources import NODES

    raw = {
        "metadata": {"name": "n1", "resourceVersion": "4", "labels": {"zone": "a"}, "annotations": {"x": "y"}},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "192.0.2.1"},
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "2001:DB8::1"},
            ],
            "images": [{"names": ["x"], "sizeBytes": 1}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    key, obj, rv, error = codec_for(NODES).item(json.dumps(raw).encode())
    assert (key, rv, error) == (("Node", "", "n1"), "4", None)
    assert obj == parse_node(raw) and obj.addresses == ("192.0.2.1", "2001:db8::1")
    raw["status"]["addresses"][0]["address"] = "not-an-ip"
    key, obj, rv, error = codec_for(NODES).item(json.dumps(raw).encode())
    assert obj is None and error is not None and error.subject == "Node n1"
    assert [e.path for e in error.errors] == ["status.addresses[0].address"]


def test_unreadable_metadata_is_skipped_not_retried_forever() -> None:
    s = Script()
    s.listing(10, [ns_obj("a", 1)])
    inf, rec = informer(s)
    inf._list()
    broken = {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "b", "resourceVersion": "11", "labels": {"x": 5}}}
    s.watch(event("ADDED", broken), event("DELETED", broken), event("ADDED", ns_obj("c", 12)))
    inf._watch()
    assert rec.names() == {"a", "c"} and inf.counters["invalid"] == 1 and inf.resource_version == "12"
    assert inf.codec.item(json.dumps(broken).encode())[:3] == (("Namespace", "", "b"), None, "11")


def test_memory_per_pod_in_the_informer_cache_is_bounded() -> None:
    # The full figure (10k pods) comes from `python -m kube_network_policies.lab.bench_decode`.
    from kube_network_policies.lab.bench_decode import run

    r = run(pods=2000, rounds=1)
    assert r["cache_bytes_per_pod"] <= 1024, r
    assert r["agent_and_engine_bytes_per_pod"] <= 2048, r
