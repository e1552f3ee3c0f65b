package certs

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
)

func TestInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	ca, err := Init(dir, []string{"a", "b"}, "example.org")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		name string
		mode os.FileMode
	}{{"ca.crt", 0o644}, {"ca.key", 0o600}, {"a.crt", 0o644}, {"a.key", 0o600}, {"b.crt", 0o644}, {"b.key", 0o600}} {
		fi, err := os.Stat(filepath.Join(dir, f.name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != f.mode {
			t.Errorf("%s has mode %v, want %v", f.name, fi.Mode().Perm(), f.mode)
		}
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	for _, n := range []string{"a", "b"} {
		pair, err := tls.LoadX509KeyPair(filepath.Join(dir, n+".crt"), filepath.Join(dir, n+".key"))
		if err != nil {
			t.Fatal(err)
		}
		leaf := pair.Leaf
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://example.org/node/"+n {
			t.Errorf("%s: URI SANs %v", n, leaf.URIs)
		}
		for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
				t.Errorf("%s: does not verify for usage %v: %v", n, usage, err)
			}
		}
	}

	// A second run reuses the CA: old and new node certificates verify
	// against the same ca.crt.
	again, err := Init(dir, []string{"c"}, "example.org")
	if err != nil {
		t.Fatal(err)
	}
	if !again.Cert.Equal(ca.Cert) {
		t.Error("second Init made a new CA")
	}
	if _, err := Init(dir, []string{"d"}, "other.org"); err == nil {
		t.Error("Init with another trust domain reused the CA silently")
	}
}

func TestInitRejects(t *testing.T) {
	dir := t.TempDir()
	for _, nodes := range [][]string{nil, {"ca"}, {"../x"}, {"A"}, {""}, {"a/b"}} {
		if _, err := Init(dir, nodes, DefaultTrustDomain); err == nil {
			t.Errorf("Init(%q) succeeded", nodes)
		}
	}
	if _, err := Init(t.TempDir(), []string{"a"}, "Bad Domain"); err == nil {
		t.Error("Init accepted a bad trust domain")
	}
}
