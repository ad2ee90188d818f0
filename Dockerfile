# kube-network-policies (Python agent) image.
#
#   docker build -t registry.k8s.io/networking/kube-network-policies-python:v0.1.0 .
#
# The install manifests (install*.yaml) run it as a DaemonSet: hostNetwork, root with only
# CAP_NET_ADMIN. Its ENTRYPOINT is `kube-network-policies run`; the manifests pass the flags.
# hack/images/build.sh builds the same image without Docker, from hack/images/agent.toml;
# tests/unit/test_images.py checks the two agree, so a change here goes there too.
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="kube-network-policies" \
      org.opencontainers.image.description="Kubernetes NetworkPolicy, AdminNetworkPolicy and ClusterNetworkPolicy agent: nftables + NFQUEUE dataplane, Python policy engine" \
      org.opencontainers.image.licenses="Apache-2.0"

# Runtime tools the agent runs as subprocesses:
#   nftables  `nft`: the ruleset (one `nft -f -` transaction per sync) and backend detection;
#   iptables  `iptables`/`ip6tables`: only on kernels without the nft `queue` expression, where
#             one iptables NFQUEUE rule per family and hook queues the packets nft marked.
# Debian's iptables is iptables-nft (netlink, like nft); set the alternatives explicitly so
# iptables-legacy, which needs CAP_NET_RAW and loads modules itself, is never picked.
# Not installed: conntrack and iproute2 (the agent does not run them outside the lab) and kmod
# (the kernel autoloads the netfilter modules with the node's own modprobe).
# Versions are not pinned: bookworm's security updates replace old package versions on the
# mirror, which would break pinned builds; the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables iptables \
    && update-alternatives --set iptables /usr/sbin/iptables-nft \
    && update-alternatives --set ip6tables /usr/sbin/ip6tables-nft \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Only what the package build needs (see .dockerignore); README.md is the package's readme.
# The package without its lab/ subpackage (.dockerignore leaves it out): the lab is the scenario
# runner, the benchmarks and the test control plane, which the agent never imports (only the CLI's
# `lab` and `bench` commands do, and they say that the lab is not installed), and which needs
# tools this image does not have (ip, conntrack, gcc, Go). Less code in an image that runs as
# root with CAP_NET_ADMIN on every node. The build checks both: the agent imports, the lab does not.
WORKDIR /usr/src/kube-network-policies
COPY pyproject.toml README.md ./
COPY src/ ./src/
RUN pip install --no-cache-dir . \
    && kube-network-policies --help > /dev/null \
    && python -c "import kube_network_policies.agent, kube_network_policies.explain" \
    && ! python -c "import kube_network_policies.lab" 2> /dev/null

# No USER: the agent runs as root inside the container. Kubernetes gives added capabilities
# (NET_ADMIN) only to root; a non-root process would need file capabilities on python3, nft
# and iptables, which also require allowing privilege escalation. The manifests instead drop
# every capability but NET_ADMIN, forbid privilege escalation and mount the root filesystem
# read-only, so root here holds nothing beyond CAP_NET_ADMIN.
WORKDIR /
ENTRYPOINT ["kube-network-policies", "run"]
