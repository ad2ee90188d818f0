"""The judged-accept bit in the rendered ruleset: only packets the worker's verdict marked as
judged by the engine may enter the accept cache, on both queueing backends."""

from __future__ import annotations

import re
from typing import Any

import pytest

from kube_network_policies.dataplane.nftables import (
    DEFAULT_JUDGED_MARK,
    DEFAULT_MARK,
    Backend,
    RulesetConfig,
    base_chains,
    render,
)

T = "inet kube-network-policies"
BACKENDS = [Backend.NFT_QUEUE, Backend.XT_NFQUEUE]


def rules(text: str, chain: str) -> list[str]:
    prefix = f"add rule {T} {chain} "
    return [ln[len(prefix) :] for ln in text.splitlines() if ln.startswith(prefix)]


def unmark_chains(config: RulesetConfig) -> list[str]:
    return [c.name for c in base_chains(config) if c.name.endswith("-unmark")]


def test_default_bits() -> None:
    assert DEFAULT_JUDGED_MARK == 0x1000 and DEFAULT_JUDGED_MARK != DEFAULT_MARK
    assert RulesetConfig(backend=Backend.XT_NFQUEUE).judged_mark == DEFAULT_JUDGED_MARK
    # Clear of kube-proxy's masquerade and drop bits, like the queueing bit.
    assert DEFAULT_JUDGED_MARK & (0x4000 | 0x8000) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"judged_mark": 0}, "judged_mark must be a single bit"),
        ({"judged_mark": 0x3000}, "judged_mark must be a single bit"),
        ({"judged_mark": 1 << 32}, "judged_mark must be a single bit"),
        ({"judged_mark": 0x2000}, "must be different bits, both are 0x2000"),
        ({"mark": 0x1000}, "must be different bits, both are 0x1000"),
    ],
)
def test_judged_mark_is_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RulesetConfig(backend=Backend.XT_NFQUEUE, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fail_open", [False, True])
def test_cache_takes_only_judged_packets(backend: Backend, fail_open: bool) -> None:
    config = RulesetConfig(backend=backend, fail_open=fail_open)
    text = render(config, ["10.0.0.1"], ["fd00::1"])
    chains = unmark_chains(config)
    assert len(chains) == 2
    for chain in chains:
        adds = [r for r in rules(text, chain) if " add @accepted-" in r]
        assert len(adds) == 2
        # Both bits: diverted (0x2000) and judged by the engine (0x1000). A packet the kernel
        # accepted unjudged (bypass, full queue) or the worker accepted without a verdict on
        # its tuple has only the first.
        assert all(r.startswith("meta mark and 0x00003000 == 0x00003000 meta l4proto { tcp, udp, sctp } add @accepted-") for r in adds)
        # The last rule clears both bits of every diverted packet, cached or not.
        assert rules(text, chain)[-1].startswith("meta mark and 0x00002000 == 0x00002000 meta mark set meta mark and 0xffffcfff ")
    # The judged bit is cleared when a packet is diverted: it can only come from the verdict.
    diverts = [r for r in rules(text, "postrouting") + rules(text, "input") if "@podips" in r]
    assert len(diverts) == 6
    assert all("meta mark set meta mark and 0xffffefff or 0x00002000 " in r for r in diverts)
    assert not any(re.search(r"meta mark (set meta mark )?or 0x00001000|== 0x00001000", r) for r in rules(text, "postrouting"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_judged_mark(backend: Backend) -> None:
    config = RulesetConfig(backend=backend, mark=0x100000, judged_mark=0x200000)
    text = render(config, ["10.0.0.1"], [])
    for chain in unmark_chains(config):
        r = rules(text, chain)
        assert r[0].startswith("meta mark and 0x00300000 == 0x00300000 ")
        assert r[-1].startswith("meta mark and 0x00100000 == 0x00100000 meta mark set meta mark and 0xffcfffff ")
    diverts = [r for r in rules(text, "postrouting") if "@podips" in r]
    assert all("meta mark set meta mark and 0xffdfffff or 0x00100000 " in r for r in diverts)
    assert "0x00001000" not in text and "0xffffefff" not in text


def test_without_the_cache_no_judged_bit() -> None:
    # nft-queue needs no mark at all; xt-nfqueue only its queueing bit.
    nft = render(RulesetConfig(backend=Backend.NFT_QUEUE, accept_cache=False), ["10.0.0.1"], ["fd00::1"])
    assert "mark" not in nft
    xt = render(RulesetConfig(backend=Backend.XT_NFQUEUE, accept_cache=False), ["10.0.0.1"], ["fd00::1"])
    assert "0x00001000" not in xt and "0xffffefff" not in xt and "0x00003000" not in xt
    diverts = [r for r in rules(xt, "postrouting") if "@podips" in r]
    assert all("meta mark set meta mark or 0x00002000 accept" in r for r in diverts)
    for chain in ("postrouting-unmark", "input-unmark"):
        assert rules(xt, chain) == [
            'meta mark and 0x00002000 == 0x00002000 meta mark set meta mark and 0xffffdfff comment "clear the queueing mark bit"'
        ]


def test_nft_queue_marks_in_the_same_statement_as_it_queues() -> None:
    text = render(RulesetConfig(backend=Backend.NFT_QUEUE, queue_count=2, fail_open=True), ["10.0.0.1"], [])
    diverts = [r for r in rules(text, "postrouting") if "@podips" in r]
    assert all(" meta mark set meta mark and 0xffffefff or 0x00002000 queue num 100-101 bypass comment" in r for r in diverts)
