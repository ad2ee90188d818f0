#!/usr/bin/env bash
# Imports image archives from hack/images/build.sh into a containerd, in the namespace the
# kubelet's CRI uses, and checks that every reference the archive names is then present.
#
#   hack/images/import.sh --address SOCK [--namespace NS] [--snapshotter NAME] ARCHIVE...
#
#   --address SOCK        the containerd socket (each node of scripts/cluster.sh has its own)
#   --namespace NS        containerd namespace (default k8s.io, the CRI's)
#   --snapshotter NAME    unpack for this snapshotter (default: containerd's default, overlayfs,
#                         which is also the CRI's default)
#
# Idempotent: importing an archive again replaces the images with the same content.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "import: $*" >&2; }
die() { log "$*"; exit 1; }
usage() { echo "usage: $0 --address SOCK [--namespace NS] [--snapshotter NAME] ARCHIVE..." >&2; exit 2; }

address=
namespace=k8s.io
snapshotter=
archives=()
while [ $# -gt 0 ]; do
  case "$1" in
    --address) [ $# -ge 2 ] || usage; address=$2; shift 2 ;;
    --namespace) [ $# -ge 2 ] || usage; namespace=$2; shift 2 ;;
    --snapshotter) [ $# -ge 2 ] || usage; snapshotter=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) log "unknown option '$1'"; usage ;;
    *) archives+=("$1"); shift ;;
  esac
done
[ -n "$address" ] && [ ${#archives[@]} -gt 0 ] || usage
command -v ctr >/dev/null || die "ctr is not installed (Debian: containerd)"
[ -S "$address" ] || die "no containerd socket at $address"
py=${KNP_PYTHON:-python3}

ctr_() { ctr --address "$address" --namespace "$namespace" "$@"; }
ctr_ version >/dev/null 2>&1 || die "containerd at $address does not answer (ctr version failed)"

for archive in "${archives[@]}"; do
  [ -f "$archive" ] || die "no archive at $archive (build it with hack/images/build.sh)"
  refs=$("$py" "$here/oci.py" refs "$archive") || die "cannot read the image names in $archive"
  [ -n "$refs" ] || die "$archive names no image (io.containerd.image.name): not built by hack/images/build.sh?"
  opts=()
  [ -z "$snapshotter" ] || opts+=(--snapshotter "$snapshotter")
  out=$(ctr_ images import "${opts[@]}" "$archive" 2>&1) || { echo "$out" >&2; die "ctr images import $archive failed"; }
  present=$(ctr_ images ls -q)
  while IFS= read -r ref; do
    grep -qxF "$ref" <<<"$present" || die "$archive imported, but $ref is not in containerd ($address, namespace $namespace)"
    log "$ref ($address, $namespace)"
  done <<<"$refs"
done
