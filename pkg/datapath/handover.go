package datapath

import (
	"errors"
	"os"
)

// Names of the kernel objects a running smeshd hands to its successor
// (docs/restart.md, 3.1): "map/NAME" for a map (NAME: its name in the BPF
// objects, e.g. "map/smesh_sockhash"), "link/TYPE/CGROUPID" for a cgroup
// attachment (TYPE: the attach type's name as ebpf.AttachType.String
// gives it, CGROUPID: the cgroup's id), and "lock" for the pin directory's
// locked file (on_failure = "closed").

// Handover returns a duplicate of every map, cgroup attachment and, when the
// capture is pinned, of the pin directory's lock, by name, for a successor
// (Options.Adopt). The caller closes them once sent. This Datapath goes on
// working until Release.
func (d *Datapath) Handover() (map[string]*os.File, error) {
	return nil, errors.New("handing the data path over: not implemented yet")
}

// Release gives this Datapath's objects up without detaching or unpinning
// anything: a successor that adopted them (Options.Adopt) holds them now.
// The Datapath is closed afterwards; Close does nothing more.
func (d *Datapath) Release() error {
	return errors.New("releasing the data path: not implemented yet")
}
