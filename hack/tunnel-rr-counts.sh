#!/bin/bash
# Counts per round trip through a cross-node relay pair, which a shared
# machine's noise does not change: syscalls (strace -c -f on each relay
# process) and wake-ups (every thread's voluntary context switches,
# /proc/PID/task/*/status), for the smesh tunnel and for an
# HAProxy pair (TCP mode, TLS 1.3, verify required) with the same
# certificates. Wake-ups are voluntary context switches (a thread that
# slept in epoll_wait, futex or a read woke). A client on node a does
# 64-byte request/response round trips with an echo server on node b; each relay is measured over two runs
# of N1 and N2 round trips on one connection each, and the difference is
# divided by N2-N1, so connection set-up cancels out.
# Prerequisites (Debian): apt-get install -y haproxy strace python3 iproute2
# Usage (root, after make build): hack/tunnel-rr-counts.sh [N1] [N2] [mode]
#   mode: smesh's data path, splice (default) or copy
# Everything made is named smesh-test-rc-* and removed on exit.
set -u
N1=${1:-200}; N2=${2:-2200}; MODE=${3:-splice}
SMESHD=$(realpath "$(dirname "$0")/../bin/smeshd")
for t in haproxy strace nsenter python3 "$SMESHD"; do command -v "$t" >/dev/null || { echo "needs $t"; exit 2; }; done
. "$(dirname "$0")/lib/two-nodes.sh"
two_nodes rc "$MODE"

cat > "$D/echo.py" <<'PY'
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(65536)
        if not b: break
        c.sendall(b)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
cat > "$D/rr.py" <<'PY'
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 64
for i in range(n):
    c.sendall(msg)
    got = b""
    while len(got) < 64:
        b = c.recv(64 - len(got))
        if not b: sys.exit("short echo after %d round trips" % i)
        got += b
c.close()
PY
hap() {  # hap NODE: HAProxy's configuration of one node
  local g='global\n  maxconn 4096\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n'
  if [ "$1" = b ]; then
    printf "$g"'frontend f\n  bind 198.18.0.2:18201 ssl crt %s ca-file %s verify required\n  default_backend s\nbackend s\n  server echo 198.18.0.2:7001\n' "$D/tls/b.pem" "$D/tls/ca.crt"
  else
    printf "$g"'frontend f\n  bind 127.0.0.1:18200\n  default_backend s\nbackend s\n  server b 198.18.0.2:18201 ssl crt %s ca-file %s verify required\n' "$D/tls/a.pem" "$D/tls/ca.crt"
  fi
}
hap a > "$D/hap-a.cfg"; hap b > "$D/hap-b.cfg"
# The echo server smesh delivers to is in node b's mesh (its hop spliced);
# HAProxy's is outside it.
on b mesh python3 "$D/echo.py" 198.18.0.2 7000 & PIDS+=($!)
on b "" python3 "$D/echo.py" 198.18.0.2 7001 & PIDS+=($!)
on b "" haproxy -db -f "$D/hap-b.cfg" >"$D/hap-b.log" 2>&1 & PIDS+=($!)
on a "" haproxy -db -f "$D/hap-a.cfg" >"$D/hap-a.log" 2>&1 & PIDS+=($!)
sleep 2
for n in a b; do grep -q . "$D/smeshd-$n.log" && { echo "smeshd on $n:"; cat "$D/smeshd-$n.log"; }; done

# pids NAME NODE: the PIDs of the relay process NAME runs in NODE
pids() { for p in $(ip netns pids "$P-$2"); do [ "$(cat /proc/$p/comm)" = "$1" ] && echo "$p"; done; }
# vcsw PID: voluntary context switches (sleeps: wake-ups) of all its threads
vcsw() { cat /proc/$1/task/*/status | awk '/^voluntary_ctxt_switches/{x+=$2} END{print x}'; }
# run SYSTEM N: N round trips through SYSTEM's path, on one connection
run() {
  if [ "$1" = smesh ]; then on a mesh python3 "$D/rr.py" 198.18.0.2 7000 "$2"
  else on a "" python3 "$D/rr.py" 127.0.0.1 18200 "$2"; fi || { echo "$1: round trips failed"; exit 1; }
}
# measure SYSTEM NAME NODE N: strace -c of NAME's process on NODE over N
# round trips (in $D/st-SYSTEM-NODE-N), then its wake-ups over N more
# without strace (in $D/cs-SYSTEM-NODE-N).
measure() {
  local sys=$1 name=$2 node=$3 n=$4 p sp c0
  p=$(pids "$name" "$node" | head -1)
  strace -c -f -q -p "$p" -o "$D/st-$sys-$node-$n" 2>/dev/null & sp=$!
  sleep 0.5; run "$sys" "$n"; sleep 0.2; kill -INT "$sp"; wait "$sp" 2>/dev/null
  c0=$(vcsw "$p"); run "$sys" "$n"; echo $(( $(vcsw "$p") - c0 )) > "$D/cs-$sys-$node-$n"
}
for sys in smesh haproxy; do
  name=smeshd; [ "$sys" = haproxy ] && name=haproxy
  for node in a b; do for n in "$N1" "$N2"; do measure "$sys" "$name" "$node" "$n"; done; done
done
echo "per round trip (64 B each way; differences between $N2 and $N1 round trips), smesh data path: $MODE"
python3 - "$D" "$N1" "$N2" <<'PY'
import sys, collections
d, n1, n2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def calls(path):
    out = collections.Counter()
    for line in open(path):
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            out[f[-1]] = int(f[3])
    return out
names = ["read", "recvfrom", "write", "sendto", "epoll_pwait", "epoll_wait", "futex", "nanosleep", "clock_gettime"]
print("%-8s %-9s %8s %8s" % ("system", "node", "syscalls", "wake-ups") + "".join(" %9s" % n[:9] for n in names))
for sys_ in ("smesh", "haproxy"):
    for node, role in (("a", "sending"), ("b", "receiving")):
        a, b = calls("%s/st-%s-%s-%d" % (d, sys_, node, n1)), calls("%s/st-%s-%s-%d" % (d, sys_, node, n2))
        per = {k: (b[k] - a[k]) / (n2 - n1) for k in set(a) | set(b)}
        cs = [int(open("%s/cs-%s-%s-%d" % (d, sys_, node, n)).read()) for n in (n1, n2)]
        print("%-8s %-9s %8.2f %8.2f" % (sys_, role, sum(per.values()), (cs[1] - cs[0]) / (n2 - n1))
              + "".join(" %9.2f" % per.get(n, 0) for n in names))
PY
