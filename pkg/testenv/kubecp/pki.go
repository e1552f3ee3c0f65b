package kubecp

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/smesh-dev/smesh/pkg/certs"
)

// pki is what the control plane authenticates with, all made afresh for
// each Start: one CA that signs the API server's serving certificate and
// the admin's client certificate (kube-apiserver --client-ca-file), and the
// key pair service account tokens are signed and checked with.
type pki struct {
	caPEM                     []byte
	adminCertPEM, adminKeyPEM []byte
	// Files, for kube-apiserver's flags.
	caFile, servingCert, servingKey, saKeyFile, saPubFile string
}

// adminUser is the test admin's name; its group system:masters is bound to
// cluster-admin by the API server's bootstrap RBAC policy.
const adminUser = "smesh-test-admin"

func newPKI(dir string) (*pki, error) {
	notBefore, notAfter := time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
	ca, err := certs.NewCA("kubecp.test", notBefore, notAfter)
	if err != nil {
		return nil, err
	}
	p := &pki{
		caPEM:       ca.CertPEM(),
		caFile:      filepath.Join(dir, "ca.crt"),
		servingCert: filepath.Join(dir, "apiserver.crt"),
		servingKey:  filepath.Join(dir, "apiserver.key"),
		saKeyFile:   filepath.Join(dir, "sa.key"),
		saPubFile:   filepath.Join(dir, "sa.pub"),
	}
	servingCertPEM, servingKeyPEM, err := ca.Sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:   notBefore,
		NotAfter:    notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	})
	if err != nil {
		return nil, err
	}
	// The API server takes a client certificate's CN as the user name and
	// its O as the groups.
	p.adminCertPEM, p.adminKeyPEM, err = ca.Sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: adminUser, Organization: []string{"system:masters"}},
		NotBefore:   notBefore,
		NotAfter:    notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return nil, err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	saKeyDER, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		return nil, err
	}
	saPubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	for name, data := range map[string][]byte{
		p.caFile:      p.caPEM,
		p.servingCert: servingCertPEM,
		p.servingKey:  servingKeyPEM,
		p.saKeyFile:   pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: saKeyDER}),
		p.saPubFile:   pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPubDER}),
	} {
		if err := os.WriteFile(name, data, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}
