// Package config reads and checks smeshd's TOML configuration.
//
// Parse and Load are strict: a key smeshd does not know is an error naming the
// key and its line, because a misspelt key would otherwise silently leave the
// default in force (for example capture of a cgroup nobody meant to enroll).
// Every value is checked by Validate, which reports all problems at once.
// smesh.toml at the repository root documents every key with its default.
package config

import (
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Config is the whole smeshd configuration. Start from Default: its zero
// value is not valid.
type Config struct {
	Capture    Capture    `toml:"capture"`
	Datapath   Datapath   `toml:"datapath"`
	Outbound   Outbound   `toml:"outbound"`
	Tunnel     Tunnel     `toml:"tunnel"`
	Admin      Admin      `toml:"admin"`
	Log        Log        `toml:"log"`
	Daemon     Daemon     `toml:"daemon"`
	Kubernetes Kubernetes `toml:"kubernetes"`
	Services   []Service  `toml:"services"`
	Policies   []Policy   `toml:"policy"`
}

// Capture selects the workloads and destinations whose outbound TCP is
// captured.
type Capture struct {
	// Cgroups are cgroup v2 directories whose processes (and those of their
	// descendants) are in the mesh. Relative paths are below the cgroup2
	// mount; see CgroupPaths. An empty list captures nothing, which suits a
	// node that only receives tunnel traffic.
	Cgroups []string `toml:"cgroups"`
	// IncludeCIDRs are the destinations (IPv4 and IPv6) that are captured;
	// a v4-mapped destination counts as the IPv4 address it carries.
	IncludeCIDRs []netip.Prefix `toml:"include_cidrs"`
	// ExcludeCIDRs are destinations left alone even when included.
	ExcludeCIDRs []netip.Prefix `toml:"exclude_cidrs"`
	// ExcludePorts are destination ports left alone.
	ExcludePorts []uint16 `toml:"exclude_ports"`
	// OnFailure says what happens to new connections when smeshd cannot
	// proxy them: "open" lets them through uncaptured, "closed" refuses them.
	OnFailure string `toml:"on_failure"`
	// PinDir is where on_failure = "closed" pins the capture (a directory
	// on a bpffs mount) so that it outlives smeshd.
	PinDir string `toml:"pin_dir"`
	// Workloads name the identities of cgroups at or below Cgroups
	// ([[capture.workloads]], workloads.go).
	Workloads []Workload `toml:"workloads"`
}

// Datapath chooses how captured connections are carried.
type Datapath struct {
	// Mode is "auto" (splice where the kernel can also bound what a
	// spliced hop queues, else copy), "splice" or "copy".
	Mode string `toml:"mode"`
	// MapSize is the maximum number of entries of the sockhash and of the
	// original-destination map.
	MapSize uint32 `toml:"map_size"`
	// ServiceMapSize bounds the service ports connect4 translates
	// (Kubernetes Services times their ClusterIPs and TCP ports, and
	// [[services]]); BackendMapSize their backends, all services together.
	ServiceMapSize uint32 `toml:"service_map_size"`
	BackendMapSize uint32 `toml:"backend_map_size"`
	// SpliceProxyHops splices the hops with smeshd at one end too, not
	// only direct same-node connections.
	SpliceProxyHops bool `toml:"splice_proxy_hops"`
	// SpliceQueueLimit is how many bytes a spliced hop may queue at its
	// reader before that direction is demoted to TCP.
	SpliceQueueLimit Size `toml:"splice_queue_limit"`
}

// Outbound is the local listener captured connections are redirected to.
type Outbound struct {
	// Listen must be an IPv4 loopback address: connect4 rewrites IPv4
	// destinations to it (and connect6 v4-mapped ones), and nothing off the
	// node may reach it.
	Listen netip.AddrPort `toml:"listen"`
	// Listen6 must be an IPv6 loopback address: connect6 rewrites IPv6
	// destinations to it.
	Listen6 netip.AddrPort `toml:"listen6"`
	// MaxConnections bounds the captured connections relayed at once;
	// more are reset.
	MaxConnections int `toml:"max_connections"`
	// IdleTimeout resets a relayed connection that moved nothing either
	// way for this long; 0 disables it.
	IdleTimeout Duration `toml:"idle_timeout"`
}

// Tunnel is the mTLS tunnel between the smeshd of different nodes.
type Tunnel struct {
	// Listen is where this node accepts tunnel connections; [::] accepts
	// IPv4 and IPv6 (where the kernel has no IPv6, smeshd listens on
	// 0.0.0.0 instead and says so).
	Listen netip.AddrPort `toml:"listen"`
	// PeerPort is the port dialled on other nodes.
	PeerPort uint16 `toml:"peer_port"`
	// AllowPorts are the only local destination ports the tunnel delivers
	// to; empty means any port.
	AllowPorts []uint16 `toml:"allow_ports"`
	// MaxConnections bounds the incoming tunnel connections past their
	// handshake (authenticated, relaying) at once.
	MaxConnections int `toml:"max_connections"`
	// HandshakeTimeout bounds the TLS handshake and the read of the header.
	HandshakeTimeout Duration `toml:"handshake_timeout"`
	// MaxHandshakes bounds the incoming connections still in their
	// handshake (not authenticated yet), apart from MaxConnections, so that
	// unauthenticated connections cannot take the places of peers.
	MaxHandshakes int `toml:"max_handshakes"`
	// MaxHandshakesPerSource bounds those of them from one source address.
	MaxHandshakesPerSource int `toml:"max_handshakes_per_source"`
	// IdleTimeout resets an incoming tunnel connection that moved nothing
	// either way for this long; 0 disables it.
	IdleTimeout Duration `toml:"idle_timeout"`
	TLS         TLS      `toml:"tls"`
}

// TLS configures the tunnel's mutual authentication.
type TLS struct {
	// Mode is "mtls" or "disabled" (plain TCP, for tests and benchmarks).
	Mode string `toml:"mode"`
	// Source is where the node's certificate and the CA come from with
	// mode "mtls": "files" (Cert, Key, CA) or "workload_api" (a SPIFFE
	// Workload API, such as a SPIRE agent's socket, at WorkloadAPISocket).
	Source            string `toml:"source"`
	WorkloadAPISocket string `toml:"workload_api_socket"`
	// Cert, Key and CA are PEM files. Their existence is checked when the
	// tunnel starts, not here, so a config can be checked on another host.
	Cert string `toml:"cert"`
	Key  string `toml:"key"`
	CA   string `toml:"ca"`
	// TrustDomain is the SPIFFE trust domain every peer certificate's
	// identity (its spiffe:// URI SAN) must be in, this node's own too.
	TrustDomain string `toml:"trust_domain"`
	// AllowIdentities are the spiffe:// URIs a peer certificate must carry
	// one of; empty means any identity in TrustDomain.
	AllowIdentities []string `toml:"allow_identities"`
	// Peers pin which identities may serve which destinations: a tunnel to
	// a destination inside one of their CIDRs is only opened to a server
	// whose identity that entry lists (the most specific CIDR decides).
	// Destinations outside every entry may be served by any allowed peer.
	Peers []Peer `toml:"peers"`
}

// Peer is one [[tunnel.tls.peers]] entry.
type Peer struct {
	CIDRs      []netip.Prefix `toml:"cidrs"`
	Identities []string       `toml:"identities"`
	// Workloads are the workload identities the nodes of Identities may
	// assert as the source of their tunnelled connections (wire v3):
	// exact SPIFFE IDs, or prefixes ending in "/". Once any entry has
	// workloads, a node may assert only those of its entries, with a
	// source address only inside its entries' cidrs; while none has,
	// no assertion is verified and every connection is its node's
	// (tunnel.IdentityPolicy.Verify).
	Workloads []string `toml:"workloads"`
}

// Admin is the HTTP endpoint for /metrics, /healthz and /readyz.
type Admin struct {
	Listen netip.AddrPort `toml:"listen"`
}

// Log configures logging.
type Log struct {
	// Level is "trace", "debug", "info", "warn" or "error".
	Level string `toml:"level"`
	// Format is "console" or "json".
	Format string `toml:"format"`
}

// MinRestartHold is the shortest [daemon] restart_hold other than 0: two
// heartbeats (one a second) and some slack for a busy node.
const MinRestartHold = 2 * time.Second

// Daemon configures the daemon's own lifecycle.
type Daemon struct {
	// DrainTimeout is how long smeshd waits for open connections to end
	// when asked to stop; 0 stops at once.
	DrainTimeout Duration `toml:"drain_timeout"`
	// RestartHold bounds how long a captured connection is sent to a
	// listener that outlived smeshd (pinned, or held by a successor or
	// systemd's store): once smeshd's heartbeat is older, connect4/6
	// treat the listener as not ready and on_failure decides. 0: no bound.
	RestartHold Duration `toml:"restart_hold"`
	// AfterRelease is what smeshd does once it handed everything over to a
	// successor and drained: "exit" (0), or "wait" idle until SIGTERM,
	// for a container the kubelet would otherwise restart (restartPolicy
	// Always) into a take-back from its successor.
	AfterRelease string `toml:"after_release"`
}

// Kubernetes enrols the pods of this node by label, when smeshd runs in a
// cluster (deploy/kubernetes).
type Kubernetes struct {
	Enabled bool `toml:"enabled"`
	// NodeNameEnv names the environment variable that holds this node's
	// name (the DaemonSet sets it from spec.nodeName).
	NodeNameEnv string `toml:"node_name_env"`
	// Label is "KEY=VALUE": a pod carrying it, or whose namespace carries
	// it, is in the mesh; a pod whose KEY has another value is not.
	Label string `toml:"label"`
	// StrictLabel is "KEY=VALUE": a pod in the mesh carrying it, or whose
	// namespace carries it, is strict (accepts TCP only through the mesh,
	// but on the ports its probes name, for the kubelet); a pod whose KEY
	// has another value is not. "" makes no pod strict.
	StrictLabel string `toml:"strict_label"`
	// KubepodsCgroup is the kubelet's kubepods cgroup, relative to the
	// cgroup v2 mount (e.g. "kubepods.slice", or
	// "kubelet.slice/kubelet-kubepods.slice" below a kubelet cgroupRoot);
	// "" finds it by a search, which a second kubepods cgroup at the same
	// depth makes ambiguous.
	KubepodsCgroup string `toml:"kubepods_cgroup"`
	// PreferLocalBackends says which Services send connections to a
	// backend on this node whenever one is usable: "prefer_close" (those
	// whose trafficDistribution or topology annotation asks for close
	// endpoints, or whose EndpointSlices carry hints), "always", "never".
	PreferLocalBackends string `toml:"prefer_local_backends"`
	// PolicyRootNamespace is Istio's root namespace: its
	// AuthorizationPolicies apply to the workloads of every namespace.
	PolicyRootNamespace string `toml:"policy_root_namespace"`
}

// IsKubepodsName reports whether name is what the kubelet calls its
// kubepods cgroup: kubepods.slice or *-kubepods.slice (systemd driver, the
// prefix from a cgroupRoot), kubepods (cgroupfs). pkg/kube derives the pod
// cgroups' names from it.
func IsKubepodsName(name string) bool {
	return name == "kubepods" || name == "kubepods.slice" || strings.HasSuffix(name, "-kubepods.slice")
}

// StrictLabelKeyValue splits StrictLabel into its key and value ("" and ""
// when it is not set).
func (k Kubernetes) StrictLabelKeyValue() (key, value string) {
	key, value, _ = strings.Cut(k.StrictLabel, "=")
	return key, value
}

// LabelKeyValue splits Label into its key and value.
func (k Kubernetes) LabelKeyValue() (key, value string) {
	key, value, _ = strings.Cut(k.Label, "=")
	return key, value
}

// Duration is a time.Duration written in TOML as a string such as "30s".
type Duration struct{ time.Duration }

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) {
	return []byte(d.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(text []byte) error {
	v, err := time.ParseDuration(string(text))
	if err != nil {
		return fmt.Errorf("%q is not a duration (want e.g. \"30s\" or \"1m30s\")", text)
	}
	d.Duration = v
	return nil
}

// Size is a number of bytes written in TOML as a string such as "2MiB".
type Size struct{ Bytes uint64 }

var sizeUnits = []struct {
	suffix string
	mult   uint64
}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}}

// MarshalText implements encoding.TextMarshaler.
func (s Size) MarshalText() ([]byte, error) {
	for _, u := range sizeUnits {
		if s.Bytes >= u.mult && s.Bytes%u.mult == 0 {
			return []byte(strconv.FormatUint(s.Bytes/u.mult, 10) + u.suffix), nil
		}
	}
	return []byte(strconv.FormatUint(s.Bytes, 10) + "B"), nil
}

func (s Size) String() string {
	b, _ := s.MarshalText()
	return string(b)
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Size) UnmarshalText(text []byte) error {
	str := string(text)
	for _, u := range sizeUnits {
		num, ok := strings.CutSuffix(str, u.suffix)
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(num, 10, 64)
		if err != nil || n > math.MaxUint64/u.mult {
			break
		}
		s.Bytes = n * u.mult
		return nil
	}
	return fmt.Errorf("%q is not a size (want e.g. \"2MiB\", \"512KiB\" or \"65536B\")", text)
}

// DefaultTrustDomain is [tunnel.tls] trust_domain unless set: the trust
// domain `smeshd certs init` gives its certificates unless told otherwise
// (pkg/certs keeps the same value).
const DefaultTrustDomain = "smesh.local"

// Default returns the default configuration, the one smesh.toml documents.
// Empty lists are empty, not nil, so that a parsed "[]" compares equal.
func Default() Config {
	return Config{
		Capture: Capture{
			Cgroups:      []string{"smesh.slice"},
			IncludeCIDRs: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
			ExcludeCIDRs: []netip.Prefix{},
			ExcludePorts: []uint16{},
			OnFailure:    "open",
			PinDir:       "/sys/fs/bpf/smesh",
		},
		Datapath: Datapath{
			Mode:             "auto",
			MapSize:          65536,
			ServiceMapSize:   65536,
			BackendMapSize:   262144,
			SpliceProxyHops:  true,
			SpliceQueueLimit: Size{2 << 20},
		},
		Outbound: Outbound{
			Listen:         netip.MustParseAddrPort("127.0.0.1:18000"),
			Listen6:        netip.MustParseAddrPort("[::1]:18000"),
			MaxConnections: 16384,
			IdleTimeout:    Duration{time.Hour},
		},
		Tunnel: Tunnel{
			Listen:                 netip.MustParseAddrPort("[::]:18001"),
			PeerPort:               18001,
			AllowPorts:             []uint16{},
			MaxConnections:         4096,
			HandshakeTimeout:       Duration{5 * time.Second},
			MaxHandshakes:          1024,
			MaxHandshakesPerSource: 512,
			IdleTimeout:            Duration{time.Hour},
			TLS: TLS{
				Mode:              "mtls",
				Source:            "files",
				WorkloadAPISocket: "unix:///run/spire/agent-sockets/spire-agent.sock",
				Cert:              "/etc/smesh/tls/node.crt",
				Key:               "/etc/smesh/tls/node.key",
				CA:                "/etc/smesh/tls/ca.crt",
				TrustDomain:       DefaultTrustDomain,
				AllowIdentities:   []string{},
				Peers:             []Peer{},
			},
		},
		Admin: Admin{
			Listen: netip.MustParseAddrPort("127.0.0.1:15000"),
		},
		Log: Log{
			Level:  "info",
			Format: "console",
		},
		Daemon: Daemon{
			DrainTimeout: Duration{30 * time.Second},
			RestartHold:  Duration{10 * time.Second},
			AfterRelease: "exit",
		},
		Kubernetes: Kubernetes{
			Enabled:     false,
			NodeNameEnv: "NODE_NAME",
			Label:       "smesh.dev/mesh=enabled",
			StrictLabel: "smesh.dev/inbound=strict",

			PreferLocalBackends: "prefer_close",
			PolicyRootNamespace: "istio-system",
		},
		Services: []Service{},
		Policies: []Policy{},
	}
}
