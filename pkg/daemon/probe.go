package daemon

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/smesh-dev/smesh/pkg/admin"
)

// Probe is `smeshd ready`: the readiness of the smeshd of the caller's own
// cgroup (its container), not of whichever smeshd holds the admin listener.
// During a hand-over two smeshd of one node share that listener (a new pod
// beside the old one, host network): before the take-over an HTTP probe of
// the new pod would be answered by the old smeshd (ready: the new pod would
// count as Ready before it took anything over, and the old pod be deleted
// while the new smeshd may still fail), after it the old pod's probe by the
// new smeshd. So Probe asks /readyz and accepts the answer only from a
// process in its own cgroup (admin.PIDHeader): the exec probe runs in the
// container's cgroup, as does the container's smeshd.
func Probe(ctx context.Context, addr netip.AddrPort, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr.String()+"/readyz", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("asking smeshd's admin endpoint: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	pid, err := strconv.Atoi(resp.Header.Get(admin.PIDHeader))
	if err != nil {
		return fmt.Errorf("the smeshd answering on %s does not say its PID (%s header): an older version; not this container's", addr, admin.PIDHeader)
	}
	own, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return err
	}
	theirs, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return fmt.Errorf("the smeshd answering on %s is PID %d, which this probe cannot see (hostPID off?): %w", addr, pid, err)
	}
	// The whole file: on a hybrid host the v1 hierarchies are in it too.
	if !bytes.Equal(own, theirs) {
		return fmt.Errorf("not ready: the smeshd answering on %s is PID %d of cgroup %s, not this container's (%s): "+
			"this one has not taken over yet, or has handed over to it", addr, pid, unified(theirs), unified(own))
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("smeshd (PID %d): %d %s", pid, resp.StatusCode, strings.TrimSpace(string(body)))
	}
	return nil
}

// unified is the cgroup v2 path in a /proc/PID/cgroup file ("0::PATH").
func unified(procCgroup []byte) string {
	for _, line := range strings.Split(string(procCgroup), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p
		}
	}
	return strings.TrimSpace(string(procCgroup))
}
