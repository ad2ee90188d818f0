#!/usr/bin/env bash
# Runs the upstream suites against a real cluster on this machine (scripts/cluster.sh) with the
# agent deployed as its DaemonSet from the image built here (hack/images/build.sh).
#
#   scripts/e2e.sh SUITE... [--keep] [--reuse] [--nodes N] [--parallel N] [--focus REGEX]
#
# SUITE:
#   netpol  the Kubernetes e2e suite (e2e.test, k8s.io/kubernetes at the control plane's version)
#           focused on `Netpol`, as the Go agent's CI runs it; agent from install.yaml
#   anp     network-policy-api v0.1.7 conformance, profiles AdminNetworkPolicy and
#           BaselineAdminNetworkPolicy, all features; agent from install-anp.yaml
#   cnp     network-policy-api v0.2.0 conformance, profile ClusterNetworkPolicy (v1alpha2), all
#           features; agent from install-cnp.yaml
#   all     the three, one after the other
# Each suite gets a fresh cluster (`cluster.sh up --agent ...`), torn down afterwards unless
# --keep; --reuse runs on the cluster already up as it is. --parallel: ginkgo processes for
# netpol (default 4). --focus narrows netpol (a regex, default Netpol) or, for anp/cnp, the
# conformance tests (a -test.run regex below TestConformanceProfiles).
#
# Without SCTP sockets in the kernel (here): netpol skips `[Feature:SCTPConnectivity]`; anp/cnp
# run the suite built without its SCTP server containers (hack/npapi/build.sh) and skip the SCTP
# tests. Both are counted as skipped, with that reason.
#
# Output: the suite's own report, then per suite `N passed, M failed, K skipped`; logs and
# reports in ${KNP_E2E_DIR:-/var/tmp/knp-e2e}/<suite>-<time>/. Exit 1 when a suite failed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
results_root=${KNP_E2E_DIR:-/var/tmp/knp-e2e}
log() { echo "e2e: $*" >&2; }
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

suites=()
keep=0
reuse=0
nodes=2
parallel=4
focus=
while [ $# -gt 0 ]; do
  case "$1" in
    netpol|anp|cnp) suites+=("$1") ;;
    all) suites+=(netpol anp cnp) ;;
    --keep) keep=1 ;;
    --reuse) reuse=1 ;;
    --nodes|--parallel)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { log "$1 needs a number"; exit 2; }
      if [ "$1" = --nodes ]; then nodes=$2; else parallel=$2; fi
      shift ;;
    --focus) [ -n "${2:-}" ] || { log "--focus needs a regex"; exit 2; }; focus=$2; shift ;;
    -h|--help) usage ;;
    *) log "unknown argument '$1'"; usage ;;
  esac
  shift
done
[ ${#suites[@]} -gt 0 ] || usage
[ "$(id -u)" = 0 ] || { log "needs root (network namespaces, containerd, kubelet)"; exit 2; }
if [ $reuse = 1 ] && [ ${#suites[@]} -gt 1 ]; then
  log "--reuse runs one suite on the cluster that is up; name one suite"
  exit 2
fi

sctp_sockets() { python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132)' 2>/dev/null; }
if sctp_sockets; then sctp=1; else sctp=0; fi
NO_SCTP_REASON="this kernel has no SCTP sockets (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): EPROTONOSUPPORT)"

log "building what the suites need (cached) ..."
k8s_bin=$(bash "$repo/hack/k8s/build.sh" e2e.test ginkgo kubectl)
npapi_bin=$(bash "$repo/hack/npapi/build.sh")

agent_of() { case "$1" in netpol) echo np ;; anp) echo anp ;; cnp) echo cnp ;; esac; }

run_netpol() {  # OUT KUBECONFIG
  local out=$1 kc=$2 skip=()
  [ $sctp = 1 ] || skip=(--skip='\[Feature:SCTPConnectivity\]')
  # The suite's own report goes to the terminal; the JSON report is what we count.
  PATH=$k8s_bin:$PATH "$k8s_bin/ginkgo" --nodes="$parallel" --focus="${focus:-Netpol}" "${skip[@]}" \
    --timeout=3h --no-color --json-report=report.json --output-dir="$out" \
    "$k8s_bin/e2e.test" -- \
    --kubeconfig="$kc" --provider=local --dump-logs-on-failure=false --disable-log-dump=true \
    --report-dir="$out" 2>&1 | tee "$out/suite.log" || true
  python3 "$repo/hack/e2e/summary.py" ginkgo "$out/report.json" --focus "${focus:-Netpol}" \
    --skip '\[Feature:SCTPConnectivity\]' --reason "$NO_SCTP_REASON" | tee "$out/summary.txt"
  return "${PIPESTATUS[0]}"
}

run_npapi() {  # OUT KUBECONFIG VERSION PROFILES
  local out=$1 kc=$2 v=$3 profiles=$4 bin skip=()
  bin=$npapi_bin/conformance-$v.test
  if [ $sctp = 0 ]; then
    bin=$npapi_bin/conformance-$v-nosctp.test
    skip=(-test.skip 'TestConformanceProfiles/.*SCTP')
  fi
  # Two clients in the suite: controller-runtime's reads -kubeconfig, client-go's default rules KUBECONFIG.
  (cd "$out" && KUBECONFIG=$kc "$bin" -test.run "TestConformanceProfiles${focus:+/$focus}" "${skip[@]}" -test.v -test.count 1 \
    -test.timeout 3h -kubeconfig "$kc" -conformance-profiles "$profiles" -all-features \
    -organization kubernetes-sigs -project kube-network-policies-python \
    -url https://github.com/kubernetes-sigs/kube-network-policies -version v0.1.0 \
    -contact sig-network -additional-info 'scripts/e2e.sh (this repository)' -report-output "$out/conformance-report.yaml") 2>&1 | tee "$out/suite.log" || true
  python3 "$repo/hack/e2e/summary.py" gotest "$out/suite.log" --tests "$npapi_bin/conformance-$v.tests" \
    --skip SCTP --reason "$NO_SCTP_REASON" | tee "$out/summary.txt"
  return "${PIPESTATUS[0]}"
}

status=0
declare -A lines
for suite in "${suites[@]}"; do
  out=$results_root/$suite-$(date +%Y%m%d-%H%M%S)
  mkdir -p "$out"
  start=$(date +%s)
  if [ $reuse = 0 ]; then
    bash "$repo/scripts/cluster.sh" down >/dev/null 2>&1 || true
    log "$suite: bringing the cluster up ($nodes nodes, agent: $(agent_of "$suite")) ..."
    # anp/cnp: the CRDs of the suite's own release (experimental channel: all features are run).
    crds=
    case "$suite" in
      anp) crds=$(echo "$npapi_bin"/crds-v0.1.7/*.yaml) ;;
      cnp) crds=$(echo "$npapi_bin"/crds-v0.2.0/*.yaml) ;;
    esac
    if ! KNP_CLUSTER_ANP_CRDS=$crds KNP_CLUSTER_CNP_CRDS=$crds \
      bash "$repo/scripts/cluster.sh" up --nodes "$nodes" --agent "$(agent_of "$suite")" 2>&1 | tee "$out/cluster-up.log"; then
      log "$suite: the cluster did not come up (log: $out/cluster-up.log)"
      lines[$suite]="0 passed, 1 failed, 0 skipped (the cluster did not come up)"
      status=1
      continue
    fi
  fi
  kc=$(bash "$repo/scripts/cluster.sh" kubeconfig)
  up=$(date +%s)
  log "$suite: running (results in $out) ..."
  rc=0
  case "$suite" in
    netpol) run_netpol "$out" "$kc" || rc=$? ;;
    anp) run_npapi "$out" "$kc" v0.1.7 AdminNetworkPolicy,BaselineAdminNetworkPolicy || rc=$? ;;
    cnp) run_npapi "$out" "$kc" v0.2.0 ClusterNetworkPolicy || rc=$? ;;
  esac
  [ $rc = 0 ] || status=1
  # The agent's own account of the run, for whoever investigates a failure.
  KUBECONFIG=$kc "$k8s_bin/kubectl" -n kube-system logs -l app=kube-network-policies --tail=-1 --prefix \
    >"$out/agent.log" 2>&1 || true
  end=$(date +%s)
  lines[$suite]="$(tail -1 "$out/summary.txt") (cluster $((up - start)) s, suite $((end - up)) s)"
  if [ $reuse = 0 ] && [ $keep = 0 ]; then
    bash "$repo/scripts/cluster.sh" down >/dev/null 2>&1 || log "$suite: cluster teardown failed; see scripts/cluster.sh status"
  fi
done

echo
for suite in "${suites[@]}"; do
  echo "$suite: ${lines[$suite]}"
done
# One suite: its own closing line last, as the suite printed it.
[ ${#suites[@]} != 1 ] || [ ! -s "$out/summary.txt" ] || tail -1 "$out/summary.txt"
exit $status
