#!/bin/bash
# Same-node figures with tools nobody here wrote: iperf3 throughput,
# sockperf ping-pong latency, and curl downloading a 256 MB file from nginx
# ten times over one keep-alive connection (a small request, a large answer:
# the shape whose answer is demoted; Gbit/s over the ten), between two
# processes on one node, with no mesh, with smesh copy and with smesh splice,
# in interleaved rounds. Each mode gets its own network namespace (and
# smeshd); everything made is named smesh-test-tools-* and removed on exit.
# Usage (root, after make build): hack/samenode-tools.sh [seconds-per-run] [rounds]
# TOOLS="iperf3 sockperf download" (the default) picks which to run.
set -u
T=${1:-3}; R=${2:-3}
TOOLS=${TOOLS:-iperf3 sockperf download}
SMESHD=$(realpath "$(dirname "$0")/../bin/smeshd")
for t in iperf3 sockperf nginx curl nsenter python3 "$SMESHD"; do command -v "$t" >/dev/null || { echo "needs $t"; exit 2; }; done
CGROOT=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
D=$(mktemp -d /tmp/smesh-test-tools.XXXXXX)
MODES=${MODES:-direct copy splice}
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
mkdir -p "$D/www" && head -c 256000000 /dev/zero > "$D/www/file"
for m in $MODES; do
  inmode "$m" iperf3 -s -B 127.0.0.1 -p 5201 >/dev/null 2>&1 & PIDS+=($!)
  inmode "$m" sockperf sr --tcp -i 127.0.0.1 -p 11111 >/dev/null 2>&1 & PIDS+=($!)
  mkdir -p "$D/nginx-$m"
  printf 'daemon off; master_process off; worker_processes 1; pid %s/nginx-%s/pid; error_log %s/nginx-%s/error.log;\nevents {}\nhttp { access_log off; sendfile on; keepalive_requests 1000; client_body_temp_path %s/nginx-%s; proxy_temp_path %s/nginx-%s; fastcgi_temp_path %s/nginx-%s; uwsgi_temp_path %s/nginx-%s; scgi_temp_path %s/nginx-%s;\n  server { listen 127.0.0.1:8080; root %s/www; } }\n' \
    "$D" "$m" "$D" "$m" "$D" "$m" "$D" "$m" "$D" "$m" "$D" "$m" "$D" "$m" "$D" > "$D/nginx-$m.conf"
  inmode "$m" nginx -e "$D/nginx-$m/error.log" -c "$D/nginx-$m.conf" >/dev/null 2>&1 & PIDS+=($!)
done
sleep 1
gbps() { python3 -c 'import json,sys;print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9,2))'; }
# download MODE: ten downloads of the file over one connection, Gbit/s.
download() {
  local args=() i
  for i in $(seq 10); do args+=(-o /dev/null http://127.0.0.1:8080/file); done
  inmode "$1" curl -s -w "'%{size_download} %{time_total}\n'" "${args[*]}" |
    awk '{b+=$1; s+=$2} END {if (s > 0) printf "%.2f", b*8/s/1e9; else print "failed"}'
}
for r in $(seq 1 "$R"); do
  line="round $r:"
  for m in $MODES; do
    line="$line  $m"
    case " $TOOLS " in *" iperf3 "*) line="$line $(inmode "$m" iperf3 -c 127.0.0.1 -p 5201 -t "$T" -J | gbps) Gbit/s";; esac
    case " $TOOLS " in *" sockperf "*) line="$line p50 $(inmode "$m" sockperf pp --tcp -i 127.0.0.1 -p 11111 -t "$T" 2>&1 | awk '/percentile 50.000/{print $NF}') us";; esac
    case " $TOOLS " in *" download "*) line="$line download $(download "$m") Gbit/s";; esac
    line="$line;"
  done
  echo "$line"
done
