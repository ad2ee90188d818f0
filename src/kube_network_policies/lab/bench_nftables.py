"""Benchmark of ruleset syncs: how long rendering and applying large pod-IP sets takes.

    python -m kube_network_policies.lab.bench_nftables --bench [--sizes 10000,100000]

Runs nft in a throwaway network namespace (root). `--render` prints the script for a small example.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import sys
import time
from collections.abc import Sequence

from kube_network_policies.dataplane.nftables import Backend, RulesetConfig, render
from kube_network_policies.dataplane.ruleset import (
    DataplaneError,
    Ruleset,
    detect_backend,
    run_checked,
    run_command,
)


def _random_v4(n: int, rng: random.Random) -> list[str]:
    return [str(ipaddress.IPv4Address(a)) for a in rng.sample(range(0x0A000000, 0x0B000000), n)]


def _random_v6(n: int, rng: random.Random) -> list[str]:
    return [str(ipaddress.IPv6Address((0xFD00 << 112) | a)) for a in rng.sample(range(1 << 32), n)]


def _bench(sizes: Sequence[int], backend: Backend | None) -> int:
    if os.geteuid() != 0:
        print("the nftables bench needs root (it creates a network namespace)", file=sys.stderr)
        return 2
    netns = f"knp-bench-{os.getpid()}"
    run_checked(run_command, ("ip", "netns", "add", netns))
    try:
        chosen = backend or detect_backend(netns=netns)
        config = RulesetConfig(backend=chosen)
        print(f"backend: {chosen.value}; nft in a throwaway netns ({netns}); both sets hold N elements")
        rng = random.Random(1)
        for n in sizes:
            ruleset = Ruleset(config, netns=netns)
            v4, v6 = _random_v4(n, rng), _random_v6(n, rng)
            t0 = time.perf_counter()
            text = render(config, v4, v6)
            t_render = time.perf_counter() - t0
            t0 = time.perf_counter()
            ruleset.sync(v4, v6)
            t_first = time.perf_counter() - t0
            # The steady state: 1% churn, everything re-applied (flush + re-add).
            k = max(1, n // 100)
            v4b, v6b = v4[k:] + _random_v4(k, rng), v6[k:] + _random_v6(k, rng)
            t0 = time.perf_counter()
            ruleset.sync(v4b, v6b)
            t_resync = time.perf_counter() - t0
            print(
                f"N={n:>7}: render {t_render * 1e3:7.1f} ms ({len(text) / 1e6:.1f} MB), "
                f"first sync {t_first * 1e3:7.1f} ms, re-sync (1% changed) {t_resync * 1e3:7.1f} ms"
            )
            ruleset.remove()
    finally:
        run_command(("ip", "netns", "del", netns))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kube_network_policies.lab.bench_nftables")
    parser.add_argument("--bench", action="store_true", help="time syncs of large sets (root; throwaway netns)")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated set sizes (default: %(default)s)")
    parser.add_argument("--backend", choices=[b.value for b in Backend], help="default: detect")
    parser.add_argument("--render", action="store_true", help="print the script for a small example and exit")
    args = parser.parse_args(argv)
    try:
        backend = Backend(args.backend) if args.backend else None
        if args.render:
            config = RulesetConfig(backend=backend or Backend.NFT_QUEUE)
            sys.stdout.write(render(config, ["10.244.1.2", "10.244.1.3"], ["fd00:10:244:1::2"]))
            return 0
        if args.bench:
            return _bench([int(s) for s in args.sizes.split(",") if s.strip()], backend)
    except (DataplaneError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
