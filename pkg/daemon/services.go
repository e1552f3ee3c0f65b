package daemon

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/datapath"
	"github.com/smesh-dev/smesh/pkg/metrics"
	"github.com/smesh-dev/smesh/pkg/services"
)

// staticServices keeps smesh.toml's [[services]] in the data path. A
// backend is local (chosen first by prefer_local and local_only, spliced
// when chosen) when its address is loopback or an address of a namespace
// smeshd knows on this node, so the services are written again whenever
// that set of addresses changes (enrol's NodeAddrs).
type staticServices struct {
	sink services.Sink
	log  zerolog.Logger

	mu    sync.Mutex
	cfg   []config.Service
	local map[netip.Addr]bool
	keys  map[services.Key]bool // what the sink holds from us
}

func newStaticServices(sink services.Sink, log zerolog.Logger) *staticServices {
	return &staticServices{sink: sink, log: log.With().Str("component", "services").Logger(),
		local: make(map[netip.Addr]bool), keys: make(map[services.Key]bool)}
}

// set puts cfg in force, all of it or none of it: should one service fail,
// the previous set is written back.
func (s *staticServices) set(cfg []config.Service) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	prev := s.cfg
	if err := s.write(cfg); err != nil {
		if rerr := s.write(prev); rerr != nil {
			s.log.Error().Err(rerr).Msg("writing back the previous [[services]]")
		}
		return err
	}
	s.cfg = cfg
	return nil
}

// setLocal is enrol's NodeAddrs: the addresses of this node changed.
func (s *staticServices) setLocal(addrs []netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	local := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		local[a.Unmap()] = true
	}
	s.local = local
	if err := s.write(s.cfg); err != nil {
		s.log.Error().Err(err).Msg("rewriting [[services]] after this node's addresses changed")
	}
}

// write makes the sink hold exactly cfg: every service updated, then those
// no longer configured deleted.
func (s *staticServices) write(cfg []config.Service) error {
	want := make(map[services.Key]bool)
	for _, c := range cfg {
		svc := s.service(c)
		if err := s.sink.Update(svc); err != nil {
			return fmt.Errorf("services: %w", err)
		}
		want[svc.Key] = true
		s.keys[svc.Key] = true
	}
	var errs []error
	for k := range s.keys {
		if !want[k] {
			if err := s.sink.Delete(k); err != nil {
				errs = append(errs, err)
				continue
			}
			delete(s.keys, k)
		}
	}
	return errors.Join(errs...)
}

// below returns the way for the cluster's Services (pkg/kube) into sink,
// beneath [[services]]: an entry of smesh.toml takes precedence over a
// cluster Service with the same VIP and port (it is the operator's word on
// this node, and without it the two would overwrite each other on every
// change). The cluster's update of such a key is refused, so its watcher
// retries it and it comes into force once the entry leaves smesh.toml;
// its delete of one is not the cluster's to make, and succeeds as is.
func (s *staticServices) below(sink services.Sink) services.Sink {
	return clusterSink{s, sink}
}

type clusterSink struct {
	static *staticServices
	sink   services.Sink
}

func (c clusterSink) Update(svc services.Service) error {
	c.static.mu.Lock()
	defer c.static.mu.Unlock()
	if c.static.keys[svc.Key] {
		return fmt.Errorf("%s is also a [[services]] entry of smesh.toml, which takes precedence over the cluster's %s", svc.Key, svc.Name)
	}
	return c.sink.Update(svc)
}

func (c clusterSink) Delete(k services.Key) error {
	c.static.mu.Lock()
	defer c.static.mu.Unlock()
	if c.static.keys[k] {
		return nil
	}
	return c.sink.Delete(k)
}

// service is c as the data path takes it. Static backends are always ready.
func (s *staticServices) service(c config.Service) services.Service {
	svc := services.Service{
		Key:             services.Key{VIP: c.VIP, Port: c.Port},
		Name:            c.Name,
		AffinityTimeout: c.SessionAffinityTimeout.Duration,
		LocalOnly:       c.LocalOnly,
		PreferLocal:     c.PreferLocal,
	}
	for _, b := range c.Backends {
		a := b.Addr().Unmap()
		svc.Backends = append(svc.Backends, services.Backend{
			Addr: b, Local: a.IsLoopback() || s.local[a], Ready: true, Serving: true,
		})
	}
	return svc
}

// serviceView is one service as /debug/services shows it.
type serviceView struct {
	Name            string        `json:"name"`
	VIP             netip.Addr    `json:"vip"`
	Port            uint16        `json:"port"`
	Backends        []backendView `json:"backends"`
	AffinityTimeout string        `json:"session_affinity_timeout,omitempty"`
	LocalOnly       bool          `json:"local_only"`
	PreferLocal     bool          `json:"prefer_local"`
}

type backendView struct {
	Addr        netip.AddrPort `json:"addr"`
	Node        string         `json:"node,omitempty"`
	Local       bool           `json:"local"`
	Ready       bool           `json:"ready"`
	Serving     bool           `json:"serving"`
	Terminating bool           `json:"terminating"`
	// Usable: connect4 may send a connection there now (Service.Usable).
	Usable bool `json:"usable"`
}

// debugServices is /debug/services: every service the data path holds,
// whatever its source.
func debugServices(t *datapath.ServiceTable) func() any {
	return func() any {
		out := []serviceView{}
		for _, s := range t.Services() {
			v := serviceView{Name: s.Name, VIP: s.VIP, Port: s.Port, LocalOnly: s.LocalOnly, PreferLocal: s.PreferLocal, Backends: []backendView{}}
			if s.AffinityTimeout > 0 {
				v.AffinityTimeout = s.AffinityTimeout.String()
			}
			usable := make(map[netip.AddrPort]bool)
			for _, b := range s.Usable() {
				usable[b.Addr] = true
			}
			for _, b := range s.Backends {
				v.Backends = append(v.Backends, backendView{Addr: b.Addr, Node: b.Node, Local: b.Local, Ready: b.Ready,
					Serving: b.Serving, Terminating: b.Terminating, Usable: usable[b.Addr]})
			}
			out = append(out, v)
		}
		return out
	}
}

// serviceCounts reads the service counters at scrape time.
func (d *daemon) serviceCounts() (metrics.ServiceCounts, error) {
	f := d.dp.Services().Fill()
	sc := metrics.ServiceCounts{Services: f.Services, Backends: f.Backends}
	c, err := d.dp.Counters()
	if err != nil {
		return sc, err
	}
	sc.LocalSplice, sc.Tunnel, sc.Direct, sc.NoBackend = c.SvcLocal, c.SvcTunnel, c.SvcDirect, c.SvcNoBackend
	return sc, nil
}
