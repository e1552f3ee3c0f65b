// Package certs makes development certificates for smesh's tunnel: an ECDSA
// P-256 CA and node certificates whose identity is a SPIFFE ID in a URI SAN
// (spiffe://TRUST-DOMAIN/node/NAME). Each node certificate serves both as
// the node's server certificate and as its client certificate. For demos and
// tests: production nodes get their certificates from SPIRE, cert-manager or
// a company CA.
package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// DefaultTrustDomain is the trust domain of `smeshd certs init` unless told
// otherwise.
const DefaultTrustDomain = "smesh.local"

// Validity of what Init makes. Development certificates: long enough that a
// demo machine does not trip over them, short enough to be visibly not
// production material.
const (
	CAValidity   = 10 * 365 * 24 * time.Hour
	NodeValidity = 365 * 24 * time.Hour
)

// nodeName keeps names usable as file names and SPIFFE path segments.
var nodeName = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,62})$`)

// trustDomain follows the SPIFFE spec: lowercase letters, digits, dots,
// dashes and underscores.
var trustDomain = regexp.MustCompile(`^[a-z0-9._-]{1,255}$`)

func checkNodeName(name string) error {
	if !nodeName.MatchString(name) || name == "ca" {
		return fmt.Errorf("node name %q: want 1 to 63 lowercase letters, digits, '.', '-' or '_', starting with a letter or digit, and not \"ca\"", name)
	}
	return nil
}

// CA is a certificate authority that issues node certificates.
type CA struct {
	Cert        *x509.Certificate
	Key         *ecdsa.PrivateKey
	TrustDomain string
}

// NewCA makes a self-signed CA for trustDomain, valid from notBefore to
// notAfter.
func NewCA(domain string, notBefore, notAfter time.Time) (*CA, error) {
	if !trustDomain.MatchString(domain) {
		return nil, fmt.Errorf("trust domain %q: want lowercase letters, digits, '.', '-' and '_' only", domain)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	td, _ := url.Parse("spiffe://" + domain)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{"smesh development CA"}, CommonName: domain},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
		URIs:                  []*url.URL{td},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("creating CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, TrustDomain: domain}, nil
}

// ID returns the SPIFFE ID of node name in the CA's trust domain.
func (ca *CA) ID(name string) string {
	return "spiffe://" + ca.TrustDomain + "/node/" + name
}

// Issue makes a key and a certificate for node name, valid from notBefore to
// notAfter, usable for TLS client and server authentication. It returns both
// PEM-encoded.
func (ca *CA) Issue(name string, notBefore, notAfter time.Time) (certPEM, keyPEM []byte, err error) {
	if err := checkNodeName(name); err != nil {
		return nil, nil, err
	}
	return ca.IssueURIs(name, []string{ca.ID(name)}, notBefore, notAfter)
}

// IssueURIs is Issue with the URI SANs given: none, or identities outside
// the CA's trust domain. Tests make with it the certificates a peer must
// refuse although the CA signed them.
func (ca *CA) IssueURIs(name string, uris []string, notBefore, notAfter time.Time) (certPEM, keyPEM []byte, err error) {
	var ids []*url.URL
	for _, u := range uris {
		id, err := url.Parse(u)
		if err != nil {
			return nil, nil, err
		}
		ids = append(ids, id)
	}
	return ca.Sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: name},
		NotBefore:   notBefore,
		NotAfter:    notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        ids,
	})
}

// Sign makes a key and a certificate as tmpl describes it (subject, names,
// validity, usages), signed by the CA; it sets tmpl's serial number. It
// returns both PEM-encoded. Tests make with it certificates of other shapes
// than a node's, such as a Kubernetes API server's and its clients'.
func (ca *CA) Sign(tmpl *x509.Certificate) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl.SerialNumber = serial()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating certificate for %s: %w", tmpl.Subject.CommonName, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pemBlock("CERTIFICATE", der), pemBlock("PRIVATE KEY", keyDER), nil
}

// CertPEM returns the CA certificate, PEM-encoded.
func (ca *CA) CertPEM() []byte { return pemBlock("CERTIFICATE", ca.Cert.Raw) }

// KeyPEM returns the CA key, PEM-encoded.
func (ca *CA) KeyPEM() ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return nil, err
	}
	return pemBlock("PRIVATE KEY", der), nil
}

// Init writes a development set into dir: ca.crt and ca.key, and NAME.crt
// and NAME.key for every node. If dir already holds ca.crt and ca.key, that
// CA signs the new node certificates (so nodes can be added later, and a
// node's certificate renewed); otherwise a new CA for domain is made.
// Existing node files are replaced atomically (rename), which a running
// smeshd picks up as a rotation. Keys are written 0600.
func Init(dir string, nodes []string, domain string) (*CA, error) {
	if len(nodes) == 0 {
		return nil, errors.New("no nodes (want e.g. --nodes a,b)")
	}
	for _, n := range nodes {
		if err := checkNodeName(n); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	now := time.Now()
	ca, err := LoadCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	switch {
	case errors.Is(err, os.ErrNotExist):
		if ca, err = NewCA(domain, now.Add(-time.Hour), now.Add(CAValidity)); err != nil {
			return nil, err
		}
		keyPEM, err := ca.KeyPEM()
		if err != nil {
			return nil, err
		}
		if err := writeFile(filepath.Join(dir, "ca.key"), keyPEM, 0o600); err != nil {
			return nil, err
		}
		if err := writeFile(filepath.Join(dir, "ca.crt"), ca.CertPEM(), 0o644); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	case ca.TrustDomain != domain:
		return nil, fmt.Errorf("%s is a CA for trust domain %q, not %q (use --trust-domain %s, or another --dir)", dir, ca.TrustDomain, domain, ca.TrustDomain)
	}
	for _, n := range nodes {
		certPEM, keyPEM, err := ca.Issue(n, now.Add(-time.Hour), now.Add(NodeValidity))
		if err != nil {
			return nil, err
		}
		// Key first: a reader that sees the new certificate finds its key.
		if err := writeFile(filepath.Join(dir, n+".key"), keyPEM, 0o600); err != nil {
			return nil, err
		}
		if err := writeFile(filepath.Join(dir, n+".crt"), certPEM, 0o644); err != nil {
			return nil, err
		}
	}
	return ca, nil
}

// LoadCA reads a CA that Init wrote. Its trust domain is taken from its
// spiffe:// URI SAN.
func LoadCA(certFile, keyFile string) (*CA, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, err
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, fmt.Errorf("%s or %s holds no PEM block", certFile, keyFile)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certFile, err)
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", keyFile, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: not an ECDSA key", keyFile)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].Scheme != "spiffe" {
		return nil, fmt.Errorf("%s: not a CA made by smeshd certs init (no spiffe:// trust domain)", certFile)
	}
	return &CA{Cert: cert, Key: key, TrustDomain: cert.URIs[0].Host}, nil
}

// writeFile replaces path atomically with data.
func writeFile(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // fails harmlessly after the rename
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}
