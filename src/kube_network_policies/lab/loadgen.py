"""Build and drive knp-loadgen, our C load generator for new TCP connections per second.

The C source lives in tools/loadgen/loadgen.c (its header explains the design: epoll,
non-blocking connects, RST on close so no side keeps TIME_WAIT, log-linear latency histogram).
`ensure_built()` compiles it with gcc into a cache keyed by the hash of the source and flags, so
a changed source is rebuilt and an unchanged one never is:

    ${KNP_CACHE:-/var/cache/kube-network-policies}/loadgen/<hash>/knp-loadgen

Both modes run inside a network namespace through a command prefix such as
["ip", "netns", "exec", "NS"] (an empty list runs in the current namespace):

    server = serve(["ip", "netns", "exec", "srv"], [80, 81])
    try:
        result = connect(["ip", "netns", "exec", "cli"], ["10.0.0.2:80"], duration=5, concurrency=64)
    finally:
        stop_server(server)
    result["conn_per_s"], result["latency_us"]["p99"]

`python -m kube_network_policies.lab.loadgen` builds it and prints the binary's path.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kube_network_policies.errors import KnpError

__all__ = [
    "BINARY_NAME",
    "CFLAGS",
    "LoadgenError",
    "cache_root",
    "connect",
    "ensure_built",
    "format_target",
    "serve",
    "source_path",
    "stop_server",
]

BINARY_NAME = "knp-loadgen"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")
LIBS = ("-lpthread",)
DEFAULT_CACHE = "/var/cache/kube-network-policies"


class LoadgenError(KnpError, RuntimeError):
    """Building or running knp-loadgen failed; the message carries the tool's stderr."""


def source_path() -> Path:
    """The C source: $KNP_LOADGEN_SOURCE, else tools/loadgen/loadgen.c of this checkout."""
    override = os.environ.get("KNP_LOADGEN_SOURCE")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "tools" / "loadgen" / "loadgen.c"


def cache_root() -> Path:
    """${KNP_CACHE:-/var/cache/kube-network-policies}/loadgen."""
    return Path(os.environ.get("KNP_CACHE") or DEFAULT_CACHE) / "loadgen"


def ensure_built(source: Path | None = None, cache_dir: Path | None = None, cc: str = "gcc") -> Path:
    """Compile the load generator unless an up-to-date build is cached; return the binary's path.

    The cache key is a hash of the source text, the flags and the compiler name, so any change
    to the source produces a new build directory. The binary is written under a temporary name
    and renamed into place, so concurrent callers never see a half-written file.
    """
    src = Path(source) if source is not None else source_path()
    try:
        code = src.read_bytes()
    except OSError as e:
        raise LoadgenError(f"cannot read the load generator source {src}: {e}") from e
    key = hashlib.sha256()
    for part in (code, "\0".join((cc, *CFLAGS, *LIBS)).encode()):
        key.update(part)
        key.update(b"\0")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out_dir = root / key.hexdigest()[:16]
    binary = out_dir / BINARY_NAME
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary

    compiler = shutil.which(cc)
    if compiler is None:
        raise LoadgenError(f"cannot build {BINARY_NAME}: the C compiler '{cc}' is not on PATH")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoadgenError(f"cannot create the build cache {out_dir} (set KNP_CACHE): {e}") from e
    fd, tmp = tempfile.mkstemp(prefix=f".{BINARY_NAME}.", dir=out_dir)
    os.close(fd)
    cmd = [compiler, *CFLAGS, "-o", tmp, str(src), *LIBS]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            raise LoadgenError(
                f"gcc failed to build {BINARY_NAME} from {src} (exit {result.returncode}):\n"
                f"{' '.join(cmd)}\n{(result.stderr or result.stdout).strip()}"
            )
        os.chmod(tmp, 0o755)  # noqa: S103 - an executable we built, run as root
        os.replace(tmp, binary)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return binary


def format_target(target: str | tuple[str, int]) -> str:
    """ "10.0.0.2:80", "[fd00::2]:80", or ("fd00::2", 80) -> the tool's IP:PORT syntax."""
    if isinstance(target, str):
        return target
    host, port = target
    if ipaddress.ip_address(host).version == 6:
        return f"[{host}]:{int(port)}"
    return f"{host}:{int(port)}"


def _stderr_text(proc: subprocess.Popen[bytes]) -> str:
    if proc.stderr is None:
        return ""
    try:
        return proc.stderr.read().decode(errors="replace").strip()
    except (OSError, ValueError):
        return ""


def serve(
    netns_cmd_prefix: Sequence[str],
    ports: Iterable[int],
    binds: Iterable[str] | None = None,
    threads: int = 1,
    ready_timeout: float = 10.0,
) -> subprocess.Popen[bytes]:
    """Start the sink (accept and close, dual-stack "::" unless `binds`) and return once it
    listens. Stop it with `stop_server()` (or terminate() it: it exits 0 on SIGTERM)."""
    port_list = [str(int(p)) for p in ports]
    if not port_list:
        raise ValueError("serve() needs at least one port")
    cmd = [*netns_cmd_prefix, str(ensure_built()), "serve", "--ports", ",".join(port_list), "--threads", str(int(threads))]
    bind_list = list(binds or ())
    if bind_list:
        cmd += ["--bind", ",".join(bind_list)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + ready_timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                proc.kill()
                proc.wait()
                raise LoadgenError(f"{' '.join(cmd)}: not listening after {ready_timeout} s: {_stderr_text(proc)}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait()
                raise LoadgenError(f"{' '.join(cmd)} exited ({proc.returncode}): {_stderr_text(proc)}")
            line += chunk
    try:
        info = json.loads(line)
        if not isinstance(info, dict) or "listening" not in info:
            raise ValueError(line)
    except ValueError as e:
        proc.kill()
        proc.wait()
        raise LoadgenError(f"{' '.join(cmd)}: unexpected first line {line!r}") from e
    return proc


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> dict[str, Any]:
    """SIGTERM the sink and return its closing report, e.g. {"accepted": 123456}."""
    if proc.poll() is None:
        proc.terminate()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise LoadgenError(f"knp-loadgen serve ignored SIGTERM for {timeout} s") from None
    if proc.returncode != 0:
        raise LoadgenError(f"knp-loadgen serve exited {proc.returncode}: {err.decode(errors='replace').strip()}")
    for raw in reversed(out.decode(errors="replace").splitlines()):
        try:
            report = json.loads(raw)
        except ValueError:
            continue
        if isinstance(report, dict) and "accepted" in report:
            return report
    raise LoadgenError(f"knp-loadgen serve printed no closing report: {out!r}")


def connect(
    netns_cmd_prefix: Sequence[str],
    targets: Iterable[str | tuple[str, int]],
    duration: float,
    concurrency: int,
    binds: Iterable[str] | None = None,
    threads: int = 1,
    timeout: float = 1.0,
) -> dict[str, Any]:
    """Open and reset connections for `duration` seconds, `concurrency` in flight, round-robin over
    targets x same-family source addresses; return the tool's JSON report:

    {"connections", "failures", "timeouts", "seconds", "conn_per_s",
     "latency_us": {"p50", "p90", "p99", "p999", "max", "mean"},
     "failure_kinds": {"refused", "unreachable", "reset", "local", "other"}, "attempts",
     "abandoned", ...}. Raises LoadgenError (with stderr) when the tool fails.
    """
    target_list = [format_target(t) for t in targets]
    if not target_list:
        raise ValueError("connect() needs at least one target")
    cmd = [
        *netns_cmd_prefix,
        str(ensure_built()),
        "connect",
        "--targets",
        ",".join(target_list),
        "--duration",
        repr(float(duration)),
        "--concurrency",
        str(int(concurrency)),
        "--threads",
        str(int(threads)),
        "--timeout",
        repr(float(timeout)),
        "--json",
    ]
    bind_list = list(binds or ())
    if bind_list:
        cmd += ["--bind", ",".join(bind_list)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout + 60, check=False)
    except subprocess.TimeoutExpired as e:
        raise LoadgenError(f"{' '.join(cmd)} did not finish: {e}") from e
    if result.returncode != 0:
        raise LoadgenError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    try:
        report = json.loads(result.stdout)
    except ValueError as e:
        raise LoadgenError(f"{' '.join(cmd)}: output is not JSON: {result.stdout!r} {result.stderr.strip()}") from e
    if not isinstance(report, dict) or "connections" not in report:
        raise LoadgenError(f"{' '.join(cmd)}: unexpected report {report!r}")
    return report


if __name__ == "__main__":
    try:
        print(ensure_built())
    except LoadgenError as error:
        print(error, file=sys.stderr)
        sys.exit(1)
