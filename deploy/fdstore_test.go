package deploy

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smesh-dev/smesh/pkg/testenv"
)

// fdprobeUnit runs deploy/internal/fdstoreprobe with a file descriptor
// store. Its start takes a second (PROBE_START_DELAY): connections made
// meanwhile wait in the stored listener's queue, or are refused.
const fdprobeUnit = `[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/fdstoreprobe serve 127.0.0.1:18099
FileDescriptorStoreMax=16
Restart=on-failure
RestartSec=1s
Environment=PROBE_START_DELAY=1s
Environment=PROBE_FDPOLL=\nFDPOLL=0

[Install]
WantedBy=multi-user.target
`

// TestSystemdFDStore is experiment (d) of docs/restart.md: what systemd's
// file descriptor store (sd_notify FDSTORE=1, FileDescriptorStoreMax=)
// does for a listening socket and a BPF object on systemd 252 (Debian 12,
// the floor of deploy/smeshd.service) and 254 (bookworm-backports, which
// has FileDescriptorStorePreserve=): across `systemctl restart`, across a
// crash restart (Restart=on-failure), and across stop + start; and whether
// connections made while no process runs wait in the stored listener's
// accept queue. The unit runs deploy/internal/fdstoreprobe.
func TestSystemdFDStore(t *testing.T) {
	testenv.RequirePrivileged(t)
	probe := buildProbe(t)
	for _, v := range []struct {
		name   string
		rootfs func(*testing.T) string
	}{
		{"systemd252", bookwormRootfs},
		{"systemd254", backportsRootfs},
	} {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			c := bootContainer(t, v.rootfs(t), "--bind-ro="+probe+":/root/probe")
			c.t = t
			c.diagnose = func() string {
				out, _ := c.exec(commandTimeout, "journalctl", "--no-pager", "-n", "30", "-u", "fdprobe")
				return out
			}
			version := c.systemdVersion()
			if err := os.WriteFile(filepath.Join(probe, "fdprobe.service"), []byte(fdprobeUnit), 0o644); err != nil {
				t.Fatal(err)
			}
			c.sh("install -m 0755 /root/probe/fdstoreprobe /usr/local/bin/ && " +
				"cp /root/probe/fdprobe.service /etc/systemd/system/ && systemctl daemon-reload && systemctl enable --now fdprobe")
			client := func(what string) (string, bool) {
				out, ok := c.try("/usr/local/bin/fdstoreprobe client 127.0.0.1:18099")
				out = strings.TrimSpace(out)
				t.Logf("systemd %s, %s: %s", version, what, out)
				return out, ok
			}
			expect := func(what, out string, ok bool, want ...string) {
				t.Helper()
				if !ok {
					t.Errorf("%s: %s", what, out)
					return
				}
				for _, w := range want {
					if !strings.Contains(out, w) {
						t.Errorf("%s: %q, want %q in it", what, out, w)
					}
				}
			}
			out, ok := client("first start")
			expect("first start", out, ok, "gen=1", "inherited=false")
			first := field(out, "listener")

			c.sh("systemctl restart --no-block fdprobe; sleep 0.3")
			out, ok = client("connect during `systemctl restart`")
			expect("systemctl restart", out, ok, "gen=2", "inherited=true", "map=true", "listener="+first,
				"polledmap=false", // a BPF map stored without FDPOLL=0 is not kept
				"link=true")       // a cgroup bpf_link with FDPOLL=0 is

			c.sh("systemctl kill -s KILL fdprobe; sleep 0.3")
			out, ok = client("connect 0.3s after SIGKILL, Restart=on-failure, RestartSec=1s")
			expect("crash restart", out, ok, "gen=3", "inherited=true", "map=true", "listener="+first, "link=true")

			c.sh("systemctl stop fdprobe")
			out, ok = client("connect while stopped")
			if ok {
				t.Errorf("a connection while the unit is stopped was answered: %s", out)
			}
			c.sh("systemctl start fdprobe")
			out, ok = client("start after stop")
			expect("start after stop", out, ok, "gen=1", "inherited=false")

			t.Logf("journal:\n%s", c.diagnose())
			if strings.HasPrefix(version, "252") {
				return
			}
			c.sh("mkdir -p /etc/systemd/system/fdprobe.service.d && " +
				"printf '[Service]\\nFileDescriptorStorePreserve=yes\\n' > /etc/systemd/system/fdprobe.service.d/preserve.conf && " +
				"systemctl daemon-reload && systemctl restart fdprobe && systemctl stop fdprobe")
			out, _ = c.try("timeout 3 /usr/local/bin/fdstoreprobe client 127.0.0.1:18099 || echo exit=$?")
			t.Logf("systemd %s, FileDescriptorStorePreserve=yes, connect while stopped: %s", version, strings.TrimSpace(out))
			c.sh("systemctl start fdprobe")
			out, ok = client("FileDescriptorStorePreserve=yes, start after stop")
			expect("FileDescriptorStorePreserve=yes, start after stop", out, ok, "inherited=true", "map=true")
		})
	}
}

func field(line, name string) string {
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, name+"="); ok {
			return v
		}
	}
	return ""
}

// buildProbe builds fdstoreprobe, static, into a directory of its own.
func buildProbe(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	gobin := os.Getenv("GO")
	if gobin == "" {
		var err error
		if gobin, err = exec.LookPath("go"); err != nil {
			t.Fatal(err)
		}
	}
	build := exec.Command(gobin, "build", "-o", filepath.Join(dir, "fdstoreprobe"), "./internal/fdstoreprobe")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building fdstoreprobe: %v\n%s", err, out)
	}
	return dir
}

// masterUnit runs fdstoreprobe as master (main process) and worker, with
// the KillMode= under test.
const masterUnit = `[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/fdstoreprobe master 127.0.0.1:%d
FileDescriptorStoreMax=16
KillMode=%s
Environment=PROBE_SCOPE=%s
`

// TestSystemdKillMode is experiment (e) of docs/restart.md: a long-lived
// connection served by a process that is not the unit's main process
// (fdstoreprobe's worker), across `systemctl restart`: with KillMode=process
// the old worker finishes it while the new one, handed the stored
// listener, serves new connections; with KillMode=mixed (and
// control-group, the default) systemd kills the old worker with the unit,
// cutting it, unless the master moves the worker into a transient scope of
// its own (StartTransientUnit with PIDs=, through busctl) before it exits,
// also under deploy/smeshd.service's sandboxing directives.
func TestSystemdKillMode(t *testing.T) {
	testenv.RequirePrivileged(t)
	probe := buildProbe(t)
	c := bootContainer(t, bookwormRootfs(t), "--bind-ro="+probe+":/root/probe")
	c.t = t
	c.sh("install -m 0755 /root/probe/fdstoreprobe /usr/local/bin/")
	hardening := unitHardening(t)
	for i, mode := range []string{"process", "mixed", "mixed+scope", "mixed+scope+hardened"} {
		port := 18090 + i
		killMode, rest, _ := strings.Cut(mode, "+")
		scope, hardened, _ := strings.Cut(rest, "+")
		unit := "probe-" + killMode + scope + hardened
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		t.Run(mode, func(t *testing.T) {
			c.t = t
			c.diagnose = func() string {
				out, _ := c.exec(commandTimeout, "journalctl", "--no-pager", "-n", "30", "-u", unit)
				return out
			}
			content := fmt.Sprintf(masterUnit, port, killMode, scope)
			if hardened != "" {
				// smeshd's own sandbox (deploy/smeshd.service): can the
				// master still reach systemd over D-Bus?
				content += hardening
			}
			if err := os.WriteFile(filepath.Join(probe, unit+".service"), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
			c.sh(fmt.Sprintf("cp /root/probe/%s.service /etc/systemd/system/ && systemctl daemon-reload && systemctl start %s", unit, unit))
			// The stream runs in the background, outside the unit.
			c.sh(fmt.Sprintf("(/usr/local/bin/fdstoreprobe stream %s 4s > /tmp/%s.out 2>&1 &)", addr, unit))
			time.Sleep(time.Second)
			c.sh("systemctl restart " + unit)
			out, _ := c.try("/usr/local/bin/fdstoreprobe stream " + addr + " 300ms")
			t.Logf("KillMode=%s, a new connection after the restart: %s", mode, strings.TrimSpace(out))
			time.Sleep(4 * time.Second)
			streamOut := strings.TrimSpace(c.sh("cat /tmp/" + unit + ".out"))
			t.Logf("KillMode=%s, the stream opened before the restart: %s", mode, streamOut)
			t.Logf("journal:\n%s", c.diagnose())
			switch mode {
			case "process", "mixed+scope", "mixed+scope+hardened":
				if !strings.HasSuffix(streamOut, "ok") {
					t.Errorf("KillMode=process: the stream did not outlive the restart: %s", streamOut)
				}
				if field(streamOut, "pid") == field(out, "pid") {
					t.Errorf("the new connection went to the old worker")
				}
			default:
				if strings.HasSuffix(streamOut, "ok") {
					t.Errorf("KillMode=%s: the stream outlived the restart: %s", mode, streamOut)
				}
			}
			if !strings.HasSuffix(strings.TrimSpace(out), "ok") {
				t.Errorf("a new connection after the restart: %s", out)
			}
			c.sh("systemctl stop " + unit)
		})
	}
}

// unitHardening is the sandboxing of deploy/smeshd.service's [Service]:
// capabilities, file system, kernel interfaces.
func unitHardening(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile("smeshd.service")
	if err != nil {
		t.Fatal(err)
	}
	keys := []string{"CapabilityBoundingSet", "AmbientCapabilities", "NoNewPrivileges", "ProtectSystem",
		"ProtectControlGroups", "ProtectHome", "PrivateMounts", "PrivateTmp", "PrivateDevices",
		"ProtectKernelModules", "ProtectKernelLogs", "ProtectClock", "ProtectHostname", "RestrictNamespaces",
		"RestrictAddressFamilies", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
		"MemoryDenyWriteExecute", "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber"}
	var out strings.Builder
	for _, line := range strings.Split(string(data), "\n") {
		k, _, ok := strings.Cut(line, "=")
		if ok && slices.Contains(keys, k) {
			out.WriteString(line + "\n")
		}
	}
	if !strings.Contains(out.String(), "SystemCallFilter=") {
		t.Fatalf("no sandboxing found in smeshd.service:\n%s", out.String())
	}
	return out.String()
}
