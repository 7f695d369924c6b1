package config

import (
	"sort"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"
)

// location is where a key was written, and what kind of value it has.
type location struct {
	line int
	kind unstable.Kind
}

// keyLines maps every key of a decoded document to its location, so that validation errors
// can name a line. Keys are dotted paths from the document root; the Nth table of an array
// of tables counts as a path element N from 0 ("device.1.bars"); a table header locates its
// own path ("device.1"). Keys inside inline tables are not located. Best effort: it gives up
// at the first syntax error (the decoder has reported it already).
func keyLines(data []byte) map[string]location {
	nl := newlineOffsets(data)
	lineOf := func(off uint32) int {
		return sort.Search(len(nl), func(i int) bool { return nl[i] >= int(off) }) + 1
	}
	locs := map[string]location{}
	arrays := map[string]int{} // tables seen so far per array-of-tables path
	var p unstable.Parser
	p.Reset(data)
	prefix := ""
	for p.NextExpression() {
		e := p.Expression()
		if e.Kind != unstable.Table && e.Kind != unstable.ArrayTable && e.Kind != unstable.KeyValue {
			continue
		}
		key, off, ok := keyPath(e)
		if !ok {
			continue
		}
		switch e.Kind {
		case unstable.Table:
			prefix = key
		case unstable.ArrayTable:
			n := arrays[key]
			arrays[key] = n + 1
			prefix = key + "." + strconv.Itoa(n)
		case unstable.KeyValue:
			if prefix != "" {
				key = prefix + "." + key
			}
			locs[key] = location{line: lineOf(off), kind: e.Value().Kind}
			continue
		}
		locs[prefix] = location{line: lineOf(off), kind: e.Kind}
	}
	return locs
}

// keyPath returns the dotted key of a table header or key-value expression and the offset
// of its first part.
func keyPath(e *unstable.Node) (string, uint32, bool) {
	it := e.Key()
	var parts []string
	var off uint32
	for it.Next() {
		n := it.Node()
		if len(parts) == 0 {
			off = n.Raw.Offset
		}
		parts = append(parts, string(n.Data))
	}
	if len(parts) == 0 {
		return "", 0, false
	}
	return strings.Join(parts, "."), off, true
}

func newlineOffsets(data []byte) []int {
	var nl []int
	for i, c := range data {
		if c == '\n' {
			nl = append(nl, i)
		}
	}
	return nl
}
