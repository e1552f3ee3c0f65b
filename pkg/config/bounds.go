package config

import "fmt"

// Bounds on what Parse reads. smeshd's whole schema nests three tables deep
// ([[tunnel.tls.peers]] with its cidrs list) and the documented smesh.toml
// is a few kilobytes; the TOML decoder, though, takes time quadratic in the
// nesting of inline tables and in the parts of a dotted key (a 64 KiB file
// of nested inline tables took 90 s to check). Anything past these bounds
// is refused before the decoder sees it.
const (
	// MaxSize is the largest configuration file Parse reads.
	MaxSize = 1 << 20
	// MaxNesting is how deep arrays and inline tables may nest.
	MaxNesting = 16
	// MaxKeyParts is how many dotted parts one key or table name may have.
	MaxKeyParts = 16
)

// checkBounds refuses a document over MaxSize, nesting arrays and inline
// tables deeper than MaxNesting, or with a key of more than MaxKeyParts
// parts. It reads the document once, as a TOML lexer would as far as
// strings and comments go (a bracket inside a string is not nesting), and
// leaves every other syntax question to the decoder.
func checkBounds(doc []byte) error {
	if len(doc) > MaxSize {
		return fmt.Errorf("the configuration is %d bytes, more than smeshd reads (%d): is this the right file?", len(doc), MaxSize)
	}
	line, depth, dots := 1, 0, 0
	for i := 0; i < len(doc); i++ {
		switch c := doc[i]; c {
		case '\n':
			line++
			dots = 0
		case '#':
			for i+1 < len(doc) && doc[i+1] != '\n' {
				i++
			}
		case '"', '\'':
			end, lines := skipString(doc, i)
			line += lines
			i = end
		case '[', '{':
			depth++
			dots = 0
			if depth > MaxNesting {
				return fmt.Errorf("line %d: arrays and inline tables nest more than %d deep (smeshd's configuration needs at most 5)", line, MaxNesting)
			}
		case ']', '}':
			depth = max(depth-1, 0)
			dots = 0
		case '=', ',':
			dots = 0
		case '.':
			// Within a key or table name, a dot separates parts; in a
			// value, only a float or a time has one.
			dots++
			if dots >= MaxKeyParts {
				return fmt.Errorf("line %d: a key of more than %d dotted parts (smeshd's keys have at most 3)", line, MaxKeyParts)
			}
		}
	}
	return nil
}

// skipString returns the index of the last byte of the string that opens at
// doc[start] (a quote), and how many newlines it spans. An unterminated
// string runs to the end of its line (single-line) or of the document
// (multi-line); the decoder reports it.
func skipString(doc []byte, start int) (end, lines int) {
	q := doc[start]
	escapes := q == '"'
	if start+2 < len(doc) && doc[start+1] == q && doc[start+2] == q {
		// Multi-line: up to three quotes in a row, and then up to two more
		// that belong to the content ("""a""""" is `a""`).
		for i := start + 3; i < len(doc); i++ {
			switch {
			case escapes && doc[i] == '\\':
				if i+1 < len(doc) && doc[i+1] == '\n' {
					lines++
				}
				i++
			case doc[i] == '\n':
				lines++
			case doc[i] == q && i+2 < len(doc) && doc[i+1] == q && doc[i+2] == q:
				i += 2
				for extra := 0; extra < 2 && i+1 < len(doc) && doc[i+1] == q; extra++ {
					i++
				}
				return i, lines
			}
		}
		return len(doc) - 1, lines
	}
	for i := start + 1; i < len(doc); i++ {
		switch {
		case escapes && doc[i] == '\\' && i+1 < len(doc) && doc[i+1] != '\n':
			i++
		case doc[i] == q:
			return i, lines
		case doc[i] == '\n':
			return i - 1, lines
		}
	}
	return len(doc) - 1, lines
}
