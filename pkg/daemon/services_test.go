package daemon

import (
	"net/netip"
	"testing"

	"github.com/rs/zerolog"

	"github.com/smesh-dev/smesh/pkg/config"
	"github.com/smesh-dev/smesh/pkg/services"
)

// mapSink is a services.Sink holding the last Service given per key.
type mapSink map[services.Key]services.Service

func (m mapSink) Update(s services.Service) error { m[s.Key] = s; return nil }
func (m mapSink) Delete(k services.Key) error     { delete(m, k); return nil }

// TestClusterBelowStatic: a cluster Service with the VIP and port of a
// [[services]] entry neither overwrites nor deletes it, and takes the key
// once the entry leaves smesh.toml.
func TestClusterBelowStatic(t *testing.T) {
	table := mapSink{}
	static := newStaticServices(table, zerolog.New(zerolog.NewTestWriter(t)))
	cluster := static.below(table)
	vip := netip.MustParseAddr("198.19.0.10")
	key := services.Key{VIP: vip, Port: 80}
	entry := config.Service{Name: "static-web", VIP: vip, Port: 80, Backends: []netip.AddrPort{netip.MustParseAddrPort("198.18.0.2:8080")}}
	if err := static.set([]config.Service{entry}); err != nil {
		t.Fatal(err)
	}
	fromCluster := services.Service{Key: key, Name: "ns/web:http", Backends: []services.Backend{{Addr: netip.MustParseAddrPort("198.18.9.9:80")}}}
	if err := cluster.Update(fromCluster); err == nil {
		t.Error("the cluster's Service overwrote a [[services]] entry without an error")
	}
	if err := cluster.Delete(key); err != nil {
		t.Errorf("the cluster's delete of a key it does not hold: %v", err)
	}
	if got := table[key].Name; got != "static-web" {
		t.Fatalf("the data path holds %q for %s, want smesh.toml's entry", got, key)
	}
	// Other keys pass through.
	other := services.Service{Key: services.Key{VIP: vip, Port: 81}, Name: "ns/web:grpc"}
	if err := cluster.Update(other); err != nil || table[other.Key].Name != other.Name {
		t.Errorf("a cluster Service of its own key: %v, held %q", err, table[other.Key].Name)
	}
	// The entry leaves smesh.toml (a reload): the watcher's retry lands.
	if err := static.set(nil); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Update(fromCluster); err != nil || table[key].Name != fromCluster.Name {
		t.Errorf("after the entry left smesh.toml: %v, held %q", err, table[key].Name)
	}
	if err := cluster.Delete(key); err != nil || len(table) != 1 {
		t.Errorf("the cluster's delete of its own key: %v, table %v", err, table)
	}
}
