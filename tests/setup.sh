#!/usr/bin/env bash
# tests/setup.sh: install what ferry's tests need on a Debian machine.
# Idempotent; needs root; only uses apt (Debian's package registry).
set -euo pipefail

# The one list of packages the tests need. Helpers of other tests append here.
#   containerd runc          containerd.rs (a real runtime calling ferry)
#   containernetworking-plugins  portmap, loopback, ... in /usr/lib/cni (chaining)
#   iproute2                 ip netns / ip -j (every e2e test)
#   nftables iptables        portmap's rules, ipamd's SNAT/isolation (inside node netns only)
#   iputils-ping             pods ping each other
#   busybox-static           httpd/wget in the chaining test, sandbox images for containerd
#   jq                       tests/demo.sh output
PACKAGES=(
	containerd
	runc
	containernetworking-plugins
	iproute2
	nftables
	iptables
	iputils-ping
	busybox-static
	jq
)

if [[ $(id -u) != 0 ]]; then
	echo "tests/setup.sh: run as root" >&2
	exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
	status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
	[[ $status == installed ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
	echo "tests/setup.sh: all ${#PACKAGES[@]} packages present"
	exit 0
fi

echo "tests/setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
