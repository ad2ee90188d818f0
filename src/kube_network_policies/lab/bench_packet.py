"""Time per call of the packet parser (dataplane/packet.py), the first step for every queued packet.

    python -m kube_network_policies.lab.bench_packet [--rounds 7] [--loops 200000]

Best of several rounds, with the bare loop's cost subtracted, for an IPv4 and an IPv6 TCP SYN and
an IPv6 SYN behind two extension headers; each as bytes and as a memoryview into a larger buffer
(what the NFQUEUE consumer passes).
"""

from __future__ import annotations

import argparse
import struct
import sys
import time

from kube_network_policies.dataplane.packet import parse_packet
from kube_network_policies.engine.flow import Flow

# IP protocol numbers (next-header values) the test packets use.
HOPOPTS = 0
TCP = 6
DSTOPTS = 60


def _bench_packets() -> dict[str, bytes]:
    tcp_syn = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0xA0, 0x02, 64240, 0, 0) + bytes(20)
    v4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp_syn), 1, 0x4000, 64, 6, 0, bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)))
    v6 = struct.pack("!IHBB16s16s", 0x60000000, len(tcp_syn), 6, 64, b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02")
    hop = struct.pack("!BB6x", DSTOPTS, 0)
    dst = struct.pack("!BB6x", TCP, 0)
    v6ext = struct.pack("!IHBB16s16s", 0x60000000, 16 + len(tcp_syn), HOPOPTS, 64, b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02")
    return {
        "ipv4 tcp syn": v4 + tcp_syn,
        "ipv6 tcp syn": v6 + tcp_syn,
        "ipv6 hbh+dstopts tcp": v6ext + hop + dst + tcp_syn,
    }


def bench(rounds: int = 7, loops: int = 200_000) -> dict[str, float]:
    """Best-of-`rounds` time per parse_packet call in µs, for bytes and for a memoryview of a
    larger buffer (what the NFQUEUE consumer passes)."""
    results: dict[str, float] = {}
    for name, pkt in _bench_packets().items():
        buf = bytearray(4096)
        buf[100 : 100 + len(pkt)] = pkt
        inputs: dict[str, bytes | memoryview] = {
            "bytes": pkt,
            "memoryview": memoryview(buf)[100 : 100 + len(pkt)],
        }
        for kind, data in inputs.items():
            assert isinstance(parse_packet(data), Flow)
            best = float("inf")
            rng = range(loops)
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in rng:
                    parse_packet(data)
                best = min(best, time.perf_counter() - t0)
            # Subtract the bare loop cost so the figure is the call itself.
            t0 = time.perf_counter()
            for _ in rng:
                pass
            loop_cost = time.perf_counter() - t0
            results[f"{name} ({kind})"] = (best - loop_cost) / loops * 1e6
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kube_network_policies.lab.bench_packet", description="time per parse_packet call")
    parser.add_argument("--rounds", type=int, default=7, help="best of this many rounds (default: %(default)s)")
    parser.add_argument("--loops", type=int, default=200_000, help="calls per round (default: %(default)s)")
    args = parser.parse_args(argv)
    for name, us in bench(max(1, args.rounds), max(1, args.loops)).items():
        print(f"{name:40s} {us:6.3f} µs/packet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
