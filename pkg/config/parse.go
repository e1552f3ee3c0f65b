package config

import (
	"encoding"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// Load reads and parses the configuration file at path. It reads at most
// MaxSize bytes (and one more, to tell a file that is too large).
func Load(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("reading config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return Config{}, fmt.Errorf("reading config %s: %w", path, err)
	}
	cfg, err := Parse(data)
	if err != nil {
		return Config{}, prefixEach(path, err)
	}
	return cfg, nil
}

// Parse decodes a TOML configuration over Default and validates it. Keys
// that are not part of Config are errors, and so is a document past the
// bounds in bounds.go.
func Parse(data []byte) (Config, error) {
	if err := checkBounds(data); err != nil {
		return Config{}, err
	}
	doc := string(data)

	// A first decode into a plain map fails only on syntax. It lists the
	// keys for the strict check, and keeps the raw values for messages.
	var raw map[string]any
	md, err := toml.Decode(doc, &raw)
	if err != nil {
		return Config{}, syntaxError(err)
	}
	if err := checkKeys(doc, md.Keys()); err != nil {
		return Config{}, err
	}

	cfg := Default()
	if _, err := toml.Decode(doc, &cfg); err != nil {
		return Config{}, decodeError(raw, err)
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

func syntaxError(err error) error {
	var perr toml.ParseError
	if errors.As(err, &perr) {
		return fmt.Errorf("line %d, column %d: %s", perr.Position.Line, perr.Position.Col, perr.Message)
	}
	return err
}

// decodeError makes an error of decoding into Config name the key and line.
func decodeError(raw map[string]any, err error) error {
	var perr toml.ParseError
	if !errors.As(err, &perr) {
		// Type mismatches: the decoder already says
		// `toml: line 5 (last key "datapath.map_size"): incompatible types: ...`.
		return err
	}
	msg, ok := textError(raw, perr.LastKey)
	if !ok {
		msg = perr.Message
	}
	return fmt.Errorf("line %d: %s: %s", perr.Position.Line, perr.LastKey, msg)
}

// textError describes the value of a netip-typed key that did not parse.
// netip's own errors quote Go function names, and some omit the value.
func textError(raw map[string]any, key string) (string, bool) {
	var what, example string
	var parses func(string) bool
	switch key {
	case "capture.include_cidrs", "capture.exclude_cidrs":
		what, example = "CIDR", "10.0.0.0/8"
		parses = func(s string) bool { _, err := netip.ParsePrefix(s); return err == nil }
	case "outbound.listen", "tunnel.listen", "admin.listen":
		what, example = "address:port", "127.0.0.1:18000"
		parses = func(s string) bool { _, err := netip.ParseAddrPort(s); return err == nil }
	default:
		return "", false
	}

	value := lookup(raw, key)
	values, ok := value.([]any)
	if !ok {
		values = []any{value}
	}
	for _, v := range values {
		s, ok := v.(string)
		if !ok {
			return fmt.Sprintf("%v is not a string (want e.g. %q)", v, example), true
		}
		if !parses(s) {
			return fmt.Sprintf("%q is not a valid %s (want e.g. %q)", s, what, example), true
		}
	}
	return "", false
}

// lookup returns the raw value at a dotted key made of bare names.
func lookup(raw map[string]any, key string) any {
	var v any = raw
	for name := range strings.SplitSeq(key, ".") {
		table, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = table[name]
	}
	return v
}

// maxUnknownKeys bounds the unknown keys reported: each costs a decode of
// the whole document to find its line.
const maxUnknownKeys = 10

// checkKeys reports the keys of the document that Config does not have,
// with their line and the keys allowed next to them. Matching is exact: the
// decoder would also accept "Capture" for "capture".
func checkKeys(doc string, keys []toml.Key) error {
	tables, arrays := schema()
	var errs []error
	reported := make(map[string]bool) // an array of tables lists its key once per element
	for _, key := range keys {
		// Every part of the key, not only the last: a dotted key such as
		// capture.x.y = 1 lists only capture.x.y, never capture.x.
		for i := 1; i <= len(key); i++ {
			allowed, isTable := tables[key[:i-1].String()]
			if !isTable {
				// Below a value such as capture.cgroups, which the typed
				// decode rejects.
				break
			}
			if slices.Contains(allowed, key[i-1]) {
				continue
			}
			unknown := key[:i]
			if !reported[unknown.String()] {
				reported[unknown.String()] = true
				if len(reported) <= maxUnknownKeys {
					errs = append(errs, unknownKeyError(doc, unknown, key, arrays, allowed))
				}
			}
			break
		}
	}
	if more := len(reported) - maxUnknownKeys; more > 0 {
		errs = append(errs, fmt.Errorf("and %d more unknown keys", more))
	}
	return errors.Join(errs...)
}

// unknownKeyError reports key, the first unknown part of full (the key as
// the document has it), with its line.
func unknownKeyError(doc string, key, full toml.Key, arrays map[string]bool, allowed []string) error {
	where := "at the top level"
	if len(key) > 1 {
		where = "in [" + key[:len(key)-1].String() + "]"
	}
	msg := fmt.Sprintf("unknown key %s (allowed %s: %s)", key, where, strings.Join(allowed, ", "))
	line := keyLine(doc, key, arrays)
	if line == 0 {
		// A table made by a dotted key (capture.x.y = 1 makes capture.x)
		// has no line of its own; its key's line is the one to name.
		line = keyLine(doc, full, arrays)
	}
	if line > 0 {
		return fmt.Errorf("line %d: %s", line, msg)
	}
	return errors.New(msg)
}

// schema maps each table of Config ("" for the top level, then e.g.
// "tunnel.tls") to its keys in declaration order, and lists the arrays of
// tables (e.g. "tunnel.tls.peers").
func schema() (tables map[string][]string, arrays map[string]bool) {
	tables, arrays = make(map[string][]string), make(map[string]bool)
	var walk func(path toml.Key, t reflect.Type)
	walk = func(path toml.Key, t reflect.Type) {
		var names []string
		for f := range t.Fields() {
			name := f.Tag.Get("toml")
			names = append(names, name)
			switch {
			case isTable(f.Type):
				walk(append(slices.Clip(path), name), f.Type)
			case f.Type.Kind() == reflect.Slice && isTable(f.Type.Elem()):
				// An array of tables: its elements' keys are listed
				// below the array's name.
				arrays[append(slices.Clip(path), name).String()] = true
				walk(append(slices.Clip(path), name), f.Type.Elem())
			}
		}
		tables[path.String()] = names
	}
	walk(nil, reflect.TypeFor[Config]())
	return tables, arrays
}

// isTable reports whether a field type is a TOML table rather than a value
// written as a string (Duration, netip.AddrPort).
func isTable(t reflect.Type) bool {
	return t.Kind() == reflect.Struct &&
		!reflect.PointerTo(t).Implements(reflect.TypeFor[encoding.TextUnmarshaler]())
}

// keyLine returns the line of key in doc, or 0 when it cannot tell.
//
// toml v1.6 keeps key positions private and reveals them only in decoding
// errors, so this decodes doc once more into a struct whose single path
// leads to key and whose leaf always fails to decode.
func keyLine(doc string, key toml.Key, arrays map[string]bool) int {
	t := reflect.TypeFor[failDecode]()
	for i := len(key) - 1; i >= 0; i-- {
		if i < len(key)-1 && arrays[key[:i+1].String()] {
			t = reflect.SliceOf(t) // below an array of tables
		}
		t = reflect.StructOf([]reflect.StructField{{
			Name: "F",
			Type: t,
			Tag:  reflect.StructTag("toml:" + strconv.Quote(key[i])),
		}})
	}
	_, err := toml.Decode(doc, reflect.New(t).Interface())
	var perr toml.ParseError
	// The decoder matches field names case-insensitively when there is no
	// exact match, so make sure the failure is at key itself.
	if errors.As(err, &perr) && perr.LastKey == key.String() {
		return perr.Position.Line
	}
	return 0
}

type failDecode struct{}

func (failDecode) UnmarshalTOML(any) error { return errors.New("found") }

// prefixEach prefixes every error joined in err, so that each line of a
// multi-line report says which file it is about.
func prefixEach(prefix string, err error) error {
	joined, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return fmt.Errorf("%s: %w", prefix, err)
	}
	var errs []error
	for _, e := range joined.Unwrap() {
		errs = append(errs, fmt.Errorf("%s: %w", prefix, e))
	}
	return errors.Join(errs...)
}
