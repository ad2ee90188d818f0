"""The `kube-network-policies` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kube_network_policies.engine import Features

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    from kube_network_policies.model import kinds

    policies = ", ".join(k.name for k in kinds.all_kinds() if k.is_policy)
    parser = _Parser(prog="kube-network-policies", description=f"Kubernetes network policy agent: {policies}.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ex = sub.add_parser("explain", help="explain whether a connection is allowed by policies in manifest files, and why")
    ex.add_argument("--manifests", nargs="+", required=True, metavar="PATH", help="YAML/JSON files or directories (multi-document, kind: List)")
    ex.add_argument("--from", dest="source", required=True, metavar="NS/POD|IP")
    ex.add_argument("--to", dest="destination", required=True, metavar="NS/POD|IP")
    ex.add_argument("--port", type=_port, required=True)
    ex.add_argument("--protocol", default="TCP", type=str.upper, choices=["TCP", "UDP", "SCTP"])
    ex.add_argument("--output", "-o", default="text", choices=["text", "json"])

    run = sub.add_parser("run", help="run the agent on this node", allow_abbrev=False)
    run.add_argument(
        "--manifests",
        nargs="+",
        metavar="PATH",
        help="standalone mode: enforce the objects in these files or directories (re-read when they change); without it the agent watches the Kubernetes API",
    )
    run.add_argument(
        "--kubeconfig",
        "-kubeconfig",
        metavar="PATH",
        help="Kubernetes mode: the kubeconfig to use (default: the in-cluster service account, then $KUBECONFIG)",
    )
    run.add_argument(
        "--hostname-override",
        "-hostname-override",
        dest="hostname",
        metavar="NODE",
        help="this node's name (default: $NODE_NAME, then the host name)",
    )
    add_agent_flags(run)

    lab = sub.add_parser("lab", help="scenario runner and local lab")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, parser_class=_Parser)
    run = lab_sub.add_parser("run", help="run scenario files (a directory means every *.yaml under it)")
    run.add_argument("paths", nargs="+", metavar="PATH")
    run.add_argument("--engine-only", action="store_true", help="answer probes with the policy engine alone (no root, no kernel)")
    run.add_argument("-v", "--verbose", action="store_true", help="also list passing scenarios")
    run.add_argument("--tables", action="store_true", help="print the truth table of every probe, not only of wrong ones")
    run.add_argument("--timeout", type=float, default=1.0, help="lab mode: seconds a probe waits before it counts as denied (default 1.0)")
    run.add_argument(
        "--apiserver", action="store_true", help="lab mode through a real kube-apiserver: objects created over the API, agents in Kubernetes mode"
    )
    up = lab_sub.add_parser("up", help="bring up a lab cluster with a real API server and leave it running (root)")
    up.add_argument(
        "path",
        nargs="?",
        default=None,
        metavar="SCENARIO",
        help="the scenario whose nodes, namespaces and pods to create (default: the bundled demo)",
    )
    lab_sub.add_parser("down", help="remove the lab cluster `lab up` left running")
    latency = lab_sub.add_parser("latency", help="policy-change-to-enforcement latency through a real API server, as seen by probes (root)")
    latency.add_argument("--changes", type=int, default=40)
    latency.add_argument("--reselect", action="store_true", help="changes that also change the diverted IP set (nftables sync)")
    latency.add_argument("--json", action="store_true")
    lbench = lab_sub.add_parser("bench", help="new TCP connections/s between pods through the agent vs no agent (root)")
    lbench.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    lbench.add_argument("--seconds", type=float, default=5.0, help="measured seconds per round (default 5)")
    lbench.add_argument("--rounds", type=int, default=3, help="(agent, baseline) round pairs per workload (default 3)")
    lbench.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each measured run (default 1)")
    lbench.add_argument("--pods", type=int, default=10_000, help="synthetic pods on other nodes (default 10000)")
    lbench.add_argument("--policies", type=int, default=1_000, help="NetworkPolicies (default 1000)")
    lbench.add_argument("--concurrency", type=int, default=64, help="connections in flight per workload (default 64)")
    lbench.add_argument(
        "--accept-cache",
        dest="accept_cache",
        nargs="?",
        const=True,
        default=True,
        type=_bool,
        metavar="BOOL",
        help="run the agent with its accept cache (default true)",
    )

    sub.add_parser("cleanup", help="remove every nftables and iptables rule an agent left on this node (manual uninstall; root)")

    bench = sub.add_parser("bench", help="benchmark the policy engine (prints figures)")
    bench.add_argument("--pods", type=int, default=10_000)
    bench.add_argument("--policies", type=int, default=1_000, help="NetworkPolicies")
    bench.add_argument("--admin-policies", type=int, default=100)
    bench.add_argument("--seconds", type=float, default=3.0, help="time spent measuring decisions")
    bench.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser


def _bool(text: str) -> bool:
    """Go's flag package accepts -flag, -flag=true, -flag=false (and 1/0, t/f)."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes"):
        return True
    if value in ("0", "f", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")


def _queue(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a queue number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 65535")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 64")
    return value


def add_agent_flags(p: argparse.ArgumentParser) -> None:
    """The flags the Go agent has, with its names; single- and double-dash spellings both work.
    The flags that enable policy kinds come from the kind registry (model.kinds)."""
    from kube_network_policies.model import kinds

    switches = [("fail-open", "accept packets when the agent cannot judge them (no listener, full queue, internal error)")]
    switches += [(flag, kinds.flag_help(flag)) for flag in kinds.flags()]
    for name, help_text in switches:
        p.add_argument(
            f"-{name}", f"--{name}", dest=flag_dest(name), nargs="?", const=True, default=False, type=_bool, metavar="BOOL", help=help_text
        )
    p.add_argument("-nfqueue-id", "--nfqueue-id", dest="nfqueue_id", type=_queue, default=100, metavar="N", help="first NFQUEUE number (default 100)")
    p.add_argument(
        "-nfqueue-count",
        "--nfqueue-count",
        dest="nfqueue_count",
        type=_count,
        default=1,
        metavar="N",
        help="queues (one worker process each, default 1)",
    )
    p.add_argument(
        "-accept-cache",
        "--accept-cache",
        dest="accept_cache",
        nargs="?",
        const=True,
        default=True,
        type=_bool,
        metavar="BOOL",
        help="remember accepted (source, destination, protocol, port) tuples in the kernel for 30 s, so repeated connections skip userspace; emptied on every state change (default true)",
    )
    p.add_argument(
        "-metrics-bind-address",
        "--metrics-bind-address",
        dest="metrics_bind_address",
        default=":9080",
        metavar="ADDR",
        help="metrics and health endpoints (default :9080)",
    )
    p.add_argument(
        "-ruleset-on-exit",
        "--ruleset-on-exit",
        dest="ruleset_on_exit",
        choices=["auto", "keep", "remove"],
        default="auto",
        help="on SIGTERM: keep the nftables rules for the next agent, remove them, or auto (default): fail-open keeps; "
        "fail-closed keeps unless the API shows the agent's DaemonSet is gone or no longer runs on this node "
        "(Kubernetes mode) and removes in standalone mode",
    )
    p.add_argument(
        "-status-details",
        "--status-details",
        dest="status_details",
        nargs="?",
        const=True,
        default=False,
        type=_bool,
        metavar="BOOL",
        help="show diverted pod IPs and error texts on /statusz, to whoever reaches the metrics address (default false)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def flag_dest(flag: str) -> str:
    """The argparse attribute of a flag: admin-network-policy -> admin_network_policy."""
    return flag.replace("-", "_")


def features_from_args(args: argparse.Namespace) -> Features:
    """The kinds the `run` flags enable."""
    from kube_network_policies.engine import Features
    from kube_network_policies.model import kinds

    return Features(frozenset(flag for flag in kinds.flags() if getattr(args, flag_dest(flag))))


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 65535")
    return value


def cmd_explain(args: argparse.Namespace) -> int:
    from kube_network_policies.engine import ClusterState, Features
    from kube_network_policies.explain import ExplainError, explain, features_for_objects, render_json, render_text
    from kube_network_policies.sources.files import ManifestError, load_objects

    try:
        objects = load_objects(args.manifests)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    state = ClusterState(features_for_objects(objects, Features()))
    for obj in objects:
        state.apply(obj)
    try:
        results = explain(state, args.source, args.destination, args.protocol, args.port)
    except ExplainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(render_json(results) if args.output == "json" else render_text(results))
    return 0


def _scenario_status(status: int, paths: list[str]) -> int:
    """A failed `lab run` whose scenario files do not load (bad input) exits 2, like every
    command given bad input; the runner has named each file and its problem already."""
    if status == 0:
        return status
    from kube_network_policies.lab.scenario import ScenarioError, find_scenario_files, load_scenario

    try:
        for path in find_scenario_files(paths):
            load_scenario(path)
    except ScenarioError:
        return EXIT_USAGE
    return status


def cmd_lab(args: argparse.Namespace) -> int:
    from kube_network_policies.lab.runner import run_paths

    if args.lab_command == "run" and args.engine_only:
        from kube_network_policies.lab.engine_mode import EngineMode

        return _scenario_status(run_paths(args.paths, EngineMode(), verbose=args.verbose, tables=args.tables), args.paths)
    # Everything else builds network namespaces and runs real agents.
    from kube_network_policies.lab.netns_mode import LabError, check_lab_prerequisites
    from kube_network_policies.lab.topology import exit_on_sigterm

    problem = check_lab_prerequisites()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    exit_on_sigterm()  # SIGTERM cleans up like Ctrl-C: namespaces and agents are removed
    if args.lab_command == "latency":
        from kube_network_policies.lab.bench_latency import run_latency

        return run_latency(changes=args.changes, reselect=args.reselect, as_json=args.json)
    if args.lab_command == "down":
        from kube_network_policies.lab.up import lab_down

        return lab_down()
    if args.lab_command == "up":
        from kube_network_policies.lab.up import lab_up

        return lab_up(args.path)  # None: the demo scenario, shipped with the package
    if args.lab_command == "bench":
        from kube_network_policies.lab.bench_lab import run_lab_bench

        return run_lab_bench(
            seconds=args.seconds,
            rounds=args.rounds,
            as_json=args.json,
            warmup=args.warmup,
            pods=args.pods,
            policies=args.policies,
            concurrency=args.concurrency,
            accept_cache=args.accept_cache,
        )
    if not args.apiserver:
        from kube_network_policies.lab.netns_mode import LabMode

        return _scenario_status(run_paths(args.paths, LabMode(timeout=args.timeout), verbose=args.verbose, tables=args.tables), args.paths)
    from kube_network_policies.lab.apiserver_mode import ApiLabMode

    try:
        mode = ApiLabMode(timeout=args.timeout)
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return _scenario_status(run_paths(args.paths, mode, verbose=args.verbose, tables=args.tables), args.paths)
    finally:
        mode.close()


def cmd_run(args: argparse.Namespace) -> int:
    import logging
    import socket

    from kube_network_policies.agent import AgentConfig, run_agent

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.manifests and args.kubeconfig:
        print("error: --manifests (standalone mode) and --kubeconfig (Kubernetes mode) exclude each other", file=sys.stderr)
        return EXIT_USAGE
    node = args.hostname or os.environ.get("NODE_NAME") or socket.gethostname()
    config = AgentConfig(
        manifests=tuple(args.manifests or ()),
        node=node,
        features=features_from_args(args),
        fail_open=args.fail_open,
        queue_id=args.nfqueue_id,
        queue_count=args.nfqueue_count,
        accept_cache=args.accept_cache,
        metrics_bind_address=args.metrics_bind_address,
        status_details=args.status_details,
        kubeconfig=args.kubeconfig,
        ruleset_on_exit=args.ruleset_on_exit,
        pod_namespace=os.environ.get("POD_NAMESPACE") or None,
        pod_name=os.environ.get("POD_NAME") or None,
    )
    return run_agent(config)


def cmd_cleanup(_args: argparse.Namespace) -> int:
    from kube_network_policies.dataplane.ruleset import DataplaneError, cleanup

    if os.geteuid() != 0:
        print("error: cleanup needs root (it deletes nftables and iptables rules)", file=sys.stderr)
        return EXIT_USAGE
    try:
        removed = cleanup()
    except DataplaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print("nothing to remove: no kube-network-policies rules on this node")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kube_network_policies.lab.bench_engine import run_benchmark

    return run_benchmark(pods=args.pods, policies=args.policies, admin_policies=args.admin_policies, seconds=args.seconds, as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"explain": cmd_explain, "lab": cmd_lab, "bench": cmd_bench, "run": cmd_run, "cleanup": cmd_cleanup}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # last resort: a clear line, never a traceback, unless asked for
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("kube_network_policies.lab"):
            # The image leaves the lab out (see Dockerfile): `lab` and `bench` need a checkout.
            print(
                f"error: `{args.command}` needs the lab, which this installation does not include (the image ships the agent only)", file=sys.stderr
            )
            return EXIT_USAGE
        if os.environ.get("KNP_DEBUG"):
            raise
        from kube_network_policies.errors import InputError, KnpError

        if isinstance(exc, KnpError):  # ours, with a message for the user: not a bug
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE if isinstance(exc, InputError) else 1
        print(f"internal error: {type(exc).__name__}: {exc} (set KNP_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
