#!/usr/bin/env bash
# Builds Kubernetes components and test binaries from the k8s.io/kubernetes Go module, at the
# control plane's version, for the real cluster (scripts/cluster.sh) and the upstream suites
# (scripts/e2e.sh).
#
#   hack/k8s/build.sh NAME...               build what is missing; prints the bin dir on stdout
#   hack/k8s/build.sh --print-path          only print the bin dir (it may not be built yet)
#   hack/k8s/build.sh --list                the names it knows
#
# NAME: kubelet kube-proxy kube-scheduler kube-controller-manager kubectl e2e.test ginkgo agnhost
# (or `all`). The binaries land in
#   ${KNP_CACHE:-/var/cache/kube-network-policies}/k8s/k8s-<v>-<hash>/bin/<name>
# where <hash> covers the generated go.mod, the Go version, the tags and ldflags, so a changed
# input builds anew and an unchanged one is reused. The Go module and build caches are the
# control plane's (controlplane/go-mod, go-build): with them warm a component takes about a
# minute on 2 cores, e2e.test several.
#
# Environment: KNP_CACHE (cache root), KNP_K8S_VERSION (default v1.34.4, as the control plane).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=${KNP_K8S_VERSION:-v1.34.4}
root=${KNP_CACHE:-/var/cache/kube-network-policies}

log() { echo "k8s: $*" >&2; }
usage() { echo "usage: $0 [--print-path|--list] NAME... (NAME: $(known))" >&2; exit 2; }

# name -> "kind package": kind is cmd (a release binary, version ldflags), test (go test -c,
# version ldflags) or tool (a plain build).
pkg_of() {
  case "$1" in
    kubelet|kube-proxy|kube-scheduler|kube-controller-manager|kubectl) echo "cmd k8s.io/kubernetes/cmd/$1" ;;
    e2e.test) echo "test k8s.io/kubernetes/test/e2e" ;;
    agnhost) echo "cmd k8s.io/kubernetes/test/images/agnhost" ;;
    ginkgo) echo "tool github.com/onsi/ginkgo/v2/ginkgo" ;;
    *) return 1 ;;
  esac
}
known() { echo "kubelet kube-proxy kube-scheduler kube-controller-manager kubectl e2e.test ginkgo agnhost"; }

mode=build
names=()
for arg in "$@"; do
  case "$arg" in
    --print-path) mode=print ;;
    --list) known | tr ' ' '\n'; exit 0 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    all) read -r -a all <<<"$(known)"; names+=("${all[@]}") ;;
    -*) usage ;;
    *) pkg_of "$arg" >/dev/null || { log "unknown component '$arg'"; usage; }; names+=("$arg") ;;
  esac
done
[ "$mode" = print ] || [ ${#names[@]} -gt 0 ] || usage

# shellcheck source=../lib/k8s-module.sh
. "$here/../lib/k8s-module.sh"
k8s_module_env "$root/controlplane"
k8s_module_resolve

gomod() { k8s_gomod knp.local/k8s hack/k8s/build.sh; }
ldflags=$(k8s_ldflags)
go_version=$(go env GOVERSION)
hash=$(
  { echo "go=$go_version tags=$k8s_build_tags ldflags=$ldflags"; gomod; } | sha256sum | cut -c1-12
)
keydir=$root/k8s/k8s-$K8S_VERSION-$hash
bindir=$keydir/bin

if [ "$mode" = print ]; then
  echo "$bindir"
  exit 0
fi

missing() { local n; for n in "${names[@]}"; do [ -x "$bindir/$n" ] || echo "$n"; done; }
if [ -z "$(missing)" ]; then
  log "reusing $bindir"
  echo "$bindir"
  exit 0
fi

# One build at a time per key: a second caller waits, then finds what it needs built.
mkdir -p "$keydir/src" "$bindir"
exec 9>"$keydir/.lock"
flock 9
gomod >"$keydir/src/go.mod"
info=$keydir/BUILD-INFO
for n in $(missing); do
  read -r kind pkg <<<"$(pkg_of "$n")"
  start=$(date +%s)
  log "building $n ($pkg @ $K8S_VERSION, $go_version) ..."
  tmp=$bindir/.$n.tmp
  rm -f "$tmp"
  case "$kind" in
    cmd) (cd "$keydir/src" && go build -trimpath -tags="$k8s_build_tags" -ldflags="$ldflags" -o "$tmp" "$pkg") ;;
    test) (cd "$keydir/src" && go test -c -trimpath -ldflags="$ldflags" -o "$tmp" "$pkg") ;;
    tool) (cd "$keydir/src" && go build -trimpath -ldflags="-s -w" -o "$tmp" "$pkg") ;;
  esac
  mv "$tmp" "$bindir/$n"
  end=$(date +%s)
  log "built $n in $((end - start))s ($(du -h "$bindir/$n" | cut -f1))"
  echo "$n: $pkg, built in $((end - start))s with $go_version, $(stat -c %s "$bindir/$n") bytes" >>"$info"
done
echo "$bindir"
