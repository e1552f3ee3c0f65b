package sandbox

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/vishvananda/netns"
)

// SetSysctl writes value to the sysctl key of network namespace ns. key is
// the path below /proc/sys, e.g. "net/ipv4/ip_forward" (slashes, not dots:
// interface names such as eth0.100 contain dots).
//
// A file below /proc/sys/net belongs to the network namespace of the thread
// that opens it, at the moment it opens it; the open file stays with that
// namespace whichever thread writes to it later. So the file is opened on a
// thread switched into ns. (/proc/net, by contrast, is /proc/self/net: the
// namespace of the process's main thread, not of the calling thread.)
func SetSysctl(ns netns.NsHandle, key, value string) error {
	if !filepath.IsLocal(key) {
		return fmt.Errorf("setting sysctl %q: not a path below /proc/sys", key)
	}
	path := filepath.Join("/proc/sys", key)
	err := InNetns(ns, func() error {
		// No O_CREATE: a missing key is an error, not an attempt to
		// create a file in procfs.
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		_, err = f.WriteString(value)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("setting sysctl %s to %q: %w", key, value, err)
	}
	return nil
}
