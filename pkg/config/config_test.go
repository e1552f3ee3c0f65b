package config

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/certs"
)

func TestDefaultValidates(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v", err)
	}
}

// The shipped smesh.toml documents the defaults; this keeps the two equal.
func TestShippedConfigIsDefault(t *testing.T) {
	got, err := Load(filepath.Join("..", "..", "smesh.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if want := Default(); !reflect.DeepEqual(got, want) {
		t.Errorf("smesh.toml differs from Default():\n got %+v\nwant %+v", got, want)
	}
}

func TestParseEmptyIsDefault(t *testing.T) {
	got, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := Default(); !reflect.DeepEqual(got, want) {
		t.Errorf("Parse(nil) = %+v, want %+v", got, want)
	}
}

func TestParseOverridesDefaults(t *testing.T) {
	got, err := Parse([]byte(`
[capture]
cgroups = ["a.slice", "/sys/fs/cgroup/b.slice"]
exclude_cidrs = ["10.96.0.0/12"]
exclude_ports = [22]

[tunnel]
allow_ports = [80, 443]
handshake_timeout = "1m30s"
tls.allow_identities = ["spiffe://smesh.local/node/a"]

[daemon]
drain_timeout = "0s"
`))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Capture.Cgroups = []string{"a.slice", "/sys/fs/cgroup/b.slice"}
	want.Capture.ExcludeCIDRs = mustPrefixes("10.96.0.0/12")
	want.Capture.ExcludePorts = []uint16{22}
	want.Tunnel.AllowPorts = []uint16{80, 443}
	want.Tunnel.HandshakeTimeout = Duration{90 * time.Second}
	want.Tunnel.TLS.AllowIdentities = []string{"spiffe://smesh.local/node/a"}
	want.Daemon.DrainTimeout = Duration{0}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got  %+v\nwant %+v", got, want)
	}
}

func TestParseUnknownKeys(t *testing.T) {
	tests := []struct {
		name string
		doc  string
		want []string
	}{
		{
			name: "top level",
			doc:  "# comment\nverbose = true\n",
			want: []string{"line 2", "unknown key verbose", "allowed at the top level", "capture"},
		},
		{
			name: "unknown table",
			doc:  "[capture]\n\n[metrics]\nlisten = \"127.0.0.1:9090\"\n",
			want: []string{"line 3", "unknown key metrics"},
		},
		{
			name: "in a table",
			doc:  "[capture]\ncgroups = [\"a\"]\ncgroup = \"b\"\n",
			want: []string{"line 3", "unknown key capture.cgroup", "in [capture]", "cgroups, include_cidrs"},
		},
		{
			name: "in tunnel.tls",
			doc:  "[tunnel]\npeer_port = 18001\n\n[tunnel.tls]\nmode = \"mtls\"\ncrt = \"x\"\n",
			want: []string{"line 6", "unknown key tunnel.tls.crt", "in [tunnel.tls]", "cert"},
		},
		{
			name: "dotted key",
			doc:  "[tunnel]\ntls.certificate = \"x\"\n",
			want: []string{"line 2", "unknown key tunnel.tls.certificate"},
		},
		{
			name: "wrong case",
			doc:  "[Datapath]\nmode = \"copy\"\n",
			want: []string{"line 1", "unknown key Datapath"},
		},
		{
			name: "quoted key",
			doc:  "[log]\n\"level.x\" = 1\n",
			want: []string{"line 2", `unknown key log."level.x"`},
		},
		{
			name: "dotted key below a table",
			doc:  "[capture]\nfoo.bar = 1\n",
			want: []string{"line 2", "unknown key capture.foo", "in [capture]"},
		},
		{
			name: "dotted key from the top",
			doc:  "tunnel.tls.x.y = 1\n",
			want: []string{"line 1", "unknown key tunnel.tls.x", "in [tunnel.tls]"},
		},
		{
			name: "in an array of tables",
			doc:  "[[tunnel.tls.peers]]\ncidrs = [\"10.0.0.0/8\"]\nidentities = [\"spiffe://smesh.local/node/a\"]\nidentity = \"x\"\n",
			want: []string{"line 4", "unknown key tunnel.tls.peers.identity", "cidrs, identities"},
		},
		{
			name: "array of tables, reported once",
			doc:  "[[capture.rules]]\nport = 1\n[[capture.rules]]\nport = 2\n",
			want: []string{"unknown key capture.rules"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc))
			wantErr(t, err, tt.want...)
			if n := strings.Count(err.Error(), "unknown key"); n != 1 {
				t.Errorf("%d unknown keys reported, want 1:\n%v", n, err)
			}
		})
	}
}

func TestParseSeveralUnknownKeys(t *testing.T) {
	_, err := Parse([]byte("a = 1\n[capture]\nb = 2\n[tunnel.tls]\nc = 3\n"))
	wantErr(t, err, "line 1: unknown key a", "line 3: unknown key capture.b", "line 5: unknown key tunnel.tls.c")
}

func TestParseManyUnknownKeys(t *testing.T) {
	var doc strings.Builder
	doc.WriteString("[capture]\n")
	for i := range 25 {
		fmt.Fprintf(&doc, "k%d = %d\n", i, i)
	}
	_, err := Parse([]byte(doc.String()))
	wantErr(t, err, "line 2: unknown key capture.k0", "line 11: unknown key capture.k9", "and 15 more unknown keys")
	if strings.Contains(err.Error(), "capture.k10") {
		t.Errorf("more than %d unknown keys reported:\n%v", maxUnknownKeys, err)
	}
}

// Errors the decoder finds: syntax, types, values that do not parse.
func TestParseDecodeErrors(t *testing.T) {
	tests := []struct {
		name string
		doc  string
		want []string
	}{
		{"syntax", "[capture]\ncgroups = [\"a\"\n", []string{"line 2"}},
		{"unterminated table", "[capture\n", []string{"line 2"}},
		{"duplicate key", "[log]\nlevel = \"info\"\nlevel = \"debug\"\n", []string{"line 3", "level"}},
		{"string for integer", "[datapath]\nmap_size = \"big\"\n", []string{"line 2", "datapath.map_size"}},
		{"integer for string", "[log]\nlevel = 3\n", []string{"line 2", "log.level"}},
		{"table for value", "[capture.cgroups]\nx = 1\n", []string{"capture.cgroups"}},
		{"value for table", "capture = 1\n", []string{"line 1", "capture"}},
		{"bad CIDR", "[capture]\ninclude_cidrs = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
			[]string{"line 2", "capture.include_cidrs", `"10.0.0.0/33" is not a valid CIDR`, `"10.0.0.0/8"`}},
		{"CIDR without length", "[capture]\nexclude_cidrs = [\"10.0.0.1\"]\n",
			[]string{"line 2", "capture.exclude_cidrs", `"10.0.0.1" is not a valid CIDR`}},
		{"CIDR not a string", "[capture]\nexclude_cidrs = [10]\n", []string{"capture.exclude_cidrs", "10 is not a string"}},
		{"port too large", "[capture]\nexclude_ports = [70000]\n", []string{"line 2", "capture.exclude_ports", "70000"}},
		{"negative port", "[tunnel]\npeer_port = -1\n", []string{"line 2", "tunnel.peer_port"}},
		{"map_size beyond uint32", "[datapath]\nmap_size = 5000000000\n", []string{"datapath.map_size"}},
		{"listen not an address", "[outbound]\nlisten = \"localhost:18000\"\n",
			[]string{"line 2", "outbound.listen", `"localhost:18000" is not a valid address:port`}},
		{"listen without port", "[admin]\nlisten = \"127.0.0.1\"\n", []string{"line 2", "admin.listen"}},
		{"listen port too large", "[tunnel]\nlisten = \"0.0.0.0:70000\"\n", []string{"line 2", "tunnel.listen"}},
		{"bad duration", "[daemon]\ndrain_timeout = \"soon\"\n",
			[]string{"line 2", "daemon.drain_timeout", `"soon" is not a duration`}},
		{"duration without unit", "[tunnel]\nhandshake_timeout = 5\n", []string{"line 2", "tunnel.handshake_timeout"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc))
			wantErr(t, err, tt.want...)
		})
	}
}

// Errors Validate finds, reached through Parse as a user would.
func TestParseInvalidValues(t *testing.T) {
	tests := []struct {
		name string
		doc  string
		want []string
	}{
		{"CIDR with host bits", "[capture]\ninclude_cidrs = [\"10.1.2.3/8\"]\n",
			[]string{"capture.include_cidrs", "10.1.2.3/8 has host bits set", "10.0.0.0/8"}},
		{"IPv4-mapped CIDR", "[capture]\ninclude_cidrs = [\"::ffff:10.0.0.0/104\"]\n", []string{"capture.include_cidrs", "v4-mapped", "10.0.0.0/8"}},
		{"IPv6 CIDR with host bits", "[capture]\nexclude_cidrs = [\"fd00::1/64\"]\n", []string{"capture.exclude_cidrs", "host bits", "fd00::/64"}},
		{"bad IPv6 CIDR", "[capture]\ninclude_cidrs = [\"fd00::/129\"]\n", []string{"line 2", "capture.include_cidrs", "fd00::/129"}},
		{"outbound.listen6 not IPv6 loopback", "[outbound]\nlisten6 = \"[fd00::1]:18000\"\n", []string{"outbound.listen6", "IPv6 loopback"}},
		{"outbound.listen6 on the admin port", "[outbound]\nlisten6 = \"[::1]:15000\"\n", []string{"outbound.listen6", "admin.listen"}},
		{"no include CIDRs", "[capture]\ninclude_cidrs = []\n", []string{"capture.include_cidrs", "empty"}},
		{"exclude port 0", "[capture]\nexclude_ports = [80, 0]\n", []string{"capture.exclude_ports", "0 is not a port"}},
		{"allow port 0", "[tunnel]\nallow_ports = [0]\n", []string{"tunnel.allow_ports"}},
		{"peer port 0", "[tunnel]\npeer_port = 0\n", []string{"tunnel.peer_port"}},
		{"listen port 0", "[admin]\nlisten = \"127.0.0.1:0\"\n", []string{"admin.listen", "port 0"}},
		{"tunnel listen port 0", "[tunnel]\nlisten = \"0.0.0.0:0\"\n", []string{"tunnel.listen", "port 0"}},
		{"outbound not loopback", "[outbound]\nlisten = \"10.0.0.1:18000\"\n", []string{"outbound.listen", "loopback"}},
		{"outbound IPv6 loopback", "[outbound]\nlisten = \"[::1]:18000\"\n", []string{"outbound.listen", "IPv4 loopback"}},
		{"same ports", "[admin]\nlisten = \"127.0.0.1:18000\"\n", []string{"admin.listen", "outbound.listen", "18000"}},
		{"cgroup root slash", "[capture]\ncgroups = [\"/\"]\n", []string{"capture.cgroups", "root"}},
		{"cgroup root dot", "[capture]\ncgroups = [\".\"]\n", []string{"capture.cgroups", "root"}},
		{"cgroup root dot slash", "[capture]\ncgroups = [\"./\"]\n", []string{"capture.cgroups", "root"}},
		{"cgroup root double slash", "[capture]\ncgroups = [\"//\"]\n", []string{"capture.cgroups", "root"}},
		{"cgroup empty", "[capture]\ncgroups = [\"\"]\n", []string{"capture.cgroups"}},
		{"cgroup climbing", "[capture]\ncgroups = [\"a/../..\"]\n", []string{"capture.cgroups", `".."`}},
		{"cgroup parent", "[capture]\ncgroups = [\"../x\"]\n", []string{"capture.cgroups", `".."`}},
		{"on_failure", "[capture]\non_failure = \"ignore\"\n", []string{"capture.on_failure", `"open", "closed"`}},
		{"datapath mode", "[datapath]\nmode = \"fast\"\n", []string{"datapath.mode", `"auto", "splice", "copy"`}},
		{"map_size small", "[datapath]\nmap_size = 10\n", []string{"datapath.map_size", "1024 to 1048576"}},
		{"map_size large", "[datapath]\nmap_size = 2000000\n", []string{"datapath.map_size"}},
		{"max_connections", "[tunnel]\nmax_connections = 0\n", []string{"tunnel.max_connections"}},
		{"handshake zero", "[tunnel]\nhandshake_timeout = \"0s\"\n", []string{"tunnel.handshake_timeout"}},
		{"handshake negative", "[tunnel]\nhandshake_timeout = \"-1s\"\n", []string{"tunnel.handshake_timeout"}},
		{"drain negative", "[daemon]\ndrain_timeout = \"-1s\"\n", []string{"daemon.drain_timeout"}},
		{"restart_hold negative", "[daemon]\nrestart_hold = \"-1s\"\n", []string{"daemon.restart_hold", "no bound", "at least 2s"}},
		{"restart_hold below two beats", "[daemon]\nrestart_hold = \"1500ms\"\n", []string{"daemon.restart_hold", "1.5s", "every second"}},
		{"after_release", "[daemon]\nafter_release = \"stay\"\n", []string{"daemon.after_release", `"exit", "wait"`}},
		{"tls mode", "[tunnel.tls]\nmode = \"tls\"\n", []string{"tunnel.tls.mode", `"mtls", "disabled"`}},
		{"mtls without cert", "[tunnel.tls]\ncert = \"\"\n", []string{"tunnel.tls.cert", "mtls"}},
		{"mtls without key", "[tunnel.tls]\nkey = \"\"\n", []string{"tunnel.tls.key"}},
		{"mtls without ca", "[tunnel.tls]\nca = \"\"\n", []string{"tunnel.tls.ca"}},
		{"identity not a URI", "[tunnel.tls]\nallow_identities = [\"node-a\"]\n", []string{"tunnel.tls.allow_identities", "SPIFFE"}},
		{"identity wrong scheme", "[tunnel.tls]\nallow_identities = [\"https://example.org/a\"]\n", []string{"tunnel.tls.allow_identities"}},
		{"identity without host", "[tunnel.tls]\nallow_identities = [\"spiffe:///a\"]\n", []string{"tunnel.tls.allow_identities"}},
		{"identities without TLS", "[tunnel.tls]\nmode = \"disabled\"\nallow_identities = [\"spiffe://smesh.local/a\"]\n",
			[]string{"tunnel.tls.allow_identities", "disabled"}},
		// What the tunnel's own parser (go-spiffe) refuses, check refuses.
		{"identity with upper-case trust domain", "[tunnel.tls]\nallow_identities = [\"spiffe://SMESH.local/node/b\"]\n",
			[]string{"tunnel.tls.allow_identities", `"spiffe://SMESH.local/node/b" is not a SPIFFE ID`, "lower-case"}},
		{"identity with a query", "[tunnel.tls]\nallow_identities = [\"spiffe://smesh.local/node/b?x=1\"]\n",
			[]string{"tunnel.tls.allow_identities", "is not a SPIFFE ID"}},
		{"identity with a fragment", "[tunnel.tls]\nallow_identities = [\"spiffe://smesh.local/node/b#x\"]\n",
			[]string{"tunnel.tls.allow_identities", "is not a SPIFFE ID"}},
		{"identity with a port", "[tunnel.tls]\nallow_identities = [\"spiffe://smesh.local:8443/node/b\"]\n",
			[]string{"tunnel.tls.allow_identities", "is not a SPIFFE ID"}},
		{"identity with a user", "[tunnel.tls]\nallow_identities = [\"spiffe://u@smesh.local/node/b\"]\n",
			[]string{"tunnel.tls.allow_identities", "is not a SPIFFE ID"}},
		{"identity in another trust domain", "[tunnel.tls]\nallow_identities = [\"spiffe://example.org/node/b\"]\n",
			[]string{"tunnel.tls.allow_identities", `not in tunnel.tls.trust_domain "smesh.local"`}},
		{"trust domain upper-case", "[tunnel.tls]\ntrust_domain = \"Smesh.local\"\n", []string{"tunnel.tls.trust_domain"}},
		{"trust domain empty", "[tunnel.tls]\ntrust_domain = \"\"\n", []string{"tunnel.tls.trust_domain"}},
		{"trust domain as an ID", "[tunnel.tls]\ntrust_domain = \"spiffe://smesh.local/x\"\n", []string{"tunnel.tls.trust_domain"}},
		{"peers without CIDRs", "[[tunnel.tls.peers]]\nidentities = [\"spiffe://smesh.local/node/b\"]\n",
			[]string{"tunnel.tls.peers[0].cidrs", "empty"}},
		{"peers without identities", "[[tunnel.tls.peers]]\ncidrs = [\"10.0.2.0/24\"]\n",
			[]string{"tunnel.tls.peers[0].identities", "empty"}},
		{"peers CIDR with host bits", "[[tunnel.tls.peers]]\ncidrs = [\"10.0.2.1/24\"]\nidentities = [\"spiffe://smesh.local/node/b\"]\n",
			[]string{"tunnel.tls.peers[0].cidrs", "host bits"}},
		{"peers bad identity", "[[tunnel.tls.peers]]\ncidrs = [\"10.0.2.0/24\"]\nidentities = [\"spiffe://smesh.local/node/b?x\"]\n",
			[]string{"tunnel.tls.peers[0].identities", "is not a SPIFFE ID"}},
		{"peers identity in another trust domain", "[[tunnel.tls.peers]]\ncidrs = [\"10.0.2.0/24\"]\nidentities = [\"spiffe://example.org/node/b\"]\n",
			[]string{"tunnel.tls.peers[0].identities", "not in tunnel.tls.trust_domain"}},
		{"peers workload not SPIFFE", "[[tunnel.tls.peers]]\nidentities = [\"spiffe://smesh.local/node/b\"]\nworkloads = [\"payments\"]\n",
			[]string{"tunnel.tls.peers[0].workloads", `"payments"`}},
		{"peers workload not canonical", "[[tunnel.tls.peers]]\nidentities = [\"spiffe://smesh.local/node/b\"]\nworkloads = [\"spiffe://smesh.local/ns//sa/x\"]\n",
			[]string{"tunnel.tls.peers[0].workloads"}},
		{"peers workload prefix with two slashes", "[[tunnel.tls.peers]]\nidentities = [\"spiffe://smesh.local/node/b\"]\nworkloads = [\"spiffe://smesh.local/ns//\"]\n",
			[]string{"tunnel.tls.peers[0].workloads"}},
		{"peers workload in another trust domain", "[[tunnel.tls.peers]]\nidentities = [\"spiffe://smesh.local/node/b\"]\nworkloads = [\"spiffe://example.org/ns/a/\"]\n",
			[]string{"tunnel.tls.peers[0].workloads", "not in tunnel.tls.trust_domain"}},
		{"peers CIDR twice", "[[tunnel.tls.peers]]\ncidrs = [\"10.0.2.0/24\"]\nidentities = [\"spiffe://smesh.local/node/b\"]\n" +
			"[[tunnel.tls.peers]]\ncidrs = [\"10.0.2.0/24\"]\nidentities = [\"spiffe://smesh.local/node/c\"]\n",
			[]string{"tunnel.tls.peers[1].cidrs", "also in tunnel.tls.peers[0]"}},
		{"peers without TLS", "[tunnel.tls]\nmode = \"disabled\"\n[[tunnel.tls.peers]]\ncidrs = [\"10.0.2.0/24\"]\nidentities = [\"spiffe://smesh.local/node/b\"]\n",
			[]string{"tunnel.tls.peers", "disabled"}},
		{"max_handshakes", "[tunnel]\nmax_handshakes = 0\n", []string{"tunnel.max_handshakes"}},
		{"max_handshakes_per_source", "[tunnel]\nmax_handshakes_per_source = 0\n", []string{"tunnel.max_handshakes_per_source"}},
		{"tunnel idle negative", "[tunnel]\nidle_timeout = \"-1s\"\n", []string{"tunnel.idle_timeout"}},
		{"log level", "[log]\nlevel = \"verbose\"\n", []string{"log.level", `"trace"`}},
		{"log format", "[log]\nformat = \"text\"\n", []string{"log.format", `"console", "json"`}},
		{"tls source", "[tunnel.tls]\nsource = \"spire\"\n", []string{"tunnel.tls.source", `"files", "workload_api"`}},
		{"workload API socket relative", "[tunnel.tls]\nsource = \"workload_api\"\nworkload_api_socket = \"unix://run/agent.sock\"\n",
			[]string{"tunnel.tls.workload_api_socket", "unix:///ABSOLUTE/PATH"}},
		{"workload API socket no scheme", "[tunnel.tls]\nsource = \"workload_api\"\nworkload_api_socket = \"/run/agent.sock\"\n",
			[]string{"tunnel.tls.workload_api_socket"}},
		{"workload API tcp name", "[tunnel.tls]\nsource = \"workload_api\"\nworkload_api_socket = \"tcp://localhost:8081\"\n",
			[]string{"tunnel.tls.workload_api_socket", "IP and a port"}},
		{"kubernetes label without value", "[kubernetes]\nlabel = \"smesh.dev/mesh\"\n", []string{"kubernetes.label", "KEY=VALUE"}},
		{"kubernetes label bad key", "[kubernetes]\nlabel = \"-mesh=enabled\"\n", []string{"kubernetes.label", "label name"}},
		{"kubernetes label bad prefix", "[kubernetes]\nlabel = \"Smesh_dev/mesh=enabled\"\n", []string{"kubernetes.label", "DNS subdomain"}},
		{"kubernetes label bad value", "[kubernetes]\nlabel = \"smesh.dev/mesh=on!\"\n", []string{"kubernetes.label", "label value"}},
		{"kubernetes strict label without value", "[kubernetes]\nstrict_label = \"smesh.dev/inbound\"\n", []string{"kubernetes.strict_label", "KEY=VALUE"}},
		{"kubernetes strict label bad value", "[kubernetes]\nstrict_label = \"smesh.dev/inbound=on!\"\n", []string{"kubernetes.strict_label", "label value"}},
		{"kubernetes strict label of the mesh key", "[kubernetes]\nstrict_label = \"smesh.dev/mesh=strict\"\n", []string{"kubernetes.strict_label", "key of kubernetes.label"}},
		{"kubernetes node env", "[kubernetes]\nnode_name_env = \"node name\"\n", []string{"kubernetes.node_name_env"}},
		{"kubepods not kubepods", "[kubernetes]\nkubepods_cgroup = \"system.slice\"\n", []string{"kubernetes.kubepods_cgroup", "kubepods.slice"}},
		{"kubepods root", "[kubernetes]\nkubepods_cgroup = \"/\"\n", []string{"kubernetes.kubepods_cgroup", "below the cgroup v2 root"}},
		{"kubepods dotdot", "[kubernetes]\nkubepods_cgroup = \"../kubepods\"\n", []string{"kubernetes.kubepods_cgroup"}},
		{"kubepods fs path", "[kubernetes]\nkubepods_cgroup = \"/sys/fs/cgroup/kubepods.slice\"\n", []string{"kubernetes.kubepods_cgroup", "relative to the cgroup v2 mount"}},
		{"prefer local", "[kubernetes]\nprefer_local_backends = \"sometimes\"\n", []string{"kubernetes.prefer_local_backends", `"prefer_close", "always", "never"`}},
		{"kubepods type", "[kubernetes]\nkubepods_cgroup = 1\n", []string{"line 2", "kubernetes.kubepods_cgroup"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.doc))
			wantErr(t, err, tt.want...)
		})
	}
}

func TestParseValidEdgeCases(t *testing.T) {
	tests := []struct {
		name string
		doc  string
	}{
		{"no cgroups", "[capture]\ncgroups = []\n"},
		{"duplicate entries", "[capture]\ncgroups = [\"a\", \"a\"]\ninclude_cidrs = [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n"},
		{"TLS disabled without files", "[tunnel.tls]\nmode = \"disabled\"\ncert = \"\"\nkey = \"\"\nca = \"\"\n"},
		{"IPv4 tunnel listen", "[tunnel]\nlisten = \"0.0.0.0:18001\"\n"},
		{"IPv6 CIDRs", "[capture]\ninclude_cidrs = [\"::/0\", \"10.0.0.0/8\"]\nexclude_cidrs = [\"fd00:5e::/32\"]\n"},
		{"other loopback", "[outbound]\nlisten = \"127.0.0.2:18000\"\n"},
		{"drain zero", "[daemon]\ndrain_timeout = \"0s\"\n"},
		{"restart_hold off", "[daemon]\nrestart_hold = \"0s\"\n"},
		{"restart_hold short", "[daemon]\nrestart_hold = \"2s\"\n"},
		{"after_release wait", "[daemon]\nafter_release = \"wait\"\n"},
		{"map_size bounds", "[datapath]\nmap_size = 1024\n"},
		{"other trust domain", "[tunnel.tls]\ntrust_domain = \"example.org\"\nallow_identities = [\"spiffe://example.org/node/a\"]\n"},
		{"peers", "[[tunnel.tls.peers]]\ncidrs = [\"10.0.2.0/24\", \"fd00:5e::/32\"]\nidentities = [\"spiffe://smesh.local/node/b\"]\n" +
			"[[tunnel.tls.peers]]\ncidrs = [\"10.0.0.0/8\"]\nidentities = [\"spiffe://smesh.local/node/b\", \"spiffe://smesh.local/node/c\"]\n"},
		{"peers workloads", "[[tunnel.tls.peers]]\ncidrs = [\"10.0.2.0/24\"]\nidentities = [\"spiffe://smesh.local/node/b\"]\n" +
			"workloads = [\"spiffe://smesh.local/ns/prod/sa/payments\", \"spiffe://smesh.local/ns/dev/\"]\n" +
			"[[tunnel.tls.peers]]\nidentities = [\"spiffe://smesh.local/node/c\"]\nworkloads = [\"spiffe://smesh.local/\"]\n"},
		{"peers inline", "[tunnel.tls]\npeers = [{cidrs = [\"10.0.2.0/24\"], identities = [\"spiffe://smesh.local/node/b\"]}]\n"},
		{"tunnel idle zero", "[tunnel]\nidle_timeout = \"0s\"\n"},
		{"workload API without files", "[tunnel.tls]\nsource = \"workload_api\"\ncert = \"\"\nkey = \"\"\nca = \"\"\n"},
		{"workload API over tcp", "[tunnel.tls]\nsource = \"workload_api\"\nworkload_api_socket = \"tcp://127.0.0.1:8081\"\n"},
		{"kubernetes", "[kubernetes]\nenabled = true\nnode_name_env = \"MY_NODE\"\nlabel = \"mesh=\"\n"},
		{"kubernetes plain label", "[kubernetes]\nlabel = \"example.com/in-mesh=yes\"\n"},
		{"prefer local always", "[kubernetes]\nprefer_local_backends = \"always\"\n"},
		{"prefer local never", "[kubernetes]\nprefer_local_backends = \"never\"\n"},
		{"kubepods systemd", "[kubernetes]\nkubepods_cgroup = \"kubepods.slice\"\n"},
		{"kubepods below a cgroup root", "[kubernetes]\nkubepods_cgroup = \"/kubelet.slice/kubelet-kubepods.slice\"\n"},
		{"kubepods cgroupfs", "[kubernetes]\nkubepods_cgroup = \"kubelet/kubepods\"\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Parse([]byte(tt.doc)); err != nil {
				t.Errorf("Parse = %v, want no error", err)
			}
		})
	}
}

// The default trust domain is the one `smeshd certs init` uses, so that a
// development set of certificates works with the default configuration.
func TestDefaultTrustDomainIsCertsInit(t *testing.T) {
	if DefaultTrustDomain != certs.DefaultTrustDomain || Default().Tunnel.TLS.TrustDomain != certs.DefaultTrustDomain {
		t.Errorf("tunnel.tls.trust_domain defaults to %q, smeshd certs init uses %q", Default().Tunnel.TLS.TrustDomain, certs.DefaultTrustDomain)
	}
}

func TestValidateReportsAllProblems(t *testing.T) {
	_, err := Parse([]byte(`
[capture]
cgroups = ["/"]
include_cidrs = ["10.1.0.0/8"]
on_failure = "maybe"

[datapath]
mode = "fast"

[outbound]
listen = "10.0.0.1:18000"

[tunnel]
peer_port = 0

[tunnel.tls]
allow_identities = ["node-a"]

[log]
format = "text"
`))
	wantErr(t, err,
		"capture.cgroups", "capture.include_cidrs", "capture.on_failure", "datapath.mode",
		"outbound.listen", "tunnel.peer_port", "tunnel.tls.allow_identities", "log.format")
	if n := len(strings.Split(err.Error(), "\n")); n != 8 {
		t.Errorf("%d problems reported, want 8:\n%v", n, err)
	}
}

func TestValidateZeroConfig(t *testing.T) {
	var c Config
	err := c.Validate()
	wantErr(t, err, "capture.include_cidrs", "datapath.mode", "outbound.listen", "tunnel.listen",
		"admin.listen", "tunnel.tls.mode", "log.level", "log.format")
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "smesh.toml")
	if err := os.WriteFile(path, []byte("[datapath]\nmode = \"x\"\n[log]\nlevel = \"y\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	wantErr(t, err, "datapath.mode", "log.level")
	for line := range strings.SplitSeq(err.Error(), "\n") {
		if !strings.HasPrefix(line, path+": ") {
			t.Errorf("error line %q does not start with the path", line)
		}
	}

	_, err = Load(filepath.Join(dir, "missing.toml"))
	wantErr(t, err, "missing.toml")
}

func TestCgroupPaths(t *testing.T) {
	tests := []struct {
		name    string
		mount   string
		cgroups []string
		want    []string
		wantErr string
	}{
		{
			name:    "relative",
			mount:   "/sys/fs/cgroup",
			cgroups: []string{"smesh.slice", "a/b.scope/"},
			want:    []string{"/sys/fs/cgroup/smesh.slice", "/sys/fs/cgroup/a/b.scope"},
		},
		{
			name:    "hybrid mount",
			mount:   "/sys/fs/cgroup/unified/",
			cgroups: []string{"smesh.slice"},
			want:    []string{"/sys/fs/cgroup/unified/smesh.slice"},
		},
		{
			name:    "absolute below mount",
			mount:   "/sys/fs/cgroup",
			cgroups: []string{"/sys/fs/cgroup/smesh.slice"},
			want:    []string{"/sys/fs/cgroup/smesh.slice"},
		},
		{
			name:    "same directory twice",
			mount:   "/sys/fs/cgroup",
			cgroups: []string{"smesh.slice", "/sys/fs/cgroup/smesh.slice", "smesh.slice"},
			want:    []string{"/sys/fs/cgroup/smesh.slice"},
		},
		{
			name:  "none",
			mount: "/sys/fs/cgroup",
			want:  nil,
		},
		{
			name:    "absolute outside mount",
			mount:   "/sys/fs/cgroup/unified",
			cgroups: []string{"/sys/fs/cgroup/smesh.slice"},
			wantErr: "not below the cgroup v2 mount",
		},
		{
			name:    "sibling with common prefix",
			mount:   "/sys/fs/cgroup",
			cgroups: []string{"/sys/fs/cgroupx/a"},
			wantErr: "not below",
		},
		{
			name:    "the mount itself",
			mount:   "/sys/fs/cgroup",
			cgroups: []string{"/sys/fs/cgroup/"},
			wantErr: "cgroup v2 root",
		},
		{
			name:    "climbing out",
			mount:   "/sys/fs/cgroup",
			cgroups: []string{"../x"},
			wantErr: "not below",
		},
		{
			name:    "nested",
			mount:   "/sys/fs/cgroup",
			cgroups: []string{"smesh.slice/app.scope", "smesh.slice"},
			wantErr: "/sys/fs/cgroup/smesh.slice/app.scope is below /sys/fs/cgroup/smesh.slice",
		},
		{
			name:    "relative mount",
			mount:   "sys/fs/cgroup",
			cgroups: []string{"smesh.slice"},
			wantErr: "not an absolute path",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Default()
			c.Capture.Cgroups = tt.cgroups
			got, err := c.CgroupPaths(tt.mount)
			if tt.wantErr != "" {
				wantErr(t, err, tt.wantErr)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("CgroupPaths(%q) = %q, want %q", tt.mount, got, tt.want)
			}
		})
	}
}

func TestDurationText(t *testing.T) {
	d := Duration{1500 * time.Millisecond}
	text, err := d.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	var back Duration
	if err := back.UnmarshalText(text); err != nil {
		t.Fatal(err)
	}
	if back != d {
		t.Errorf("round trip of %v gave %v", d, back)
	}
}

func wantErr(t *testing.T, err error, substrs ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one containing %q", substrs)
	}
	for _, s := range substrs {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error does not contain %q:\n%v", s, err)
		}
	}
}

func mustPrefixes(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(s))
	for i, p := range s {
		out[i] = netip.MustParsePrefix(p)
	}
	return out
}
