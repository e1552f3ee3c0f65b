#!/bin/sh
# PID 1 of the guest `make kernel-test` boots (hack/kerneltest): it sets up
# what the tests expect of a Linux host, runs `smeshd check` and the test
# binaries listed in /kerneltest/plan, and powers the machine off.
#
# The kernel's console is ttyS0; results go to ttyS1, which the host reads:
# lines starting with "@@kerneltest " frame each step (each on a line of its
# own, even after output that did not end one), and between them is what
# the step printed (a test binary's -test.v=test2json stream).
export PATH=/bin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=1777 tmp /tmp
mount -t tmpfs run /run
mkdir -p /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf

out=/dev/ttyS1
stty -F $out raw -echo
kt() { printf '\n@@kerneltest %s\n' "$*" >$out; }

kt boot "$(cut -d' ' -f1 /proc/uptime)"
kt kernel "$(uname -r)"
# Modules the tests need, in dependency order (the host resolved it).
while read -r mod; do
	insmod "/lib/modules/$mod" || kt error "insmod $mod failed"
done </kerneltest/modules
ifconfig lo 127.0.0.1 up
# A host name, as every host has: the kernel's "(none)" is no SPIFFE path
# segment, so default workload identities (spiffe://TD/node/HOST/unit/...),
# which tests check, could not be formed.
hostname smesh-guest
# A host's usual open-file limit; the tests hold hundreds of sockets.
ulimit -n 65536
. /kerneltest/env

kt begin check
# The shipped smesh.toml as installed per the README: a node certificate
# set where it points (check loads it, as start would).
mkdir -p /etc/smesh/tls
/bin/smeshd certs init --dir /etc/smesh/tls --nodes node >/dev/null
/bin/smeshd check -c /src/smesh.toml >$out 2>&1
kt end check $? "$(cut -d' ' -f1 /proc/uptime)"

# plan: NAME DIR BINARY ARGS...; each binary runs in its package's source
# directory (tests read files relative to it, e.g. ../../smesh.toml).
while read -r name dir bin args; do
	kt begin "$name"
	# shellcheck disable=SC2086 # ARGS are words
	(cd "/src/$dir" && "/src/$dir/$bin" -test.v=test2json $args) >$out 2>&1 </dev/null
	kt end "$name" $? "$(cut -d' ' -f1 /proc/uptime)"
done </kerneltest/plan
kt done "$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
