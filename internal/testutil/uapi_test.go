package testutil

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const demoFacts = `# comment
demo.h const DEMOIO 174
demo.h const DEMO_FLAG_WIDE 1
demo.h ioctl DEMO_GET 0x3b01
demo.h ioctl DEMO_SET 0x3b02
demo.h absent DEMO_FUTURE
demo.h const DEMO_DOC_ONLY 5
demo.h struct demo_item size 8 align 8
demo.h field demo_item.off offset 0 size 8 type u64
demo.h struct demo_list size 16 align 8
demo.h field demo_list.argsz offset 0 size 4 type u32
demo.h field demo_list.flags offset 4 size 4 type u32
demo.h field demo_list.count offset 8 size 4 type u32
demo.h field demo_list.id offset 12 size 4 type s32
demo.h field demo_list.items offset 16 size 8 type demo_item[]
other.h const OTHER 1
`

// The Go side of testdata/mirrors.
type item struct {
	_   struct{}
	Off uint64
}

type list struct {
	_     struct{}
	Argsz uint32
	Flags uint32
	Count uint32
	ID    int32
}

type listOne struct {
	_     struct{}
	Head  list
	First item
}

func demoSpec() UAPISpec {
	return UAPISpec{
		Dir:     "testdata/mirrors",
		Headers: []string{"demo.h"},
		Structs: []Mirror{
			{C: "demo_item", Go: item{}, Fields: "off"},
			{C: "demo_list", Go: list{}, Fields: "argsz flags count id", Flex: item{}},
		},
		Composites: []Composite{{Go: listOne{}, Header: "demo_list", Data: "First"}},
		Consts: map[string]uint64{
			"DEMOIO": 0xae, "DEMO_FLAG_WIDE": 1, "DEMO_GET": 0x3b01, "DEMO_SET": 0x3b02,
		},
		Absent:      map[string]string{"DEMO_FUTURE": "proposed"},
		NotMirrored: []string{"DEMO_DOC_ONLY"},
	}
}

// recorder collects the errors of a check.
type recorder struct {
	testing.TB
	errs []string
}

func (r *recorder) Helper() {}

func (r *recorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

func run(t *testing.T, facts string, spec UAPISpec) []string {
	t.Helper()
	fs, err := ParseUAPI(strings.NewReader(facts))
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{TB: t}
	checkUAPI(r, fs, spec)
	return r.errs
}

func TestParseUAPI(t *testing.T) {
	fs, err := ParseUAPI(strings.NewReader(demoFacts))
	if err != nil {
		t.Fatal(err)
	}
	want := []UAPIFact{
		{Line: 2, Header: "demo.h", Kind: "const", Name: "DEMOIO", Value: 174},
		{Line: 4, Header: "demo.h", Kind: "ioctl", Name: "DEMO_GET", Value: 0x3b01},
		{Line: 6, Header: "demo.h", Kind: "absent", Name: "DEMO_FUTURE"},
		{Line: 8, Header: "demo.h", Kind: "struct", Name: "demo_item", Size: 8, Align: 8},
		{Line: 15, Header: "demo.h", Kind: "field", Name: "demo_list.items", Offset: 16, Size: 8, Type: "demo_item[]"},
	}
	got := slices.DeleteFunc(fs, func(f UAPIFact) bool {
		return !slices.Contains([]int{2, 4, 6, 8, 15}, f.Line)
	})
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if !got[4].Flex() || got[3].Flex() {
		t.Error("Flex() wrong")
	}
	for _, bad := range []string{
		"demo.h const X",
		"demo.h const X 1 2",
		"demo.h const X one",
		"demo.h absent X 1",
		"demo.h struct s size 8",
		"demo.h struct s align 8 size 8",
		"demo.h field s offset 0 size 4 type u32",
		"demo.h field s.f offset 0 size 4",
		"demo.h enum X 1",
		"demo.h",
		"demo.h const X 1\ndemo.h ioctl X 0x2",
		"demo.h struct s size 1 align 1\ndemo.h struct s size 1 align 1",
	} {
		if _, err := ParseUAPI(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseUAPI(%q) accepted it", bad)
		}
	}
}

func TestCheckUAPIGood(t *testing.T) {
	if errs := run(t, demoFacts, demoSpec()); len(errs) > 0 {
		t.Errorf("errors for a matching package:\n%s", strings.Join(errs, "\n"))
	}
}

// Each change to the facts or the spec must be reported with a message containing want.
func TestCheckUAPIMismatch(t *testing.T) {
	for _, tt := range []struct {
		name  string
		facts func(string) string
		spec  func(*UAPISpec)
		want  string
	}{
		{"size", sub("demo_list size 16", "demo_list size 24"), nil, "size 16, kernel 24"},
		{"alignment", sub("demo_list size 16 align 8", "demo_list size 16 align 4"), nil, "alignment 8, kernel 4"},
		{"offset", sub("demo_list.count offset 8", "demo_list.count offset 4"), nil, "offset 8, kernel 4"},
		{"field size", sub("demo_item.off offset 0 size 8", "demo_item.off offset 0 size 4"), nil, "size 8, kernel 4"},
		{"signedness", sub("demo_list.id offset 12 size 4 type s32", "demo_list.id offset 12 size 4 type u32"), nil, "Go int32, kernel u32"},
		{"field order", nil, func(s *UAPISpec) { s.Structs[1].Fields = "argsz count flags id" }, "kernel 8"},
		{"field count", nil, func(s *UAPISpec) { s.Structs[1].Fields = "argsz flags count" }, "4 Go fields, 3 kernel names"},
		{"kernel field without Go field", func(f string) string {
			return f + "demo.h field demo_list.extra offset 16 size 4 type u32\n"
		}, nil, "kernel field extra (offset 16) has no Go field"},
		{"flex element", nil, func(s *UAPISpec) { s.Structs[1].Flex = uint32(0) }, "element size 4, kernel 8"},
		{"flex missing", nil, func(s *UAPISpec) { s.Structs[1].Flex = nil }, "set Mirror.Flex"},
		{"flex where none", nil, func(s *UAPISpec) { s.Structs[0].Flex = uint8(0) }, "has no flexible array"},
		{"struct not in file", sub("demo.h struct demo_item size 8 align 8\n", ""), nil, "struct demo_item is not in"},
		{"composite data offset", sub("demo_list.items offset 16", "demo_list.items offset 12"), nil, "First at offset 16"},
		{"composite header type", nil, func(s *UAPISpec) { s.Composites[0].Header = "demo_item" }, "(the mirror of struct demo_item)"},
		{"const value", sub("DEMO_SET 0x3b02", "DEMO_SET 0x3b03"), nil, "DEMO_SET = 0x3b02, kernel 0x3b03"},
		{"const not in file", sub("demo.h const DEMOIO 174\n", ""), nil, "DEMOIO: not in"},
		{"absent is present", sub("demo.h absent DEMO_FUTURE", "demo.h const DEMO_FUTURE 9"), nil, "no longer absent"},
		{"const is absent", nil, func(s *UAPISpec) { s.Consts["DEMO_FUTURE"] = 9; delete(s.Absent, "DEMO_FUTURE") }, "move it to Absent"},
		{"unchecked fact", func(f string) string {
			return f + "demo.h ioctl DEMO_NEW 0x3b03\n"
		}, nil, "ioctl DEMO_NEW (demo.h) is not checked"},
		{"unchecked not-mirrored", nil, func(s *UAPISpec) { s.NotMirrored = nil }, "const DEMO_DOC_ONLY (demo.h) is not checked"},
		{"not-mirrored not in file", nil, func(s *UAPISpec) { s.NotMirrored = append(s.NotMirrored, "DEMO_GONE") }, "DEMO_GONE (NotMirrored): not in"},
		{"Go struct not in spec", nil, func(s *UAPISpec) { s.Composites = nil }, "type listOne has a structs.HostLayout field but is not in the spec"},
		{"Go const not in spec", nil, func(s *UAPISpec) { delete(s.Consts, "DEMO_GET") }, "const DEMO_GET mirrors the kernel's DEMO_GET but is not in the spec"},
		{"Go-cased const not in spec", nil, func(s *UAPISpec) { delete(s.Consts, "DEMO_FLAG_WIDE") }, "const FlagWide mirrors the kernel's DEMO_FLAG_WIDE"},
		{"spec const not declared", nil, func(s *UAPISpec) { s.Consts["DEMO_TYPO"] = 1 }, "DEMO_TYPO is in the spec, but no constant"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			facts, spec := demoFacts, demoSpec()
			if tt.facts != nil {
				facts = tt.facts(facts)
			}
			if tt.spec != nil {
				tt.spec(&spec)
			}
			errs := run(t, facts, spec)
			if !slices.ContainsFunc(errs, func(e string) bool { return strings.Contains(e, tt.want) }) {
				t.Errorf("no error containing %q; got:\n%s", tt.want, strings.Join(errs, "\n"))
			}
		})
	}
}

// sub returns a function replacing old with new once, failing loudly if old is absent.
func sub(old, new string) func(string) string {
	return func(s string) string {
		if !strings.Contains(s, old) {
			panic("test facts lack " + old)
		}
		return strings.Replace(s, old, new, 1)
	}
}

func TestDeclaredMirrors(t *testing.T) {
	consts, structs, err := DeclaredMirrors("testdata/mirrors")
	if err != nil {
		t.Fatal(err)
	}
	wantConsts := map[string]string{
		"DEMO_GET": "DEMO_GET", "DEMO_SET": "DEMO_SET", "DEMOIO": "DEMOIO",
		"DEMO_FLAG_WIDE": "FlagWide", "DEMO_FUTURE": "DEMO_FUTURE",
	}
	if diff := cmp.Diff(wantConsts, consts); diff != "" {
		t.Errorf("consts (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"item", "list", "listOne"}, structs); diff != "" {
		t.Errorf("structs (-want +got):\n%s", diff)
	}
}

// The committed file parses, and names the headers of Linux 7.2.
func TestUAPIFile(t *testing.T) {
	var major, minor uint64
	for _, f := range LoadUAPI(t) {
		switch f.Name {
		case "LINUX_VERSION_MAJOR":
			major = f.Value
		case "LINUX_VERSION_PATCHLEVEL":
			minor = f.Value
		}
	}
	if major != 7 || minor != 2 {
		t.Errorf("%s is from Linux %d.%d, want 7.2", UAPIFile, major, minor)
	}
	if got := UAPIStruct(t, "vfio_region_info").Size; got == 0 {
		t.Error("UAPIStruct(vfio_region_info) has size 0")
	}
}
