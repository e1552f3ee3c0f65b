#!/bin/bash
# Cross-node comparison with tools nobody here wrote: two network namespace
# "nodes" joined by a veth, a client on node a, servers on node b, through
#   bare     the veth, no relay, no TLS (the baseline);
#   smesh    the smesh tunnel (the client's cgroup enrolled on node a);
#   stunnel  a stunnel4 pair, TLS 1.3, mutual certificates (verifyChain);
#   haproxy  an HAProxy pair, TCP mode, TLS 1.3, "verify required" both ways;
# all with the same certificates (smeshd certs init: ECDSA P-256), in
# interleaved rounds (systems rotate; medians quoted), for
#   rr       sockperf ping-pong, TCP, 64-byte messages: p50 and p99 (us);
#   conn/s   ab -c 4 against nginx: one request per connection;
#   bulk     iperf3, node a -> node b (Gbit/s).
# A benchmark, not part of `make test`; on a shared machine the figures
# move from run to run: compare systems within one run.
#
# Prerequisites (Debian; installed with apt-get when missing and root):
#   sockperf iperf3 stunnel4 haproxy apache2-utils nginx-light iproute2 python3
# Usage (root, after make build): hack/tunnel-compare.sh [seconds-per-run] [rounds] [mode]
#   mode: smesh's data path, splice (default) or copy
#   WORKLOADS="rr conn bulk" (the default) and SYSTEMS="bare smesh stunnel
#   haproxy" (the default) in the environment run fewer of them.
# Everything made is named smesh-test-tc-* and removed on exit.
set -u
T=${1:-3}; R=${2:-3}; MODE=${3:-splice}
SMESHD=$(realpath "$(dirname "$0")/../bin/smeshd")
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

missing=""
for need in sockperf:sockperf iperf3:iperf3 stunnel4:stunnel4 haproxy:haproxy ab:apache2-utils nginx:nginx-light ip:iproute2 python3:python3 nsenter:util-linux; do
  command -v "${need%%:*}" >/dev/null 2>&1 || missing="$missing ${need#*:}"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then echo "needs:$missing"; exit 2; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null || exit 2
fi
[ -x "$SMESHD" ] || { echo "needs $SMESHD (make build)"; exit 2; }

. "$(dirname "$0")/lib/two-nodes.sh"
two_nodes tc "$MODE"

# Servers on node b, in its mesh (the tunnel delivers to them through a
# spliced hop; the other systems reach them uncaptured).
SRV=198.18.0.2
declare -A PORT=([rr]=11111 [conn]=8080 [bulk]=5201)
cat > "$D/nginx.conf" <<NGX
daemon off; worker_processes 1; pid $D/nginx.pid; error_log $D/nginx.err;
events { worker_connections 4096; }
http { access_log off; server { listen $SRV:${PORT[conn]}; location / { return 200 "ok\n"; } } }
NGX
on b mesh sockperf server --tcp -i "$SRV" -p "${PORT[rr]}" >/dev/null 2>&1 & PIDS+=($!)
on b mesh iperf3 -s -B "$SRV" -p "${PORT[bulk]}" >/dev/null 2>&1 & PIDS+=($!)
on b mesh nginx -c "$D/nginx.conf" >/dev/null 2>&1 & PIDS+=($!)

# Relay pairs: node a listens on 127.0.0.1:OFFSET+port, node b on
# $SRV:OFFSET+port+1 in front of the server's port.
# stunnel: offset 10000 (a) / 10001 (b); HAProxy: 20000 / 20001.
st_a="foreground = yes\npid =\n"; st_b="$st_a"
hp="global\n  maxconn 8192\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
hp_a="$hp"; hp_b="$hp"
for w in rr conn bulk; do
  p=${PORT[$w]}
  st_b+="[$w]\naccept = $SRV:$((p + 10001))\nconnect = $SRV:$p\ncert = $D/tls/b.crt\nkey = $D/tls/b.key\nCAfile = $D/tls/ca.crt\nverifyChain = yes\nsslVersionMin = TLSv1.3\n"
  st_a+="[$w]\nclient = yes\naccept = 127.0.0.1:$((p + 10000))\nconnect = $SRV:$((p + 10001))\ncert = $D/tls/a.crt\nkey = $D/tls/a.key\nCAfile = $D/tls/ca.crt\nverifyChain = yes\nsslVersionMin = TLSv1.3\n"
  hp_b+="listen $w\n  bind $SRV:$((p + 20001)) ssl crt $D/tls/b.pem ca-file $D/tls/ca.crt verify required\n  server s $SRV:$p\n"
  hp_a+="listen $w\n  bind 127.0.0.1:$((p + 20000))\n  server b $SRV:$((p + 20001)) ssl crt $D/tls/a.pem ca-file $D/tls/ca.crt verify required\n"
done
printf "$st_a" > "$D/stunnel-a.conf"; printf "$st_b" > "$D/stunnel-b.conf"
printf "$hp_a" > "$D/haproxy-a.cfg"; printf "$hp_b" > "$D/haproxy-b.cfg"
on b "" stunnel4 "$D/stunnel-b.conf" >"$D/stunnel-b.log" 2>&1 & PIDS+=($!)
on a "" stunnel4 "$D/stunnel-a.conf" >"$D/stunnel-a.log" 2>&1 & PIDS+=($!)
on b "" haproxy -db -f "$D/haproxy-b.cfg" >"$D/haproxy-b.log" 2>&1 & PIDS+=($!)
on a "" haproxy -db -f "$D/haproxy-a.cfg" >"$D/haproxy-a.log" 2>&1 & PIDS+=($!)
sleep 2
for n in a b; do grep -q . "$D/smeshd-$n.log" && { echo "smeshd on $n:"; cat "$D/smeshd-$n.log"; }; done

# target SYSTEM WORKLOAD: the cgroup ("" or mesh), host and port the
# client of SYSTEM uses for WORKLOAD
target() {
  local p=${PORT[$2]}
  case $1 in
    bare) echo "- $SRV $p" ;;
    smesh) echo "mesh $SRV $p" ;;
    stunnel) echo "- 127.0.0.1 $((p + 10000))" ;;
    haproxy) echo "- 127.0.0.1 $((p + 20000))" ;;
  esac
}
# one SYSTEM WORKLOAD: run it once, print its figures ("rr" prints p50 p99)
one() {
  local cg host port
  read -r cg host port < <(target "$1" "$2"); [ "$cg" = - ] && cg=""
  case $2 in
    rr) on a "$cg" sockperf ping-pong --tcp -i "$host" -p "$port" -m 64 -t "$T" 2>&1 |
          sed 's/\x1b\[[0-9;]*m//g' | awk '/percentile 50.000/{p50=$NF} /percentile 99.000/{p99=$NF} END{print (p50==""?"nan":p50), (p99==""?"nan":p99)}' ;;
    conn) on a "$cg" ab -q -c 4 -n 10000000 -t "$T" "http://$host:$port/" 2>/dev/null |
          awk '/^Requests per second/{print $4; f=1} END{if(!f)print "nan"}' ;;
    bulk) on a "$cg" iperf3 -c "$host" -p "$port" -t "$T" -J 2>/dev/null | python3 -c 'import json,sys
try: print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9,2))
except Exception: print("nan")' ;;
  esac
}
read -r -a SYSTEMS <<< "${SYSTEMS:-bare smesh stunnel haproxy}"
for r in $(seq 1 "$R"); do
  for w in ${WORKLOADS:-rr conn bulk}; do
    for i in "${!SYSTEMS[@]}"; do
      s=${SYSTEMS[$(( (i + r) % ${#SYSTEMS[@]} ))]}
      echo "$s $w $(one "$s" "$w")" >> "$D/results"
      echo "round $r/$R: $s $w $(tail -1 "$D/results" | cut -d' ' -f3-)" >&2
    done
  done
done
echo "tunnel-compare: $R rounds of ${T}s, medians; smesh data path: $MODE; $(nproc) cores, kernel $(uname -r)"
python3 - "$D/results" <<'PY'
import sys, statistics, math
rows = {}
for line in open(sys.argv[1]):
    s, w, *v = line.split()
    rows.setdefault((s, w), []).append([float(x) for x in v])
def med(s, w, i=0):
    v = [x[i] for x in rows.get((s, w), []) if i < len(x) and not math.isnan(x[i])]
    return statistics.median(v) if v else float("nan")
print("%-8s %12s %12s %10s %10s" % ("system", "rr p50 us", "rr p99 us", "conn/s", "Gbit/s"))
for s in ("bare", "smesh", "stunnel", "haproxy"):
    print("%-8s %12.1f %12.1f %10.0f %10.2f" % (s, med(s, "rr", 0), med(s, "rr", 1), med(s, "conn"), med(s, "bulk")))
PY
