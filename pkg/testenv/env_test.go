package testenv

import (
	"regexp"
	"testing"
)

func TestUnique(t *testing.T) {
	a, b := Unique("smesh-test"), Unique("smesh-test")
	if ok := regexp.MustCompile(`^smesh-test-[0-9a-f]{8}$`).MatchString(a); !ok {
		t.Errorf("Unique() = %q, want smesh-test-<8 hex digits>", a)
	}
	if a == b {
		t.Errorf("Unique() returned %q twice", a)
	}
}
