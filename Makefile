# smesh: build, generate, test. `make help` lists the targets.
# sudo resets PATH (secure_path), leaving out /usr/local/go/bin, where Go's
# own installer puts go: without go in PATH, `sudo make ...` looks there.
GO ?= $(if $(shell command -v go 2>/dev/null),go,$(or $(wildcard /usr/local/go/bin/go),go))
BIN := bin/smeshd
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

# The one place that owns the BPF compiler and its flags (used by bpf2go).
export BPF2GO_CC := clang
export BPF2GO_CFLAGS := -O2 -g -Wall -Werror

.PHONY: all build image run demo bench generate vmlinux test test-deps kernel-test kube-control-plane kube-scale svc-scale ci fmt-check vet clean clean-test-env help

all: build

help:
	@echo "build           bin/smeshd"
	@echo "image           the container image $(IMAGE) as $(IMAGE_TAR), offline (docker load / podman load / kind load image-archive)"
	@echo "bench           build and run smeshd bench: no mesh vs copy vs splice (root)"
	@echo "demo            two namespace nodes with smeshd, nginx and curl: tunnel and splice at work (root)"
	@echo "run             build and run smeshd with ./smesh.toml and development certificates in bin/dev-tls (root)"
	@echo "test            all tests, then how many were skipped and why; kernel tests need root (SMESH_REQUIRE_PRIVILEGED=1 makes skips failures)"
	@echo "test-deps       install the programs the tests drive: iproute2, iperf3, curl, nginx-light, systemd, nftables, debootstrap, systemd-container (root, apt-get)"
	@echo "kube-control-plane build kube-apiserver and etcd for the tests once per machine (hack/kubecp, cached in /var/cache/smesh-test-kubecp; minutes the first time)"
	@echo "kube-scale      benchmark: smeshd for one node in a real API server with 100 and 5,000 nodes (100,000 pods): ready time, RSS, bytes, CPU (root; about 6 min)"
	@echo "svc-scale       benchmark: the Service watcher and the BPF service maps with 10,000 Services and 100,000 endpoints in a real API server: RSS, heap, map memory, slice update to map updated"
	@echo "kernel-test     the kernel tests on another kernel in a qemu guest: KERNEL=pkg|file.deb (default: Debian 12's 6.1)"
	@echo "generate        regenerate the BPF bindings and objects (needs clang)"
	@echo "vmlinux         regenerate bpf/include/vmlinux.h from this kernel's BTF (needs bpftool)"
	@echo "ci              generate and fail on any diff, gofmt, vet, test"
	@echo "clean-test-env  remove leftover smesh-test-* cgroups and network namespaces"

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/smeshd

# The container image deploy/kubernetes/daemonset.yaml runs: the static
# binary in one layer, built offline from Go (hack/image, go-containerregistry):
# no Dockerfile, no base image. One tar, both a docker-save archive and an OCI
# layout. `make image IMAGE=registry.example/smesh/smeshd:v1` for another name
# (then set it in the DaemonSet too).
IMAGE ?= smesh/smeshd:dev
IMAGE_TAR ?= bin/smeshd-image.tar
image:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o bin/image/smeshd ./cmd/smeshd
	$(GO) run ./hack/image -binary bin/image/smeshd -name $(IMAGE) -out $(IMAGE_TAR) -version $(VERSION)

# smesh.toml's tunnel wants certificates in /etc/smesh/tls. `make run` makes a
# development set in bin/dev-tls instead (once) and runs smesh.toml with its
# [tunnel.tls] paths pointed there; everything else is smesh.toml as it is.
DEV_TLS := $(CURDIR)/bin/dev-tls
run: build
	@test -e $(DEV_TLS)/ca.crt || ./$(BIN) certs init --dir $(DEV_TLS) --nodes node
	sed 's|"/etc/smesh/tls/|"$(DEV_TLS)/|' smesh.toml > bin/smesh.run.toml
	./$(BIN) -c bin/smesh.run.toml

demo: build
	$(GO) build -o bin/smesh-demo ./cmd/smesh-demo
	./bin/smesh-demo --smeshd $(BIN)

bench: build
	./$(BIN) bench

generate:
	$(GO) generate ./bpf/...

vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > bpf/include/vmlinux.h

# go test through hack/testsummary: go test's usual output, then how many
# tests were skipped and why, so that a run without root or without the
# tools the tests drive cannot pass for a full one.
# Narrower runs: make test PKGS=./pkg/bench TESTFLAGS="-count=1 -run Progress"
# -timeout: the first run on a machine also builds the systemd tests' root
# file systems (deploy/, debootstrap: several minutes).
PKGS ?= ./...
TESTFLAGS ?= -count=1 -timeout 30m
# A full run builds the test control plane first (minutes, once per
# machine) rather than inside go test, where it would compete with the
# timing-sensitive tests for the CPUs; a narrower run that needs it gets it
# built on first use (pkg/testenv/kubecp).
test: $(if $(filter ./...,$(PKGS)),kube-control-plane)
	$(GO) build -o bin/testsummary ./hack/testsummary
	GO=$(GO) ./bin/testsummary $(TESTFLAGS) $(PKGS)

test-deps:
	hack/test-deps.sh

# The real Kubernetes control plane the tests start (pkg/testenv/kubecp):
# kube-apiserver and etcd built from source by hack/kubecp, a Go module of
# its own, at the versions its go.mod names, once per machine into
# /var/cache/smesh-test-kubecp (which a fresh clone, as in CI, still finds).
kube-control-plane:
	cd hack/kubecp && GO=$(GO) $(GO) run .

# What a cluster's size does to smeshd (hack/kubescale; a benchmark, not part
# of make test): the test control plane filled with Node objects and Pods,
# smeshd started for one node as the DaemonSet runs it, a Markdown table on
# stdout (README, Kubernetes). Root: smeshd loads its BPF programs.
# E.g. make kube-scale KUBE_SCALE_FLAGS="-sizes 100:1000,1000:20000 -window 10s"
KUBE_SCALE_FLAGS ?=
kube-scale: build kube-control-plane
	$(GO) build -o bin/kubescale ./hack/kubescale
	./bin/kubescale -smeshd $(BIN) $(KUBE_SCALE_FLAGS)

# The Service watcher at scale (hack/svcscale; a benchmark, not part of make
# test; root: it loads the data path's maps): 10,000 Services with 10
# endpoints each in the test control plane, the watcher in a process of its
# own with smeshd's token, feeding a Sink that keeps nothing and then the data
# path's ServiceTable; RSS, heap, BPF map memory and the latency from an
# EndpointSlice write to the maps updated (README, Kubernetes).
# E.g. make svc-scale SVC_SCALE_FLAGS="-services 1000 -updates 100"
SVC_SCALE_FLAGS ?=
svc-scale: kube-control-plane
	$(GO) build -o bin/svcscale ./hack/svcscale
	./bin/svcscale $(SVC_SCALE_FLAGS)

# The kernel tests on another kernel than this machine's, in a qemu guest
# (hack/kerneltest; needs qemu-system-x86, busybox-static, cpio). KERNEL is
# a Debian kernel package, a metapackage (followed to its image), or a .deb
# file; the default, linux-image-amd64, is Debian 12's 6.1 on Debian 12.
# Packages are downloaded once, into .cache/kernel-test.
# E.g. make kernel-test KERNEL=linux-image-6.12-amd64 KERNEL_TEST_FLAGS="-run TestSameNode"
KERNEL ?= linux-image-amd64
KERNEL_TEST_FLAGS ?=
kernel-test:
	$(GO) build -o bin/kerneltest ./hack/kerneltest
	GO=$(GO) ./bin/kerneltest -kernel $(KERNEL) $(KERNEL_TEST_FLAGS)

fmt-check:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# hack/kubecp is a module of its own, which ./... does not reach.
vet:
	$(GO) vet ./...
	cd hack/kubecp && $(GO) vet ./...

ci: generate
	@git diff --exit-code -- bpf/ || { echo "generated BPF bindings differ from the committed ones: run make generate and commit"; exit 1; }
	$(MAKE) fmt-check vet test

clean:
	rm -rf bin

# Each smesh-test-*/smesh-bench-* cgroup goes with everything below it, whatever
# the names there (a pod's cgroup sits below an enrolled one, and may be named
# by whoever made it): one cgroup.kill for the tree, then rmdir children first.
# A killed systemd test container (deploy/) also leaves its name=systemd cgroup
# on a hybrid host, and systemd-nspawn's state in /run.
# Bridges, veths and wires live in the network namespaces and go with them.
clean-test-env:
	@cg=$$(awk '$$3=="cgroup2"{print $$2; exit}' /proc/mounts); \
	for top in $$(find "$$cg" -type d \( -name 'smesh-test-*' -o -name 'smesh-bench-*' \) -prune 2>/dev/null); do \
		[ -f "$$top/cgroup.kill" ] && echo 1 > "$$top/cgroup.kill"; \
		for d in $$(find "$$top" -depth -type d); do \
			if rmdir "$$d" 2>/dev/null || { sleep 0.5; rmdir "$$d" 2>/dev/null; }; then \
				echo "removed cgroup $$d"; else echo "could not remove cgroup $$d"; fi; \
		done; \
	done; \
	v1=$$(awk '$$3=="cgroup" && $$4 ~ /(^|,)name=systemd(,|$$)/ {print $$2; exit}' /proc/mounts); \
	for top in $$([ -n "$$v1" ] && find "$$v1" -maxdepth 1 -type d -name 'smesh-test-*' 2>/dev/null); do \
		for d in $$(find "$$top" -depth -type d); do rmdir "$$d" 2>/dev/null && echo "removed name=systemd cgroup $$d"; done; \
	done; \
	for d in /run/systemd/nspawn/propagate/smesh-test-*; do [ -d "$$d" ] && rm -rf "$$d" && echo "removed $$d"; done; \
	for n in $$(ip netns list 2>/dev/null | awk '/^smesh-(test|bench)/{print $$1}'); do ip netns del "$$n" && echo "removed netns $$n"; done
