// Package admin is smeshd's admin HTTP server on [admin] listen: /metrics for
// Prometheus, /healthz and /readyz for systemd, Kubernetes and load balancers,
// and /debug/connections for an operator asking what smeshd relays right now.
//
// It is read-only: every endpoint answers GET and HEAD, anything else gets
// 405. It listens on loopback by default because /debug/connections shows
// who talks to whom.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	stdlog "log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/metrics"
)

// Conn is one connection smeshd relays or tunnels, as /debug/connections
// shows it.
type Conn struct {
	// Source is the client's address, OriginalDst the address it connected
	// to before capture.
	Source      string `json:"source"`
	OriginalDst string `json:"original_dst"`
	// SourceIdentity is the SPIFFE ID of the workload the connection
	// comes from, when smeshd knows it.
	SourceIdentity string `json:"source_identity,omitempty"`
	// Path is one of the metrics.Path* values.
	Path string `json:"path"`
	// TxBytes went from the client to the server, RxBytes back.
	TxBytes    int64   `json:"tx_bytes"`
	RxBytes    int64   `json:"rx_bytes"`
	AgeSeconds float64 `json:"age_seconds"`
}

// Connections is the /debug/connections document.
type Connections struct {
	// Connections are those smeshd relays or tunnels itself.
	Connections []Conn `json:"connections"`
	// SplicedHops counts the same-node hops spliced in the kernel (half the
	// sockets in the sockhash); nil when the splice path is not in use or
	// its counters could not be read (SpliceError then says why).
	SplicedHops *int   `json:"spliced_hops,omitempty"`
	SpliceError string `json:"splice_error,omitempty"`
}

// Readiness states. Draining is final: a server that drains is never ready
// again.
const (
	starting int32 = iota
	ready
	draining
)

// Server is the admin HTTP server.
type Server struct {
	ln    *stoppable
	mux   *http.ServeMux
	srv   *http.Server
	m     *metrics.Metrics
	conns func() []Conn
	log   zerolog.Logger
	state atomic.Int32
	// problem, when not empty, keeps a ready server answering 503 with
	// it: something smeshd should be doing it cannot do right now.
	problem atomic.Pointer[string]
	// served is closed when Serve returns.
	served chan struct{}
}

// stoppable is the admin listener: once stopped, its Accept fails for
// good, so that http.Server's loop ends without accepting what is queued
// (it retries a deadline, which it takes for a temporary error).
type stoppable struct {
	*net.TCPListener
	stopped atomic.Bool
}

func (l *stoppable) Accept() (net.Conn, error) {
	c, err := l.TCPListener.Accept()
	if err != nil && l.stopped.Load() {
		return nil, net.ErrClosed
	}
	return c, err
}

// New listens on addr at once, so that a port clash is a startup error, and
// returns a server that is not ready until SetReady(true). conns lists the
// relayed and tunnelled connections for /debug/connections; it may be nil.
func New(addr netip.AddrPort, m *metrics.Metrics, conns func() []Conn, log zerolog.Logger) (*Server, error) {
	if m == nil {
		return nil, errors.New("admin server without metrics")
	}
	ln, err := net.Listen("tcp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("admin.listen %s: %w", addr, err)
	}
	return NewFrom(ln.(*net.TCPListener), m, conns, log)
}

// NewFrom is New serving ln, the admin listener a predecessor handed over
// (pkg/handover), instead of listening.
func NewFrom(ln *net.TCPListener, m *metrics.Metrics, conns func() []Conn, log zerolog.Logger) (*Server, error) {
	if m == nil {
		return nil, errors.New("admin server without metrics")
	}
	s := &Server{
		ln:     &stoppable{TCPListener: ln},
		m:      m,
		conns:  conns,
		log:    log.With().Str("component", "admin").Logger(),
		served: make(chan struct{}),
	}

	// Method patterns: "GET" also matches HEAD, and the mux answers other
	// methods with 405 and an Allow header.
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.HandleFunc("GET /debug/connections", s.connections)
	s.mux = mux

	s.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		// Longer than the metrics handler's own 10 s scrape timeout.
		WriteTimeout:   30 * time.Second,
		IdleTimeout:    60 * time.Second,
		MaxHeaderBytes: 16 << 10,
		ErrorLog:       stdlog.New(errorLog{s.log}, "", 0),
	}
	return s, nil
}

// HandleJSON serves the document fn returns, as JSON, on GET path (e.g.
// "/debug/namespaces"). Call it before requests for path arrive.
func (s *Server) HandleJSON(path string, fn func() any) {
	s.mux.HandleFunc("GET "+path, func(w http.ResponseWriter, r *http.Request) {
		s.writeJSON(w, r, fn())
	})
}

// Addr is the address the server listens on (with the real port when the
// configured one was 0).
func (s *Server) Addr() netip.AddrPort {
	return s.ln.Addr().(*net.TCPAddr).AddrPort()
}

// Listener is the admin listener, for a hand-over: the caller sends a
// duplicate (File) and leaves this one to Release.
func (s *Server) Listener() *net.TCPListener { return s.ln.TCPListener }

// Serve answers requests until Shutdown or Release. It returns nil after
// them.
func (s *Server) Serve() error {
	defer close(s.served)
	s.log.Info().Stringer("listen", s.Addr()).Msg("admin server listening")
	if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !s.ln.stopped.Load() {
		return fmt.Errorf("serving admin on %s: %w", s.Addr(), err)
	}
	return nil
}

// Shutdown stops the server, waiting for requests in flight until ctx ends.
// It also closes the listener when Serve was never called. Call it last when
// draining, so that /metrics and /readyz stay visible while smeshd drains.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	// Shutdown closes only listeners that Serve took over.
	if cerr := s.ln.Close(); cerr != nil && !errors.Is(cerr, net.ErrClosed) && err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("shutting down admin server: %w", err)
	}
	return nil
}

// StopAccepting ends Serve's accept loop without accepting what the
// kernel has queued, and returns once it has ended: the listener stays
// open, so connections keep completing their handshake into its queue, for
// whoever holds it next (a successor it was handed to). Requests in flight
// go on. Release then closes this process's copy.
func (s *Server) StopAccepting() {
	s.ln.stopped.Store(true)
	s.ln.SetDeadline(time.Unix(1, 0)) // wakes a waiting Accept at once
	select {
	case <-s.served:
	case <-time.After(time.Second): // Serve never ran
	}
}

// Release hands the listener over: it stops accepting (StopAccepting),
// leaves what is queued to the successor and closes this process's copy.
// Requests in flight go on; Shutdown then waits for them.
func (s *Server) Release() error {
	s.StopAccepting()
	if err := s.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}

// SetReady marks the daemon ready (programs attached, listeners up) or not.
// It has no effect once the server drains.
func (s *Server) SetReady(ok bool) {
	from, to := ready, starting
	if ok {
		from, to = starting, ready
	}
	s.state.CompareAndSwap(from, to)
}

// SetProblem makes /readyz answer 503 with problem as the reason while the
// server is ready, for as long as smeshd cannot do all it is configured to
// (e.g. an enrolled cgroup is missing, so nothing is captured there). ""
// clears it.
func (s *Server) SetProblem(problem string) {
	s.problem.Store(&problem)
}

// SetDraining makes /readyz answer 503 for good, so that whatever routes
// traffic by readiness stops sending new work while connections drain.
func (s *Server) SetDraining() { s.state.Store(draining) }

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set(PIDHeader, strconv.Itoa(os.Getpid()))
	plain(w, http.StatusOK, "ok")
}

// PIDHeader names the process that answered /readyz and /healthz. Two
// smeshd of one node (a hand-over: a new pod beside the old one) share the
// admin listener, so an answer says nothing about the asker's own smeshd
// unless it says whose it is (daemon.Probe).
const PIDHeader = "Smesh-Pid"

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set(PIDHeader, strconv.Itoa(os.Getpid()))
	switch s.state.Load() {
	case ready:
		if p := s.problem.Load(); p != nil && *p != "" {
			plain(w, http.StatusServiceUnavailable, "not ready: "+*p)
			return
		}
		plain(w, http.StatusOK, "ready")
	case draining:
		plain(w, http.StatusServiceUnavailable, "not ready: draining")
	default:
		plain(w, http.StatusServiceUnavailable, "not ready: starting")
	}
}

func (s *Server) connections(w http.ResponseWriter, r *http.Request) {
	doc := Connections{Connections: []Conn{}}
	if s.conns != nil {
		if c := s.conns(); c != nil {
			doc.Connections = c
		}
	}
	sc, ok, err := s.m.Splice()
	switch {
	case err != nil:
		doc.SpliceError = err.Error()
	case ok:
		hops := sc.Sockets / 2
		doc.SplicedHops = &hops
	}
	s.writeJSON(w, r, doc)
}

func (s *Server) writeJSON(w http.ResponseWriter, r *http.Request, doc any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(doc); err != nil {
		s.log.Debug().Err(err).Str("path", r.URL.Path).Msg("writing JSON")
	}
}

func plain(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	fmt.Fprintln(w, msg)
}

// errorLog sends net/http's own complaints (bad requests, TLS probes on the
// plain port, accept errors) to the logger as warnings.
type errorLog struct{ log zerolog.Logger }

func (e errorLog) Write(p []byte) (int, error) {
	e.log.Warn().Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}
