package config

import (
	"bytes"
	"reflect"
	"testing"

	"github.com/BurntSushi/toml"
)

// FuzzParse checks that Parse never panics, and that whatever it accepts is
// valid and survives being written out and parsed again.
func FuzzParse(f *testing.F) {
	f.Add([]byte(""))
	f.Add([]byte("[capture]\ncgroups = [\"a\"]\ncgroup = 1\n"))
	f.Add([]byte("[tunnel.tls]\nallow_identities = [\"spiffe://example.org/a\"]\n"))
	f.Add([]byte("[[services]]\nname = \"web\"\nvip = \"198.19.0.10\"\nport = 80\nbackends = [\"198.18.0.2:8080\"]\nsession_affinity_timeout = \"1h\"\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Parse accepted a config that does not validate: %v", err)
		}
		var buf bytes.Buffer
		if err := toml.NewEncoder(&buf).Encode(c); err != nil {
			t.Fatalf("encoding %+v: %v", c, err)
		}
		again, err := Parse(buf.Bytes())
		if err != nil {
			t.Fatalf("parsing the re-encoded config: %v\n%s", err, buf.Bytes())
		}
		if !reflect.DeepEqual(again, c) {
			t.Fatalf("re-encoded config differs:\n got %+v\nwant %+v", again, c)
		}
	})
}
