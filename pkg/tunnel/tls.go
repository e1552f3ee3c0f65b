package tunnel

import (
	"context"
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
	"github.com/spiffe/go-spiffe/v2/workloadapi"
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
// certificates must chain to. They come from PEM files, read again when a
// file changes (LoadCredentials), or from a SPIFFE Workload API, which
// pushes every rotation (WorkloadAPICredentials). Either way rotation needs
// no restart, and open connections keep the session they have. A file
// change is noticed at the first handshake at least a second after it; a set
// that does not load (a half-written file, a key that does not match) is
// logged and the previous set stays in use.
type Credentials struct {
	certFile, keyFile, caFile string
	policy                    atomic.Pointer[IdentityPolicy] // changed by reloads
	svids                     *workloadapi.X509Source        // nil: files
	source                    string                         // the cert file or the Workload API's address, for logs and metrics
	stop                      chan struct{}                  // closed by Close
	closeOnce                 sync.Once
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
		certFile: certFile, keyFile: keyFile, caFile: caFile, source: certFile,
		stop: make(chan struct{}),
		log:  log.With().Str("component", "tunnel-tls").Logger(),
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

// WorkloadAPICredentials takes this node's certificate (its X.509 SVID)
// and the CA (the X.509 bundle of the SVID's trust domain) from the SPIFFE
// Workload API at addr ("unix:///run/spire/agent-sockets/spire-agent.sock",
// a SPIRE agent's socket), waiting for the first SVID until ctx is done.
// The agent pushes each rotation; new handshakes use it from then on. Close
// ends the stream.
func WorkloadAPICredentials(ctx context.Context, addr string, policy *IdentityPolicy, log zerolog.Logger) (_ *Credentials, err error) {
	c := &Credentials{
		source: addr,
		stop:   make(chan struct{}),
		log:    log.With().Str("component", "tunnel-tls").Str("workload_api", addr).Logger(),
	}
	c.policy.Store(policy)
	c.svids, err = workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	if err != nil {
		return nil, fmt.Errorf("tunnel.tls.workload_api_socket %s: no X.509 SVID: %w "+
			"(is the SPIRE agent running there, and is smeshd registered with it?)", addr, err)
	}
	defer func() {
		if err != nil {
			c.svids.Close()
		}
	}()
	set, err := c.fromWorkloadAPI()
	if err != nil {
		return nil, err
	}
	c.cur.Store(set)
	c.nextCheck.Store(time.Now().Add(reloadInterval).UnixNano())
	c.log.Info().Str("spiffe_id", spiffeIDOf(set.cert.Leaf)).Time("not_after", set.cert.Leaf.NotAfter).Msg("X.509 SVID from the Workload API")
	c.warnExpiry(set, time.Now())
	go c.follow()
	return c, nil
}

// follow installs every SVID or bundle the Workload API pushes.
func (c *Credentials) follow() {
	for {
		select {
		case <-c.stop:
			return
		case <-c.svids.Updated():
		}
		next, err := c.fromWorkloadAPI()
		if err != nil {
			c.log.Error().Err(err).Msg("the Workload API sent an SVID or bundle that does not load; keeping the previous one")
			continue
		}
		c.mu.Lock()
		c.cur.Store(next)
		c.lastWarned = time.Time{}
		c.mu.Unlock()
		c.log.Info().Str("spiffe_id", spiffeIDOf(next.cert.Leaf)).Time("not_after", next.cert.Leaf.NotAfter).
			Msg("X.509 SVID or bundle rotated by the Workload API")
	}
}

// fromWorkloadAPI builds a generation from the source's current SVID and
// its trust domain's bundle.
func (c *Credentials) fromWorkloadAPI() (*credSet, error) {
	svid, err := c.svids.GetX509SVID()
	if err != nil {
		return nil, err
	}
	bundle, err := c.svids.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
	if err != nil {
		return nil, fmt.Errorf("no X.509 bundle for trust domain %s: %w", svid.ID.TrustDomain(), err)
	}
	if len(svid.Certificates) == 0 {
		return nil, errors.New("X.509 SVID without a certificate")
	}
	cert := tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, sc := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, sc.Raw)
	}
	pool := x509.NewCertPool()
	for _, ca := range bundle.X509Authorities() {
		pool.AddCert(ca)
	}
	return c.newSet([3]fileStamp{}, cert, pool, "the Workload API's SVID", "its trust bundle")
}

// Source names where the credentials come from: the certificate file, or
// the Workload API's address.
func (c *Credentials) Source() string { return c.source }

// Close stops following the Workload API (nothing for files).
func (c *Credentials) Close() error {
	var err error
	c.closeOnce.Do(func() {
		close(c.stop)
		if c.svids != nil {
			err = c.svids.Close()
		}
	})
	return err
}

// spiffeIDOf is the SPIFFE ID of cert, or "".
func spiffeIDOf(cert *x509.Certificate) string {
	id, err := x509svid.IDFromCert(cert)
	if err != nil {
		return ""
	}
	return id.String()
}

// CheckPolicy reports whether policy could be put in force: this node's
// certificate must pass its trust domain.
func (c *Credentials) CheckPolicy(policy *IdentityPolicy) error {
	return policy.checkOwn(c.source, c.cur.Load().cert.Leaf)
}

// SetPolicy puts policy in force for new handshakes (a reload) and returns
// the one it replaces. Call CheckPolicy first.
func (c *Credentials) SetPolicy(policy *IdentityPolicy) (previous *IdentityPolicy) {
	return c.policy.Swap(policy)
}

// Identity is the SPIFFE ID of this node's certificate, or "".
func (c *Credentials) Identity() string { return spiffeIDOf(c.cur.Load().cert.Leaf) }

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
	if c.svids != nil {
		// Pushed by the Workload API (follow): nothing to poll.
		set = c.cur.Load()
		c.warnExpiry(set, now)
		return set
	}
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
	}{{"node certificate", c.source, set.cert.Leaf}} {
		threshold := ExpiryWarning
		if c.svids != nil {
			// SVIDs live for hours (SPIRE's default is 1h) and the agent
			// rotates them at half their life: one with a quarter left
			// was not rotated in time.
			threshold = f.cert.NotAfter.Sub(f.cert.NotBefore) / 4
		}
		if left := f.cert.NotAfter.Sub(now); left < threshold {
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
	return c.newSet(stamps, cert, pool, "tunnel.tls.cert "+c.certFile, "tunnel.tls.ca "+c.caFile)
}

// newSet builds a generation from a certificate and the CAs peers must
// chain to. certName and caName say where they came from, for errors.
func (c *Credentials) newSet(stamps [3]fileStamp, cert tls.Certificate, pool *x509.CertPool, certName, caName string) (*credSet, error) {
	// Our own certificate must chain to the CA too: a node whose peers
	// would all refuse it should say so at start, not at every handshake.
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		if ic, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(ic)
		}
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("%s does not verify against %s: %w", certName, caName, err)
	}
	if err := c.policy.Load().checkOwn(c.source, cert.Leaf); err != nil {
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
		// Protocol v3 or v2 for clients that offer it (the server's
		// order decides: v3 first); a client that offers no ALPN (an
		// older node) speaks v1.
		NextProtos:                  []string{ALPN3, ALPN2},
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
		NextProtos:                  []string{ALPN3, ALPN2},
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
	return spiffeIDOf(cs.PeerCertificates[0])
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

// handshake runs tc's handshake in a goroutine of its own, which ends with
// it: certificate verification and the key exchange grow a stack to tens
// of KiB, and the goroutine that waits here goes on to relay the
// connection for as long as it lasts, parked most of the time; its stack
// stays small.
func handshake(ctx context.Context, tc *tls.Conn) error {
	done := make(chan error, 1)
	go func() { done <- tc.HandshakeContext(ctx) }()
	return <-done
}
