package tunnel

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ExpiryWarning is how close to its end a certificate must be for smeshd
// to warn about it.
const ExpiryWarning = 7 * 24 * time.Hour

// How often the certificate files are checked for changes (on handshakes,
// so an idle node does not poll), and how often an upcoming expiry is
// repeated in the log.
const (
	reloadInterval = time.Second
	expiryRepeat   = time.Hour
)

// Credentials are this node's certificate and key and the CA its peers'
// certificates must chain to, read from PEM files and read again when a
// file changes: rotation needs no restart, and open connections keep the
// session they have. A change is noticed at the first handshake at least a
// second after it; a set that does not load (a half-written file, a key
// that does not match) is logged and the previous set stays in use.
type Credentials struct {
	certFile, keyFile, caFile string
	policy                    atomic.Pointer[IdentityPolicy] // changed by reloads
	log                       zerolog.Logger

	cur        atomic.Pointer[credSet]
	nextCheck  atomic.Int64 // unix nanoseconds
	mu         sync.Mutex   // serialises reloads
	lastWarned time.Time    // under mu
}

// credSet is one loaded generation of files, with the TLS configurations
// built from it. A client session cache belongs to one generation: sessions
// verified under an old CA or presenting an old certificate are not resumed.
type credSet struct {
	stamps [3]fileStamp
	cert   tls.Certificate
	pool   *x509.CertPool
	server *tls.Config
	client *tls.Config
}

type fileStamp struct {
	mtime time.Time
	size  int64
	ino   uint64
}

// LoadCredentials reads the three files. policy says which peers'
// certificates are accepted; this node's own must pass its trust domain.
func LoadCredentials(certFile, keyFile, caFile string, policy *IdentityPolicy, log zerolog.Logger) (*Credentials, error) {
	c := &Credentials{
		certFile: certFile, keyFile: keyFile, caFile: caFile,
		log: log.With().Str("component", "tunnel-tls").Logger(),
	}
	c.policy.Store(policy)
	set, err := c.load()
	if err != nil {
		return nil, err
	}
	c.cur.Store(set)
	c.nextCheck.Store(time.Now().Add(reloadInterval).UnixNano())
	c.warnExpiry(set, time.Now())
	return c, nil
}

// CheckPolicy reports whether policy could be put in force: this node's
// certificate must pass its trust domain.
func (c *Credentials) CheckPolicy(policy *IdentityPolicy) error {
	return policy.checkOwn(c.certFile, c.cur.Load().cert.Leaf)
}

// SetPolicy puts policy in force for new handshakes (a reload) and returns
// the one it replaces. Call CheckPolicy first.
func (c *Credentials) SetPolicy(policy *IdentityPolicy) (previous *IdentityPolicy) {
	return c.policy.Swap(policy)
}

// Identity is the SPIFFE ID of this node's certificate, or "".
func (c *Credentials) Identity() string {
	id, err := x509svid.IDFromCert(c.cur.Load().cert.Leaf)
	if err != nil {
		return ""
	}
	return id.String()
}

// NotAfter is when this node's certificate expires (for metrics).
func (c *Credentials) NotAfter() time.Time { return c.cur.Load().cert.Leaf.NotAfter }

// ServerConfig is the TLS configuration of the tunnel server. It picks up
// reloaded files on every handshake.
func (c *Credentials) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			set := c.current()
			if raw, ok := hello.Conn.(*rawConn); ok {
				raw.set = set
			}
			return set.server, nil
		},
	}
}

// clientConfig is the TLS configuration for the next tunnel connection, to
// the node of dst, and the credentials it holds: a server dst is pinned to
// ([[tunnel.tls.peers]]) must have one of the pinned identities.
func (c *Credentials) clientConfig(dst netip.Addr) (*tls.Config, *credSet) {
	set := c.current()
	if _, ok := c.policy.Load().pinned(dst); !ok {
		return set.client, set
	}
	// The clone shares the session cache: a session resumed with another
	// server is checked all the same (VerifyConnection runs on resumption).
	cfg := set.client.Clone()
	cfg.VerifyConnection = func(cs tls.ConnectionState) error { return c.verifyServer(set, cs, dst) }
	return cfg, set
}

// current returns the credentials in force, first reloading them if a
// file changed.
func (c *Credentials) current() *credSet {
	set := c.cur.Load()
	now := time.Now()
	if now.UnixNano() < c.nextCheck.Load() || !c.mu.TryLock() {
		return set
	}
	defer c.mu.Unlock()
	c.nextCheck.Store(now.Add(reloadInterval).UnixNano())
	if stamps, err := c.stamps(); err == nil && stamps == set.stamps {
		c.warnExpiry(set, now)
		return set
	}
	next, err := c.load()
	if err != nil {
		c.log.Error().Err(err).Msg("certificate files changed but do not load; keeping the previous ones")
		return set
	}
	c.cur.Store(next)
	c.log.Info().Str("cert", c.certFile).Time("not_after", next.cert.Leaf.NotAfter).Msg("certificate files changed: reloaded")
	c.lastWarned = time.Time{}
	c.warnExpiry(next, now)
	return next
}

func (c *Credentials) warnExpiry(set *credSet, now time.Time) {
	if now.Sub(c.lastWarned) < expiryRepeat {
		return
	}
	for _, f := range []struct {
		what, file string
		cert       *x509.Certificate
	}{{"node certificate", c.certFile, set.cert.Leaf}} {
		if left := f.cert.NotAfter.Sub(now); left < ExpiryWarning {
			c.log.Warn().Str("file", f.file).Time("not_after", f.cert.NotAfter).
				Str("left", left.Round(time.Minute).String()).Msg(f.what + " expires soon: renew it (smesh reloads it without a restart)")
			c.lastWarned = now
		}
	}
}

func (c *Credentials) stamps() ([3]fileStamp, error) {
	var st [3]fileStamp
	for i, f := range []string{c.certFile, c.keyFile, c.caFile} {
		fi, err := os.Stat(f)
		if err != nil {
			return st, err
		}
		st[i] = fileStamp{mtime: fi.ModTime(), size: fi.Size()}
		if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
			st[i].ino = sys.Ino
		}
	}
	return st, nil
}

func (c *Credentials) load() (*credSet, error) {
	// Stamps first: a file changed while loading is loaded again next time.
	stamps, err := c.stamps()
	if err != nil {
		return nil, err
	}
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return nil, fmt.Errorf("loading tunnel.tls.cert %s and tunnel.tls.key %s: %w", c.certFile, c.keyFile, err)
	}
	caPEM, err := os.ReadFile(c.caFile)
	if err != nil {
		return nil, fmt.Errorf("reading tunnel.tls.ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("tunnel.tls.ca %s holds no PEM certificate", c.caFile)
	}
	// Our own certificate must chain to the CA too: a node whose peers
	// would all refuse it should say so at start, not at every handshake.
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		if ic, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(ic)
		}
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("tunnel.tls.cert %s does not verify against tunnel.tls.ca %s: %w", c.certFile, c.caFile, err)
	}
	if err := c.policy.Load().checkOwn(c.certFile, cert.Leaf); err != nil {
		return nil, err
	}

	set := &credSet{stamps: stamps, cert: cert, pool: pool}
	set.server = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		// Also runs on resumed sessions (crypto/tls checks there that
		// the stored chain still verifies against this ClientCAs).
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := c.policy.Load().check(cs.PeerCertificates[0])
			return err
		},
		// Protocol v2 for clients that offer it; a client that offers
		// no ALPN (an older node) speaks v1.
		NextProtos:                  []string{ALPN2},
		DynamicRecordSizingDisabled: true,
	}
	set.client = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		// Peers are dialled by IP address and named by SPIFFE ID, not by
		// DNS name or IP SAN, so crypto/tls's host name check cannot
		// apply: verifyServer checks the chain and the identity instead,
		// on every handshake, resumed ones included.
		InsecureSkipVerify:          true,
		VerifyConnection:            func(cs tls.ConnectionState) error { return c.verifyServer(set, cs, netip.Addr{}) },
		ClientSessionCache:          tls.NewLRUClientSessionCache(1024),
		NextProtos:                  []string{ALPN2},
		DynamicRecordSizingDisabled: true,
	}
	return set, nil
}

// verifyServer checks a peer server's certificate: its chain against the CA
// (on a resumed session, the chain was verified when the session was made,
// in this generation's cache; only its validity period is checked again),
// then its identity, pinned for dst if dst is valid.
func (c *Credentials) verifyServer(set *credSet, cs tls.ConnectionState, dst netip.Addr) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("peer sent no certificate")
	}
	leaf := cs.PeerCertificates[0]
	if cs.DidResume {
		now := time.Now()
		for _, cert := range cs.PeerCertificates {
			if now.Before(cert.NotBefore) || now.After(cert.NotAfter) {
				return x509.CertificateInvalidError{Cert: cert, Reason: x509.Expired}
			}
		}
	} else {
		inter := x509.NewCertPool()
		for _, ic := range cs.PeerCertificates[1:] {
			inter.AddCert(ic)
		}
		_, err := leaf.Verify(x509.VerifyOptions{
			Roots:         set.pool,
			Intermediates: inter,
			KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		})
		if err != nil {
			return err
		}
	}
	if dst.IsValid() {
		return c.policy.Load().checkServer(leaf, dst)
	}
	_, err := c.policy.Load().check(leaf)
	return err
}

// PeerID returns the SPIFFE ID of a peer certificate, or "" (for logs).
func PeerID(cs tls.ConnectionState) string {
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		return ""
	}
	return id.String()
}

// handshakeReason classifies a failed TLS handshake for the counters.
func handshakeReason(err error) Reason {
	var rh tls.RecordHeaderError
	var ua x509.UnknownAuthorityError
	var ci x509.CertificateInvalidError
	var ie *identityError
	var ne interface{ Timeout() bool }
	switch {
	case errors.As(err, &rh):
		return ReasonNotTLS
	case errors.As(err, &ie):
		return ie.reason
	case errors.As(err, &ua):
		return ReasonUnknownCA
	case errors.As(err, &ci) && ci.Reason == x509.Expired:
		return ReasonCertExpired
	case errors.As(err, &ne) && ne.Timeout():
		return ReasonHandshakeTimeout
	}
	return ReasonTLSHandshake
}
