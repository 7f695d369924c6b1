package uapi

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// kernelDoc is the page whose §10 tables restate linux-7.2.txt.
const kernelDoc = "../../docs/kernel.md"

var (
	firstCode = regexp.MustCompile("`([^`]+)`")
	shift     = regexp.MustCompile(`^1<<(\d+)$`)
)

// TestKernelDocTables checks every row of the request-number and struct tables of
// docs/kernel.md §10 against linux-7.2.txt, so the page cannot drift from the headers.
// It needs no rig: the file itself is checked against the headers by TestLayoutFile.
func TestKernelDocTables(t *testing.T) {
	f, err := os.Open(truth)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	facts, err := testutil.ParseUAPI(f)
	if err != nil {
		t.Fatalf("%s: %v", truth, err)
	}
	byName := map[string]testutil.UAPIFact{}
	for _, f := range facts {
		if f.Kind != "field" {
			byName[f.Name] = f
		}
	}

	doc, err := os.ReadFile(kernelDoc)
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(doc), "\n## 10.")
	if !ok {
		t.Fatalf("%s has no section 10", kernelDoc)
	}
	sec, _, _ = strings.Cut(sec, "\n## ")
	var consts, structs int
	for _, line := range strings.Split(sec, "\n") {
		cells := strings.Split(strings.Trim(line, "| "), "|")
		if !strings.HasPrefix(line, "|") || strings.HasPrefix(line, "|---") || len(cells) < 2 {
			continue
		}
		m := firstCode.FindStringSubmatch(cells[0])
		if m == nil { // the header row
			continue
		}
		name, cell := m[1], func(i int) string { return strings.Trim(strings.TrimSpace(cells[i]), "`") }
		fact, ok := byName[name]
		if !ok {
			t.Errorf("%s §10: %s is not in %s", kernelDoc, name, truth)
			continue
		}
		switch {
		case fact.Kind == "struct" && len(cells) == 3:
			structs++
			size, _, _ := strings.Cut(cell(1), " ")
			if size != strconv.FormatUint(fact.Size, 10) || cell(2) != strconv.FormatUint(fact.Align, 10) {
				t.Errorf("%s §10: %s: size %s align %s, %s says size %d align %d",
					kernelDoc, name, cell(1), cell(2), truth, fact.Size, fact.Align)
			}
		case (fact.Kind == "const" || fact.Kind == "ioctl") && len(cells) == 2:
			consts++
			v, err := docValue(cell(1))
			if err != nil || v != fact.Value {
				t.Errorf("%s §10: %s = %s, %s says %#x", kernelDoc, name, cell(1), truth, fact.Value)
			}
		default:
			t.Errorf("%s §10: row %q does not fit %s %s", kernelDoc, line, fact.Kind, name)
		}
	}
	if consts < 40 || structs < 20 {
		t.Errorf("%s §10: found %d constants and %d structs; did the tables move?", kernelDoc, consts, structs)
	}
}

// docValue reads a value as the page writes it: 0x3b64, 11 or 1<<16.
func docValue(s string) (uint64, error) {
	if m := shift.FindStringSubmatch(s); m != nil {
		n, err := strconv.ParseUint(m[1], 10, 6)
		return 1 << n, err
	}
	return strconv.ParseUint(s, 0, 64)
}
