# Sourced by the cross-node scripts of hack/ (tunnel-tools.sh,
# tunnel-compare.sh, tunnel-rr-counts.sh): two network namespace "nodes",
# a and b, joined by a veth (198.18.0.1 and 198.18.0.2), each with a smeshd
# in cgroup NAME-NODE-d enrolling cgroup NAME-NODE-mesh, certificates for
# both (smeshd certs init: ECDSA P-256; NODE.pem is certificate and key in
# one, as HAProxy takes them) in $D/tls. Everything made is named
# smesh-test-TAG-* and removed on exit (two_nodes installs the trap).
#
# two_nodes TAG MODE: TAG names what is made, MODE is smeshd's data path
# (splice or copy). It sets P (the name prefix), D (a directory for
# configuration and logs), CGROOT, and PIDS (processes to stop on exit:
# add yours); SMESHD must name the smeshd binary.

# on NODE CGROUP CMD...: run CMD in NODE's namespace, in CGROUP ("" for none).
on() {
  local n=$1 cg=$2; shift 2
  if [ -n "$cg" ]; then
    nsenter --net="/run/netns/$P-$n" bash -c "echo \$\$ > $CGROOT/$P-$n-$cg/cgroup.procs; exec $*"
  else
    nsenter --net="/run/netns/$P-$n" bash -c "exec $*"
  fi
}

two_nodes_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  # What nsenter started (stunnel4, nginx's workers) outlives the PIDs
  # held here: stop every process of the two namespaces, by PID.
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

two_nodes() {
  local tag=$1 mode=$2
  CGROOT=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
  D=$(mktemp -d "/tmp/smesh-test-$tag.XXXXXX")
  P=smesh-test-$tag-$$
  PIDS=()
  trap two_nodes_cleanup EXIT
  "$SMESHD" certs init --dir "$D/tls" --nodes a,b >/dev/null || exit 1
  for n in a b; do cat "$D/tls/$n.crt" "$D/tls/$n.key" > "$D/tls/$n.pem"; done
  ip netns add "$P-a"; ip netns add "$P-b"
  ip link add "${tag}a$$" type veth peer name "${tag}b$$"
  ip link set "${tag}a$$" netns "$P-a"; ip link set "${tag}b$$" netns "$P-b"
  ip -n "$P-a" addr add 198.18.0.1/24 dev "${tag}a$$"; ip -n "$P-b" addr add 198.18.0.2/24 dev "${tag}b$$"
  for n in a b; do
    ip -n "$P-$n" link set lo up
    mkdir "$CGROOT/$P-$n-mesh" "$CGROOT/$P-$n-d"
    printf '[capture]\ncgroups = ["%s"]\n[datapath]\nmode = "%s"\n[log]\nlevel = "warn"\n[tunnel.tls]\ncert = "%s"\nkey = "%s"\nca = "%s"\n' \
      "$P-$n-mesh" "$mode" "$D/tls/$n.crt" "$D/tls/$n.key" "$D/tls/ca.crt" > "$D/$n.toml"
    on "$n" d "$SMESHD" -c "$D/$n.toml" 2>"$D/smeshd-$n.log" & PIDS+=($!)
  done
  ip -n "$P-a" link set "${tag}a$$" up; ip -n "$P-b" link set "${tag}b$$" up
}
