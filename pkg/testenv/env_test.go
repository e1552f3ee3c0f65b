package testenv

import (
	"regexp"
	"strings"
	"testing"
)

func TestParseCgroup2Mount(t *testing.T) {
	for _, tc := range []struct {
		name, mounts, want string
	}{
		{
			name: "hybrid",
			mounts: "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n" +
				"cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n" +
				"cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n",
			want: "/sys/fs/cgroup/unified",
		},
		{
			name:   "unified",
			mounts: "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n",
			want:   "/sys/fs/cgroup",
		},
		{
			name:   "escaped",
			mounts: `none /tmp/my\040cg\134x cgroup2 rw 0 0` + "\n",
			want:   `/tmp/my cg\x`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseCgroup2Mount(strings.NewReader(tc.mounts))
			if err != nil || got != tc.want {
				t.Errorf("parseCgroup2Mount() = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if _, err := parseCgroup2Mount(strings.NewReader("proc /proc proc rw 0 0\n")); err == nil {
		t.Error("parseCgroup2Mount() without a cgroup2 line: no error")
	}
}

func TestUnique(t *testing.T) {
	a, b := Unique("smesh-test"), Unique("smesh-test")
	if ok := regexp.MustCompile(`^smesh-test-[0-9a-f]{8}$`).MatchString(a); !ok {
		t.Errorf("Unique() = %q, want smesh-test-<8 hex digits>", a)
	}
	if a == b {
		t.Errorf("Unique() returned %q twice", a)
	}
}
