package cgroups

import (
	"os"
	"path/filepath"
	"testing"
)

func TestMemoryLimit(t *testing.T) {
	mount := t.TempDir()
	write := func(rel, max string) string {
		dir := filepath.Join(mount, rel)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if max != "" {
			if err := os.WriteFile(filepath.Join(dir, "memory.max"), []byte(max+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return dir
	}
	write("system.slice", "max")
	unit := write("system.slice/smeshd.service", "max")
	write("kubepods.slice", "8589934592")
	pod := write("kubepods.slice/pod1", "1073741824")
	ctr := write("kubepods.slice/pod1/ctr", "max")
	loose := write("kubepods.slice/pod1/ctr/x", "") // no memory controller here
	tight := write("tight", "2147483648")
	tighter := write("tight/a", "4294967296") // the parent's is smaller

	for _, c := range []struct {
		path  string
		limit int64
		ok    bool
	}{
		{unit, 0, false},
		{pod, 1 << 30, true},
		{ctr, 1 << 30, true},
		{loose, 1 << 30, true},
		{tighter, 2 << 30, true},
		{tight, 2 << 30, true},
		{mount, 0, false},
	} {
		limit, ok, err := MemoryLimit(mount, c.path)
		if err != nil || limit != c.limit || ok != c.ok {
			t.Errorf("MemoryLimit(%s) = %d, %v, %v; want %d, %v", c.path, limit, ok, err, c.limit, c.ok)
		}
	}
	write("bad", "lots")
	if _, _, err := MemoryLimit(mount, filepath.Join(mount, "bad")); err == nil {
		t.Error("a memory.max that is not a number was accepted")
	}
	if _, _, err := MemoryLimit(mount, "/etc"); err == nil {
		t.Error("a path outside the mount was accepted")
	}
}
