package e2e

import (
	"strings"
	"testing"
	"time"
)

const gib = 1 << 30

// sameNode starts a node with smeshd in mode, a server in the enrolled
// cgroup on 127.0.0.1:9000, and returns both.
func sameNode(t *testing.T, mode string) (*node, string) {
	n := newNode(t)
	n.server(n.enrolled, "127.0.0.1:9000")
	n.start(mode, "")
	return n, "127.0.0.1:9000"
}

// TestSameNode sends known bytes between two enrolled processes on one node
// in every way the issue lists, in both data path modes, and checks that
// splice mode really spliced them (BPF counters) and copy mode really
// relayed them (the client is connected to smeshd).
func TestSameNode(t *testing.T) {
	for _, mode := range []string{"splice", "copy"} {
		t.Run(mode, func(t *testing.T) {
			n, addr := sameNode(t, mode)
			cases := []struct {
				name string
				args []string
				// min bytes sk_msg must see in splice mode: spliced, or
				// sent by TCP once the bound demoted the direction (a
				// bulk writer outruns its reader within a few MiB)
				spliced uint64
			}{
				{"1GiB one way", []string{"oneway", addr, "1073741824"}, gib},
				{"1GiB both ways at once", []string{"echo", addr, "1073741824"}, 2 * gib},
				{"10000 one-byte exchanges", []string{"rr", addr, "10000"}, 20000},
				{"200 concurrent connections", []string{"concurrent", addr, "4000000"}, 1},
				{"half-close then answer", []string{"oneway", addr, "12345"}, 12345},
				{"server closes first", []string{"serverfirst", addr, "10000000"}, 10000000},
				{"reset by server", []string{"reset-server", addr}, 0},
				{"stalled reader, 256MiB writer", []string{"stall", addr, "268435456"}, 256 << 20},
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					before := n.stats()
					n.client(n.enrolled, c.args...)
					after := n.stats()
					moved := after.bytes - before.bytes + after.demotedBytes - before.demotedBytes
					switch {
					case mode == "splice" && moved < carriedFloor(c.spliced):
						t.Errorf("spliced %d bytes, want at least %d", moved, carriedFloor(c.spliced))
					case mode == "copy" && moved != 0:
						t.Errorf("copy mode spliced %d bytes", moved)
					}
				})
			}
			t.Run("captured only in copy mode", func(t *testing.T) {
				if got := captured(n, n.enrolled, addr); got != (mode == "copy") {
					t.Errorf("captured = %v in %s mode", got, mode)
				}
			})
		})
	}
}

// TestSameNodeResetByClient: a client's reset reaches the server as an error.
func TestSameNodeResetByClient(t *testing.T) {
	for _, mode := range []string{"splice", "copy"} {
		t.Run(mode, func(t *testing.T) {
			n := newNode(t)
			srv := n.server(n.enrolled, "127.0.0.1:9000")
			n.start(mode, "")
			n.client(n.enrolled, "reset-client", "127.0.0.1:9000")
			line, err := srv.ReadLine(10 * time.Second)
			if err != nil {
				t.Fatalf("server reported nothing: %v", err)
			}
			if !strings.HasPrefix(line, "result sink error:") {
				t.Errorf("server saw %q, want an error", line)
			}
		})
	}
}
