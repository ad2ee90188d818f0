#!/usr/bin/env bash
# Builds the container images the real cluster needs (scripts/cluster.sh), without Docker or a
# registry: OCI image archives that `ctr images import` (hack/images/import.sh) loads under
# their exact names.
#
#   hack/images/build.sh NAME...                build what is missing; prints the archive paths
#   hack/images/build.sh --print-path NAME...   only print the archive paths (maybe not built yet)
#   hack/images/build.sh --force NAME...        build anew even when the archive exists
#
# NAME: agent, pause, agnhost (or all). Each image is declared in hack/images/NAME.toml (names,
# entrypoint, environment, packages); the archive lands in
#   ${KNP_CACHE:-/var/cache/kube-network-policies}/images/<hash>/NAME.tar
# where <hash> covers the declaration, this script, oci.py and the image's own inputs, so a
# changed input builds anew and an unchanged one is reused. Debian packages and the agent's
# Python dependencies are fetched at build time, unpinned, as the Dockerfile does: --force
# picks up newer ones.
#   agent    the Dockerfile's image: mmdebstrap (Debian bookworm: python3, nftables, iptables),
#            the project's wheel (without the lab subpackage) installed by the image's own pip;
#   pause    build/pause from the k8s.io/kubernetes module, a static gcc build, on scratch;
#   agnhost  the binary from hack/k8s/build.sh with a static busybox and bash, laid out as upstream's.
#
# Needs root (mmdebstrap --mode=root, chroot), mmdebstrap, gcc with a static libc, go (for the
# module), python3 >= 3.11 with pip, and the Debian mirror and PyPI.
# Environment: KNP_CACHE (cache root), KNP_K8S_VERSION (default v1.34.4), KNP_DEBIAN_MIRROR
# (default http://deb.debian.org/debian), KNP_DEBIAN_SECURITY_MIRROR
# (default http://deb.debian.org/debian-security).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
K8S_VERSION=${KNP_K8S_VERSION:-v1.34.4}
root=${KNP_CACHE:-/var/cache/kube-network-policies}
mirror=${KNP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${KNP_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
known="agent pause agnhost"

log() { echo "images: $*" >&2; }
die() { log "$*"; exit 1; }
usage() { echo "usage: $0 [--print-path|--force] NAME... (NAME: $known, or all)" >&2; exit 2; }

mode=build
force=false
names=()
for arg in "$@"; do
  case "$arg" in
    --print-path) mode=print ;;
    --force) force=true ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    all) read -r -a all <<<"$known"; names+=("${all[@]}") ;;
    agent|pause|agnhost) names+=("$arg") ;;
    *) log "unknown image '$arg'"; usage ;;
  esac
done
[ ${#names[@]} -gt 0 ] || usage

py=${KNP_PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "$py must be Python >= 3.11 (oci.py reads TOML with tomllib); set KNP_PYTHON"
oci() { "$py" "$here/oci.py" "$@"; }
decl() { oci get "$here/$1.toml" "$2"; }

# The k8s.io/kubernetes module's source directory (pause sources, manifest.go, agnhost files),
# from the Go module cache the control plane and hack/k8s share.
module_dir() {
  # shellcheck source=../lib/k8s-module.sh
  . "$here/../lib/k8s-module.sh"
  k8s_module_env "$root/controlplane"
  command -v go >/dev/null || die "go is not installed (needed to fetch the k8s.io/kubernetes module)"
  local dir
  dir=$(cd / && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n -E 's/^[[:space:]]*"Dir": "(.*)",?$/\1/p')
  [ -n "$dir" ] && [ -d "$dir" ] || die "could not fetch k8s.io/kubernetes@$K8S_VERSION from the Go module proxy"
  echo "$dir"
}

# The module must still name the images as the declarations do; a version bump that changes a
# tag must change the declaration too, or the suite would look for an image nobody imported.
check_module_tag() { # NAME FILE REGEX
  local want line
  want=$(decl "$1" build.tag)
  line=$(grep -E "$3" "$2" | head -1) || die "$2 has no line matching '$3': its layout changed?"
  grep -q -E "(^|[^0-9.])${want//./\\.}([^0-9.]|\$)" <<<"$line" \
    || die "$2 names another $1 tag than hack/images/$1.toml's $want: $line"
}

# Everything an image's archive depends on, as text to hash.
inputs_of() {
  echo "arch=$(uname -m) mirror=$mirror security=$security_mirror"
  sha256sum "$here/build.sh" "$here/oci.py" "$here/$1.toml" | cut -d' ' -f1
  case "$1" in
    agent)
      (cd "$repo" && oci inputs "$here/agent.toml" . | tr '\n' '\0' | xargs -0 sha256sum) ;;
    pause)
      local mod
      mod=$(module_dir)
      echo "k8s=$K8S_VERSION gcc=$(gcc -dumpfullversion 2>/dev/null || echo none)"
      sha256sum "$mod/build/pause/linux/pause.c" | cut -d' ' -f1 ;;
    agnhost)
      # The bin dir's name carries hack/k8s/build.sh's own input hash.
      echo "agnhost=$("$repo/hack/k8s/build.sh" --print-path)/agnhost" ;;
  esac
}

archive_of() {
  local hash
  hash=$(inputs_of "$1" | sha256sum | cut -c1-16)
  echo "$root/images/$hash/$1.tar"
}

debian_sources=("deb $mirror bookworm main" "deb $mirror bookworm-updates main" "deb $security_mirror bookworm-security main")
# Like Debian's slim images: no documentation, manual pages or translations (copyrights stay).
slim=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*')

build_agent() { # WORK ROOTFS
  local work=$1 rootfs=$2 suite variant python packages f alt target
  suite=$(decl agent rootfs.suite)
  variant=$(decl agent rootfs.variant)
  python=$(decl agent rootfs.python)
  packages=$( { decl agent rootfs.base_packages; decl agent rootfs.packages; } | paste -sd, -)
  [ "$suite" = bookworm ] || die "agent.toml: only the bookworm suite is wired here, not $suite"

  # The package as the Dockerfile's COPY lines see it (through .dockerignore), built into a wheel.
  log "agent: building the wheel (without the lab subpackage)"
  mkdir -p "$work/pkg" "$work/wheels"
  (cd "$repo" && oci inputs "$here/agent.toml" . | while IFS= read -r f; do cp --parents -- "$f" "$work/pkg/"; done)
  "$py" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$work/wheels" "$work/pkg" >&2 \
    || die "building the project's wheel failed (see above)"
  # Its dependencies and pip itself, as wheels for the image's Python (CPython $python, glibc).
  "$py" -m pip download --quiet --disable-pip-version-check --dest "$work/wheels" --only-binary=:all: \
    --implementation cp --python-version "$python" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "$work"/wheels/kube_network_policies-*.whl pip >&2 \
    || die "downloading the agent's dependencies from PyPI failed (see above)"
  local pip_whl
  pip_whl=$(cd "$work/wheels" && ls pip-*.whl)

  # In the chroot: the image's own pip (run from its wheel, so pip stays out of the image)
  # installs the agent into /usr/local as `pip install .` does in the Dockerfile, then the
  # Dockerfile's checks: the CLI runs, the agent imports, the lab does not.
  local alt_hooks=()
  while IFS="=" read -r alt target; do
    alt_hooks+=(--customize-hook="chroot \"\$1\" update-alternatives --quiet --set $alt $target")
  done < <(decl agent rootfs.alternatives)
  log "agent: mmdebstrap $suite ($variant + $packages)"
  mmdebstrap --mode=root --variant="$variant" --include="$packages" "${slim[@]}" \
    "${alt_hooks[@]}" \
    --customize-hook="mkdir \"\$1/tmp/knp-wheels\"" \
    --customize-hook="sync-in $work/wheels /tmp/knp-wheels" \
    --customize-hook="chroot \"\$1\" python3 /tmp/knp-wheels/$pip_whl/pip install --quiet --no-index --find-links /tmp/knp-wheels --no-cache-dir --root-user-action=ignore --disable-pip-version-check --break-system-packages kube-network-policies" \
    --customize-hook="rm -rf \"\$1/tmp/knp-wheels\"" \
    --customize-hook="chroot \"\$1\" python3 -c 'import sys; assert sys.version.startswith(\"$python.\"), sys.version'" \
    --customize-hook="chroot \"\$1\" env PYTHONDONTWRITEBYTECODE=1 kube-network-policies --help >/dev/null" \
    --customize-hook="chroot \"\$1\" env PYTHONDONTWRITEBYTECODE=1 python3 -c 'import kube_network_policies.agent, kube_network_policies.explain'" \
    --customize-hook="! chroot \"\$1\" env PYTHONDONTWRITEBYTECODE=1 python3 -c 'import kube_network_policies.lab' 2>/dev/null" \
    --customize-hook="rm -f \"\$1/etc/resolv.conf\" \"\$1/etc/hostname\"; rm -rf \"\$1\"/var/log/* \"\$1\"/var/cache/ldconfig/*" \
    "$suite" "$rootfs" "${debian_sources[@]}" >"$work/mmdebstrap.log" 2>&1 \
    || { tail -30 "$work/mmdebstrap.log" >&2; die "agent: mmdebstrap failed (log above)"; }
}

build_pause() { # WORK ROOTFS
  local work=$1 rootfs=$2 mod tag
  mod=$(module_dir)
  tag=$(decl pause build.tag)
  check_module_tag pause "$mod/build/pause/Makefile" '^TAG \?= '
  check_module_tag pause "$mod/test/utils/image/manifest.go" 'configs\[Pause\] = '
  local cflags
  read -r -a cflags <<<"$(decl pause build.cflags | paste -sd' ' -)"
  log "pause: gcc ${cflags[*]} build/pause/linux/pause.c"
  mkdir -p "$rootfs"
  gcc "${cflags[@]}" "-DVERSION=v$tag-$K8S_VERSION" -o "$rootfs/pause" "$mod/build/pause/linux/pause.c" \
    || die "pause: gcc failed (a static build needs libc6-dev's libc.a)"
  "$rootfs/pause" -v >&2 || die "pause: the built binary does not run"
}

build_agnhost() { # WORK ROOTFS
  local work=$1 rootfs=$2 mod bin suite f
  mod=$(module_dir)
  check_module_tag agnhost "$mod/test/utils/image/manifest.go" 'configs\[Agnhost\] = '
  bin=$("$repo/hack/k8s/build.sh" agnhost)/agnhost
  [ -x "$bin" ] || die "hack/k8s/build.sh agnhost did not produce $bin"
  suite=$(decl agnhost build.suite)
  log "agnhost: static busybox from Debian $suite"
  mmdebstrap --mode=root --variant=extract --include="$(decl agnhost build.packages | paste -sd, -)" \
    "$suite" "$work/busybox" "${debian_sources[@]}" >"$work/mmdebstrap.log" 2>&1 \
    || { tail -30 "$work/mmdebstrap.log" >&2; die "agnhost: mmdebstrap failed (log above)"; }
  local busybox
  busybox=
  for f in "$work/busybox/bin/busybox" "$work/busybox/usr/bin/busybox"; do
    [ -f "$f" ] && busybox=$f && break
  done
  [ -n "$busybox" ] || die "agnhost: busybox-static did not provide a busybox binary"
  local bash_static=
  for f in "$work/busybox/bin/bash-static" "$work/busybox/usr/bin/bash-static"; do
    [ -f "$f" ] && bash_static=$f && break
  done
  [ -n "$bash_static" ] || die "agnhost: bash-static did not provide a bash-static binary"

  # Upstream's layout (test/images/agnhost/Dockerfile): /agnhost and its agnhost-2 link, /uploads
  # (netexec), the porter certificates at /, and the user and group a SupplementalGroups test uses.
  mkdir -p "$rootfs"/{bin,etc,dev,proc,sys,run,tmp,root,uploads,home/user-defined-in-image}
  chmod 1777 "$rootfs/tmp"
  install -m 0755 "$bin" "$rootfs/agnhost"
  ln -s agnhost "$rootfs/agnhost-2"
  install -m 0644 "$mod/test/images/agnhost/porter/localhost.crt" "$rootfs/localhost.crt"
  install -m 0600 "$mod/test/images/agnhost/porter/localhost.key" "$rootfs/localhost.key"
  install -m 0755 "$busybox" "$rootfs/bin/busybox"
  local applet
  for applet in $("$rootfs/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
  done
  install -m 0755 "$bash_static" "$rootfs/bin/bash"
  printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
    'user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh' \
    'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$rootfs/etc/passwd"
  printf '%s\n' 'root:x:0:' 'user-defined-in-image:x:1000:' \
    'group-defined-in-image:x:50000:user-defined-in-image' 'nogroup:x:65534:' >"$rootfs/etc/group"
  chown 1000:1000 "$rootfs/home/user-defined-in-image"
}

build() { # NAME ARCHIVE
  local name=$1 archive=$2 dir work start
  dir=$(dirname "$archive")
  mkdir -p "$dir"
  # One build per archive at a time: a second caller waits, then finds it built.
  exec 9>"$dir/.lock"
  flock 9
  if [ -s "$archive" ] && ! $force; then
    log "$name: reusing $archive"
    exec 9>&-
    return
  fi
  [ "$(id -u)" = 0 ] || die "$name: building needs root (mmdebstrap --mode=root, chroot, file ownership)"
  start=$(date +%s)
  work=$(mktemp -d "$dir/.build.XXXXXX")
  # shellcheck disable=SC2064 # expand now: the trap must remove this build's directory
  trap "rm -rf '$work'" EXIT
  "build_$name" "$work" "$work/rootfs"
  log "$name: packing $(du -sh "$work/rootfs" | cut -f1) into $archive"
  oci pack "$here/$name.toml" "$work/rootfs" "$archive" || die "$name: packing the image failed"
  rm -rf "$work"
  trap - EXIT
  echo "$name: built in $(($(date +%s) - start))s, $(stat -c %s "$archive") bytes, $(decl "$name" image.references | paste -sd' ' -)" >>"$dir/BUILD-INFO"
  log "$name: built in $(($(date +%s) - start))s ($(du -h "$archive" | cut -f1))"
  exec 9>&-
}

for name in "${names[@]}"; do
  archive=$(archive_of "$name")
  if [ "$mode" = build ]; then
    build "$name" "$archive"
  fi
  echo "$archive"
done
