"""Cost of the packet metrics (metrics.py): PacketMetrics.observe() per packet, against
prometheus_client's own Histogram and Counter children, and the time one scrape takes.

    python -m kube_network_policies.lab.bench_metrics [-n 1000000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from kube_network_policies.metrics import BUCKETS_US, DEFAULT_WINDOW, Metrics, PacketMetrics

# Label values for the comparison with prometheus_client (as metrics.py writes them).
PROTOCOLS = {6: "TCP", 17: "UDP", 132: "SCTP"}
FAMILIES = {4: "IPv4", 6: "IPv6"}


def _bench(n: int) -> None:
    rng = random.Random(1)
    keys = [(rng.choice((6, 6, 6, 17, 132)), rng.choice((4, 6)), rng.random() < 0.9) for _ in range(1024)]
    values = [rng.lognormvariate(3, 0.6) for _ in range(1024)]
    pm = PacketMetrics()
    observe = pm.observe
    t0 = time.perf_counter()
    for i in range(n):
        k = keys[i & 1023]
        observe(k[0], k[1], k[2], values[i & 1023])
    ours = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(n):
        k = keys[i & 1023]
        values[i & 1023]
    loop = (time.perf_counter() - t0) / n * 1e6

    # The straightforward alternative: prometheus_client children, pre-resolved in a dict.
    reg = CollectorRegistry()
    hist = Histogram("h", "h", ["protocol", "family"], buckets=BUCKETS_US, registry=reg)
    cnt = Counter("c", "c", ["protocol", "family", "verdict"], registry=reg)
    children = {k: (hist.labels(PROTOCOLS[k[0]], FAMILIES[k[1]]), cnt.labels(PROTOCOLS[k[0]], FAMILIES[k[1]], str(k[2]))) for k in set(keys)}
    t0 = time.perf_counter()
    for i in range(n):
        h, c = children[keys[i & 1023]]
        h.observe(values[i & 1023])
        c.inc()
    client = (time.perf_counter() - t0) / n * 1e6

    m = Metrics(packets=pm, queue_reader=lambda: {})
    t0 = time.perf_counter()
    body = m.exposition()
    scrape = (time.perf_counter() - t0) * 1e3
    print(f"PacketMetrics.observe():                     {ours - loop:.2f} µs per packet ({n} packets, loop overhead {loop:.2f} µs subtracted)")
    print(f"prometheus_client Histogram+Counter children: {client - loop:.2f} µs per packet (for comparison)")
    print(f"scrape (collect + text, {len(body)} bytes, {DEFAULT_WINDOW}-sample quantiles): {scrape:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kube_network_policies.lab.bench_metrics", description="per-packet cost of PacketMetrics.observe()"
    )
    parser.add_argument("-n", type=int, default=1_000_000, help="packets (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        _bench(max(1, args.n))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
