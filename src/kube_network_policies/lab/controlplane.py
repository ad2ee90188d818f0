"""A real Kubernetes control plane on loopback, for the integration tests and the lab.

Runs etcd and kube-apiserver (built by ``hack/controlplane/build.sh``) as child processes::

    cp = ControlPlane.start(bin_dir, workdir)   # or: with ControlPlane.start(...) as cp:
    cp.install_crds(["../shared/crds"])         # files or directories of CRD manifests
    status, body = cp.request("GET", "/api/v1/namespaces")
    ...                                         # cp.url, cp.token, cp.kubeconfig_path, cp.ca_path
    cp.restart_apiserver()                      # same etcd, port and token; fresh watch cache
    cp.stop()

Everything lives in ``workdir`` (a fresh temporary directory, removed on stop, when none is
given): a CA and a serving certificate for 127.0.0.1/localhost made with the ``openssl`` CLI,
the service-account key pair, a static token file with one ``system:masters`` token, etcd's
data directory, both processes' logs and a kubeconfig for clients. Ports are free loopback
ports picked at start. ``start`` returns once ``/readyz`` answers 200; ``stop`` terminates both
processes, then kills what is left.

Only the standard library talks to the API (urllib, json, ssl); CRD files are read with PyYAML.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kube_network_policies.errors import KnpError

__all__ = ["ControlPlane", "ControlPlaneError", "install_crds"]

CRD_API = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ControlPlaneError(KnpError, RuntimeError):
    """The control plane could not start, or an API call it made for itself failed."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ControlPlaneError("the openssl command is needed to make the test certificates")
    proc = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = kube-network-policies test CA
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = @alt_names
[alt_names]
IP.1 = 127.0.0.1
IP.2 = 10.0.0.1
DNS.1 = localhost
DNS.2 = kubernetes
DNS.3 = kubernetes.default
DNS.4 = kubernetes.default.svc
"""


def _make_pki(pki: Path) -> None:
    """CA, serving certificate signed by it, and the service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    (pki / "openssl.cnf").write_text(_OPENSSL_CONFIG)
    ec = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    _openssl("genpkey", *ec, "-out", "ca.key", cwd=pki)
    _openssl(
        "req",
        "-config",
        "openssl.cnf",
        "-new",
        "-x509",
        "-key",
        "ca.key",
        "-sha256",
        "-days",
        "7",
        "-extensions",
        "ca",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    _openssl("genpkey", *ec, "-out", "server.key", cwd=pki)
    _openssl(
        "req",
        "-config",
        "openssl.cnf",
        "-new",
        "-key",
        "server.key",
        "-subj",
        "/CN=kube-apiserver",
        "-out",
        "server.csr",
        cwd=pki,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-sha256",
        "-days",
        "7",
        "-extfile",
        "openssl.cnf",
        "-extensions",
        "server",
        "-out",
        "server.crt",
        cwd=pki,
    )
    _openssl(
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "sa.key",
        cwd=pki,
    )
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _libc_prctl() -> Any:
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child is killed when the thread that started it dies, so a crashed or killed
    test runner leaves no servers behind. SIGKILL, not SIGTERM: kube-apiserver's graceful
    shutdown can hang once etcd is gone."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; returns once the process is gone."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver pair; make one with :meth:`start`."""

    url: str
    token: str
    kubeconfig_path: Path
    ca_path: Path
    workdir: Path
    etcd_url: str
    bin_dir: Path
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _remove_workdir: bool = field(default=False, repr=False)
    _ssl: ssl.SSLContext | None = field(default=None, repr=False)
    _commands: dict[str, tuple[list[str], Any]] = field(default_factory=dict, repr=False)

    # -- life cycle ----------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        bin_dir: str | os.PathLike[str],
        workdir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 120.0,
        apiserver_args: Sequence[str] = (),
        die_with_parent: bool = True,
    ) -> ControlPlane:
        """Start etcd and kube-apiserver from ``bin_dir`` and wait until the API is ready.

        ``workdir`` holds certificates, data, logs and the kubeconfig; without one a temporary
        directory is made and removed again by :meth:`stop`. ``apiserver_args`` are appended
        to kube-apiserver's flags (e.g. ``--feature-gates=...``). With ``die_with_parent``
        (Linux) the servers are sent SIGTERM if the calling thread dies without stopping them,
        so start them from a long-lived thread.
        """
        bin_dir = Path(bin_dir)
        for name in ("etcd", "kube-apiserver"):
            if not os.access(bin_dir / name, os.X_OK):
                raise ControlPlaneError(f"{bin_dir / name} is missing: build it with hack/controlplane/build.sh")
        remove = workdir is None
        work = Path(tempfile.mkdtemp(prefix="knp-controlplane-")) if workdir is None else Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        work = work.resolve()
        last_error: Exception | None = None
        for _attempt in range(3):  # a picked port can be taken before the server binds it
            cp = cls._start_once(bin_dir, work, timeout, apiserver_args, die_with_parent)
            cp._remove_workdir = remove
            try:
                cp._wait_ready(timeout)
                return cp
            except ControlPlaneError as e:
                cp.stop(remove_workdir=False)
                last_error = e
                if "address already in use" not in str(e):
                    break
        if remove:
            shutil.rmtree(work, ignore_errors=True)
        assert last_error is not None
        raise last_error

    @classmethod
    def _start_once(
        cls,
        bin_dir: Path,
        work: Path,
        timeout: float,
        apiserver_args: Sequence[str],
        die_with_parent: bool,
    ) -> ControlPlane:
        pki = work / "pki"
        if not (pki / "server.crt").exists():
            _make_pki(pki)
        token = secrets.token_hex(24)
        token_file = work / "tokens.csv"
        token_file.write_text(f'{token},knp-admin,knp-admin,"system:masters"\n')
        token_file.chmod(0o600)

        etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        url = f"https://127.0.0.1:{api_port}"
        data = work / "etcd-data"
        shutil.rmtree(data, ignore_errors=True)

        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "knp-test",
                            "cluster": {
                                "server": url,
                                "certificate-authority": str(pki / "ca.crt"),
                            },
                        }
                    ],
                    "users": [{"name": "knp-admin", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "knp-test",
                            "context": {"cluster": "knp-test", "user": "knp-admin"},
                        }
                    ],
                    "current-context": "knp-test",
                },
                sort_keys=False,
            )
        )
        kubeconfig.chmod(0o600)

        cp = cls(
            url=url,
            token=token,
            kubeconfig_path=kubeconfig,
            ca_path=pki / "ca.crt",
            workdir=work,
            etcd_url=etcd_url,
            bin_dir=bin_dir,
        )
        etcd_cmd = [
            str(bin_dir / "etcd"),
            "--name=knp",
            f"--data-dir={data}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=knp={peer_url}",
            "--unsafe-no-fsync",  # test data: speed over durability
            "--log-level=warn",
        ]
        apiserver_cmd = [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--cert-dir={work / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'server.crt'}",
            f"--tls-private-key-file={pki / 'server.key'}",
            f"--token-auth-file={token_file}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            *apiserver_args,
        ]
        preexec = _die_with_parent if die_with_parent and _PRCTL is not None else None
        try:
            cp._spawn("etcd", etcd_cmd, preexec)
            cp._wait_etcd(timeout)
            cp._spawn("kube-apiserver", apiserver_cmd, preexec)
        except BaseException:
            cp.stop(remove_workdir=False)
            raise
        return cp

    def _spawn(self, name: str, cmd: list[str], preexec: Any) -> None:
        self._commands[name] = (cmd, preexec)
        with open(self.workdir / f"{name}.log", "ab") as log:
            self._procs[name] = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,  # noqa: PLW1509 - only prctl(PR_SET_PDEATHSIG); no lock is taken
            )

    def _check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise ControlPlaneError(
                f"{name} exited with status {proc.returncode}; the end of "
                f"{self.workdir / (name + '.log')}:\n{_log_tail(self.workdir / (name + '.log'))}"
            )

    def _wait_etcd(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("etcd")
            try:
                with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as r:
                    if json.load(r).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"etcd not healthy after {timeout:.0f}s")
            time.sleep(0.1)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            self._check_alive("etcd")
            self._check_alive("kube-apiserver")
            try:
                status, body = self.request("GET", "/readyz", timeout=5)
                if status == 200:
                    return
                last = f"{status} {body}"
            except OSError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"kube-apiserver not ready after {timeout:.0f}s: {last}")
            time.sleep(0.25)

    def stop(self, timeout: float = 15.0, *, remove_workdir: bool | None = None) -> None:
        """Stop kube-apiserver, then etcd: SIGTERM, then SIGKILL after ``timeout`` seconds.
        Safe to call twice. Removes the workdir if ``start`` made it (or if asked to)."""
        for name in ("kube-apiserver", "etcd"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            _terminate(proc, timeout)
        remove = self._remove_workdir if remove_workdir is None else remove_workdir
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._remove_workdir = False

    def stop_apiserver(self, timeout: float = 15.0) -> None:
        """Stop kube-apiserver alone (SIGTERM, then SIGKILL after ``timeout`` seconds); etcd and
        its data stay. Clients see their connections closed, then refused."""
        proc = self._procs.pop("kube-apiserver", None)
        if proc is not None:
            _terminate(proc, timeout)

    def start_apiserver(self, timeout: float = 120.0) -> None:
        """Start kube-apiserver again after :meth:`stop_apiserver`: the same flags, port,
        certificates, token and etcd, so ``url``, ``token`` and the kubeconfig stay valid.
        Returns once ``/readyz`` answers 200. Call it from the thread that started the
        control plane (see ``die_with_parent``)."""
        if "kube-apiserver" in self._procs:
            raise ControlPlaneError("kube-apiserver is already running")
        cmd, preexec = self._commands["kube-apiserver"]
        self._spawn("kube-apiserver", cmd, preexec)
        self._wait_ready(timeout)

    def restart_apiserver(self, timeout: float = 120.0) -> None:
        """:meth:`stop_apiserver`, then :meth:`start_apiserver`. Its watch cache starts anew, so
        watches from a resourceVersion of before the restart get 410 Gone."""
        self.stop_apiserver()
        self.start_apiserver(timeout)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs.values())

    # -- REST ----------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_path))
        return self._ssl

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        """One API call as the system:masters user: ``(status, decoded JSON body)`` for every
        HTTP status (errors included); a body that is not JSON comes back as text. ``body`` is
        sent as JSON; pass e.g. ``content_type="application/merge-patch+json"`` for PATCH."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def install_crds(self, paths: Iterable[str | os.PathLike[str]], timeout: float = 60.0) -> list[str]:
        """Create (or update) every CustomResourceDefinition in ``paths`` and wait until each
        is Established; returns their names. See :func:`install_crds`."""
        return install_crds(self, paths, timeout=timeout)


def _crd_documents(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json")))
        else:
            files.append(p)
    chosen: dict[str, dict[str, Any]] = {}
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                name = str(doc.get("metadata", {}).get("name"))
                if name not in chosen or _crd_rank(doc) > _crd_rank(chosen[name]):
                    chosen[name] = doc
    return list(chosen.values())


# The releases whose CRDs this agent is built and tested against (README): shared/crds holds
# newer ones too (v0.1.7, v0.3.0), whose validation differs (v0.3.0 refuses CIDRs with host bits
# in `networks`). They are installed only for a CRD with none of these.
TESTED_BUNDLES = {
    "adminnetworkpolicies.policy.networking.k8s.io": "v0.1.1",  # unchanged up to v0.1.5
    "baselineadminnetworkpolicies.policy.networking.k8s.io": "v0.1.1",
    "clusternetworkpolicies.policy.networking.k8s.io": "v0.2.0",
}


def _crd_rank(doc: dict[str, Any]) -> tuple[bool, bool, tuple[int, ...]]:
    """Several releases of one CRD: install one, the release the agent is tested against, else
    the experimental channel (a superset) of the newest bundle. Installing each in turn would
    replace a CRD whose stored versions the next one may not serve."""
    meta = doc.get("metadata", {})
    annotations = meta.get("annotations") or {}
    bundle = str(annotations.get("policy.networking.k8s.io/bundle-version", "v0"))
    numbers = tuple(int(p) if p.isdigit() else 0 for p in bundle.lstrip("v").split("."))
    tested = TESTED_BUNDLES.get(str(meta.get("name"))) == bundle
    return tested, annotations.get("policy.networking.k8s.io/channel") == "experimental", numbers


def install_crds(cp: ControlPlane, paths: Iterable[str | os.PathLike[str]], *, timeout: float = 60.0) -> list[str]:
    """Apply the CRDs found in ``paths`` (files, or directories of ``*.yaml``) through the REST
    API: POST, or on 409 replace the existing one; then wait for ``Established``. Files are
    read where they are, never copied."""
    docs = _crd_documents(paths)
    if not docs:
        raise ControlPlaneError(f"no CustomResourceDefinition in {list(map(str, paths))}")
    names = []
    for doc in docs:
        name = doc["metadata"]["name"]
        status, body = cp.request("POST", CRD_API, doc)
        for _ in range(10):  # exists: replace it; 409 again when its status changed meanwhile
            if status != 409:
                break
            status, current = cp.request("GET", f"{CRD_API}/{name}")
            if status == 200:
                replacement = dict(doc, metadata={**doc["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]})
                status, body = cp.request("PUT", f"{CRD_API}/{name}", replacement)
        if status not in (200, 201):
            message = body.get("message") if isinstance(body, dict) else body
            raise ControlPlaneError(f"installing CRD {name}: HTTP {status}: {message}")
        names.append(name)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            status, body = cp.request("GET", f"{CRD_API}/{name}")
            conditions: list[dict[str, Any]] = []
            if status == 200 and isinstance(body, dict):
                conditions = (body.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRD {name} not Established after {timeout:.0f}s: {conditions}")
            time.sleep(0.1)
    return names
