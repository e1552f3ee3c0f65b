package daemon

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/smesh-dev/smesh/pkg/datapath"
)

func TestResolveMode(t *testing.T) {
	all := []datapath.Feature{
		{Name: "sock_ops programs", NeededFor: "capture"},
		{Name: "sk_msg programs (CONFIG_NET_SOCK_MSG)", NeededFor: "splice"},
	}
	noSkMsg := []datapath.Feature{
		{Name: "sock_ops programs", NeededFor: "capture"},
		{Name: "sk_msg programs (CONFIG_NET_SOCK_MSG)", NeededFor: "splice", Err: errors.New("not supported")},
	}
	noCapture := []datapath.Feature{
		{Name: "sock_ops programs", NeededFor: "capture", Err: errors.New("not supported")},
	}
	// Linux 6.1: everything but the bounded sk_msg program.
	noBound := append(all[:len(all):len(all)],
		datapath.Feature{Name: "bounded splice", NeededFor: "bounded splice", Err: errors.New(`kfunc "bpf_cast_to_kern_ctx": not supported`)})
	// Linux 5.10: smesh_sockops does not load.
	belowFloor := []datapath.Feature{
		{Name: "program smesh_sockops", NeededFor: "capture", Err: fmt.Errorf("%w: unknown func bpf_get_netns_cookie#122", datapath.ErrBelowFloor)},
	}
	cases := []struct {
		mode     string
		features []datapath.Feature
		want     datapath.Mode
		errWants string // substring of the error, "" for none
	}{
		{"auto", all, datapath.ModeSplice, ""},
		{"auto", noSkMsg, datapath.ModeCopy, ""},
		{"splice", all, datapath.ModeSplice, ""},
		{"splice", noSkMsg, "", "CONFIG_NET_SOCK_MSG"},
		{"copy", noSkMsg, datapath.ModeCopy, ""},
		{"copy", noCapture, "", "sock_ops"},
		{"auto", noBound, datapath.ModeCopy, ""},
		{"splice", noBound, datapath.ModeSplice, ""},
		{"copy", noBound, datapath.ModeCopy, ""},
		{"auto", belowFloor, "", "below smesh's floor"},
		{"copy", belowFloor, "", "Linux 5.15 or later"},
		{"turbo", all, "", "want auto, splice or copy"},
	}
	for _, c := range cases {
		got, err := ResolveMode(c.mode, c.features)
		switch {
		case c.errWants == "" && err != nil:
			t.Errorf("ResolveMode(%q): %v", c.mode, err)
		case c.errWants != "" && (err == nil || !strings.Contains(err.Error(), c.errWants)):
			t.Errorf("ResolveMode(%q) error = %v, want one naming %q", c.mode, err, c.errWants)
		case got != c.want:
			t.Errorf("ResolveMode(%q) = %q, want %q", c.mode, got, c.want)
		}
	}
}
