"""The nftables ruleset as text, and the Ruleset's command sequence (no root, no kernel)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from kube_network_policies.dataplane.nftables import (
    ACCEPT_CACHE_SIZE,
    ACCEPT_CACHE_TIMEOUT_S,
    DEFAULT_MARK,
    Backend,
    RulesetConfig,
    base_chains,
    render,
    xt_rules,
)
from kube_network_policies.dataplane.ruleset import CommandError, CommandResult, Ruleset, detect_backend

NFT = RulesetConfig(backend=Backend.NFT_QUEUE)
XT = RulesetConfig(backend=Backend.XT_NFQUEUE)
NFT_PLAIN = RulesetConfig(backend=Backend.NFT_QUEUE, accept_cache=False)
XT_PLAIN = RulesetConfig(backend=Backend.XT_NFQUEUE, accept_cache=False)
T = "inet kube-network-policies"


def rules(text: str, chain: str) -> list[str]:
    prefix = f"add rule {T} {chain} "
    return [ln[len(prefix) :] for ln in text.splitlines() if ln.startswith(prefix)]


def elements(text: str, set_name: str) -> list[str]:
    out: list[str] = []
    for m in re.finditer(rf"^add element {T} {set_name} {{ (.*) }}$", text, re.M):
        out += m.group(1).split(", ")
    return out


# --- render ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [NFT, XT, RulesetConfig(backend=Backend.NFT_QUEUE, queue_count=4, fail_open=True)])
def test_sync_text_never_deletes(config: RulesetConfig) -> None:
    text = render(config, ["10.0.0.1"], ["fd00::1"])
    assert "delete" not in text
    assert "flush ruleset" not in text
    assert "flush table" not in text
    # Everything is (re)declared with the idempotent `add`, then only contents are replaced.
    assert text.startswith(f"add table {T}\n")
    for chain in base_chains(config):
        assert f"flush chain {T} {chain.name}\n" in text
    assert f"flush set {T} podips-v4\n" in text and f"flush set {T} podips-v6\n" in text


def test_nft_queue_fail_closed() -> None:
    text = render(NFT_PLAIN, ["10.244.1.2", "10.244.1.3"], ["fd00:10:244:1::2"])
    assert f"add chain {T} postrouting {{ type filter hook postrouting priority 95; policy accept; }}" in text
    assert f"add chain {T} input {{ type filter hook input priority 101; policy accept; }}" in text
    post = rules(text, "postrouting")
    assert post[0].startswith("icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } accept")
    assert post[1].startswith('oif "lo" accept')
    assert post[2] == "ct state != new accept"
    assert post[3].startswith("meta skuid 0 accept")
    diverts = [r for r in post if "queue" in r]
    assert [r.split(" queue")[0] for r in diverts] == [
        "ip saddr @podips-v4",
        "ip daddr @podips-v4",
        "ip6 saddr @podips-v6",
        "ip6 daddr @podips-v6",
    ]
    assert all(" queue num 100 comment" in r for r in diverts)  # no bypass when fail-closed
    inp = rules(text, "input")
    assert inp[1].startswith('iif "lo" accept')
    assert inp[2] == "ct state != new accept"
    assert not any("skuid" in r for r in inp)  # in input the socket is the receiving one
    assert [r.split(" queue")[0] for r in inp if "queue" in r] == ["ip saddr @podips-v4", "ip6 saddr @podips-v6"]
    assert "mark" not in text  # nft-queue needs no mark (without the accept cache)
    assert [c.name for c in base_chains(NFT_PLAIN)] == ["postrouting", "input"]
    assert elements(text, "podips-v4") == ["10.244.1.2", "10.244.1.3"]
    assert elements(text, "podips-v6") == ["fd00:10:244:1::2"]


def test_skuid_accept_precedes_every_divert() -> None:
    for config in (NFT, XT):
        post = rules(render(config, ["10.0.0.1"], []), "postrouting")
        skuid = next(i for i, r in enumerate(post) if "skuid 0" in r)
        ct = post.index("ct state != new accept")
        first_divert = next(i for i, r in enumerate(post) if "@podips" in r)
        assert ct < skuid < first_divert


def test_nft_queue_fail_open_bypass() -> None:
    text = render(RulesetConfig(backend=Backend.NFT_QUEUE, fail_open=True), ["10.0.0.1"], [])
    diverts = [r for r in rules(text, "postrouting") + rules(text, "input") if "@podips" in r]
    assert len(diverts) == 6
    assert all(" queue num 100 bypass comment" in r for r in diverts)


@pytest.mark.parametrize(
    ("fail_open", "fanout", "expected"),
    [
        (False, False, "queue num 100-103 comment"),
        (True, False, "queue num 100-103 bypass comment"),
        (False, True, "queue num 100-103 fanout comment"),
        (True, True, "queue num 100-103 bypass,fanout comment"),
    ],
)
def test_nft_queue_several_queues(fail_open: bool, fanout: bool, expected: str) -> None:
    config = RulesetConfig(backend=Backend.NFT_QUEUE, queue_count=4, fail_open=fail_open, cpu_fanout=fanout)
    diverts = [r for r in rules(render(config, ["10.0.0.1"], []), "postrouting") if "@podips" in r]
    assert all(expected in r for r in diverts), diverts


def test_xt_nfqueue_marks_and_clears() -> None:
    text = render(XT_PLAIN, ["10.244.1.2"], ["fd00::2"])
    assert "queue num" not in text  # such kernels have no nft_queue: nft must never queue
    assert "accepted" not in text  # no accept cache
    chains = {c.name: c for c in base_chains(XT_PLAIN)}
    # Marking runs before iptables' mangle chains (-150), clearing right after them.
    assert chains["postrouting"].priority == chains["input"].priority == -155
    assert chains["postrouting-unmark"].priority == chains["input-unmark"].priority == -145
    assert chains["postrouting-unmark"].hook == "postrouting" and chains["input-unmark"].hook == "input"
    diverts = [r for r in rules(text, "postrouting") + rules(text, "input") if "@podips" in r]
    assert len(diverts) == 6
    assert all("meta mark set meta mark or 0x00002000 accept" in r for r in diverts)
    for chain in ("postrouting-unmark", "input-unmark"):
        (rule,) = rules(text, chain)
        assert rule.startswith("meta mark and 0x00002000 == 0x00002000 meta mark set meta mark and 0xffffdfff")


# --- the accept cache -----------------------------------------------------------------------

CACHE_RULES = [
    'ip saddr . ip daddr . meta l4proto . th dport @accepted-v4 accept comment "accepted before (accept cache)"',
    'ip6 saddr . ip6 daddr . meta l4proto . th dport @accepted-v6 accept comment "accepted before (accept cache)"',
]
# Only packets with the queueing AND the judged bit (0x1000: the worker's verdict) are cached.
REMEMBER = [
    "meta mark and 0x00003000 == 0x00003000 meta l4proto { tcp, udp, sctp } "
    'add @accepted-v4 { ip saddr . ip daddr . meta l4proto . th dport } comment "judged and accepted by the agent: remember"',
    "meta mark and 0x00003000 == 0x00003000 meta l4proto { tcp, udp, sctp } "
    'add @accepted-v6 { ip6 saddr . ip6 daddr . meta l4proto . th dport } comment "judged and accepted by the agent: remember"',
    'meta mark and 0x00002000 == 0x00002000 meta mark set meta mark and 0xffffcfff comment "clear the queueing and judged mark bits"',
]
# Set the queueing bit, clear the judged bit: only the worker's verdict may set it.
SET_MARK = "meta mark set meta mark and 0xffffefff or 0x00002000"


def test_accept_cache_is_on_by_default() -> None:
    assert NFT.accept_cache and XT.accept_cache


@pytest.mark.parametrize("config", [NFT, XT])
def test_accept_cache_sets_are_declared_and_flushed_by_every_sync(config: RulesetConfig) -> None:
    text = render(config, ["10.0.0.1"], [])
    flags = f"flags dynamic, timeout; timeout {ACCEPT_CACHE_TIMEOUT_S}s; size {ACCEPT_CACHE_SIZE};"
    assert f"add set {T} accepted-v4 {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service; {flags} }}\n" in text
    assert f"add set {T} accepted-v6 {{ type ipv6_addr . ipv6_addr . inet_proto . inet_service; {flags} }}\n" in text
    assert f"flush set {T} accepted-v4\nflush set {T} accepted-v6\n" in text
    assert elements(text, "accepted-v4") == elements(text, "accepted-v6") == []


@pytest.mark.parametrize("config", [NFT, XT, RulesetConfig(backend=Backend.NFT_QUEUE, queue_count=2, fail_open=True)])
def test_accept_cache_lookups_come_right_before_the_diverts(config: RulesetConfig) -> None:
    text = render(config, ["10.0.0.1"], ["fd00::1"])
    post, inp = rules(text, "postrouting"), rules(text, "input")
    # After every exemption (replies, root sockets), before the first divert.
    assert post[2:7] == ["ct state != new accept", post[3], *CACHE_RULES, post[6]]
    assert "skuid 0" in post[3] and post[6].startswith("ip saddr @podips-v4 ")
    assert inp[2:5] == ["ct state != new accept", *CACHE_RULES]
    assert inp[5].startswith("ip saddr @podips-v4 ")
    # Every divert marks the packet, so the chain after the queue knows it came back accepted.
    diverts = [r for r in post + inp if "@podips" in r]
    assert len(diverts) == 6 and all(f"{SET_MARK} " in r for r in diverts)


def test_accept_cache_nft_queue_marks_before_queueing_and_remembers_after() -> None:
    text = render(NFT, ["10.0.0.1"], [])
    chains = {c.name: c for c in base_chains(NFT)}
    # After the queueing chains (95 / 101), before SNAT (100) on postrouting.
    assert [(c.name, c.hook, c.priority) for c in base_chains(NFT)] == [
        ("postrouting", "postrouting", 95),
        ("input", "input", 101),
        ("postrouting-unmark", "postrouting", 96),
        ("input-unmark", "input", 102),
    ]
    assert chains["postrouting-unmark"].priority < 100
    diverts = [r for r in rules(text, "postrouting") if "@podips" in r]
    assert all(f" {SET_MARK} queue num 100 comment" in r for r in diverts)
    for chain in ("postrouting-unmark", "input-unmark"):
        assert rules(text, chain) == REMEMBER
    assert xt_rules(NFT) == ()


def test_accept_cache_xt_remembers_in_the_unmark_chains() -> None:
    text = render(XT, ["10.0.0.1"], [])
    assert [c.priority for c in base_chains(XT)] == [-155, -155, -145, -145]
    for chain in ("postrouting-unmark", "input-unmark"):
        # Separate rules: a full set fails its `add` (ending that rule), the mark is still cleared.
        assert rules(text, chain) == REMEMBER
    diverts = [r for r in rules(text, "postrouting") if "@podips" in r]
    assert len(diverts) == 4 and all(f" {SET_MARK} accept comment" in r for r in diverts)


@pytest.mark.parametrize("config", [NFT_PLAIN, XT_PLAIN])
def test_without_accept_cache_nothing_of_it_is_rendered(config: RulesetConfig) -> None:
    text = render(config, ["10.0.0.1"], ["fd00::1"])
    assert "accepted" not in text and "th dport" not in text
    assert len([r for r in rules(text, "postrouting") if "@podips" in r]) == 4


def test_xt_custom_mark() -> None:
    text = render(RulesetConfig(backend=Backend.XT_NFQUEUE, mark=0x10000000), ["10.0.0.1"], [])
    assert "meta mark and 0xffffefff or 0x10000000 accept" in text
    assert "meta mark and 0xefffefff" in text


def test_fail_open_does_not_change_xt_nft_text() -> None:
    # With xt-nfqueue the bypass lives in the iptables rule; the nft text is the same.
    assert render(XT, ["10.0.0.1"], []) == render(RulesetConfig(backend=Backend.XT_NFQUEUE, fail_open=True), ["10.0.0.1"], [])


def test_empty_sets() -> None:
    for config in (NFT, XT):
        text = render(config, [], [])
        assert "add element" not in text  # nft rejects `{ }`
        assert f"flush set {T} podips-v4" in text and f"flush set {T} podips-v6" in text
        # The rules stay: an empty set simply matches nothing.
        assert any("@podips-v4" in r for r in rules(text, "postrouting"))


def test_ipv6_elements_are_canonical_and_deduplicated() -> None:
    text = render(
        NFT,
        ["10.0.0.2", "10.0.0.1", "10.0.0.2", ipaddress.IPv4Address("10.0.0.3")],
        ["FD00:0:0:0::1", "fd00::1", "2001:db8::a:0:0:1", ipaddress.IPv6Address("::ffff:10.0.0.1")],
    )
    assert elements(text, "podips-v4") == ["10.0.0.2", "10.0.0.1", "10.0.0.3"]
    assert elements(text, "podips-v6") == ["fd00::1", "2001:db8::a:0:0:1", "::ffff:10.0.0.1"]


def test_large_sets_are_chunked() -> None:
    v4 = [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(10_000)]
    text = render(NFT, v4, [])
    lines = [ln for ln in text.splitlines() if ln.startswith(f"add element {T} podips-v4")]
    assert len(lines) > 1
    assert elements(text, "podips-v4") == v4


@pytest.mark.parametrize(
    ("v4", "v6", "bad"),
    [
        (["fd00::1"], [], "fd00::1"),
        ([], ["10.0.0.1"], "10.0.0.1"),
        (["10.0.0.256"], [], "10.0.0.256"),
        (["10.0.0.1 }; flush ruleset; add element inet x y { 10.0.0.2"], [], "flush ruleset"),
        (["10.0.0.0/24"], [], "10.0.0.0/24"),
        ([""], [], "''"),
    ],
)
def test_bad_addresses_are_rejected(v4: list[str], v6: list[str], bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(bad)):
        render(NFT, v4, v6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"queue_id": -1},
        {"queue_id": 65536},
        {"queue_count": 0},
        {"queue_id": 65535, "queue_count": 2},
        {"mark": 0},
        {"mark": 0x3000},
        {"mark": 1 << 32},
    ],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RulesetConfig(backend=Backend.XT_NFQUEUE, **kwargs)


def test_default_mark_avoids_kube_proxy_bits() -> None:
    assert XT.mark == DEFAULT_MARK
    assert DEFAULT_MARK & (0x4000 | 0x8000) == 0


def test_xt_rules() -> None:
    assert xt_rules(NFT) == ()
    rs = xt_rules(XT)
    assert {(r.binary, r.chain) for r in rs} == {
        ("iptables", "POSTROUTING"),
        ("iptables", "INPUT"),
        ("ip6tables", "POSTROUTING"),
        ("ip6tables", "INPUT"),
    }
    assert rs[0].args == (
        "-m", "mark", "--mark", "0x2000/0x2000", "-m", "comment", "--comment", "kube-network-policies",
        "-j", "NFQUEUE", "--queue-num", "100",
    )  # fmt: skip
    many = xt_rules(RulesetConfig(backend=Backend.XT_NFQUEUE, queue_count=4, fail_open=True, cpu_fanout=True))
    assert many[0].args[-4:] == ("--queue-balance", "100:103", "--queue-cpu-fanout", "--queue-bypass")


# --- Ruleset command sequence with a fake runner --------------------------------------------


class FakeRunner:
    """Records commands; emulates iptables -S/-C/-I/-D on one in-memory rule list per chain."""

    def __init__(self, nft_rc: int = 0, nft_stderr: str = "") -> None:
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.chains: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        self.nft_rc = nft_rc
        self.nft_stderr = nft_stderr

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> CommandResult:
        argv = tuple(argv)
        self.calls.append((argv, stdin))
        if argv[:3] == ("ip", "netns", "exec"):
            argv = argv[4:]
        if argv[0] == "nft":
            if argv[1] == "-j":  # list chains / table / set
                return CommandResult(0, '{"nftables": []}', "")
            return CommandResult(self.nft_rc, "", self.nft_stderr)
        binary, _w, _t, _mangle, op, chain, *spec = argv
        rules = self.chains.setdefault((binary, chain), [])
        if op == "-S":
            out = [f"-P {chain} ACCEPT"] + [f"-A {chain} " + " ".join(r) for r in rules]
            return CommandResult(0, "\n".join(out) + "\n", "")
        if op == "-C":
            return CommandResult(0 if tuple(spec) in rules else 1, "", "Bad rule")
        if op == "-I":
            rules.insert(int(spec[0]) - 1, tuple(spec[1:]))
            return CommandResult(0, "", "")
        if op == "-D":
            if len(spec) == 1 and spec[0].isdigit():
                del rules[int(spec[0]) - 1]
            else:
                rules.remove(tuple(spec))
            return CommandResult(0, "", "")
        raise AssertionError(argv)

    def nft_scripts(self) -> list[str]:
        return [stdin for argv, stdin in self.calls if argv[-3:] == ("nft", "-f", "-") and stdin]


def test_sync_is_one_nft_transaction_and_installs_xt_rules_once() -> None:
    fake = FakeRunner()
    rs = Ruleset(XT, runner=fake)
    rs.sync(["10.0.0.1"], [])
    rs.sync(["10.0.0.2"], ["fd00::2"])
    scripts = fake.nft_scripts()
    assert len(scripts) == 2
    assert "10.0.0.2" in scripts[1] and "10.0.0.1" not in scripts[1]
    for key in [("iptables", "POSTROUTING"), ("iptables", "INPUT"), ("ip6tables", "POSTROUTING"), ("ip6tables", "INPUT")]:
        assert len(fake.chains[key]) == 1
    inserts = [a for a, _ in fake.calls if "-I" in a]
    assert len(inserts) == 4  # the second sync only checked (-C)


def test_stale_xt_rule_is_replaced_without_a_gap() -> None:
    fake = FakeRunner()
    Ruleset(XT, runner=fake).sync([], [])
    # A restarted agent with other settings: exactly one rule per chain, the new one, at the top.
    fake.chains[("iptables", "INPUT")].append(("-j", "ACCEPT"))
    new = RulesetConfig(backend=Backend.XT_NFQUEUE, fail_open=True, queue_id=200)
    Ruleset(new, runner=fake).sync([], [])
    rules = fake.chains[("iptables", "INPUT")]
    assert rules[0][-3:] == ("--queue-num", "200", "--queue-bypass")
    assert len([r for r in rules if "kube-network-policies" in r]) == 1
    assert ("-j", "ACCEPT") in rules  # other rules untouched
    ops = [a[4] for a, _ in fake.calls if a[0] == "iptables" and a[5] == "INPUT" and a[4] in ("-I", "-D")]
    assert ops[-2:] == ["-I", "-D"]  # insert the new rule before deleting the old


def test_xt_rule_flushed_by_someone_else_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    import kube_network_policies.dataplane.ruleset as ruleset_module

    monkeypatch.setattr(ruleset_module, "XT_RECHECK_S", 0.0)  # the periodic re-check is due at once
    fake = FakeRunner()
    rs = Ruleset(XT, runner=fake)
    rs.sync([], [])
    fake.chains[("ip6tables", "POSTROUTING")].clear()
    rs.sync([], [])
    assert len(fake.chains[("ip6tables", "POSTROUTING")]) == 1


def test_syncs_between_xt_rechecks_run_only_nft() -> None:
    """A sync is on the policy-to-enforcement path: no iptables runs until the re-check is due."""
    fake = FakeRunner()
    rs = Ruleset(XT, runner=fake)
    rs.sync(["10.0.0.1"], [])
    n = len(fake.calls)
    rs.sync(["10.0.0.2"], [])
    assert [argv[0] for argv, _ in fake.calls[n:]] == ["nft"]


@pytest.mark.parametrize("config", [XT, NFT])
def test_shutdown_fail_closed_or_remove_deletes_everything(config: RulesetConfig) -> None:
    fake = FakeRunner()
    rs = Ruleset(config, runner=fake)
    fake.chains[("iptables", "INPUT")] = [("-m", "comment", "--comment", "kube-network-policies", "-j", "NFQUEUE")]
    rs.sync(["10.0.0.1"], [])
    if config.backend is Backend.XT_NFQUEUE:
        rs.shutdown(keep=False)
    else:
        rs.remove()  # an nft-queue shutdown leaves iptables alone; an uninstall sweeps it
    assert fake.nft_scripts()[-1] == "add table inet kube-network-policies\ndelete table inet kube-network-policies\n"
    assert all(not rules for rules in fake.chains.values())
    n = len(fake.calls)
    rs.sync(["10.0.0.1"], [])  # a late sync must not resurrect the rules
    assert len(fake.calls) == n


def test_shutdown_fail_open_keeps_everything() -> None:
    fake = FakeRunner()
    rs = Ruleset(RulesetConfig(backend=Backend.XT_NFQUEUE, fail_open=True), runner=fake)
    rs.sync(["10.0.0.1"], [])
    n = len(fake.calls)
    rs.shutdown(keep=True)
    assert len(fake.calls) == n  # not a single command
    assert all(len(rules) == 1 for rules in fake.chains.values())


def test_nft_error_names_command_and_message() -> None:
    fake = FakeRunner(nft_rc=1, nft_stderr="/dev/stdin:30:1-20: Error: Could not process rule: No such file or directory\n" + "x" * 10_000)
    rs = Ruleset(NFT, runner=fake, netns="ns1")
    with pytest.raises(CommandError) as info:
        rs.sync(["10.0.0.1"], [])
    msg = str(info.value)
    assert msg.startswith("`ip netns exec ns1 nft -f -` failed (exit 1): ")
    assert "Could not process rule: No such file or directory" in msg
    assert len(msg) < 1000  # nft's echo of a huge input line is trimmed
    assert info.value.argv == ("ip", "netns", "exec", "ns1", "nft", "-f", "-")


def test_stale_chain_is_replaced_on_first_sync_only() -> None:
    listing = (
        '{"nftables": [{"metainfo": {}}, '
        '{"chain": {"family": "inet", "table": "kube-network-policies", "name": "postrouting", "type": "filter", "hook": "postrouting", "prio": -155}}, '
        '{"chain": {"family": "inet", "table": "kube-network-policies", "name": "input-unmark", "type": "filter", "hook": "input", "prio": -145}}, '
        '{"chain": {"family": "inet", "table": "other", "name": "postrouting", "type": "filter", "hook": "postrouting", "prio": 0}}]}'
    )
    fake = FakeRunner()

    def runner(argv: Sequence[str], stdin: str | None = None) -> CommandResult:
        if tuple(argv) == ("nft", "-j", "list", "chains", "inet"):
            return CommandResult(0, listing, "")
        return fake(argv, stdin)

    rs = Ruleset(NFT, runner=runner)
    rs.sync([], [])
    first = fake.nft_scripts()[0]
    assert first.startswith(
        f"flush chain {T} postrouting\ndelete chain {T} postrouting\nflush chain {T} input-unmark\ndelete chain {T} input-unmark\n"
    )
    assert "other" not in first
    # The unmark chain says an xt-nfqueue agent ran before: its iptables rules are swept.
    assert [a for a, _ in fake.calls if a[0] == "iptables" and a[4] == "-S"]
    n = len(fake.calls)
    rs.sync([], [])
    assert "delete" not in fake.nft_scripts()[1]
    assert [a[0] for a, _ in fake.calls[n:]] == ["nft"]  # steady state: one nft run


@pytest.mark.parametrize("config", [NFT, XT])
def test_flush_cache_is_one_transaction_after_the_first_sync_only(config: RulesetConfig) -> None:
    fake = FakeRunner()
    rs = Ruleset(config, runner=fake, netns="ns1")
    rs.flush_cache()  # before the first sync the sets do not exist: nothing to do
    assert fake.calls == []
    rs.sync(["10.0.0.1"], [])
    n = len(fake.calls)
    rs.flush_cache()
    assert fake.calls[n:] == [(("ip", "netns", "exec", "ns1", "nft", "-f", "-"), f"flush set {T} accepted-v4\nflush set {T} accepted-v6\n")]
    rs.shutdown(keep=False)
    n = len(fake.calls)
    rs.flush_cache()  # after shutdown: nothing
    assert len(fake.calls) == n


def test_flush_cache_without_the_cache_does_nothing() -> None:
    fake = FakeRunner()
    rs = Ruleset(XT_PLAIN, runner=fake)
    rs.sync(["10.0.0.1"], [])
    n = len(fake.calls)
    rs.flush_cache()
    assert len(fake.calls) == n


def test_flush_cache_error_is_a_command_error() -> None:
    fake = FakeRunner()
    rs = Ruleset(XT, runner=fake)
    rs.sync([], [])
    fake.nft_rc, fake.nft_stderr = 1, "Error: No such file or directory"
    with pytest.raises(CommandError, match="No such file or directory"):
        rs.flush_cache()


def test_nft_queue_unmark_chains_do_not_mean_an_xt_past() -> None:
    # A previous nft-queue agent with the accept cache left its unmark chains (fail-open): that is
    # not the xt layout (mangle + 5), so no iptables command runs.
    listing = (
        '{"nftables": [{"chain": {"family": "inet", "table": "kube-network-policies", "name": "postrouting-unmark", '
        '"type": "filter", "hook": "postrouting", "prio": 96}}]}'
    )
    fake = FakeRunner()

    def runner(argv: Sequence[str], stdin: str | None = None) -> CommandResult:
        if tuple(argv) == ("nft", "-j", "list", "chains", "inet"):
            return CommandResult(0, listing, "")
        return fake(argv, stdin)

    Ruleset(NFT, runner=runner).sync([], [])
    assert {a[0] for a, _ in fake.calls} == {"nft"}
    assert "delete" not in fake.nft_scripts()[0]  # same hook and priority: kept in place


def test_nft_queue_never_runs_iptables_without_an_xt_past() -> None:
    fake = FakeRunner()
    rs = Ruleset(NFT, runner=fake)
    rs.sync(["10.0.0.1"], [])
    rs.sync(["10.0.0.2"], [])
    rs.shutdown(keep=False)
    assert {a[0] for a, _ in fake.calls} == {"nft"}


def test_detect_backend() -> None:
    def make(queue_ok: bool, nft_ok: bool = True) -> tuple[Callable[..., CommandResult], list[str]]:
        calls: list[str] = []

        def runner(argv: Sequence[str], stdin: str | None = None) -> CommandResult:
            calls.append(" ".join(argv))
            if argv[0] == "nft":
                assert argv[1] == "-c"  # never commits anything
                ok = nft_ok and (queue_ok or "queue" not in (stdin or ""))
                return CommandResult(0 if ok else 1, "", "" if ok else "Error: Could not process rule: No such file or directory")
            return CommandResult(0, "iptables v1.8.9 (nf_tables)", "")

        return runner, calls

    runner, _ = make(queue_ok=True)
    assert detect_backend(runner=runner) is Backend.NFT_QUEUE
    runner, calls = make(queue_ok=False)
    assert detect_backend(runner=runner) is Backend.XT_NFQUEUE
    assert "iptables --version" in calls and "ip6tables --version" in calls
    runner, _ = make(queue_ok=False, nft_ok=False)
    with pytest.raises(CommandError, match="nft -c -f -"):
        detect_backend(runner=runner)
