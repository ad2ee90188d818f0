#!/usr/bin/env bash
# A real multi-node Kubernetes cluster on this machine, every node in a network namespace.
#
#   scripts/cluster.sh up [--nodes N] [--agent none|np|anp|cnp] [--images DIR] [--dual-stack]
#                         [--no-check]
#   scripts/cluster.sh down                  stop everything, unmount, delete the namespaces
#   scripts/cluster.sh status                what runs, the nodes and pods (exit 0: all up)
#   scripts/cluster.sh kubeconfig            print the admin kubeconfig path (root namespace)
#   scripts/cluster.sh manifest np|anp|cnp   print the manifest --agent applies (image replaced)
#   scripts/cluster.sh exec NODE CMD...      run CMD in NODE's network namespace (node-1, ...,
#                                            or fabric: the control plane's); KUBECONFIG set
#   scripts/cluster.sh check                 smoke test: pod -> pod across nodes (and over IPv6
#                                            with --dual-stack), pod -> Service, in-cluster API
#                                            client through the kubernetes Service; with the agent
#                                            deployed, a deny-all NetworkPolicy is enforced
#
# Layout. The namespace knpc-fabric holds a bridge and the control plane (etcd, kube-apiserver
# on the bridge's address, controller-manager, scheduler). Each node is a namespace knpc-node-I
# with a veth on that bridge and its own containerd (cgroupfs, root/state/socket under the state
# dir), kubelet (own root dir and cgroup root /knpc-node-I) and kube-proxy (iptables mode, so it
# only writes the node namespace's ruleset). Pods are wired by the CNI ptp + host-local plugins
# from a static per-node /24; the fabric and every node route the other nodes' pod ranges. The
# root namespace keeps its interfaces, routes and rules: a loopback forwarder
# (hack/cluster/apiforward.py) lets clients there reach the API server.
#
# One cluster per machine: namespace and cgroup names are fixed (knpc-*), whatever the state dir.
# `up` first removes what a killed run left (processes, mounts, cgroups, namespaces), and waits
# until every node is Ready and the smoke test passes. Images (pause, agnhost, the agent) are not
# pulled: `up` imports the archives that `hack/images/build.sh all` prints, or those in --images.
#
# Environment: KNP_CLUSTER_DIR (state, default /run/knp-cluster), KNP_CACHE (build cache),
# KNP_CLUSTER_FABRIC (default 10.250.0: the fabric's /24, .1 is the API server, node I is .(10+I)),
# KNP_CLUSTER_PODS (default 10.244: node I gets 10.244.I.0/24),
# KNP_CLUSTER_SERVICES (default 10.96.0.0/16), KNP_CLUSTER_CRDS (CRD directory, default
# ../shared/crds next to the repository), KNP_CLUSTER_ANP_CRDS / KNP_CLUSTER_CNP_CRDS (the CRD
# files for --agent anp / cnp), KNP_AGENT_IMAGE (the agent image, default the manifests' own);
# with --dual-stack also KNP_CLUSTER_FABRIC6 (default fd6b:6e70:fab: the fabric's /64),
# KNP_CLUSTER_PODS6 (default fd6b:6e70:1: node I gets fd6b:6e70:1:I::/64) and
# KNP_CLUSTER_SERVICES6 (default fd6b:6e70:96::/112).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=${KNP_CLUSTER_DIR:-/run/knp-cluster}
D=${D%/}
# Teardown deletes it: an absolute path below the root, never / itself.
[[ "$D" =~ ^/[^/]+ ]] || { echo "cluster: error: KNP_CLUSTER_DIR must be an absolute path below /, not '${KNP_CLUSTER_DIR:-}'" >&2; exit 1; }
PREFIX=knpc-
FABRIC_NS=${PREFIX}fabric
BRIDGE=knpc-br
FABRIC=${KNP_CLUSTER_FABRIC:-10.250.0}
API_IP=$FABRIC.1
API_PORT=6443
PODS=${KNP_CLUSTER_PODS:-10.244}
POD_CIDR=$PODS.0.0/16
SVC_CIDR=${KNP_CLUSTER_SERVICES:-10.96.0.0/16}
# --dual-stack: IPv6 next to IPv4 (IPv4 stays the primary family). Unique local ranges.
FABRIC6=${KNP_CLUSTER_FABRIC6:-fd6b:6e70:fab}
API_IP6=$FABRIC6::1
PODS6=${KNP_CLUSTER_PODS6:-fd6b:6e70:1}
POD_CIDR6=$PODS6::/48
SVC_CIDR6=${KNP_CLUSTER_SERVICES6:-fd6b:6e70:96::/112}
DUAL=0
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1   # the v1.34 kubelet's default and the e2e suite's
AGNHOST_IMAGE=registry.k8s.io/e2e-test-images/agnhost:2.56
AGENT_IMAGE=${KNP_AGENT_IMAGE:-}
CRD_DIR=${KNP_CLUSTER_CRDS:-$repo/../shared/crds}

log() { echo "cluster: $*" >&2; }
die() { echo "cluster: error: $*" >&2; exit 1; }
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

node_name() { echo "node-$1"; }
node_ns() { echo "${PREFIX}node-$1"; }
node_ip() { echo "$FABRIC.$((10 + $1))"; }
node_pods() { echo "$PODS.$1.0/24"; }
node_ip6() { echo "$FABRIC6::$((10 + $1))"; }
node_pods6() { echo "$PODS6:$1::/64"; }
# Both families when --dual-stack, comma-separated, IPv4 first.
dual() { if [ "$DUAL" = 1 ]; then echo "$1,$2"; else echo "$1"; fi; }
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" -- "$@"; }

# Clients run inside the fabric namespace, where the API server is.
kc() { in_ns "$FABRIC_NS" "$K8S_BIN/kubectl" --kubeconfig "$D/admin-fabric.kubeconfig" "$@"; }

bins() {
  CP_BIN=$("$repo/hack/controlplane/build.sh" --print-path)
  K8S_BIN=$("$repo/hack/k8s/build.sh" --print-path)
  local b
  for b in "$CP_BIN/etcd" "$CP_BIN/kube-apiserver"; do
    [ -x "$b" ] || die "$b is missing: build it with hack/controlplane/build.sh"
  done
  for b in kubelet kube-proxy kube-scheduler kube-controller-manager kubectl; do
    [ -x "$K8S_BIN/$b" ] || die "$K8S_BIN/$b is missing: build it with hack/k8s/build.sh $b"
  done
}

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, mounts, cgroups)"; }

# ---------------------------------------------------------------------------------------------
# Teardown: everything is found from what it is (our namespaces, our cgroups, our state dir),
# not only from pid files, so the leftovers of a killed run go too.

our_netns_inodes() {
  local f
  for f in /run/netns/"$PREFIX"*; do
    [ -e "$f" ] && stat -L -c %i "$f" 2>/dev/null
  done
  return 0
}

# Processes of this cluster: in one of our network namespaces (control plane, containerd and
# its shims, kubelet, kube-proxy, hostNetwork pods), in one of our cgroups (every pod), or the
# API forwarder (in the root namespace: known by its arguments). Never this script's ancestors.
our_pids() {
  local inodes p ino args ancestors=" " q=$$
  while [ "$q" -gt 1 ] 2>/dev/null; do
    ancestors+="$q "
    q=$(awk '{ print $4 }' "/proc/$q/stat" 2>/dev/null) || break
  done
  inodes=" $(our_netns_inodes | tr '\n' ' ') "
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [[ "$ancestors" == *" $p "* ]] && continue
    ino=$(readlink "/proc/$p/ns/net" 2>/dev/null) || continue
    ino=${ino#net:[}; ino=${ino%]}
    if [[ "$inodes" == *" $ino "* ]]; then echo "$p"; continue; fi
    if grep -qs ":/${PREFIX}" "/proc/$p/cgroup"; then echo "$p"; continue; fi
    args=$(tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null) || continue
    if grep -qx '.*/hack/cluster/apiforward\.py' <<<"$args" && grep -qxF "/run/netns/$FABRIC_NS" <<<"$args"; then
      echo "$p"
    fi
  done
  return 0
}

# containerd's shims listen on sockets in /run/containerd/s (a fixed directory); a killed shim
# leaves its socket. Each node namespace lists the unix sockets made in it.
shim_sockets() {
  local ns
  for ns in /run/netns/"$PREFIX"node-*; do
    [ -e "$ns" ] || continue
    nsenter --net="$ns" -- cat /proc/self/net/unix 2>/dev/null |
      awk '$8 ~ "^/run/containerd/s/" { print $8 }'
  done
  return 0
}

our_mounts() {
  awk -v d="$D" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
    awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-
}

teardown() {
  local socks pids i m
  socks=$(shim_sockets | sort -u)
  for i in $(seq 1 30); do
    pids=$(our_pids)
    [ -n "$pids" ] || break
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.3
  done
  pids=$(our_pids)
  [ -z "$pids" ] || die "processes still alive after SIGKILL: $(tr '\n' ' ' <<<"$pids")"
  [ -z "$socks" ] || xargs -r rm -f <<<"$socks"
  for i in $(seq 1 10); do
    m=$(our_mounts)
    [ -n "$m" ] || break
    while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done <<<"$m"
  done
  [ -z "$(our_mounts)" ] || die "mounts left under $D: $(our_mounts | tr '\n' ' ')"
  # Cgroups: depth first, only ours (/knpc-*), in every v1 hierarchy.
  for i in $(seq 1 20); do
    [ -n "$(find /sys/fs/cgroup/*/ -maxdepth 1 -name "${PREFIX}*" -type d 2>/dev/null)" ] || break
    find /sys/fs/cgroup/*/"${PREFIX}"* -depth -type d -exec rmdir {} + 2>/dev/null || true
    sleep 0.2
  done
  local ns
  for ns in /run/netns/"$PREFIX"*; do
    [ -e "$ns" ] && ip netns delete "$(basename "$ns")"
  done
  # Fixed paths of the kubelet: its log symlinks in /var/log/containers (ours point into the
  # state dir) and the device-plugin socket every kubelet makes in /var/lib/kubelet.
  find /var/log/containers -maxdepth 1 -type l -lname "$D/*" -delete 2>/dev/null || true
  [ ! -S /var/lib/kubelet/device-plugins/kubelet.sock ] || rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  # libcni caches each attachment's result in /var/lib/cni/results (containerd 1.6 has no
  # setting for it); ours name their network namespace under the state dir.
  { grep -lsF "$D/" /var/lib/cni/results/* 2>/dev/null || true; } | xargs -r rm -f
  if [ -d "$D" ]; then
    rm -rf --one-file-system "$D"
  fi
}

# ---------------------------------------------------------------------------------------------
# Up

check_cidrs() {
  # None of our ranges may overlap an address or route of the root namespace.
  local ranges=("$FABRIC.0/24" "$POD_CIDR" "$SVC_CIDR")
  [ "$DUAL" = 0 ] || ranges+=("$FABRIC6::/64" "$POD_CIDR6" "$SVC_CIDR6")
  python3 - "${ranges[@]}" <<'EOF'
import ipaddress, subprocess, sys
ours = [ipaddress.ip_network(c) for c in sys.argv[1:]]
seen = []
for cmd in (["ip", "-o", "addr"], ["ip", "-4", "route", "show", "table", "all"], ["ip", "-6", "route", "show", "table", "all"]):
    for line in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines():
        for word in line.split():
            try:
                net = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            if net.prefixlen > 0 and not net.is_loopback:
                seen.append(net)
bad = [f"{o} overlaps {s}" for o in ours for s in seen if o.overlaps(s)]
if bad:
    sys.exit("the cluster's ranges clash with the machine's: " + "; ".join(bad)
             + " (set KNP_CLUSTER_FABRIC / KNP_CLUSTER_PODS / KNP_CLUSTER_SERVICES)")
EOF
}

ossl() { openssl "$@" >/dev/null 2>"$D/pki/openssl.err" || die "openssl $1 failed: $(cat "$D/pki/openssl.err")"; }

# cert NAME SUBJECT EXT: EC key + certificate signed by the cluster CA.
cert() {
  local name=$1 subj=$2 ext=$3
  ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$D/pki/$name.key"
  ossl req -new -key "$D/pki/$name.key" -subj "$subj" -out "$D/pki/$name.csr"
  ossl x509 -req -in "$D/pki/$name.csr" -CA "$D/pki/ca.crt" -CAkey "$D/pki/ca.key" \
    -CAcreateserial -sha256 -days 30 -extfile "$D/pki/openssl.cnf" -extensions "$ext" \
    -out "$D/pki/$name.crt"
}

make_pki() {
  mkdir -p "$D/pki"
  local svc_ip
  svc_ip=$(python3 -c 'import ipaddress,sys; print(ipaddress.ip_network(sys.argv[1])[1])' "$SVC_CIDR")
  cat >"$D/pki/openssl.cnf" <<EOF
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:$API_IP, IP:$svc_ip, IP:127.0.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
EOF
  ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$D/pki/ca.key"
  ossl req -new -x509 -key "$D/pki/ca.key" -subj "/CN=knp-cluster-ca" -sha256 -days 30 \
    -config "$D/pki/openssl.cnf" -extensions ca -out "$D/pki/ca.crt"
  cert apiserver "/CN=kube-apiserver" server
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client
  cert admin "/O=system:masters/CN=knp-admin" client
  cert controller-manager "/CN=system:kube-controller-manager" client
  cert scheduler "/CN=system:kube-scheduler" client
  cert kube-proxy "/CN=system:kube-proxy" client
  local i
  for i in $(seq 1 "$NODES"); do
    cert "$(node_name "$i")" "/O=system:nodes/CN=system:node:$(node_name "$i")" client
  done
  ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$D/pki/sa.key"
  ossl pkey -in "$D/pki/sa.key" -pubout -out "$D/pki/sa.pub"
  chmod 600 "$D"/pki/*.key
}

# kubeconfig FILE SERVER CERTNAME
kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: knp-cluster
  cluster:
    server: $2
    certificate-authority: $D/pki/ca.crt
users:
- name: $3
  user:
    client-certificate: $D/pki/$3.crt
    client-key: $D/pki/$3.key
contexts:
- name: knp-cluster
  context: {cluster: knp-cluster, user: $3}
current-context: knp-cluster
EOF
  chmod 600 "$1"
}

make_network() {
  ip netns add "$FABRIC_NS"
  in_ns "$FABRIC_NS" ip link set lo up
  in_ns "$FABRIC_NS" ip link add "$BRIDGE" type bridge
  in_ns "$FABRIC_NS" ip addr add "$API_IP/24" dev "$BRIDGE"
  in_ns "$FABRIC_NS" ip link set "$BRIDGE" up
  in_ns "$FABRIC_NS" sysctl -qw net.ipv4.ip_forward=1
  if [ "$DUAL" = 1 ]; then
    in_ns "$FABRIC_NS" ip addr add "$API_IP6/64" dev "$BRIDGE" nodad
    in_ns "$FABRIC_NS" sysctl -qw net.ipv6.conf.all.forwarding=1
  fi
  local i j ns
  for i in $(seq 1 "$NODES"); do
    ns=$(node_ns "$i")
    ip netns add "$ns"
    # Made inside the fabric, so the root namespace never holds either end, even briefly.
    in_ns "$FABRIC_NS" ip link add "knpc-n$i" type veth peer name eth0 netns "/run/netns/$ns"
    in_ns "$FABRIC_NS" ip link set "knpc-n$i" master "$BRIDGE" up
    in_ns "$ns" ip link set lo up
    in_ns "$ns" ip addr add "$(node_ip "$i")/24" dev eth0
    in_ns "$ns" ip link set eth0 up
    in_ns "$ns" ip route add default via "$API_IP"
    in_ns "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
    in_ns "$FABRIC_NS" ip route add "$(node_pods "$i")" via "$(node_ip "$i")"
    if [ "$DUAL" = 1 ]; then
      in_ns "$ns" ip addr add "$(node_ip6 "$i")/64" dev eth0 nodad
      in_ns "$ns" ip -6 route add default via "$API_IP6"
      in_ns "$ns" sysctl -qw net.ipv6.conf.all.forwarding=1
      in_ns "$FABRIC_NS" ip -6 route add "$(node_pods6 "$i")" via "$(node_ip6 "$i")"
    fi
  done
  for i in $(seq 1 "$NODES"); do
    for j in $(seq 1 "$NODES"); do
      [ "$i" != "$j" ] || continue
      in_ns "$(node_ns "$i")" ip route add "$(node_pods "$j")" via "$(node_ip "$j")"
      [ "$DUAL" = 0 ] || in_ns "$(node_ns "$i")" ip -6 route add "$(node_pods6 "$j")" via "$(node_ip6 "$j")"
    done
  done
}

# spawn NAME NETNS|root CMD...: a daemon in its own session, log and pid under the state dir.
spawn() {
  local name=$1 ns=$2
  shift 2
  if [ "$ns" = root ]; then
    setsid "$@" >"$D/log/$name.log" 2>&1 </dev/null &
  else
    nsenter --net="/run/netns/$ns" -- setsid "$@" >"$D/log/$name.log" 2>&1 </dev/null &
  fi
  echo $! >"$D/pid/$name"
}

alive() { local p; p=$(cat "$D/pid/$1" 2>/dev/null) && kill -0 "$p" 2>/dev/null; }

# wait_for WHAT SECONDS PROC CMD...: until CMD succeeds; PROC (a spawn name, or -) must live.
wait_for() {
  local what=$1 secs=$2 proc=$3
  shift 3
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ "$proc" != - ] && ! alive "$proc"; then
      die "$proc exited while waiting for $what; the end of $D/log/$proc.log:
$(tail -n 25 "$D/log/$proc.log")"
    fi
    [ $SECONDS -lt $end ] || die "$what not after ${secs}s$([ "$proc" = - ] || echo " (see $D/log/$proc.log)")"
    sleep 0.5
  done
}

start_control_plane() {
  mkdir -p "$D/cp"
  spawn etcd "$FABRIC_NS" "$CP_BIN/etcd" --name=knpc --data-dir="$D/cp/etcd" \
    --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
    --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
    --initial-cluster=knpc=http://127.0.0.1:2380 --unsafe-no-fsync --log-level=warn
  spawn kube-apiserver "$FABRIC_NS" "$CP_BIN/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --advertise-address="$API_IP" --secure-port="$API_PORT" \
    --cert-dir="$D/cp/apiserver-certs" \
    --tls-cert-file="$D/pki/apiserver.crt" --tls-private-key-file="$D/pki/apiserver.key" \
    --client-ca-file="$D/pki/ca.crt" \
    --kubelet-client-certificate="$D/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$D/pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-cluster-ip-range="$(dual "$SVC_CIDR" "$SVC_CIDR6")" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$D/pki/sa.pub" \
    --service-account-signing-key-file="$D/pki/sa.key" \
    --allow-privileged=true
  kubeconfig "$D/admin-fabric.kubeconfig" "https://$API_IP:$API_PORT" admin
  kubeconfig "$D/cp/controller-manager.kubeconfig" "https://$API_IP:$API_PORT" controller-manager
  kubeconfig "$D/cp/scheduler.kubeconfig" "https://$API_IP:$API_PORT" scheduler
  wait_for "kube-apiserver ready" 120 kube-apiserver kc get --raw /readyz
  spawn kube-controller-manager "$FABRIC_NS" "$K8S_BIN/kube-controller-manager" \
    --kubeconfig="$D/cp/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false \
    --service-account-private-key-file="$D/pki/sa.key" --root-ca-file="$D/pki/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file="$D/pki/ca.crt" --cluster-signing-key-file="$D/pki/ca.key" \
    --service-cluster-ip-range="$(dual "$SVC_CIDR" "$SVC_CIDR6")" \
    --cluster-cidr="$(dual "$POD_CIDR" "$POD_CIDR6")" --allocate-node-cidrs=false
  spawn kube-scheduler "$FABRIC_NS" "$K8S_BIN/kube-scheduler" \
    --kubeconfig="$D/cp/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false
  # Clients in the root namespace: a loopback port forwarded into the fabric.
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  spawn apiforward root python3 "$repo/hack/cluster/apiforward.py" "$port" \
    "/run/netns/$FABRIC_NS" "$API_IP" "$API_PORT"
  kubeconfig "$D/admin.kubeconfig" "https://127.0.0.1:$port" admin
  wait_for "the API through 127.0.0.1:$port" 30 apiforward \
    "$K8S_BIN/kubectl" --kubeconfig "$D/admin.kubeconfig" get --raw /readyz
}

# Archives to import into every node: --images DIR, else what hack/images/build.sh all prints.
find_images() {
  if [ -n "$IMAGES_DIR" ]; then
    [ -d "$IMAGES_DIR" ] || die "--images $IMAGES_DIR is not a directory"
    find "$IMAGES_DIR" -maxdepth 1 -name '*.tar' | sort
  elif [ -x "$repo/hack/images/build.sh" ]; then
    "$repo/hack/images/build.sh" all || die "hack/images/build.sh all failed"
  else
    die "no images: hack/images/build.sh is not there; give --images DIR (OCI archives of \
$PAUSE_IMAGE, $AGNHOST_IMAGE and, for --agent, the agent's image)"
  fi
}

import_images() {
  local sock=$1 a
  shift
  if [ -x "$repo/hack/images/import.sh" ]; then
    "$repo/hack/images/import.sh" --address "$sock" "$@" >/dev/null
  else
    for a in "$@"; do
      ctr -a "$sock" -n k8s.io images import "$a" >/dev/null || die "importing $a failed"
    done
  fi
}

start_node() {
  local i=$1 name ns ip dir
  name=$(node_name "$i") ns=$(node_ns "$i") ip=$(node_ip "$i") dir=$D/$name
  mkdir -p "$dir/containerd" "$dir/cni/net.d" "$dir/cni/ipam" "$dir/kubelet" "$dir/pod-logs"
  # kubelet needs its cgroup root to exist in every hierarchy (cgroupfs driver, cgroup v1).
  local h
  for h in /sys/fs/cgroup/*/; do
    [ "$h" = /sys/fs/cgroup/unified/ ] || mkdir -p "$h${PREFIX}$name"
  done
  cat >"$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$dir/containerd/containerd.sock"
[ttrpc]
  address = "$dir/containerd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  netns_mounts_under_state_dir = true
  # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which this machine may not grant: keep the
  # pods at or above containerd's own score.
  restrict_oom_score_adj = true
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$dir/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
EOF
  cat >"$dir/cni/net.d/10-knpc.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "${PREFIX}$name",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "$(node_pods "$i")"}]$([ "$DUAL" = 0 ] || echo ", [{\"subnet\": \"$(node_pods6 "$i")\"}]")],
        "routes": [{"dst": "0.0.0.0/0"}$([ "$DUAL" = 0 ] || echo ', {"dst": "::/0"}')]
      }
    }
  ]
}
EOF
  spawn "containerd-$name" "$ns" containerd --config "$dir/containerd/config.toml"
  wait_for "containerd of $name" 30 "containerd-$name" ctr -a "$dir/containerd/containerd.sock" version
  import_images "$dir/containerd/containerd.sock" "${ARCHIVES[@]}"

  kubeconfig "$dir/kubelet.kubeconfig" "https://$API_IP:$API_PORT" "$name"
  cat >"$dir/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $D/pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /${PREFIX}$name
cgroupsPerQOS: true
containerRuntimeEndpoint: unix://$dir/containerd/containerd.sock
failSwapOn: false
podLogsDir: $dir/pod-logs
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
maxPods: 250
EOF
  spawn "kubelet-$name" "$ns" "$K8S_BIN/kubelet" --config="$dir/kubelet-config.yaml" \
    --kubeconfig="$dir/kubelet.kubeconfig" --root-dir="$dir/kubelet" --cert-dir="$dir/kubelet/pki" \
    --hostname-override="$name" --node-ip="$(dual "$ip" "$(node_ip6 "$i")")"

  kubeconfig "$dir/kube-proxy.kubeconfig" "https://$API_IP:$API_PORT" kube-proxy
  cat >"$dir/kube-proxy-config.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $dir/kube-proxy.kubeconfig}
mode: iptables
hostnameOverride: $name
clusterCIDR: $(dual "$POD_CIDR" "$POD_CIDR6")
bindAddress: $ip
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [primary]
# Conntrack tables are the machine's, not the namespace's: leave them as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  spawn "kube-proxy-$name" "$ns" "$K8S_BIN/kube-proxy" --config="$dir/kube-proxy-config.yaml"
}

node_ready() {
  [ "$(kc get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

wait_nodes() {
  local i name
  for i in $(seq 1 "$NODES"); do
    name=$(node_name "$i")
    wait_for "node $name registered" 120 "kubelet-$name" kc get node "$name"
    # Static pod ranges (the CNI config above): the node object says the same.
    local cidrs
    cidrs=$(dual "$(node_pods "$i")" "$(node_pods6 "$i")")
    kc patch node "$name" --type merge \
      -p "{\"spec\":{\"podCIDR\":\"$(node_pods "$i")\",\"podCIDRs\":[\"${cidrs//,/\",\"}\"]}}" >/dev/null
  done
  for i in $(seq 1 "$NODES"); do
    name=$(node_name "$i")
    wait_for "node $name Ready" 180 "kubelet-$name" node_ready "$name"
  done
}

manifest_of() {
  case "$1" in
    np) echo install.yaml ;;
    anp) echo install-anp.yaml ;;
    cnp) echo install-cnp.yaml ;;
    *) die "--agent wants none, np, anp or cnp, not '$1'" ;;
  esac
}

# The image the agent runs: KNP_AGENT_IMAGE, else the manifest's own.
agent_image() {
  local image
  image=$(awk '$1 == "image:" { print $2; exit }' "$repo/$1")
  [ -n "$image" ] || die "no image: line in $1"
  echo "${AGENT_IMAGE:-$image}"
}

# The manifest as users apply it, with only the image replaced.
render_manifest() {
  local from
  from=$(AGENT_IMAGE='' agent_image "$1")
  # Exact string comparison (no regex): image names hold dots.
  awk -v from="$from" -v to="$(agent_image "$1")" '
    $1 == "image:" && $2 == from && NF == 2 { sub(/image:.*/, "image: " to) }
    { print }' "$repo/$1"
}

install_agent() {
  local manifest crds=()
  case "$AGENT" in
    none) return 0 ;;
    np) manifest=install.yaml ;;
    # The releases the README installs (the agent is tested against them); KNP_CLUSTER_ANP_CRDS
    # and KNP_CLUSTER_CNP_CRDS (space-separated files) choose others, e.g. a suite's own.
    anp) manifest=install-anp.yaml
      read -r -a crds <<<"${KNP_CLUSTER_ANP_CRDS:-$CRD_DIR/v1alpha1-adminnetworkpolicies.yaml $CRD_DIR/v1alpha1-baselineadminnetworkpolicies.yaml}" ;;
    cnp) manifest=install-cnp.yaml
      read -r -a crds <<<"${KNP_CLUSTER_CNP_CRDS:-$CRD_DIR/v1alpha2-clusternetworkpolicies.yaml}" ;;
  esac
  local f
  for f in "${crds[@]}"; do
    [ -f "$f" ] || die "CRD file $f is missing (set KNP_CLUSTER_CRDS)"
    kc apply --server-side -f "$f" >/dev/null
  done
  for f in "${crds[@]}"; do
    kc wait --for=condition=Established --timeout=60s -f "$f" >/dev/null
  done
  local image
  image=$(agent_image "$manifest")
  # No registry: the image must have been imported into every node.
  local i images
  for i in $(seq 1 "$NODES"); do
    # Listed first, then searched: grep -q would end the pipe early (SIGPIPE under pipefail).
    images=$(ctr -a "$D/$(node_name "$i")/containerd/containerd.sock" -n k8s.io images ls -q)
    grep -qxF "$image" <<<"$images" ||
      die "the agent image $image is not in $(node_name "$i")'s containerd: build it with hack/images/build.sh agent, or put its archive in --images"
  done
  render_manifest "$manifest" | kc apply -f - >/dev/null
  log "agent: $manifest applied (image $image); waiting for the DaemonSet"
  if ! kc -n kube-system rollout status daemonset/kube-network-policies --timeout=180s >&2; then
    kc -n kube-system get pods -l app=kube-network-policies -o wide >&2 || true
    kc -n kube-system logs -l app=kube-network-policies --tail=10 --prefix >&2 || true
    die "the agent's DaemonSet did not become ready (kubectl -n kube-system describe pods -l app=kube-network-policies)"
  fi
}

# ---------------------------------------------------------------------------------------------
# Smoke check

check() {
  local ns=knpc-check i n1 n2 ip1 ip2 svc api
  n1=$(node_name 1) n2=$(node_name "$(( NODES > 1 ? 2 : 1 ))")
  kc delete namespace "$ns" --ignore-not-found --wait=true >/dev/null
  wait_for "default service account" 60 - kc -n default get serviceaccount default
  kc create namespace "$ns" >/dev/null
  wait_for "service account in $ns" 60 - kc -n "$ns" get serviceaccount default
  for i in 1 2; do
    local node=$n1
    [ "$i" = 2 ] && node=$n2
    kc -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: srv-$i, labels: {app: srv-$i}}
spec:
  nodeSelector: {kubernetes.io/hostname: $node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: netexec
    image: $AGNHOST_IMAGE
    imagePullPolicy: Never
    args: [netexec, --http-port=8080]
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
EOF
  done
  kc -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: srv-1}
spec:
  selector: {app: srv-1}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: apiclient}
spec:
  nodeSelector: {kubernetes.io/hostname: $n2}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: $AGNHOST_IMAGE
    imagePullPolicy: Never
    args: [inclusterclient, --poll-interval=1]
EOF
  kc -n "$ns" wait --for=condition=Ready --timeout=120s pod/srv-1 pod/srv-2 pod/apiclient >/dev/null ||
    die "check: pods not Ready: $(kc -n "$ns" get pods -o wide 2>&1)"
  ip1=$(kc -n "$ns" get pod srv-1 -o jsonpath='{.status.podIP}')
  ip2=$(kc -n "$ns" get pod srv-2 -o jsonpath='{.status.podIP}')
  svc=$(kc -n "$ns" get service srv-1 -o jsonpath='{.spec.clusterIP}')
  api=$(kc -n default get service kubernetes -o jsonpath='{.spec.clusterIP}')
  probe() {
    local from=$1 to=$2 what=$3 out try
    # A few tries: kube-proxy programs a new Service's rules shortly after its endpoints.
    for try in 1 2 3 4 5 6 7 8 9 10; do
      if out=$(kc -n "$ns" exec "$from" -- /agnhost connect --timeout=3s "$to" 2>&1); then
        log "check: $what ($from -> $to) ok$([ "$try" = 1 ] || echo " (try $try)")"
        return 0
      fi
      sleep 1
    done
    die "check: $what ($from -> $to) failed 10 times: $out"
  }
  probe srv-2 "$ip1:8080" "pod -> pod on $n1"
  probe srv-1 "$ip2:8080" "pod -> pod on $n2"
  if [[ "$(kc get node "$n1" -o jsonpath='{.spec.podCIDRs[*]}')" == *:* ]]; then
    local ip6
    ip6=$(kc -n "$ns" get pod srv-1 -o jsonpath='{.status.podIPs[1].ip}')
    [ -n "$ip6" ] || die "check: dual-stack, but srv-1 has no IPv6 address"
    probe srv-2 "[$ip6]:8080" "pod -> pod on $n1 over IPv6"
  fi
  probe srv-2 "$svc:80" "pod -> ClusterIP Service"
  probe srv-2 "$api:443" "pod -> kubernetes Service"
  # The in-cluster client: service account token over the kubernetes Service ClusterIP.
  local end=$((SECONDS + 30)) logs
  while :; do
    logs=$(kc -n "$ns" logs apiclient 2>&1 || true)
    if grep -q "status=failed" <<<"$logs"; then die "check: in-cluster API client failed: $(tail -n 5 <<<"$logs")"; fi
    [ "$(grep -c "calling /healthz" <<<"$logs")" -ge 3 ] && break
    [ $SECONDS -lt $end ] || die "check: in-cluster API client made no calls: $(tail -n 5 <<<"$logs")"
    sleep 1
  done
  log "check: in-cluster API client (service account, kubernetes Service) ok"
  if kc -n kube-system get daemonset kube-network-policies >/dev/null 2>&1; then
    # The agent runs: a deny-all-ingress NetworkPolicy on srv-1 must cut srv-2 -> srv-1 (across
    # nodes) and leave srv-1 -> srv-2 alone.
    kc -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-srv-1}
spec:
  podSelector: {matchLabels: {app: srv-1}}
  policyTypes: [Ingress]
EOF
    end=$((SECONDS + 30))
    while kc -n "$ns" exec srv-2 -- /agnhost connect --timeout=2s "$ip1:8080" >/dev/null 2>&1; do
      [ $SECONDS -lt $end ] || die "check: the agent did not enforce a deny-all NetworkPolicy within 30s"
      sleep 1
    done
    log "check: NetworkPolicy deny-all ingress enforced (srv-2 -> srv-1 blocked)"
    probe srv-1 "$ip2:8080" "pod -> pod not selected by the policy"
  fi
  kc delete namespace "$ns" --wait=false >/dev/null
}

# ---------------------------------------------------------------------------------------------

# Exit status 0 only when every process runs and every node is Ready (scripts can reuse it).
status() {
  local f s ok=0 i
  if [ ! -d "$D/pid" ]; then echo "no cluster (state dir $D)"; return 1; fi
  for f in "$D"/pid/*; do
    if alive "$(basename "$f")"; then s=running; else s=DEAD ok=1; fi
    printf '%-32s %s pid %s\n' "$(basename "$f")" "$s" "$(cat "$f")"
  done
  kc get nodes -o wide 2>&1 || ok=1
  kc get pods -A -o wide 2>&1 || ok=1
  for i in $(seq 1 "$NODES"); do
    node_ready "$(node_name "$i")" 2>/dev/null || { echo "$(node_name "$i") is not Ready"; ok=1; }
  done
  return $ok
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
NODES=2
AGENT=none
IMAGES_DIR=
CHECK=1
case "$cmd" in
  up)
    while [ $# -gt 0 ]; do
      case "$1" in
        --nodes) NODES=${2:-}; shift 2 ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        --agent) AGENT=${2:-}; shift 2 ;;
        --agent=*) AGENT=${1#*=}; shift ;;
        --images) IMAGES_DIR=${2:-}; shift 2 ;;
        --images=*) IMAGES_DIR=${1#*=}; shift ;;
        --no-check) CHECK=0; shift ;;
        --dual-stack) DUAL=1; shift ;;
        *) log "unknown option '$1'"; usage ;;
      esac
    done
    [[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "--nodes wants a number from 1 to 99, not '$NODES'"
    case "$AGENT" in none|np|anp|cnp) ;; *) die "--agent wants none, np, anp or cnp, not '$AGENT'" ;; esac
    need_root
    bins
    for t in containerd ctr runc nsenter openssl python3 iptables; do
      command -v "$t" >/dev/null || die "$t is not installed"
    done
    for p in ptp host-local loopback; do
      [ -x "/usr/lib/cni/$p" ] || die "/usr/lib/cni/$p is missing (apt-get install containernetworking-plugins)"
    done
    start=$SECONDS
    archives=$(find_images) || exit 1
    mapfile -t ARCHIVES <<<"$archives"
    [ -n "$archives" ] || die "no image archives to import"
    teardown
    check_cidrs
    mkdir -p "$D/log" "$D/pid"
    echo "$NODES" >"$D/nodes"
    make_pki
    make_network
    start_control_plane
    log "control plane up ($((SECONDS - start))s)"
    for i in $(seq 1 "$NODES"); do start_node "$i"; done
    wait_nodes
    log "$NODES nodes Ready ($((SECONDS - start))s)"
    install_agent
    [ "$CHECK" = 0 ] || check
    log "up in $((SECONDS - start))s; kubeconfig: $D/admin.kubeconfig"
    ;;
  down)
    [ $# = 0 ] || usage
    need_root
    start=$SECONDS
    teardown
    log "down in $((SECONDS - start))s"
    ;;
  status)
    need_root
    [ -f "$D/nodes" ] && NODES=$(cat "$D/nodes")
    bins
    status
    ;;
  manifest)
    [ $# = 1 ] || usage
    render_manifest "$(manifest_of "$1")"
    ;;
  kubeconfig)
    [ -f "$D/admin.kubeconfig" ] || die "no cluster: $D/admin.kubeconfig is missing (scripts/cluster.sh up)"
    echo "$D/admin.kubeconfig"
    ;;
  exec)
    [ $# -ge 2 ] || usage
    need_root
    node=$1
    shift
    case "$node" in
      fabric|"$FABRIC_NS") ns=$FABRIC_NS ;;
      [0-9]*) ns=$(node_ns "$node") ;;
      "$PREFIX"*) ns=$node ;;
      *) ns=$PREFIX$node ;;
    esac
    [ -e "/run/netns/$ns" ] || die "no network namespace $ns (there are: $(cd /run/netns 2>/dev/null && echo "$PREFIX"*))"
    K8S_BIN=$("$repo/hack/k8s/build.sh" --print-path)
    export KUBECONFIG=$D/admin-fabric.kubeconfig PATH=$K8S_BIN:$PATH
    exec nsenter --net="/run/netns/$ns" -- "$@"
    ;;
  check)
    need_root
    [ -f "$D/nodes" ] || die "no cluster (state dir $D)"
    NODES=$(cat "$D/nodes")
    bins
    check
    ;;
  -h|--help) usage 0 ;;
  *) log "unknown command '$cmd'"; usage ;;
esac
