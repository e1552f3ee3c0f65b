package config

import (
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/smesh-dev/smesh/pkg/identity"
)

// Map sizes smeshd accepts: below the minimum a busy node fills the maps at
// once; above the maximum they cost more kernel memory than they are worth.
const (
	minMapSize = 1024
	maxMapSize = 1 << 20
	// Backends: 4 Mi, a cluster's endpoints with room for a revision of
	// each service being replaced.
	maxBackendMapSize = 1 << 22
)

// The bound of a spliced hop's queue: below the minimum a hop demotes at
// once; above the maximum one stalled reader holds more than TCP would.
const (
	minQueueLimit = 64 << 10
	maxQueueLimit = 256 << 20
)

// problems collects validation errors, each prefixed with its key.
type problems []error

func (p *problems) addf(key, format string, args ...any) {
	*p = append(*p, errors.New(key+": "+fmt.Sprintf(format, args...)))
}

// Validate checks every value of c and reports all problems at once, each
// naming its key and what is allowed. It does not touch the file system.
func (c *Config) Validate() error {
	var p problems
	c.Capture.validate(&p)
	validateWorkloads(&p, c)
	validateServices(&p, c.Services)
	validatePolicies(&p, c.Policies)

	checkOneOf(&p, "datapath.mode", c.Datapath.Mode, "auto", "splice", "copy")
	if c.Datapath.MapSize < minMapSize || c.Datapath.MapSize > maxMapSize {
		p.addf("datapath.map_size", "%d is out of range (want %d to %d)", c.Datapath.MapSize, minMapSize, maxMapSize)
	}
	if c.Datapath.ServiceMapSize < minMapSize || c.Datapath.ServiceMapSize > maxMapSize {
		p.addf("datapath.service_map_size", "%d is out of range (want %d to %d)", c.Datapath.ServiceMapSize, minMapSize, maxMapSize)
	}
	if c.Datapath.BackendMapSize < minMapSize || c.Datapath.BackendMapSize > maxBackendMapSize {
		p.addf("datapath.backend_map_size", "%d is out of range (want %d to %d)", c.Datapath.BackendMapSize, minMapSize, maxBackendMapSize)
	}
	if l := c.Datapath.SpliceQueueLimit.Bytes; l < minQueueLimit || l > maxQueueLimit {
		p.addf("datapath.splice_queue_limit", "%s is out of range (want 64KiB to 256MiB)", c.Datapath.SpliceQueueLimit)
	}

	if c.Outbound.MaxConnections < 1 {
		p.addf("outbound.max_connections", "%d: want at least 1", c.Outbound.MaxConnections)
	}
	if c.Outbound.IdleTimeout.Duration < 0 {
		p.addf("outbound.idle_timeout", "%s: want a duration of 0 (no limit) or more, e.g. \"1h\"", c.Outbound.IdleTimeout.Duration)
	}
	if checkListen(&p, "outbound.listen", c.Outbound.Listen, "127.0.0.1:18000") {
		if a := c.Outbound.Listen.Addr(); !a.Is4() || !a.IsLoopback() {
			p.addf("outbound.listen", "%s is not an IPv4 loopback address (want e.g. \"127.0.0.1:18000\"): captured IPv4 connections are redirected to it", c.Outbound.Listen)
		}
	}
	if checkListen(&p, "outbound.listen6", c.Outbound.Listen6, "[::1]:18000") {
		if a := c.Outbound.Listen6.Addr(); !a.Is6() || a.Is4In6() || !a.IsLoopback() {
			p.addf("outbound.listen6", "%s is not the IPv6 loopback address (want e.g. \"[::1]:18000\"): captured IPv6 connections are redirected to it", c.Outbound.Listen6)
		}
	}

	c.Tunnel.validate(&p)

	checkListen(&p, "admin.listen", c.Admin.Listen, "127.0.0.1:15000")
	checkDistinctPorts(&p, c)

	checkOneOf(&p, "log.level", c.Log.Level, "trace", "debug", "info", "warn", "error")
	checkOneOf(&p, "log.format", c.Log.Format, "console", "json")

	if c.Daemon.DrainTimeout.Duration < 0 {
		p.addf("daemon.drain_timeout", "%s is negative (want 0 or more, e.g. \"30s\")", c.Daemon.DrainTimeout)
	}
	if h := c.Daemon.RestartHold.Duration; h < 0 || (h > 0 && h < MinRestartHold) {
		p.addf("daemon.restart_hold", "%s: want \"0s\" (no bound) or at least %s (smeshd's heartbeat is written every second; "+
			"a shorter hold would stop capturing while smeshd runs)", c.Daemon.RestartHold, Duration{MinRestartHold})
	}
	checkOneOf(&p, "daemon.after_release", c.Daemon.AfterRelease, "exit", "wait")
	c.Kubernetes.validate(&p)
	return errors.Join(p...)
}

func (c *Capture) validate(p *problems) {
	for _, cg := range c.Cgroups {
		if err := checkCgroup(cg); err != nil {
			p.addf("capture.cgroups", "%v", err)
		}
	}
	if len(c.IncludeCIDRs) == 0 {
		p.addf("capture.include_cidrs", "is empty, so nothing would be captured (want e.g. [\"0.0.0.0/0\"])")
	}
	checkCIDRs(p, "capture.include_cidrs", c.IncludeCIDRs)
	checkCIDRs(p, "capture.exclude_cidrs", c.ExcludeCIDRs)
	checkPorts(p, "capture.exclude_ports", c.ExcludePorts)
	checkOneOf(p, "capture.on_failure", c.OnFailure, "open", "closed")
	if !filepath.IsAbs(c.PinDir) || filepath.Clean(c.PinDir) == "/" {
		p.addf("capture.pin_dir", "%q: want an absolute directory below a bpffs mount, e.g. \"/sys/fs/bpf/smesh\"", c.PinDir)
	}
}

// checkCgroup rejects entries that would enroll every process of the node
// (the cgroup v2 root) or that climb out of where they appear to point.
func checkCgroup(cg string) error {
	if cg == "" {
		return errors.New(`"" is the cgroup v2 root, which holds every process of the node (want a cgroup below it, e.g. "smesh.slice")`)
	}
	if slices.Contains(strings.Split(cg, "/"), "..") {
		return fmt.Errorf(`%q contains ".." (want a plain path, e.g. "smesh.slice")`, cg)
	}
	if clean := filepath.Clean(cg); clean == "/" || clean == "." {
		return fmt.Errorf(`%q is the cgroup v2 root, which holds every process of the node (want a cgroup below it, e.g. "smesh.slice")`, cg)
	}
	return nil
}

func checkCIDRs(p *problems, key string, prefixes []netip.Prefix) {
	for _, prefix := range prefixes {
		switch {
		case !prefix.IsValid():
			p.addf(key, "contains an unset CIDR (want e.g. \"10.0.0.0/8\")")
		case prefix.Addr().Is4In6():
			p.addf(key, "%s is a v4-mapped CIDR (want the IPv4 CIDR, e.g. %s: v4-mapped destinations are decided as IPv4)", prefix, unmapPrefix(prefix))
		case prefix != prefix.Masked():
			p.addf(key, "%s has host bits set (want %s)", prefix, prefix.Masked())
		}
	}
}

func checkPorts(p *problems, key string, ports []uint16) {
	if slices.Contains(ports, 0) {
		p.addf(key, "0 is not a port (want 1 to 65535)")
	}
}

// checkListen reports whether addr is a usable listen address, adding the
// problem if it is not.
func checkListen(p *problems, key string, addr netip.AddrPort, example string) bool {
	switch {
	case !addr.IsValid():
		p.addf(key, "is not set (want an address and port, e.g. %q)", example)
		return false
	case addr.Port() == 0:
		p.addf(key, "%s has port 0 (want a fixed port, e.g. %q)", addr, example)
		return false
	}
	return true
}

// checkDistinctPorts keeps the three listeners from colliding. Ports on
// different addresses could coexist, but one rule is easier to get right.
func checkDistinctPorts(p *problems, c *Config) {
	listens := []struct {
		key  string
		port uint16
	}{
		{"outbound.listen", c.Outbound.Listen.Port()},
		{"tunnel.listen", c.Tunnel.Listen.Port()},
		{"admin.listen", c.Admin.Listen.Port()},
	}
	// outbound.listen6 may share outbound.listen's port, and only that.
	for _, other := range listens[1:] {
		if port := c.Outbound.Listen6.Port(); port != 0 && port == other.port {
			p.addf("outbound.listen6", "port %d is also used by %s (want distinct ports; outbound.listen6 may share outbound.listen's)", port, other.key)
		}
	}
	for i, a := range listens {
		for _, b := range listens[i+1:] {
			if a.port != 0 && a.port == b.port {
				p.addf(b.key, "port %d is also used by %s (want distinct ports)", b.port, a.key)
			}
		}
	}
}

func (t *Tunnel) validate(p *problems) {
	checkListen(p, "tunnel.listen", t.Listen, "[::]:18001")
	if t.PeerPort == 0 {
		p.addf("tunnel.peer_port", "0 is not a port (want 1 to 65535, e.g. 18001)")
	}
	checkPorts(p, "tunnel.allow_ports", t.AllowPorts)
	if t.MaxConnections < 1 {
		p.addf("tunnel.max_connections", "%d is too small (want 1 or more)", t.MaxConnections)
	}
	if t.HandshakeTimeout.Duration <= 0 {
		p.addf("tunnel.handshake_timeout", "%s is not positive (want e.g. \"5s\")", t.HandshakeTimeout)
	}
	if t.MaxHandshakes < 1 {
		p.addf("tunnel.max_handshakes", "%d is too small (want 1 or more)", t.MaxHandshakes)
	}
	if t.MaxHandshakesPerSource < 1 {
		p.addf("tunnel.max_handshakes_per_source", "%d is too small (want 1 or more)", t.MaxHandshakesPerSource)
	}
	if t.IdleTimeout.Duration < 0 {
		p.addf("tunnel.idle_timeout", "%s: want a duration of 0 (no limit) or more, e.g. \"1h\"", t.IdleTimeout.Duration)
	}

	tls := t.TLS
	checkOneOf(p, "tunnel.tls.mode", tls.Mode, "mtls", "disabled")
	checkOneOf(p, "tunnel.tls.source", tls.Source, "files", "workload_api")
	if tls.Mode == "mtls" && tls.Source == "workload_api" {
		if err := checkWorkloadAPISocket(tls.WorkloadAPISocket); err != nil {
			p.addf("tunnel.tls.workload_api_socket", "%v", err)
		}
	}
	if tls.Mode == "mtls" && tls.Source == "files" {
		for _, f := range []struct{ key, path string }{
			{"tunnel.tls.cert", tls.Cert},
			{"tunnel.tls.key", tls.Key},
			{"tunnel.tls.ca", tls.CA},
		} {
			if f.path == "" {
				p.addf(f.key, "is empty (want a PEM file path; required when tunnel.tls.mode = \"mtls\")")
			}
		}
	}
	if tls.Mode == "disabled" && len(tls.AllowIdentities) > 0 {
		// Without TLS there is no identity to check: refuse rather than
		// let the operator believe peers are restricted.
		p.addf("tunnel.tls.allow_identities", "is set but tunnel.tls.mode = \"disabled\" (want [] or mode \"mtls\")")
	}
	if tls.Mode == "disabled" && len(tls.Peers) > 0 {
		p.addf("tunnel.tls.peers", "is set but tunnel.tls.mode = \"disabled\" (want none or mode \"mtls\")")
	}
	td, err := spiffeid.TrustDomainFromString(tls.TrustDomain)
	if err == nil && td.Name() != tls.TrustDomain {
		// go-spiffe also takes a SPIFFE ID and keeps its trust domain.
		err, td = errors.New("want the name alone, without spiffe:// or a path"), spiffeid.TrustDomain{}
	}
	if err != nil {
		p.addf("tunnel.tls.trust_domain", "%q is not a SPIFFE trust domain (want lower-case letters, digits, '.', '-' and '_', e.g. %q): %v",
			tls.TrustDomain, DefaultTrustDomain, err)
	}
	checkIDs := func(key string, ids []string) {
		for _, s := range ids {
			id, err := spiffeid.FromString(s)
			switch {
			case err != nil:
				p.addf(key, "%q is not a SPIFFE ID (want e.g. \"spiffe://%s/node/a\": a lower-case trust domain without port, then a path, no query or fragment): %v",
					s, DefaultTrustDomain, err)
			case !td.IsZero() && id.TrustDomain() != td:
				p.addf(key, "%q is not in tunnel.tls.trust_domain %q, so no peer could have it", s, td.Name())
			}
		}
	}
	checkIDs("tunnel.tls.allow_identities", tls.AllowIdentities)
	seen := make(map[netip.Prefix]int)
	for i, peer := range tls.Peers {
		key := fmt.Sprintf("tunnel.tls.peers[%d]", i)
		if len(peer.CIDRs) == 0 && len(peer.Workloads) == 0 {
			p.addf(key+".cidrs", "is empty (want the destinations these identities serve, e.g. [\"10.0.2.0/24\"])")
		}
		for _, c := range peer.CIDRs {
			switch {
			case !c.IsValid():
				p.addf(key+".cidrs", "contains an unset CIDR (want e.g. \"10.0.2.0/24\")")
			case c.Addr().Is4In6() || c.Addr().Zone() != "":
				p.addf(key+".cidrs", "%s: want a plain IPv4 or IPv6 CIDR", c)
			case c != c.Masked():
				p.addf(key+".cidrs", "%s has host bits set (want %s)", c, c.Masked())
			default:
				if j, dup := seen[c]; dup {
					p.addf(key+".cidrs", "%s is also in tunnel.tls.peers[%d] (want each CIDR in one entry)", c, j)
				}
				seen[c] = i
			}
		}
		if len(peer.Identities) == 0 {
			p.addf(key+".identities", "is empty (want the SPIFFE IDs that may serve these destinations)")
		}
		checkIDs(key+".identities", peer.Identities)
		for _, w := range peer.Workloads {
			if err := checkWorkload(w, td); err != nil {
				p.addf(key+".workloads", "%v", err)
			}
		}
	}
}

// checkWorkload checks one [[tunnel.tls.peers]] workloads entry: a
// workload's SPIFFE ID in its canonical form, or a prefix of some ending
// in "/", in trust domain td (when known).
func checkWorkload(w string, td spiffeid.TrustDomain) error {
	const want = `want a workload's SPIFFE ID, e.g. "spiffe://smesh.local/ns/prod/sa/payments", or a prefix ending in "/", e.g. "spiffe://smesh.local/ns/prod/"`
	s := strings.TrimSuffix(w, "/")
	if strings.HasSuffix(w, "/") && strings.Count(w, "/") == 3 {
		// "spiffe://TD/": every workload of the trust domain.
		s = w[:len(w)-1] + "/x"
	}
	id, err := identity.Parse(s)
	switch {
	case err != nil:
		return fmt.Errorf("%q: %v (%s)", w, err, want)
	case !td.IsZero() && id.TrustDomain() != td:
		return fmt.Errorf("%q is not in tunnel.tls.trust_domain %q, so no node could assert it", w, td.Name())
	}
	return nil
}

// checkWorkloadAPISocket accepts the addresses go-spiffe's Workload API
// client dials: unix:///absolute/path or tcp://IP:PORT.
func checkWorkloadAPISocket(addr string) error {
	const want = `want "unix:///ABSOLUTE/PATH" or "tcp://IP:PORT", e.g. "unix:///run/spire/agent-sockets/spire-agent.sock"`
	u, err := url.Parse(addr)
	if err != nil {
		return fmt.Errorf("%q is not a URL (%s)", addr, want)
	}
	switch u.Scheme {
	case "unix":
		if u.Host != "" || u.Opaque != "" || !filepath.IsAbs(u.Path) || u.RawQuery != "" || u.Fragment != "" {
			return fmt.Errorf("%q is not a unix socket address (%s)", addr, want)
		}
	case "tcp":
		if _, err := netip.ParseAddrPort(u.Host); err != nil || u.Path != "" || u.RawQuery != "" {
			return fmt.Errorf("%q is not a tcp address with an IP and a port (%s)", addr, want)
		}
	default:
		return fmt.Errorf("%q (%s)", addr, want)
	}
	return nil
}

// Kubernetes label syntax (k8s.io/apimachinery/pkg/util/validation): a key
// is an optional DNS subdomain prefix and "/", then a name; a value is a
// name or empty.
var (
	labelName    = regexp.MustCompile(`^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$`)
	dnsSubdomain = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
	envVarName   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
)

func (k *Kubernetes) validate(p *problems) {
	checkOneOf(p, "kubernetes.prefer_local_backends", k.PreferLocalBackends, "prefer_close", "always", "never")
	checkRootNamespace(p, "kubernetes.policy_root_namespace", k.PolicyRootNamespace)
	if !envVarName.MatchString(k.NodeNameEnv) {
		p.addf("kubernetes.node_name_env", "%q is not an environment variable name (want e.g. \"NODE_NAME\", set from spec.nodeName by the DaemonSet)", k.NodeNameEnv)
	}
	if cg := k.KubepodsCgroup; cg != "" {
		const want = `want a path relative to the cgroup v2 mount, e.g. "kubepods.slice" or "kubelet.slice/kubelet-kubepods.slice", or "" to search`
		rel := strings.TrimPrefix(cg, "/")
		switch {
		case strings.HasPrefix(cg, "/sys/fs/cgroup"):
			p.addf("kubernetes.kubepods_cgroup", "%q is a file system path (%s)", cg, want)
		case rel == "" || filepath.Clean(rel) == "." || slices.Contains(strings.Split(rel, "/"), ".."):
			p.addf("kubernetes.kubepods_cgroup", "%q is not a cgroup below the cgroup v2 root (%s)", cg, want)
		case !IsKubepodsName(filepath.Base(rel)):
			p.addf("kubernetes.kubepods_cgroup", "%q: %q is not a name the kubelet gives its kubepods cgroup "+
				"(kubepods.slice, PREFIX-kubepods.slice or kubepods; %s)", cg, filepath.Base(rel), want)
		}
	}
	checkLabel(p, "kubernetes.label", k.Label, `want "KEY=VALUE", e.g. "smesh.dev/mesh=enabled"`)
	if k.StrictLabel != "" {
		checkLabel(p, "kubernetes.strict_label", k.StrictLabel, `want "KEY=VALUE", e.g. "smesh.dev/inbound=strict", or "" for no strict pods`)
		key, _, _ := strings.Cut(k.Label, "=")
		if skey, _, _ := strings.Cut(k.StrictLabel, "="); skey == key {
			p.addf("kubernetes.strict_label", "%q has the key of kubernetes.label %q: a strict pod would carry another value of the mesh label and be out of the mesh "+
				`(want a key of its own, e.g. "smesh.dev/inbound=strict")`, k.StrictLabel, k.Label)
		}
	}
}

// checkLabel checks a "KEY=VALUE" label setting.
func checkLabel(p *problems, setting, label, example string) {
	key, value, ok := strings.Cut(label, "=")
	if !ok {
		p.addf(setting, "%q has no \"=\" (%s)", label, example)
		return
	}
	if err := checkLabelKey(key); err != nil {
		p.addf(setting, "%q: key %v (%s)", label, err, example)
	}
	if len(value) > 63 || (value != "" && !labelName.MatchString(value)) {
		p.addf(setting, "%q: value %q is not a label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit; %s)", label, value, example)
	}
}

func checkLabelKey(key string) error {
	name := key
	if prefix, n, ok := strings.Cut(key, "/"); ok {
		if len(prefix) > 253 || !dnsSubdomain.MatchString(prefix) {
			return fmt.Errorf("prefix %q is not a DNS subdomain", prefix)
		}
		name = n
	}
	if len(name) > 63 || !labelName.MatchString(name) {
		return fmt.Errorf("name %q is not a label name (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)", name)
	}
	return nil
}

func checkOneOf(p *problems, key, value string, allowed ...string) {
	if slices.Contains(allowed, value) {
		return
	}
	quoted := make([]string, len(allowed))
	for i, a := range allowed {
		quoted[i] = fmt.Sprintf("%q", a)
	}
	p.addf(key, "%q is not allowed (want one of %s)", value, strings.Join(quoted, ", "))
}

// CgroupPaths returns the cgroup directories of Capture.Cgroups, given the
// cgroup v2 mount point (found from /proc/mounts by the caller). Relative
// entries are joined to the mount; absolute ones must already be below it.
// The directories need not exist. Entries naming the same directory are
// returned once; an entry below another is an error, because programs
// attached to both would run twice for its processes.
func (c Config) CgroupPaths(cgroup2Mount string) ([]string, error) {
	if !filepath.IsAbs(cgroup2Mount) {
		return nil, fmt.Errorf("cgroup2 mount %q is not an absolute path", cgroup2Mount)
	}
	mount := filepath.Clean(cgroup2Mount)

	var paths []string
	var errs []error
	for _, cg := range c.Capture.Cgroups {
		path := cg
		if !filepath.IsAbs(path) {
			path = filepath.Join(mount, path)
		}
		path = filepath.Clean(path)
		switch {
		case path == mount:
			errs = append(errs, fmt.Errorf("capture.cgroups: %q is the cgroup v2 root %s (want a cgroup below it)", cg, mount))
		case !isBelowDir(path, mount):
			errs = append(errs, fmt.Errorf("capture.cgroups: %q is not below the cgroup v2 mount %s", cg, mount))
		case !slices.Contains(paths, path):
			paths = append(paths, path)
		}
	}
	for _, a := range paths {
		for _, b := range paths {
			if isBelowDir(b, a) {
				errs = append(errs, fmt.Errorf("capture.cgroups: %s is below %s, which already captures it (want only %s)", b, a, a))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return paths, nil
}

// isBelowDir reports whether path is strictly below dir; both are clean.
func isBelowDir(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, "../")
}

// unmapPrefix turns ::ffff:a.b.c.d/n (n >= 96) into a.b.c.d/(n-96).
func unmapPrefix(p netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0)).Masked()
}
