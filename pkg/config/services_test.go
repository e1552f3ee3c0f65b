package config

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestServices(t *testing.T) {
	c, err := Parse([]byte(`
[[services]]
name = "web"
vip = "198.19.0.10"
port = 80
backends = ["198.18.0.2:8080", "198.18.0.3:8080"]
session_affinity_timeout = "3h"
prefer_local = true

[[services]]
name = "web6"
vip = "fd00:5e:ff::10"
port = 80
backends = ["[fd00:5e::2]:8080"]
local_only = true
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Services) != 2 {
		t.Fatalf("got %d services", len(c.Services))
	}
	web := c.Services[0]
	if web.Name != "web" || web.VIP != netip.MustParseAddr("198.19.0.10") || web.Port != 80 || len(web.Backends) != 2 ||
		web.SessionAffinityTimeout.Duration != 3*time.Hour || !web.PreferLocal || web.LocalOnly {
		t.Errorf("web = %+v", web)
	}
	if !c.Services[1].LocalOnly || c.Services[1].Backends[0] != netip.MustParseAddrPort("[fd00:5e::2]:8080") {
		t.Errorf("web6 = %+v", c.Services[1])
	}

	for _, bad := range []struct{ doc, want string }{
		{"[[services]]\nvip = \"198.19.0.10\"\nport = 80\n", "services[0].name: is empty"},
		{"[[services]]\nname = \"a\"\nport = 80\n", "services[0].vip: is not set"},
		{"[[services]]\nname = \"a\"\nvip = \"::ffff:1.2.3.4\"\nport = 80\n", "services[0].vip: ::ffff:1.2.3.4: want a plain"},
		{"[[services]]\nname = \"a\"\nvip = \"198.19.0.10\"\n", "services[0].port: is not set"},
		{"[[services]]\nname = \"a\"\nvip = \"198.19.0.10\"\nport = 80\nbackends = [\"[fd00::2]:8080\"]\n", "not of the family of vip"},
		{"[[services]]\nname = \"a\"\nvip = \"198.19.0.10\"\nport = 80\nbackends = [\"198.18.0.2\"]\n", "line 5: services.backends"},
		{"[[services]]\nname = \"a\"\nvip = \"198.19.0.10\"\nport = 80\nsession_affinity_timeout = \"48h\"\n", "session_affinity_timeout: 48h0m0s is out of range"},
		{"[[services]]\nname = \"a\"\nvip = \"198.19.0.10\"\nport = 80\n[[services]]\nname = \"a\"\nvip = \"198.19.0.10\"\nport = 80\n", "services[1].name: \"a\" is also"},
		{"[[services]]\nname = \"a\"\nvip = \"198.19.0.10\"\nport = 80\nlocal = true\n", "line 5"},
	} {
		_, err := Parse([]byte(bad.doc))
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: error %v, want one containing %q", bad.doc, err, bad.want)
		}
	}
}
