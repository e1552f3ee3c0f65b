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
			concArgs, concBytes := concurrentArgs(addr, scaled(1<<20))
			cases := []struct {
				name string
				args []string
				// bytes sk_msg must splice in splice mode; bulk: the
				// reader may fall behind the writer and demote it (see
				// checkSpliced)
				spliced uint64
				bulk    bool
			}{
				{"1GiB one way", []string{"oneway", addr, scaledArg(gib)}, uint64(scaled(gib)), true},
				{"1GiB both ways at once", []string{"echo", addr, scaledArg(gib)}, 2 * uint64(scaled(gib)), true},
				{"10000 one-byte exchanges", []string{"rr", addr, scaledArg(10000)}, 2 * uint64(scaled(10000)), false},
				// Each within splice_queue_limit: none may demote.
				{"200 concurrent connections", concArgs, concBytes, false},
				{"half-close then answer", []string{"oneway", addr, "12345"}, 12345, false},
				{"server closes first", []string{"serverfirst", addr, scaledArg(10000000)}, uint64(scaled(10000000)), true},
				// The command and one more byte, in one send.
				{"reset by server", []string{"reset-server", addr}, 2, false},
				{"stalled reader, 256MiB writer", []string{"stall", addr, scaledArg(256 << 20)}, uint64(scaled(256 << 20)), true},
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					before := n.stats()
					n.client(n.enrolled, c.args...)
					after := n.stats()
					if mode == "splice" {
						checkSpliced(t, "sk_msg", before, after, c.spliced, c.bulk)
					} else if moved := after.carried() - before.carried(); moved != 0 {
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
