// Command kerneltest is `make kernel-test`: it runs smesh's kernel-level
// tests on another kernel than the host's, in a virtual machine, and says
// per test whether it passed.
//
// The kernel is a Debian package (Debian 12's 6.1 unless -kernel names
// another): downloaded once with apt-get into the cache directory and
// unpacked there with dpkg-deb. The guest is that kernel and an initramfs
// (cpio, newc) of a static busybox, the modules the tests load (from the
// same package), smeshd and the test binaries (`go test -c`, CGO_ENABLED=0),
// and init.sh as PID 1. qemu boots it with plain emulation (TCG): nested
// KVM on the development and CI VMs is slower. The guest writes its results
// to a second serial port, which qemu hands to this program's pipe: a
// -test.v=test2json stream per test binary, framed by marker lines, that
// `go tool test2json` decodes.
//
// Every test runs, without SMESH_REQUIRE_PRIVILEGED, and every skip is then
// judged here: a test that needs a program the guest lacks (nginx, curl,
// iperf3, iproute2's ip) is listed as not run, by name; one that needs
// bounded splice on a kernel whose smeshd check found none is listed as not
// applicable; any other skip is a failure. So are a kernel warning or bug
// on the guest's console, and a guest that does not finish.
//
// Emulation moves bytes far slower than the host: SMESH_TEST_SCALE (-scale)
// divides the data sizes of the e2e tests inside the guest, and the report
// says so.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "kernel-test:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	var g guestOptions
	kernelSpec := flag.String("kernel", "linux-image-amd64",
		"the kernel: a Debian package (a metapackage is followed to its image package), or a .deb file")
	cache := flag.String("cache", ".cache/kernel-test", "where downloaded and unpacked kernel packages are kept")
	flag.StringVar(&g.Dir, "dir", "bin/kernel-test", "work directory: the guest's files, its console log and results")
	flag.StringVar(&g.Run, "run", "", "only the tests matching this -test.run pattern")
	flag.IntVar(&g.Scale, "scale", 16, "divide the e2e tests' data sizes by this in the guest (SMESH_TEST_SCALE)")
	flag.DurationVar(&g.TestTimeout, "test-timeout", 18*time.Minute, "-test.timeout of each test binary")
	flag.DurationVar(&g.Timeout, "timeout", 24*time.Minute, "the whole guest, from boot to power-off (a guard against a hung guest)")
	flag.IntVar(&g.Memory, "memory", 3072, "guest memory, MiB")
	flag.IntVar(&g.CPUs, "cpus", 2, "guest CPUs")
	flag.StringVar(&g.Accel, "accel", "tcg,thread=multi", "qemu -accel: plain emulation by default (this VM has no /dev/kvm, and nested KVM is slower than TCG on the development VMs)")
	flag.StringVar(&g.CPU, "cpu", "max", "qemu -cpu")
	flag.StringVar(&g.Busybox, "busybox", "/bin/busybox", "a statically linked busybox (Debian: busybox-static)")
	flag.Parse()
	g.Skip = notInGuest
	g.Go = os.Getenv("GO")
	if g.Go == "" {
		g.Go = "go"
	}
	if g.Scale < 1 {
		return fmt.Errorf("-scale %d: want 1 or more", g.Scale)
	}
	start := time.Now()
	logf := func(format string, args ...any) {
		fmt.Printf("[%4.0fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	if err := os.MkdirAll(g.Dir, 0o755); err != nil {
		return err
	}
	var err error
	if g.Dir, err = filepath.Abs(g.Dir); err != nil {
		return err
	}

	if err := preflight(g, !strings.HasSuffix(*kernelSpec, ".deb")); err != nil {
		return err
	}
	k, err := fetchKernel(*kernelSpec, *cache, logf)
	if err != nil {
		return err
	}
	logf("kernel %s (%s %s)", k.Release, k.Package, k.Version)
	initramfs, err := buildGuest(ctx, g, k, logf)
	if err != nil {
		return err
	}
	logf("booting it: qemu %s, %d CPUs, %d MiB; e2e data sizes divided by %d (SMESH_TEST_SCALE)",
		g.Accel, g.CPUs, g.Memory, g.Scale)
	col := &collector{progress: logf}
	raw, err := os.Create(filepath.Join(g.Dir, "results.log"))
	if err != nil {
		return err
	}
	guestErr := runGuest(ctx, g, k, initramfs, func(l string) {
		fmt.Fprintln(raw, l)
		col.line(l)
	})
	raw.Close()
	guestTime := time.Since(start)
	r := &col.run
	if err := r.parseTests(ctx, g.Go); err != nil {
		return err
	}
	console, _ := os.ReadFile(filepath.Join(g.Dir, "console.log"))
	ok := report(os.Stdout, r, k, g, guestErr, consoleTrouble(console))
	fmt.Printf("\n%s in all (%s to the end of the guest); the guest's console: %s, its raw results: %s\n",
		time.Since(start).Round(time.Second), guestTime.Round(time.Second),
		filepath.Join(g.Dir, "console.log"), filepath.Join(g.Dir, "results.log"))
	if !ok {
		os.Exit(1)
	}
	return nil
}

// preflight says at once which of the programs kerneltest drives are
// missing, and which Debian packages have them.
func preflight(g guestOptions, apt bool) error {
	need := [][2]string{{"qemu-system-x86_64", "qemu-system-x86"}, {"cpio", "cpio"}, {"dpkg-deb", "dpkg"}, {g.Busybox, "busybox-static"}}
	if apt {
		need = append(need, [2]string{"apt-get", "apt"}, [2]string{"apt-cache", "apt"})
	}
	var missing []string
	for _, n := range need {
		if _, err := exec.LookPath(n[0]); err != nil && !slices.Contains(missing, n[1]) {
			missing = append(missing, n[1])
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing programs; install them with: apt-get install %s", strings.Join(missing, " "))
	}
	return nil
}

// report prints what the guest found and returns whether everything
// passed.
func report(w *os.File, r *guestRun, k *kernel, g guestOptions, guestErr error, trouble []string) bool {
	ok := true
	fmt.Fprintf(w, "\n=== make kernel-test: Linux %s (%s %s), qemu %s, %d CPUs, %d MiB\n",
		k.Release, k.Package, k.Version, g.Accel, g.CPUs, g.Memory)
	fmt.Fprintf(w, "e2e data sizes are divided by %d in the guest (SMESH_TEST_SCALE=%d): emulation moves bytes far slower than hardware\n",
		g.Scale, g.Scale)
	if g.Run != "" {
		fmt.Fprintf(w, "only the tests matching -run %q\n", g.Run)
	}

	boundedMissing := false
	for _, s := range r.steps {
		if s.name != "check" {
			continue
		}
		fmt.Fprintf(w, "\nsmeshd check -c smesh.toml in the guest (exit status %d):\n", s.rc)
		for _, l := range s.output {
			if strings.TrimSpace(l) == "" {
				continue
			}
			fmt.Fprintln(w, "  "+l)
			if strings.Contains(l, "MISSING") && strings.Contains(l, "bounded splice") {
				boundedMissing = true
			}
		}
		if s.rc != 0 {
			ok = false
		}
	}

	verdicts := r.judge(boundedMissing, g.Skip, g.Run != "")
	counts := map[string]int{}
	fmt.Fprintf(w, "\nresults, per test:\n")
	for _, v := range verdicts {
		counts[v.status]++
		sub := ""
		if v.subtests > 0 {
			sub = fmt.Sprintf(", %d subtests", v.subtests)
		}
		if v.status == "NOT SEL" {
			fmt.Fprintf(w, "  %-8s %-9s %s\n", v.status, v.step, v.test)
		} else {
			fmt.Fprintf(w, "  %-8s %-9s %s (%.1fs%s)\n", v.status, v.step, v.test, v.elapsed, sub)
		}
		if v.status == "FAIL" {
			ok = false
		}
		if v.status != "PASS" {
			for _, d := range v.detail {
				fmt.Fprintln(w, "           "+d)
			}
		}
	}

	var problems []string
	if guestErr != nil {
		problems = append(problems, guestErr.Error())
	}
	problems = append(problems, r.errors...)
	if r.done == 0 && guestErr == nil {
		problems = append(problems, "the guest never reached the end of its plan")
	}
	for _, l := range trouble {
		problems = append(problems, "kernel console: "+l)
	}
	if len(problems) > 0 {
		ok = false
		fmt.Fprintf(w, "\nproblems:\n")
		for _, p := range problems {
			fmt.Fprintln(w, "  "+p)
		}
	}

	fmt.Fprintf(w, "\n%d passed, %d failed, %d not run (the guest lacks the program they drive), "+
		"%d not applicable to this kernel, %d not selected for the guest (userspace; make test runs them)",
		counts["PASS"], counts["FAIL"], counts["NOT RUN"], counts["N/A"], counts["NOT SEL"])
	if r.done > 0 {
		fmt.Fprintf(w, "; %.0fs in the guest (init started %.1fs after boot)", r.done, r.boot)
	}
	fmt.Fprintln(w)
	if ok {
		fmt.Fprintf(w, "PASS: Linux %s\n", k.Release)
	} else {
		fmt.Fprintf(w, "FAIL: Linux %s\n", k.Release)
	}
	return ok
}
