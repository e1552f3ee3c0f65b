#!/bin/bash
# Same-node figures with tools nobody here wrote: iperf3 throughput and
# sockperf ping-pong latency between two processes on one node, with no mesh,
# with smesh copy and with smesh splice, in interleaved rounds. Each mode gets
# its own network namespace (and smeshd); everything made is named
# smesh-test-tools-* and removed on exit.
# Usage (root, after make build): hack/samenode-tools.sh [seconds-per-run] [rounds]
set -u
T=${1:-3}; R=${2:-3}
SMESHD=$(realpath "$(dirname "$0")/../bin/smeshd")
for t in iperf3 sockperf nsenter python3 "$SMESHD"; do command -v "$t" >/dev/null || { echo "needs $t"; exit 2; }; done
CGROOT=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
D=$(mktemp -d /tmp/smesh-test-tools.XXXXXX)
MODES="direct copy splice"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for m in $MODES; do
    [ -d "$CGROOT/smesh-test-tools-$m" ] && echo 1 > "$CGROOT/smesh-test-tools-$m/cgroup.kill"
    [ -d "$CGROOT/smesh-test-tools-$m-d" ] && echo 1 > "$CGROOT/smesh-test-tools-$m-d/cgroup.kill"
    sleep 0.2
    rmdir "$CGROOT/smesh-test-tools-$m" "$CGROOT/smesh-test-tools-$m-d" 2>/dev/null
    ip netns del "smesh-test-tools-$m" 2>/dev/null
  done
  rm -rf "$D"
}
trap cleanup EXIT

# inmode MODE CMD...: run CMD in MODE's namespace and workload cgroup.
inmode() { local m=$1; shift; nsenter --net="/run/netns/smesh-test-tools-$m" bash -c "echo \$\$ > $CGROOT/smesh-test-tools-$m/cgroup.procs; exec $*"; }

for m in $MODES; do
  ip netns add "smesh-test-tools-$m"; ip -n "smesh-test-tools-$m" link set lo up
  mkdir "$CGROOT/smesh-test-tools-$m" "$CGROOT/smesh-test-tools-$m-d"
  if [ "$m" != direct ]; then
    [ -e "$D/tls/ca.crt" ] || "$SMESHD" certs init --dir "$D/tls" --nodes node >/dev/null
    printf '[capture]\ncgroups = ["smesh-test-tools-%s"]\n[datapath]\nmode = "%s"\n[log]\nlevel = "warn"\n[tunnel.tls]\ncert = "%s"\nkey = "%s"\nca = "%s"\n' \
      "$m" "$m" "$D/tls/node.crt" "$D/tls/node.key" "$D/tls/ca.crt" > "$D/$m.toml"
    nsenter --net="/run/netns/smesh-test-tools-$m" bash -c "echo \$\$ > $CGROOT/smesh-test-tools-$m-d/cgroup.procs; exec $SMESHD -c $D/$m.toml" 2>"$D/$m.log" &
    PIDS+=($!)
  fi
done
sleep 1
for m in $MODES; do
  inmode "$m" iperf3 -s -B 127.0.0.1 -p 5201 >/dev/null 2>&1 & PIDS+=($!)
  inmode "$m" sockperf sr --tcp -i 127.0.0.1 -p 11111 >/dev/null 2>&1 & PIDS+=($!)
done
sleep 1
gbps() { python3 -c 'import json,sys;print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9,2))'; }
for r in $(seq 1 "$R"); do
  line="round $r:"
  for m in $MODES; do
    g=$(inmode "$m" iperf3 -c 127.0.0.1 -p 5201 -t "$T" -J | gbps)
    p=$(inmode "$m" sockperf pp --tcp -i 127.0.0.1 -p 11111 -t "$T" 2>&1 | awk '/percentile 50.000/{print $NF}')
    line="$line  $m ${g} Gbit/s p50 ${p} us;"
  done
  echo "$line"
done
