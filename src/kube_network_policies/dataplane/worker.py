"""The packet worker: one process per NFQUEUE queue, holding its own replica of the engine.

Why a separate process: decoding API objects holds the GIL for long stretches (NOTES.md: up to a
second for 10k pods), and a queued packet must not wait for that. The control process decodes and
validates; the worker receives already-typed objects over a pipe and applies them between packet
batches (an apply costs ~0.1-0.3 ms), so the packet path only ever waits for engine updates, never
for parsing, and several workers (queues) scale out across cores.
"""

from __future__ import annotations

import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from kube_network_policies.dataplane.nfqueue import (
    ACCEPT,
    ACCEPT_JUDGED,
    DEFAULT_COPY_RANGE,
    DROP,
    NfQueue,
    NfQueueError,
)
from kube_network_policies.dataplane.packet import (
    ERROR_NAMES,
    parse_addresses,
    parse_packet,
)
from kube_network_policies.dataplane.protocol import Applied, Failed, Generation, Ready, Started, Stats, Stop, apply_ops
from kube_network_policies.engine import ClusterState, Decision, Features, Flow
from kube_network_policies.metrics import PacketMetrics

STATS_INTERVAL_S = 1.0

# Called after every verdict the engine gave, with the packet's flow, the full Decision (verdict
# and the reasons of each direction) and the microseconds spent parsing and judging. Observers
# run on the packet path: they must be cheap, must not block, and must not raise.
VerdictObserver = Callable[[Flow, Decision, float], None]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    queue_num: int
    node: str
    features: Features
    fail_open: bool
    copy_range: int = DEFAULT_COPY_RANGE
    judged_mark: int = 0  # RulesetConfig.judged_mark when the accept cache is on, else 0


def observers_for(config: WorkerConfig, metrics: PacketMetrics) -> tuple[VerdictObserver, ...]:
    """What observes the verdicts of a worker, fixed when it starts: the packet metrics first."""
    return (metrics.observe_verdict,)


def _fan_out(observers: tuple[VerdictObserver, ...]) -> VerdictObserver:
    def observe(flow: Flow, decision: Decision, micros: float) -> None:
        for observer in observers:
            observer(flow, decision, micros)

    return observe


def _ignore(flow: Flow, decision: Decision, micros: float) -> None:
    pass


def make_decide(
    state: ClusterState, node: str, fail_open: bool, errors: dict[str, int], ready: list[bool], observers: tuple[VerdictObserver, ...] = ()
) -> Callable[[memoryview], int]:
    """The per-packet function: parse, judge, observe. Kept flat; every name it uses is local.

    Returns ACCEPT_JUDGED only when the engine accepted the packet's full (source, destination,
    protocol, port): only those may enter the accept cache. Everything decided without that
    verdict is DROP, or with fail_open ACCEPT: before the state is complete, and for a packet
    whose transport header cannot be read, which is accepted only when the engine would allow
    these two addresses some protocol and port (it could be any), never when the addresses
    alone are denied. A packet without readable addresses is dropped in both modes: no stack
    would deliver it either.

    Every engine verdict, and only those, is shown to `observers` with its full Decision: the
    engine builds it for the verdict anyway, so handing it on costs nothing. With one observer
    (the packet metrics alone) it is called directly, without a loop.
    """
    evaluate = state.evaluate
    some_port = state.allowed_some_port
    observe = observers[0] if len(observers) == 1 else _fan_out(observers) if observers else _ignore
    clock = time.perf_counter_ns
    error_names = ERROR_NAMES
    default = ACCEPT if fail_open else DROP

    def decide(payload: memoryview) -> int:
        if not ready[0]:
            # No decision on partial state: the default until every source has synced.
            errors["not_ready"] = errors.get("not_ready", 0) + 1
            return default
        start = clock()
        flow = parse_packet(payload)
        if flow.__class__ is int:
            name = error_names.get(flow, "unknown")
            errors[name] = errors.get(name, 0) + 1
            if not fail_open:
                return DROP
            known = parse_addresses(payload)
            if known is not None and some_port(known[0], known[1], known[2], node):
                return ACCEPT
            return DROP
        decision = evaluate(flow, node)  # type: ignore[arg-type]
        observe(flow, decision, (clock() - start) / 1000.0)  # type: ignore[arg-type]
        return ACCEPT_JUDGED if decision[0] else DROP  # [0] is .allowed, read without the field's descriptor

    return decide


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    """Entry point of a worker process: bind the queue, then judge packets and apply the control
    process's batches between them (dataplane/protocol.py)."""
    # The control process decides when we stop (a Stop message, or its end closing the pipe):
    # a signal sent to the whole process group must not take the packet path down first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    state = ClusterState(config.features)
    metrics = PacketMetrics()
    errors: dict[str, int] = {}
    ready = [False]
    try:
        queue = NfQueue(config.queue_num, copy_range=config.copy_range, fail_open=config.fail_open, judged_mark=config.judged_mark)
    except (NfQueueError, OSError, ValueError) as exc:
        conn.send(Failed(f"queue {config.queue_num}: {exc}"))
        return
    conn.send(Started(config.queue_num))
    decide = make_decide(state, config.node, config.fail_open, errors, ready, observers_for(config, metrics))
    poller = select.poll()
    poller.register(queue.fileno(), select.POLLIN)
    poller.register(conn.fileno(), select.POLLIN)
    qfd = queue.fileno()
    queue.process(decide, timeout=0)  # packets that raced the bind's ACK: nothing else wakes us for them
    next_stats = time.monotonic() + STATS_INTERVAL_S
    try:
        while True:
            for fd, _ in poller.poll(STATS_INTERVAL_S * 1000):
                if fd == qfd:
                    queue.process(decide, timeout=0)
                else:
                    while conn.poll():
                        msg = conn.recv()
                        kind = msg.__class__
                        if kind is Generation:
                            apply_ops(state, msg.ops)
                            conn.send(Applied(msg.generation))
                        elif kind is Ready:
                            ready[0] = True
                        elif kind is Stop:
                            return
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + STATS_INTERVAL_S
                delta, errs = metrics.take_delta(), dict(errors)
                errors.clear()
                conn.send(Stats(config.queue_num, delta, errs, queue.counters))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the control process is gone: the kernel's bypass/fail-closed rules take over
    finally:
        # Packets already queued are judged, not dropped (with fail-open the kernel takes new
        # ones itself from here on): a restart under load costs no connection a retransmit.
        queue.close(decide)
