package e2e

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/testenv"
	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// reload writes conf as the node's configuration file, sends SIGHUP and
// waits until smeshd says it is ready again.
func (n *node) reload(conf string) {
	n.t.Helper()
	if err := os.WriteFile(n.confPath, []byte(conf), 0o644); err != nil {
		n.t.Fatal(err)
	}
	if err := n.smeshd.Signal(syscall.SIGHUP); err != nil {
		n.t.Fatal(err)
	}
	if line, err := n.smeshd.ReadLine(10 * time.Second); err != nil || line != "ready" {
		n.t.Fatalf("smeshd after SIGHUP: %q %v %s", line, err, n.smeshd.Stderr())
	}
}

// tunnelAccepts reports whether node n's tunnel port takes a connection from
// the certificate of identity name (of the test's CA): it answers the
// header with a status (the destination is loopback, so a refusal; what
// matters is that it answers) instead of failing the TLS handshake.
func tunnelAccepts(t *testing.T, n *node, name string) bool {
	t.Helper()
	local := netip.MustParseAddr("127.0.0.1")
	conn, err := badClient{t: t, from: n, to: netip.AddrPortFrom(local, 18001)}.dial(clientTLS(t, n.pki, name))
	if err == nil {
		_, err = conn.Write(header(t, netip.AddrPortFrom(local, 9000)))
	}
	if err == nil {
		var st [tunnel.StatusSize]byte
		_, err = io.ReadFull(conn, st[:])
	}
	return err == nil
}

// TestReloadAllOrNothing: a reload whose [capture] cgroups cannot all be
// attached to changes nothing, not even what comes before the capture in
// the file or in the switch: include_cidrs (enrolled traffic would leave
// the node in clear) and allow_identities (the peer's identity check).
// Either smeshd sees it before switching anything (a file inside a cgroup),
// or the attach fails (a cgroup that takes no more programs) and what was
// switched is switched back.
func TestReloadAllOrNothing(t *testing.T) {
	a, _, server := twoNodes(t, "splice", "")
	good, err := os.ReadFile(a.confPath)
	if err != nil {
		t.Fatal(err)
	}
	mount, err := testenv.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	rel, _ := filepath.Rel(mount, a.enrolled)
	full := testenv.NewCgroup(t)
	testenv.FillCgroup(t, full)
	fullRel, _ := filepath.Rel(mount, full)
	other, _ := filepath.Rel(mount, testenv.NewCgroup(t))
	// A peer that the bad configuration's allow_identities leaves out.
	if _, err := certs.Init(a.pki, []string{"peer"}, "test.local"); err != nil {
		t.Fatal(err)
	}

	// Everything else in the file would change what a captures and which
	// peer it accepts.
	bad := func(extra string) string {
		conf := strings.Replace(string(good), fmt.Sprintf("cgroups = [%q]", rel),
			fmt.Sprintf("cgroups = [%q, %q]\ninclude_cidrs = [\"203.0.113.0/24\"]", rel, extra), 1)
		conf = strings.Replace(conf, "trust_domain = \"test.local\"\n",
			"trust_domain = \"test.local\"\nallow_identities = [\"spiffe://test.local/node/nobody\"]\n", 1)
		if conf == string(good) || !strings.Contains(conf, "nobody") || !strings.Contains(conf, "203.0.113.0/24") {
			t.Fatalf("could not make the bad configuration from:\n%s", good)
		}
		return conf
	}
	for i, tc := range []struct{ name, cgroup, why string }{
		{"a file inside a cgroup", other + "/cgroup.procs", "is a file, not a cgroup"},
		{"a cgroup that takes no more programs", fullRel, "applying [capture]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a.reload(bad(tc.cgroup))
			_, text := a.admin("/metrics")
			if v := testenv.Metric(t, text, "smesh_config_reloads_total", map[string]string{"result": "error"}); v != float64(i+1) {
				t.Errorf("smesh_config_reloads_total{result=error} = %v, want %d", v, i+1)
			}
			if !strings.Contains(a.smeshd.Stderr(), tc.why) {
				t.Errorf("the log does not say %q", tc.why)
			}
			if !captured(a, a.enrolled, server) {
				t.Error("after the rejected reload, a connection to the other node is not captured (include_cidrs changed)")
			}
			// Through the tunnel: node b's identity is still accepted, and
			// so is any other of the trust domain.
			a.client(a.enrolled, "oneway", server, "1000000")
			if !tunnelAccepts(t, a, "peer") {
				t.Error("after the rejected reload, the tunnel refuses a peer of the trust domain (allow_identities changed)")
			}
			if n := testenv.AttachedPrograms(t, full, ebpf.AttachCGroupInet4Connect); n != 64 {
				t.Errorf("%d connect4 programs on the full cgroup, want its 64", n)
			}
			for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupSockOps, ebpf.AttachCgroupInet4GetPeername} {
				if n := testenv.AttachedPrograms(t, full, typ); n != 0 {
					t.Errorf("%d %s programs left on a cgroup of the rejected configuration", n, typ)
				}
			}
		})
	}

	// The same changes without the bad cgroup are applied, all of them.
	conf := bad("x")
	conf = strings.Replace(conf, fmt.Sprintf("cgroups = [%q, \"x\"]", rel), fmt.Sprintf("cgroups = [%q]", rel), 1)
	a.reload(conf)
	if captured(a, a.enrolled, server) {
		t.Error("include_cidrs changed to 203.0.113.0/24, but the connection was still captured")
	}
	if tunnelAccepts(t, a, "peer") {
		t.Error("allow_identities changed to nobody's, but the tunnel accepted a peer")
	}
	waitLog(t, a, "identity_not_allowed", 1)
}
