package daemon

import (
	"context"
	"slices"
	"testing"

	"github.com/rs/zerolog"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

type fakePods []string

func (f fakePods) WaitSynced(context.Context) error   { return nil }
func (f fakePods) Cgroups() []string                  { return f }
func (f fakePods) Changed() <-chan struct{}           { return nil }
func (f fakePods) Pods() any                          { return nil }
func (f fakePods) Identities() map[string]spiffeid.ID { return nil }

// The cgroups in the mesh are [capture] cgroups and the pods', less a pod
// that holds smeshd itself and pods already inside a [capture] cgroup.
func TestEnrolled(t *testing.T) {
	d := &daemon{
		log:    zerolog.New(zerolog.NewTestWriter(t)),
		own:    "/cg/kubepods/burstable/podSMESHD/container",
		static: []string{"/cg/smesh.slice", "/cg/kubepods/besteffort"},
	}
	if got := d.wanted(); !slices.Equal(got, d.static) {
		t.Errorf("without pods: %v", got)
	}
	d.pods = fakePods{
		"/cg/kubepods/burstable/podA",
		"/cg/kubepods/burstable/podSMESHD",
		"/cg/kubepods/besteffort/podB",
		"/cg/kubepods/podC",
	}
	want := []string{"/cg/smesh.slice", "/cg/kubepods/besteffort", "/cg/kubepods/burstable/podA", "/cg/kubepods/podC"}
	if got := d.wanted(); !slices.Equal(got, want) {
		t.Errorf("enrolled() = %v, want %v", got, want)
	}
}
