#!/bin/bash
# Cross-node figures with tools nobody here wrote: iperf3 between two network
# namespace "nodes" joined by a veth, over the bare veth, through stunnel4
# (TLS 1.3, mutual certificates) and through the smesh tunnel, in interleaved
# rounds. stunnel and smesh use the same certificates (smeshd certs init:
# ECDSA P-256). Everything made is named smesh-test-tt-* and removed on exit.
# Usage (root, after make build): hack/tunnel-tools.sh [seconds-per-run] [rounds] [mode]
#   mode: smesh's data path, splice (default) or copy
set -u
T=${1:-3}; R=${2:-3}; MODE=${3:-splice}
SMESHD=$(realpath "$(dirname "$0")/../bin/smeshd")
for t in iperf3 stunnel4 nsenter python3 "$SMESHD"; do command -v "$t" >/dev/null || { echo "needs $t"; exit 2; }; done
CGROOT=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
D=$(mktemp -d /tmp/smesh-test-tt.XXXXXX)
P=smesh-test-tt-$$
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  # What nsenter started outlives the subshell PIDS holds (stunnel4 in
  # particular): stop every process of the two namespaces, by PID.
  for n in a b; do
    for p in $(ip netns pids "$P-$n" 2>/dev/null); do kill "$p" 2>/dev/null; done
  done
  sleep 0.5
  for n in a b; do
    for c in mesh d; do
      cg="$CGROOT/$P-$n-$c"
      [ -d "$cg" ] && echo 1 > "$cg/cgroup.kill"
    done
  done
  sleep 0.3
  for n in a b; do
    rmdir "$CGROOT/$P-$n-mesh" "$CGROOT/$P-$n-d" 2>/dev/null
    ip netns del "$P-$n" 2>/dev/null
  done
  rm -rf "$D"
}
trap cleanup EXIT

# on NODE CGROUP CMD...: run CMD in NODE's namespace, in CGROUP ("" for none).
on() {
  local n=$1 cg=$2; shift 2
  if [ -n "$cg" ]; then
    nsenter --net="/run/netns/$P-$n" bash -c "echo \$\$ > $CGROOT/$P-$n-$cg/cgroup.procs; exec $*"
  else
    nsenter --net="/run/netns/$P-$n" bash -c "exec $*"
  fi
}

"$SMESHD" certs init --dir "$D/tls" --nodes a,b >/dev/null || exit 1
ip netns add "$P-a"; ip netns add "$P-b"
ip link add "tta$$" type veth peer name "ttb$$"
ip link set "tta$$" netns "$P-a"; ip link set "ttb$$" netns "$P-b"
ip -n "$P-a" addr add 198.18.0.1/24 dev "tta$$"; ip -n "$P-b" addr add 198.18.0.2/24 dev "ttb$$"
for n in a b; do
  ip -n "$P-$n" link set lo up
  mkdir "$CGROOT/$P-$n-mesh" "$CGROOT/$P-$n-d"
  printf '[capture]\ncgroups = ["%s"]\n[datapath]\nmode = "%s"\n[log]\nlevel = "warn"\n[tunnel.tls]\ncert = "%s"\nkey = "%s"\nca = "%s"\n' \
    "$P-$n-mesh" "$MODE" "$D/tls/$n.crt" "$D/tls/$n.key" "$D/tls/ca.crt" > "$D/$n.toml"
  on "$n" d "$SMESHD" -c "$D/$n.toml" 2>"$D/smeshd-$n.log" & PIDS+=($!)
done
ip -n "$P-a" link set "tta$$" up; ip -n "$P-b" link set "ttb$$" up

conf() { printf 'foreground = yes\npid =\n%s\n[t]\naccept = %s\nconnect = %s\ncert = %s/%s.crt\nkey = %s/%s.key\nCAfile = %s/ca.crt\nverifyChain = yes\nsslVersionMin = TLSv1.3\n' "$1" "$2" "$3" "$D/tls" "$4" "$D/tls" "$4" "$D/tls"; }
conf "" 198.18.0.2:18101 198.18.0.2:5201 b > "$D/stunnel-b.conf"
conf "client = yes" 127.0.0.1:18100 198.18.0.2:18101 a > "$D/stunnel-a.conf"
# The iperf3 server is in node b's mesh: the smesh tunnel delivers to it
# through a spliced hop; the bare and stunnel runs reach it uncaptured.
on b mesh iperf3 -s -B 198.18.0.2 -p 5201 >/dev/null 2>&1 & PIDS+=($!)
on b "" stunnel4 "$D/stunnel-b.conf" >/dev/null 2>&1 & PIDS+=($!)
on a "" stunnel4 "$D/stunnel-a.conf" >/dev/null 2>&1 & PIDS+=($!)
sleep 2
for n in a b; do grep -q . "$D/smeshd-$n.log" && { echo "smeshd on $n:"; cat "$D/smeshd-$n.log"; }; done

gbps() { python3 -c 'import json,sys
d=json.load(sys.stdin)
print(d["error"] if "error" in d else round(d["end"]["sum_received"]["bits_per_second"]/1e9,2))'; }
echo "iperf3 -t $T, node a -> node b; smesh data path: $MODE"
for r in $(seq 1 "$R"); do
  v=$(on a "" iperf3 -c 198.18.0.2 -p 5201 -t "$T" -J | gbps)
  s=$(on a "" iperf3 -c 127.0.0.1 -p 18100 -t "$T" -J | gbps)
  m=$(on a mesh iperf3 -c 198.18.0.2 -p 5201 -t "$T" -J | gbps)
  echo "round $r: bare veth $v Gbit/s, stunnel4 mTLS $s Gbit/s, smesh tunnel $m Gbit/s"
done
