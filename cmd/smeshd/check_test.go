package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/certs"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/testenv"
)

// devConfig is the shipped smesh.toml with a development certificate set
// of the default trust domain in place of /etc/smesh/tls.
func devConfig(t *testing.T) string {
	t.Helper()
	shipped, err := os.ReadFile("../../smesh.toml")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if _, err := certs.Init(dir, []string{"node"}, certs.DefaultTrustDomain); err != nil {
		t.Fatal(err)
	}
	conf := strings.ReplaceAll(string(shipped), "/etc/smesh/tls", dir)
	path := filepath.Join(t.TempDir(), "smesh.toml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestCheckDefaultConfig(t *testing.T) {
	testenv.RequirePrivileged(t)
	var out, errOut bytes.Buffer
	if err := run(context.Background(), []string{"check", "-c", devConfig(t)}, &out, &errOut, nil); err != nil {
		t.Fatalf("smeshd check -c smesh.toml: %v\n%s", err, out.String())
	}
	want := []string{"spiffe://smesh.local/node/node, valid until", "smesh.slice: ", "datapath mode: splice (bounded"}
	if err := datapath.Missing(datapath.ProbeModes(), "bounded splice"); err != nil {
		t.Logf("this kernel cannot bound spliced queues: %v", err)
		want = append(want[:2], "kernel: MISSING  bounded splice", `datapath mode: copy (mode = "auto": this kernel cannot bound`)
	}
	for _, w := range want {
		if !strings.Contains(out.String(), w) {
			t.Errorf("check did not report %q:\n%s", w, out.String())
		}
	}
	if strings.Count(out.String(), "kernel: ok ") < 10 {
		t.Errorf("check reported fewer kernel features than it probes:\n%s", out.String())
	}
}

// TestCheckAsStart: `smeshd check` refuses what smeshd would refuse at
// start, for the reasons start gives: it accepted all of these.
func TestCheckAsStart(t *testing.T) {
	mount, err := testenv.Cgroup2Mount()
	if err != nil {
		testenv.SkipOrFail(t, "%v", err)
	}
	dir := t.TempDir()
	cases := []struct {
		name, conf string
		want       []string
	}{
		{"the cgroup v2 mount itself", "[capture]\ncgroups = [\"" + mount + "\"]\n", []string{"capture.cgroups", "is the cgroup v2 root"}},
		{"outside the mount", "[capture]\ncgroups = [\"/etc/passwd\"]\n", []string{"capture.cgroups", `"/etc/passwd" is not below the cgroup v2 mount`}},
		{"a cgroup with its own child", "[capture]\ncgroups = [\"smesh-test-x.slice\", \"smesh-test-x.slice/a.scope\"]\n",
			[]string{"capture.cgroups", "smesh-test-x.slice/a.scope is below"}},
		{"a file inside a cgroup", "[capture]\ncgroups = [\"cgroup.procs\"]\n", []string{"capture.cgroups", "is a file, not a cgroup"}},
		{"upper-case trust domain", "[tunnel.tls]\nallow_identities = [\"spiffe://SMESH.local/node/b\"]\n", []string{"tunnel.tls.allow_identities", "not a SPIFFE ID"}},
		{"identity with a query", "[tunnel.tls]\nallow_identities = [\"spiffe://smesh.local/node/b?x=1\"]\n", []string{"tunnel.tls.allow_identities", "not a SPIFFE ID"}},
		{"identity with a fragment", "[tunnel.tls]\nallow_identities = [\"spiffe://smesh.local/node/b#f\"]\n", []string{"tunnel.tls.allow_identities", "not a SPIFFE ID"}},
		{"identity with a port", "[tunnel.tls]\nallow_identities = [\"spiffe://smesh.local:443/node/b\"]\n", []string{"tunnel.tls.allow_identities", "not a SPIFFE ID"}},
		{"missing certificates", "[tunnel.tls]\ncert = \"" + dir + "/n.crt\"\nkey = \"" + dir + "/n.key\"\nca = \"" + dir + "/ca.crt\"\n",
			[]string{"tunnel.tls.cert", "smeshd certs init"}},
		{"certificate outside the trust domain", "", []string{"tunnel.tls.cert", `not in tunnel.tls.trust_domain "smesh.local"`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			conf := tc.conf
			if tc.name == "certificate outside the trust domain" {
				if _, err := certs.Init(dir, []string{"other"}, "example.org"); err != nil {
					t.Fatal(err)
				}
				conf = "[tunnel.tls]\ncert = \"" + dir + "/other.crt\"\nkey = \"" + dir + "/other.key\"\nca = \"" + dir + "/ca.crt\"\n"
			}
			path := filepath.Join(t.TempDir(), "smesh.toml")
			if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
				t.Fatal(err)
			}
			var out, errOut bytes.Buffer
			err := run(context.Background(), []string{"check", "-c", path}, &out, &errOut, nil)
			if err == nil {
				t.Fatalf("check accepted it:\n%s", out.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("check's error does not say %q:\n%v", w, err)
				}
			}
		})
	}
}

// TestCheckGoesOnPastEmptyNodeName: with [kubernetes] enabled and the node
// name's variable empty, check says so and still checks the kernel.
func TestCheckGoesOnPastEmptyNodeName(t *testing.T) {
	if _, err := testenv.Cgroup2Mount(); err != nil {
		testenv.SkipOrFail(t, "%v", err)
	}
	conf := "[tunnel.tls]\nmode = \"disabled\"\n[kubernetes]\nenabled = true\nnode_name_env = \"SMESH_TEST_UNSET_NODE\"\n"
	path := filepath.Join(t.TempDir(), "smesh.toml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SMESH_TEST_UNSET_NODE", "")
	var out, errOut bytes.Buffer
	err := run(context.Background(), []string{"check", "-c", path}, &out, &errOut, nil)
	if err == nil || !strings.Contains(err.Error(), "$SMESH_TEST_UNSET_NODE is empty") {
		t.Errorf("check's error does not name the empty variable: %v", err)
	}
	if !strings.Contains(out.String(), "kernel: Linux ") || !strings.Contains(out.String(), "datapath mode: ") {
		t.Errorf("check stopped at the empty variable:\n%s", out.String())
	}
}
