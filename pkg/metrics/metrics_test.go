package metrics

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/tunnel"
)

// scrape fetches /metrics through the handler and parses the text format.
func scrape(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	req.Header.Set("Accept", "text/plain")
	m.Handler().ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("scrape: status %d: %s", rec.Code, rec.Body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(rec.Body)
	if err != nil {
		t.Fatalf("parsing scrape: %v", err)
	}
	return fams
}

// series renders each sample of a family as `{l1="v1",l2="v2"} value`,
// sorted, so tests compare exact label sets and values.
func series(t *testing.T, fams map[string]*dto.MetricFamily, name string) []string {
	t.Helper()
	f, ok := fams[name]
	if !ok {
		return nil
	}
	var out []string
	for _, m := range f.GetMetric() {
		var labels []string
		for _, l := range m.GetLabel() {
			labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
		}
		var v float64
		switch {
		case m.Counter != nil:
			v = m.GetCounter().GetValue()
		case m.Gauge != nil:
			v = m.GetGauge().GetValue()
		case m.Histogram != nil:
			v = float64(m.GetHistogram().GetSampleCount())
		default:
			t.Fatalf("%s: unexpected metric type %v", name, f.GetType())
		}
		out = append(out, fmt.Sprintf("{%s} %g", strings.Join(labels, ","), v))
	}
	sort.Strings(out)
	return out
}

func expect(t *testing.T, fams map[string]*dto.MetricFamily, name string, typ dto.MetricType, want ...string) {
	t.Helper()
	if f, ok := fams[name]; ok && f.GetType() != typ {
		t.Errorf("%s: type %v, want %v", name, f.GetType(), typ)
	}
	got := series(t, fams, name)
	sort.Strings(want)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("%s:\ngot:\n  %s\nwant:\n  %s", name, strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

func TestFreshScrape(t *testing.T) {
	m := New("v1.2.3")
	fams := scrape(t, m)

	expect(t, fams, "smesh_build_info", dto.MetricType_GAUGE, `{version="v1.2.3"} 1`)
	expect(t, fams, "smesh_connections_total", dto.MetricType_COUNTER,
		`{path="copy"} 0`, `{path="splice"} 0`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 0`)
	// No splice source: the splice series are absent, not zero.
	expect(t, fams, "smesh_bytes_total", dto.MetricType_COUNTER,
		`{direction="tx",path="copy"} 0`, `{direction="rx",path="copy"} 0`,
		`{direction="tx",path="tunnel_out"} 0`, `{direction="rx",path="tunnel_out"} 0`,
		`{direction="tx",path="tunnel_in"} 0`, `{direction="rx",path="tunnel_in"} 0`)
	expect(t, fams, "smesh_active_connections", dto.MetricType_GAUGE,
		`{path="copy"} 0`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 0`)
	expect(t, fams, "smesh_config_reloads_total", dto.MetricType_COUNTER,
		`{result="error"} 0`, `{result="ok"} 0`)
	expect(t, fams, "smesh_spliced_messages_total", dto.MetricType_COUNTER)
	expect(t, fams, "smesh_splice_source_up", dto.MetricType_GAUGE)
	expect(t, fams, "smesh_enrolled_cgroups", dto.MetricType_GAUGE, `{state="attached"} 0`, `{state="missing"} 0`)
	expect(t, fams, "smesh_enrolled_cgroup_events_total", dto.MetricType_COUNTER, `{event="created"} 0`, `{event="removed"} 0`)
	if _, ok := fams["go_goroutines"]; !ok {
		t.Error("no Go runtime metrics")
	}
}

func TestDataPathCounters(t *testing.T) {
	m := New("dev")
	ts := new(tunnel.Stats)
	m.SetTunnelStats(ts)
	m.ConnOpened(PathCopy)
	m.ConnOpened(PathCopy)
	// A tunnelled connection: the tunnel client counts it, the outbound
	// relay reports it open.
	ts.Out.Connections.Add(1)
	m.ConnOpened(PathTunnelOut)
	// tunnel_in is the tunnel's alone: what the relay might report is
	// not counted again.
	ts.In.Connections.Add(1)
	ts.In.BytesRx.Add(5)
	ts.In.BytesTx.Add(7)
	m.ConnOpened(PathTunnelIn)
	m.ConnClosed(PathTunnelIn, 500, 700)
	m.AddBytes(PathCopy, 10, 1)
	m.ConnClosed(PathCopy, 100, 20)
	m.ConnOpened("bogus") // not a path: ignored, no new series
	m.ConnClosed("bogus", 1, 1)

	fams := scrape(t, m)
	expect(t, fams, "smesh_connections_total", dto.MetricType_COUNTER,
		`{path="copy"} 2`, `{path="splice"} 0`, `{path="tunnel_in"} 1`, `{path="tunnel_out"} 1`)
	expect(t, fams, "smesh_active_connections", dto.MetricType_GAUGE,
		`{path="copy"} 1`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 1`)
	// tunnel_in: what arrived through the tunnel (the server's rx) went
	// from the client to the server (tx).
	expect(t, fams, "smesh_bytes_total", dto.MetricType_COUNTER,
		`{direction="tx",path="copy"} 110`, `{direction="rx",path="copy"} 21`,
		`{direction="tx",path="tunnel_out"} 0`, `{direction="rx",path="tunnel_out"} 0`,
		`{direction="tx",path="tunnel_in"} 5`, `{direction="rx",path="tunnel_in"} 7`)
}

// The tunnel's counters have one source, tunnel.Stats, which /metrics reads
// at every scrape and smeshd's log reads when it stops: both say the same.
func TestTunnelStatsOneSource(t *testing.T) {
	m := New("dev")
	ts := new(tunnel.Stats)
	m.SetTunnelStats(ts)
	check := func(out, in, notLocal uint64) {
		t.Helper()
		fams := scrape(t, m)
		expect(t, fams, "smesh_connections_total", dto.MetricType_COUNTER,
			`{path="copy"} 0`, `{path="splice"} 0`,
			fmt.Sprintf(`{path="tunnel_in"} %d`, in), fmt.Sprintf(`{path="tunnel_out"} %d`, out))
		expect(t, fams, "smesh_tunnel_errors_total", dto.MetricType_COUNTER, fmt.Sprintf(`{reason="not_local"} %d`, notLocal))

		var log bytes.Buffer
		logger := zerolog.New(&log)
		logger.Info().Object("tunnel", ts).Msg("drained")
		var line struct {
			Tunnel struct {
				Out, In uint64
				Errors  map[string]uint64
			}
		}
		if err := json.Unmarshal(log.Bytes(), &line); err != nil {
			t.Fatalf("log line %s: %v", log.String(), err)
		}
		if line.Tunnel.Out != out || line.Tunnel.In != in || line.Tunnel.Errors["not_local"] != notLocal || len(line.Tunnel.Errors) != 1 {
			t.Errorf("log line %s, want out %d, in %d, errors {not_local: %d}", log.String(), out, in, notLocal)
		}
	}
	ts.Out.Connections.Add(3)
	ts.In.Connections.Add(2)
	ts.Count(tunnel.ReasonNotLocal)
	check(3, 2, 1)
	// Read when asked, not copied once.
	ts.Out.Connections.Add(1)
	ts.Count(tunnel.ReasonNotLocal)
	check(4, 2, 2)
}

func TestSpliceSource(t *testing.T) {
	m := New("dev")
	m.ConnOpened(PathCopy)
	m.ConnClosed(PathCopy, 3, 4)
	m.ConnOpened(PathSplice) // the kernel counts spliced hops, not this
	m.SetSpliceSource(func() (SpliceCounters, error) {
		return SpliceCounters{TxBytes: 1 << 40, RxBytes: 12345, TxMsgs: 77, RxMsgs: 8, Sockets: 7,
			Demotions: 5, Released: 4, DemotedTxBytes: 6 << 20, Conns: 9, Raced: 2}, nil
	})

	fams := scrape(t, m)
	expect(t, fams, "smesh_splice_source_up", dto.MetricType_GAUGE, `{} 1`)
	expect(t, fams, "smesh_bytes_total", dto.MetricType_COUNTER,
		`{direction="tx",path="splice"} 1.099511627776e+12`, `{direction="rx",path="splice"} 12345`,
		`{direction="tx",path="copy"} 3`, `{direction="rx",path="copy"} 4`,
		`{direction="tx",path="tunnel_out"} 0`, `{direction="rx",path="tunnel_out"} 0`,
		`{direction="tx",path="tunnel_in"} 0`, `{direction="rx",path="tunnel_in"} 0`)
	expect(t, fams, "smesh_spliced_messages_total", dto.MetricType_COUNTER,
		`{direction="tx"} 77`, `{direction="rx"} 8`)
	expect(t, fams, "smesh_splice_demotions_total", dto.MetricType_COUNTER, `{} 5`)
	expect(t, fams, "smesh_splice_released_total", dto.MetricType_COUNTER, `{} 4`)
	expect(t, fams, "smesh_splice_raced_total", dto.MetricType_COUNTER, `{} 2`)
	expect(t, fams, "smesh_splice_demoted_bytes_total", dto.MetricType_COUNTER,
		`{direction="tx"} 6.291456e+06`, `{direction="rx"} 0`)
	// 7 sockets is 3 whole hops (a hop whose second end is not in yet does
	// not count); Go's ConnOpened(splice) changes neither count.
	expect(t, fams, "smesh_active_connections", dto.MetricType_GAUGE,
		`{path="splice"} 3`, `{path="copy"} 0`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 0`)
	expect(t, fams, "smesh_connections_total", dto.MetricType_COUNTER,
		`{path="copy"} 1`, `{path="splice"} 9`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 0`)

	m.SetSpliceSource(func() (SpliceCounters, error) { return SpliceCounters{}, errors.New("map gone") })
	fams = scrape(t, m)
	expect(t, fams, "smesh_splice_source_up", dto.MetricType_GAUGE, `{} 0`)
	expect(t, fams, "smesh_connections_total", dto.MetricType_COUNTER,
		`{path="copy"} 1`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 0`)

	m.SetSpliceSource(nil)
	fams = scrape(t, m)
	expect(t, fams, "smesh_splice_source_up", dto.MetricType_GAUGE)
	expect(t, fams, "smesh_spliced_messages_total", dto.MetricType_COUNTER)
	expect(t, fams, "smesh_connections_total", dto.MetricType_COUNTER,
		`{path="copy"} 1`, `{path="splice"} 0`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 0`)
}

// A failing splice source leaves its series out, says so in
// smesh_splice_source_up, and the rest of the scrape is intact.
func TestSpliceSourceError(t *testing.T) {
	m := New("dev")
	m.ConnOpened(PathTunnelOut)
	m.Reload(false)
	m.SetSpliceSource(func() (SpliceCounters, error) {
		return SpliceCounters{TxBytes: 999, Sockets: 10}, errors.New("map lookup: bad file descriptor")
	})

	fams := scrape(t, m)
	expect(t, fams, "smesh_splice_source_up", dto.MetricType_GAUGE, `{} 0`)
	expect(t, fams, "smesh_spliced_messages_total", dto.MetricType_COUNTER)
	expect(t, fams, "smesh_bytes_total", dto.MetricType_COUNTER,
		`{direction="tx",path="copy"} 0`, `{direction="rx",path="copy"} 0`,
		`{direction="tx",path="tunnel_out"} 0`, `{direction="rx",path="tunnel_out"} 0`,
		`{direction="tx",path="tunnel_in"} 0`, `{direction="rx",path="tunnel_in"} 0`)
	expect(t, fams, "smesh_active_connections", dto.MetricType_GAUGE,
		`{path="copy"} 0`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 1`)
	expect(t, fams, "smesh_config_reloads_total", dto.MetricType_COUNTER,
		`{result="error"} 1`, `{result="ok"} 0`)
	expect(t, fams, "smesh_build_info", dto.MetricType_GAUGE, `{version="dev"} 1`)
}

func TestErrorsAndLimits(t *testing.T) {
	m := New("dev")
	ts := new(tunnel.Stats)
	m.SetTunnelStats(ts)
	ts.Count(tunnel.ReasonNotTLS)
	ts.Count(tunnel.ReasonNotTLS)
	ts.Count(tunnel.ReasonPeerUnreachable)
	m.Refused("max_connections")
	m.Refused("idle_timeout")
	m.Refused("idle_timeout")
	m.Refused("handshake_timeout")

	fams := scrape(t, m)
	expect(t, fams, "smesh_tunnel_errors_total", dto.MetricType_COUNTER,
		`{reason="not_tls"} 2`, `{reason="peer_unreachable"} 1`)
	expect(t, fams, "smesh_refused_connections_total", dto.MetricType_COUNTER,
		`{reason="handshake_timeout"} 1`, `{reason="idle_timeout"} 2`, `{reason="max_connections"} 1`)
}

func TestTLSAndReload(t *testing.T) {
	m := New("dev")
	ts := new(tunnel.Stats)
	m.SetTunnelStats(ts)
	ts.ClientHandshakes.Add(true, false, 3*time.Millisecond)
	ts.ClientHandshakes.Add(true, true, 400*time.Microsecond)
	ts.ServerHandshakes.Add(false, false, 10*time.Second)
	notAfter := time.Date(2031, 5, 1, 12, 0, 0, 0, time.UTC)
	m.CertExpiry("/etc/smesh/node.crt", notAfter)
	m.CertExpiry("/etc/smesh/old.crt", notAfter)
	m.CertExpiry("/etc/smesh/old.crt", time.Time{})
	m.Reload(true)
	m.Reload(true)
	m.Reload(false)

	fams := scrape(t, m)
	expect(t, fams, "smesh_tls_handshakes_total", dto.MetricType_COUNTER,
		`{result="error",resumed="false",role="client"} 0`,
		`{result="error",resumed="true",role="client"} 0`,
		`{result="ok",resumed="false",role="client"} 1`,
		`{result="ok",resumed="true",role="client"} 1`,
		`{result="error",resumed="false",role="server"} 1`,
		`{result="error",resumed="true",role="server"} 0`,
		`{result="ok",resumed="false",role="server"} 0`,
		`{result="ok",resumed="true",role="server"} 0`)
	// Only the two successful handshakes are timed.
	expect(t, fams, "smesh_tls_handshake_seconds", dto.MetricType_HISTOGRAM,
		`{role="client"} 2`, `{role="server"} 0`)
	for _, s := range fams["smesh_tls_handshake_seconds"].GetMetric() {
		if s.GetLabel()[0].GetValue() != RoleClient {
			continue
		}
		h := s.GetHistogram()
		if got, want := h.GetSampleSum(), 0.0034; got < want-1e-9 || got > want+1e-9 {
			t.Errorf("client handshake seconds sum %g, want %g", got, want)
		}
		// 0.4 ms is in the first bucket (le 0.0005), 3 ms in le 0.004.
		var got []string
		for _, b := range h.GetBucket() {
			got = append(got, fmt.Sprintf("%g:%d", b.GetUpperBound(), b.GetCumulativeCount()))
		}
		want := "0.0005:1 0.001:1 0.002:1 0.004:2 0.008:2 0.016:2 0.032:2 0.064:2 0.128:2 0.256:2 0.512:2 1.024:2 2.048:2 4.096:2 +Inf:2"
		if strings.Join(got, " ") != want {
			t.Errorf("client handshake buckets %s, want %s", strings.Join(got, " "), want)
		}
	}
	expect(t, fams, "smesh_certificate_expiry_seconds", dto.MetricType_GAUGE,
		fmt.Sprintf(`{file="/etc/smesh/node.crt"} %g`, float64(notAfter.Unix())))
	expect(t, fams, "smesh_config_reloads_total", dto.MetricType_COUNTER,
		`{result="error"} 1`, `{result="ok"} 2`)
}

// Two metric sets live side by side (one per test node), and the data path
// methods are safe under concurrent scrapes (run with -race).
func TestIndependentAndConcurrent(t *testing.T) {
	a, b := New("a"), New("b")
	b.SetSpliceSource(func() (SpliceCounters, error) { return SpliceCounters{Sockets: 2}, nil })
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 500 {
				a.ConnOpened(PathCopy)
				a.ConnClosed(PathCopy, 1, 2)
			}
		})
	}
	wg.Go(func() {
		for range 20 {
			scrape(t, a)
			scrape(t, b)
		}
	})
	wg.Wait()

	expect(t, scrape(t, a), "smesh_connections_total", dto.MetricType_COUNTER,
		`{path="copy"} 2000`, `{path="splice"} 0`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 0`)
	fb := scrape(t, b)
	expect(t, fb, "smesh_connections_total", dto.MetricType_COUNTER,
		`{path="copy"} 0`, `{path="splice"} 0`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 0`)
	expect(t, fb, "smesh_build_info", dto.MetricType_GAUGE, `{version="b"} 1`)
	expect(t, fb, "smesh_active_connections", dto.MetricType_GAUGE,
		`{path="splice"} 1`, `{path="copy"} 0`, `{path="tunnel_in"} 0`, `{path="tunnel_out"} 0`)
}

func TestEnrolledCgroups(t *testing.T) {
	m := New("dev")
	m.EnrolledCgroups(2, 0)
	m.EnrolledCgroupEvent(EnrolledRemoved)
	m.EnrolledCgroups(1, 1)
	m.EnrolledCgroupEvent(EnrolledCreated)
	m.EnrolledCgroupEvent(EnrolledRemoved)
	fams := scrape(t, m)
	expect(t, fams, "smesh_enrolled_cgroups", dto.MetricType_GAUGE, `{state="attached"} 1`, `{state="missing"} 1`)
	expect(t, fams, "smesh_enrolled_cgroup_events_total", dto.MetricType_COUNTER, `{event="created"} 1`, `{event="removed"} 2`)
}
