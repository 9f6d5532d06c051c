#!/usr/bin/env bash
# tests/demo.sh: ferry on one node, end to end, in network namespaces only.
#
# Builds ferry, makes an underlay "fabric" namespace and a node namespace,
# starts ipamd in the node, networks two pods with the real ferry plugin (as
# a container runtime would: CNI_* environment, config on stdin), shows them
# pinging each other, prints ipamctl's allocations, deletes both pods and
# cleans up everything. Nothing is changed in the root network namespace.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
if [[ $(id -u) != 0 ]]; then
	echo "tests/demo.sh: run as root (it creates network namespaces)" >&2
	exit 1
fi
if ! command -v cargo >/dev/null && [[ -x ${HOME:-/root}/.cargo/bin/cargo ]]; then
	PATH=${HOME:-/root}/.cargo/bin:$PATH
fi

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() {
	printf '$ %s\n' "$*"
	"$@"
}

say "setup and build"
tests/setup.sh
cargo build --release -p ferry -p ferry-ipamd -p ferry-ipamctl
BIN=${FERRY_BIN_DIR:-$ROOT/target/release}

ID=fyd$$
FAB=$ID-fab
NODE=$ID-node
PODS=("$ID-pod-a" "$ID-pod-b")
WORK=$(mktemp -d /tmp/ferry-demo.XXXXXX)
SOCK=$WORK/ipamd.sock
IPAMD_PID=""

cleanup() {
	set +e
	say "cleaning up"
	if [[ -n $IPAMD_PID ]] && kill -0 "$IPAMD_PID" 2>/dev/null; then
		kill -TERM "$IPAMD_PID"
		wait "$IPAMD_PID" 2>/dev/null
	fi
	for ns in "${PODS[@]}" "$NODE" "$FAB"; do
		ip netns del "$ns" 2>/dev/null
	done
	rm -rf "$WORK"
	echo "removed namespaces ${PODS[*]} $NODE $FAB and $WORK"
}
trap cleanup EXIT

say "the world: fabric $FAB (bridge br0) and node $NODE (192.168.77.10 on eth0)"
ip netns add "$FAB"
ip netns add "$NODE"
ip -n "$FAB" link add br0 type bridge
ip -n "$FAB" addr add 192.168.77.1/24 dev br0
ip -n "$FAB" link set br0 up
ip -n "$FAB" link add n1 type veth peer name eth0 netns "$NODE"
ip -n "$FAB" link set n1 master br0 up
ip -n "$NODE" addr add 192.168.77.10/24 dev eth0
ip -n "$NODE" link set eth0 up
ip -n "$NODE" route add default via 192.168.77.1 # a node has a default route
ip -n "$NODE" link set lo up

say "ipamd in the node namespace (pod CIDR 10.244.0.0/16, socket $SOCK)"
ip netns exec "$NODE" "$BIN/ipamd" --socket "$SOCK" --state-dir "$WORK/state" \
	--node-name demo-node --pod-cidr 10.244.0.0/16 --cooldown 1 >"$WORK/ipamd.log" 2>&1 &
IPAMD_PID=$!
deadline=$((SECONDS + 30))
until ip netns exec "$NODE" "$BIN/ipamctl" --socket "$SOCK" status >/dev/null 2>&1; do
	if ((SECONDS >= deadline)) || ! kill -0 "$IPAMD_PID" 2>/dev/null; then
		echo "ipamd did not become ready; its log:" >&2
		tail -n 30 "$WORK/ipamd.log" >&2
		exit 1
	fi
	sleep 0.1
done
run ip netns exec "$NODE" "$BIN/ipamctl" --socket "$SOCK" status

NETCONF=$(jq -n --arg sock "$SOCK" '{cniVersion: "1.1.0", name: "ferry-demo", type: "ferry",
	ipamd: {socket: $sock, timeoutMs: 5000}, mtu: 0, logFile: "", logLevel: "info"}')

# cni VERB POD: run the ferry plugin in the node namespace as a runtime would.
cni() {
	local verb=$1 pod=$2
	printf '%s' "$NETCONF" | ip netns exec "$NODE" env -i PATH="$PATH" \
		CNI_COMMAND="$verb" CNI_CONTAINERID="ctr-${pod##*-pod-}" CNI_NETNS="/run/netns/$pod" \
		CNI_IFNAME=eth0 CNI_PATH="$BIN" \
		CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$pod" \
		"$BIN/ferry" 2>>"$WORK/cni.log"
}

declare -A IP
for pod in "${PODS[@]}"; do
	say "ADD $pod"
	ip netns add "$pod"
	ip -n "$pod" link set lo up
	result=$(cni ADD "$pod")
	jq . <<<"$result"
	IP[$pod]=$(jq -r '.ips[0].address | split("/")[0]' <<<"$result")
done

A=${PODS[0]} B=${PODS[1]}
say "inside $A"
run ip -n "$A" -br addr show dev eth0
run ip -n "$A" route
say "on the node"
run ip -n "$NODE" -br link show type veth
run ip -n "$NODE" route

say "$A (${IP[$A]}) pings $B (${IP[$B]}), and the other way"
run ip netns exec "$A" ping -c 3 -W 2 "${IP[$B]}"
run ip netns exec "$B" ping -c 3 -W 2 "${IP[$A]}"

say "ipamctl allocations"
run ip netns exec "$NODE" "$BIN/ipamctl" --socket "$SOCK" allocations

for pod in "${PODS[@]}"; do
	say "DEL $pod"
	cni DEL "$pod"
	echo "ok"
done
say "after DEL"
run ip netns exec "$NODE" "$BIN/ipamctl" --socket "$SOCK" allocations
run ip -n "$NODE" -br link show type veth
say "demo done"
