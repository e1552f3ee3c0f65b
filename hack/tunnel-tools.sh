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
. "$(dirname "$0")/lib/two-nodes.sh"
two_nodes tt "$MODE"

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
