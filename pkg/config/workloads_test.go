package config

import (
	"strings"
	"testing"
)

const workloadsDoc = `
[capture]
cgroups = ["smesh.slice", "/sys/fs/cgroup/other.slice"]

[[capture.workloads]]
cgroup = "smesh.slice/payments.service"
identity = "spiffe://smesh.local/ns/prod/sa/payments"
strict = true
strict_exempt_ports = [8081, 9090]
ports = [8080, 8081]

[[capture.workloads]]
cgroup = "smesh.slice/web.service"

[[capture.workloads]]
cgroup = "/sys/fs/cgroup/other.slice"
`

func TestWorkloadsParse(t *testing.T) {
	cfg, err := Parse([]byte(workloadsDoc))
	if err != nil {
		t.Fatal(err)
	}
	got, err := cfg.Workloads("/sys/fs/cgroup", "node-a")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"/sys/fs/cgroup/smesh.slice/payments.service spiffe://smesh.local/ns/prod/sa/payments true",
		"/sys/fs/cgroup/smesh.slice/web.service spiffe://smesh.local/node/node-a/unit/web.service false",
		"/sys/fs/cgroup/other.slice spiffe://smesh.local/node/node-a/unit/other.slice false",
	}
	if len(got) != len(want) {
		t.Fatalf("got %d workloads, want %d: %+v", len(got), len(want), got)
	}
	for i, w := range got {
		if s := w.Cgroup + " " + w.Identity.String() + " " + map[bool]string{true: "true", false: "false"}[w.Strict]; s != want[i] {
			t.Errorf("workload %d: %s, want %s", i, s, want[i])
		}
	}
	if p := got[0].ExemptPorts; len(p) != 2 || p[0] != 8081 || p[1] != 9090 {
		t.Errorf("exempt ports of payments: %v, want [8081 9090]", p)
	}
	if p := got[0].Ports; len(p) != 2 || p[0] != 8080 || p[1] != 8081 {
		t.Errorf("ports of payments: %v, want [8080 8081]", p)
	}
	id, err := cfg.DefaultIdentity("/sys/fs/cgroup/smesh.slice", "node-a")
	if err != nil || id.String() != "spiffe://smesh.local/node/node-a/unit/smesh.slice" {
		t.Errorf("default identity of smesh.slice: %v, %v", id, err)
	}
}

func TestWorkloadsErrors(t *testing.T) {
	cases := []struct {
		doc, want string
	}{
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "other.slice/x.service"`, `capture.workloads[0].cgroup: "other.slice/x.service" is not at or below any [capture] cgroups entry`},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
identity = "spiffe://smesh.local/x"`, "capture.workloads[0].cgroup: is not set"},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "smesh.slice/a"
identity = "spiffe://elsewhere.example/x"`, `capture.workloads[0].identity: "spiffe://elsewhere.example/x" is not in tunnel.tls.trust_domain "smesh.local"`},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "smesh.slice/a"
identity = "payments"`, `capture.workloads[0].identity: workload identity "payments"`},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "smesh.slice/a"
[[capture.workloads]]
cgroup = "smesh.slice/a/"`, `capture.workloads[1].cgroup: "smesh.slice/a/" is also capture.workloads[0]'s cgroup`},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "smesh.slice/a"
strikt = true`, "line 5: unknown key capture.workloads.strikt"},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "smesh.slice/a"
strict_exempt_ports = [8080]`, "capture.workloads[0].strict_exempt_ports[0]: 8080: exempt ports are only for a strict workload"},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "smesh.slice/a"
strict = true
strict_exempt_ports = [8080, 0, 70000, 8080]`, "capture.workloads[0].strict_exempt_ports[1]: 0 is not a TCP port"},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "smesh.slice/a"
strict = true
strict_exempt_ports = [8080, 0, 70000, 8080]`, "capture.workloads[0].strict_exempt_ports[2]: 70000 is not a TCP port"},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "smesh.slice/a"
strict = true
strict_exempt_ports = [8080, 0, 70000, 8080]`, "capture.workloads[0].strict_exempt_ports[3]: 8080 is listed twice"},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "smesh.slice/a"
ports = [8080, 0, 8080]`, "capture.workloads[0].ports[1]: 0 is not a TCP port"},
		{`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "smesh.slice/a"
ports = [8080, 0, 8080]`, "capture.workloads[0].ports[2]: 8080 is listed twice"},
	}
	for _, tc := range cases {
		_, err := Parse([]byte(tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s\n: %v, want an error with %q", tc.doc, err, tc.want)
		}
	}
	// Absolute against relative is decided with the mount.
	cfg, err := Parse([]byte(`[capture]
cgroups = ["smesh.slice"]
[[capture.workloads]]
cgroup = "/sys/fs/cgroup/elsewhere.slice/a"`))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cfg.Workloads("/sys/fs/cgroup", "n"); err == nil || !strings.Contains(err.Error(), "is not at or below any [capture] cgroups entry") {
		t.Errorf("a workload outside the enrolled cgroups: %v", err)
	}
	if _, err := cfg.Workloads("/sys/fs/cgroup/unified", "n"); err == nil || !strings.Contains(err.Error(), "is not below the cgroup v2 mount") {
		t.Errorf("a workload outside the mount: %v", err)
	}
}
