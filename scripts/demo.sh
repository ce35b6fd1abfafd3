#!/usr/bin/env bash
# make demo: an isolated topology, then cleanwall run enforcing
# examples/demo-policy.yaml on a sandbox.
#
#   sandbox ──ptp (CNI)── node (no uplink; cleanwall runs here) ──veth── remote 198.51.100.10
#
# Everything is removed on exit, also when interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
export BIN
NODE=cwdemo-node
REMOTE=cwdemo-remote

if [ "$(id -u)" != 0 ]; then
	echo "make demo needs root (network namespaces, BPF): sudo make demo" >&2
	exit 1
fi

cleanup() {
	for ns in $REMOTE $NODE; do
		ip netns pids $ns 2>/dev/null | xargs -r kill 2>/dev/null || true
	done
	sleep 0.2
	ip netns del $NODE 2>/dev/null || true
	ip netns del $REMOTE 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo; echo "interrupted: cleaning up"; exit 130' INT TERM
cleanup

# The pins that keep a sandbox enforced must outlive cleanwall: under ip netns
# exec (a private mount namespace) they go to the host's bpffs, which every
# systemd host mounts at boot and a bare machine may not have.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

echo "== building the demo topology (node namespace without uplink, remote serving 198.51.100.10:8080)"
ip netns add $NODE
ip netns add $REMOTE
ip -n $NODE link set lo up
ip -n $REMOTE link set lo up
ip -n $NODE link add to-remote type veth peer name to-node netns $REMOTE
ip -n $NODE addr add 198.51.100.1/24 dev to-remote
ip -n $NODE addr add 2001:db8:100::1/64 dev to-remote nodad
ip -n $REMOTE addr add 198.51.100.10/24 dev to-node
ip -n $REMOTE addr add 2001:db8:100::10/64 dev to-node nodad
ip -n $NODE link set to-remote up
ip -n $REMOTE link set to-node up
# The remote could answer the sandbox directly, and the node forwards:
# only cleanwall stands between the sandbox and the remote.
ip -n $REMOTE route add 10.0.0.0/8 via 198.51.100.1
ip -n $REMOTE route add fd00::/8 via 2001:db8:100::1
ip netns exec $NODE sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
ip netns exec $REMOTE "$BIN/cleanwall-demo" serve &
sleep 0.3

echo "== cleanwall run --policy examples/demo-policy.yaml -- bash examples/demo/sandbox.sh"
echo "   (policy: only TCP 198.51.100.10:8080, through the open-mode proxy)"
echo
ip netns exec $NODE "$BIN/cleanwall" run --policy examples/demo-policy.yaml --name demo -- bash examples/demo/sandbox.sh
