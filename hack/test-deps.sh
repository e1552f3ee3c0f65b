#!/bin/sh
# `make test-deps`: installs the programs smesh's tests drive (Debian
# packages), so that no test skips for want of one. Without root or
# apt-get it says what is missing and exits non-zero.
#
# Arguments are more packages to install in the same apt-get run (.ci/run
# adds the BPF toolchain and the benchmark tools).
set -eu

# command the tests run : the Debian package that has it
# (debootstrap and systemd-nspawn: deploy/systemd_test.go boots a Debian
# container with systemd as PID 1; setpriv, nsenter and unshare: the
# Kubernetes capability test.)
needs="ip:iproute2 iperf3:iperf3 curl:curl nginx:nginx-light systemd-analyze:systemd nft:nftables debootstrap:debootstrap systemd-nspawn:systemd-container setpriv:util-linux nsenter:util-linux unshare:util-linux"

missing=""
for need in $needs; do
	# nginx lives in /usr/sbin, which a user's PATH may lack (root's and
	# sudo's have it).
	PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" command -v "${need%%:*}" >/dev/null 2>&1 ||
		missing="$missing ${need#*:}"
done
pkgs="$missing${*:+ $*}"
if [ -z "$pkgs" ]; then
	echo "test-deps: everything the tests drive is installed (ip, iperf3, curl, nginx, systemd-analyze, nft, debootstrap, systemd-nspawn)"
	exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
	echo "test-deps: missing:$pkgs; there is no apt-get here: install them with this system's package manager" >&2
	exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
	echo "test-deps: missing:$pkgs; run as root to install them with apt-get (sudo make test-deps)" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086 # one word per package
apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
echo "test-deps: installed$pkgs"
