package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestParseBounds: what is too large or nested too deep for the decoder is
// refused, saying why, before the decoder spends its time on it (a 64 KiB
// file of nested inline tables took it 90 s).
func TestParseBounds(t *testing.T) {
	nested := func(open, close string, size int) []byte {
		n := size / (len(open) + len(close))
		return []byte("x = " + strings.Repeat(open, n) + "1" + strings.Repeat(close, n) + "\n")
	}
	tests := []struct {
		name string
		doc  []byte
		want []string
	}{
		{"64KiB of nested inline tables", nested("{a=", "}", 64<<10), []string{"line 1", "nest more than 16 deep"}},
		{"inline tables one level too deep", []byte("[log]\nx = " + strings.Repeat("{a=", 17) + "1" + strings.Repeat("}", 17)),
			[]string{"line 2", "nest more than 16 deep"}},
		{"64KiB of nested arrays", nested("[", "]", 64<<10), []string{"nest more than 16 deep"}},
		{"nested arrays over lines", []byte("[capture]\ncgroups = [\n" + strings.Repeat("[\n", 20)), []string{"line 18", "nest more than"}},
		{"64KiB dotted key", []byte("[capture]\n" + strings.Repeat("a.", 32<<10) + "b = 1\n"), []string{"line 2", "more than 16 dotted parts"}},
		{"dotted table name", []byte("[" + strings.Repeat("a.", 20) + "b]\n"), []string{"line 1", "more than 16 dotted parts"}},
		{"too large", []byte("# " + strings.Repeat("x", MaxSize) + "\n"), []string{"more than smeshd reads"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse(tt.doc)
			wantErr(t, err, tt.want...)
		})
	}

	// Up to the bounds, the decoder decides.
	for _, doc := range []string{
		"[log]\nx = " + strings.Repeat("[", 16) + "1" + strings.Repeat("]", 16) + "\n",
		"[log]\n" + strings.Repeat("a.", 15) + "b = 1\n",
	} {
		_, err := Parse([]byte(doc))
		wantErr(t, err, "unknown key log.")
	}

	// Load reads no more than it may: a file too large is refused, not
	// read whole.
	path := filepath.Join(t.TempDir(), "big.toml")
	if err := os.WriteFile(path, []byte("# "+strings.Repeat("x", 4*MaxSize)), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	wantErr(t, err, path, fmt.Sprintf("%d bytes", MaxSize+1))
}

// TestBoundsSkipStringsAndComments: brackets, braces and dots inside
// strings and comments are not nesting, in every kind of TOML string.
func TestBoundsSkipStringsAndComments(t *testing.T) {
	deep := strings.Repeat("[{", 20) + strings.Repeat(".", 40)
	doc := `# ` + deep + `
[log] # ` + deep + `
level = "info" # ` + deep + `
[capture]
cgroups = [
  "a` + deep + `\"` + deep + `",
  'b` + deep + `\',
  """c` + deep + `
` + deep + `\"""` + deep + `""",
  '''d` + deep + `
` + deep + `''''',
  """e""""",
]
exclude_ports = [1, 2] # ` + deep + `
`
	c, err := Parse([]byte(doc))
	if err != nil {
		t.Fatalf("Parse: %v\n%s", err, doc)
	}
	if len(c.Capture.Cgroups) != 5 || !strings.HasSuffix(c.Capture.Cgroups[4], `e""`) {
		t.Errorf("cgroups = %q", c.Capture.Cgroups)
	}
	if err := checkBounds([]byte(doc)); err != nil {
		t.Errorf("checkBounds: %v", err)
	}
}
