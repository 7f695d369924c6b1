package testutil

import (
	"bufio"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// UAPIFile is the kernel uapi truth, relative to the repository root: the sizes, offsets
// and constants test/uapi/testdata/layout.c prints from the Linux 7.2 source's own uapi headers
// (test/uapi checks the file against them in the rig).
const UAPIFile = "test/uapi/linux-7.2.txt"

// UAPIFact is one line of [UAPIFile].
type UAPIFact struct {
	Line   int    // line number in the file
	Header string // the header that defines it, e.g. "linux/vfio.h"
	Kind   string // "const", "ioctl", "absent", "struct" or "field"
	// Name is the macro or enumerator ("VFIO_DEVICE_FEATURE"), the struct tag
	// ("vfio_region_info") or tag.field ("vfio_region_info.size").
	Name   string
	Value  uint64 // const, ioctl
	Size   uint64 // struct, field (for a flexible array member: one element)
	Align  uint64 // struct
	Offset uint64 // field
	// Type is a field's type: u8 … u64, s8 … s64 or a struct tag, with "[]" appended for
	// a flexible array member.
	Type string
}

// Flex reports whether the fact is a flexible array member.
func (f UAPIFact) Flex() bool { return strings.HasSuffix(f.Type, "[]") }

// ParseUAPI parses the format of [UAPIFile] (described in test/uapi/testdata/layout.c).
func ParseUAPI(r io.Reader) ([]UAPIFact, error) {
	var facts []UAPIFact
	seen := map[string]int{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f, err := parseFact(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w: %q", n, err, line)
		}
		f.Line = n
		key := f.Kind + " " + f.Name
		if f.Kind == "const" || f.Kind == "ioctl" || f.Kind == "absent" {
			key = "name " + f.Name
		}
		if prev, ok := seen[key]; ok {
			return nil, fmt.Errorf("line %d: %s %s already on line %d", n, f.Kind, f.Name, prev)
		}
		seen[key] = n
		facts = append(facts, f)
	}
	return facts, sc.Err()
}

func parseFact(line string) (UAPIFact, error) {
	w := strings.Fields(line)
	if len(w) < 3 {
		return UAPIFact{}, errors.New("want <header> <kind> <name> …")
	}
	f := UAPIFact{Header: w[0], Kind: w[1], Name: w[2]}
	// attrs reads "key value" pairs into the named fields, in this order.
	attrs := func(keys ...string) error {
		if len(w) != 3+2*len(keys) {
			return fmt.Errorf("%s wants %s", f.Kind, strings.Join(keys, ", "))
		}
		for i, k := range keys {
			if w[3+2*i] != k {
				return fmt.Errorf("got %q where %q belongs", w[3+2*i], k)
			}
			v := w[4+2*i]
			if k == "type" {
				f.Type = v
				continue
			}
			u, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return fmt.Errorf("%s: %w", k, err)
			}
			switch k {
			case "size":
				f.Size = u
			case "align":
				f.Align = u
			case "offset":
				f.Offset = u
			}
		}
		return nil
	}
	switch f.Kind {
	case "const", "ioctl":
		if len(w) != 4 {
			return f, fmt.Errorf("%s wants one value", f.Kind)
		}
		v, err := strconv.ParseUint(w[3], 0, 64)
		if err != nil {
			return f, err
		}
		f.Value = v
		return f, nil
	case "absent":
		if len(w) != 3 {
			return f, errors.New("absent takes no value")
		}
		return f, nil
	case "struct":
		return f, attrs("size", "align")
	case "field":
		if tag, name, ok := strings.Cut(f.Name, "."); !ok || tag == "" || name == "" {
			return f, errors.New("a field is named <struct>.<field>")
		}
		return f, attrs("offset", "size", "type")
	}
	return f, fmt.Errorf("unknown kind %q", f.Kind)
}

// Mirror is a Go struct that mirrors a kernel struct, for [UAPISpec].
type Mirror struct {
	C  string // the struct tag, e.g. "vfio_region_info"
	Go any    // a value of the Go type, e.g. regionInfo{}
	// Fields names the kernel field of each Go field, in order, blank (_) fields left
	// out: "argsz flags index cap_offset size offset".
	Fields string
	// Flex is a value of the element type of the kernel struct's flexible array member,
	// which the Go mirror leaves out (uint8(0) for __u8 data[]); nil without one.
	Flex any
}

// Composite is a Go struct that lays out a kernel struct followed by data in place of
// its flexible array member, for [UAPISpec]; e.g. a vfio_irq_set with one s32 eventfd.
type Composite struct {
	Go any // a value of the Go type
	// Header is the kernel struct its first field mirrors, e.g. "vfio_irq_set".
	Header string
	// Data is the Go field that stands where the header's flexible array begins.
	Data string
}

// UAPISpec is what one package restates of the kernel uapi, for [CheckUAPI].
type UAPISpec struct {
	// Dir is the package's source directory (a test's working directory: ".").
	Dir string
	// Headers are the headers the package mirrors: every fact of UAPIFile from these
	// must be checked here (or listed in NotMirrored).
	Headers []string
	// Structs are the package's mirrored structs.
	Structs []Mirror
	// Composites are the package's structs made of a mirrored header and data.
	Composites []Composite
	// Consts maps the kernel name of each constant and ioctl request number the package
	// declares to its Go value.
	Consts map[string]uint64
	// Absent maps the kernel name of each constant the package declares although the
	// headers lack it (a proposed uAPI, say) to the reason.
	Absent map[string]string
	// NotMirrored lists facts of Headers that the package does not restate (they are in
	// UAPIFile for docs/kernel.md): macro names or struct tags.
	NotMirrored []string
}

// LoadUAPI reads [UAPIFile] from the repository around the working directory. In the VM
// rig's guest (MMIOBROKER_VM_KERNEL set), which has no repository, it skips the test.
func LoadUAPI(t testing.TB) []UAPIFact {
	t.Helper()
	if k := os.Getenv("MMIOBROKER_VM_KERNEL"); k != "" {
		// A test binary of the VM rig, running in the guest: no repository there. The
		// host runs these tests, and test/uapi checks the file against the headers.
		t.Skipf("%s is in the repository, not in the %s guest of the VM rig", UAPIFile, k)
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("%s: no go.mod above the working directory", UAPIFile)
		}
		dir = parent
	}
	f, err := os.Open(filepath.Join(dir, UAPIFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	facts, err := ParseUAPI(f)
	if err != nil {
		t.Fatalf("%s: %v", UAPIFile, err)
	}
	return facts
}

// UAPIStruct returns the fact of struct tag from [UAPIFile], failing t if there is none.
func UAPIStruct(t testing.TB, tag string) UAPIFact {
	t.Helper()
	for _, f := range LoadUAPI(t) {
		if f.Kind == "struct" && f.Name == tag {
			return f
		}
	}
	t.Fatalf("no struct %s in %s", tag, UAPIFile)
	return UAPIFact{}
}

// CheckUAPI fails t where the package described by spec disagrees with [UAPIFile]: a
// mirrored struct's size, alignment, or a field's offset, size or type; a constant's
// value. It also fails when the two do not cover each other: a struct with a
// structs.HostLayout field or a constant in kernel spelling declared in spec.Dir but
// missing from spec, a spec entry the package does not declare, or a fact of
// spec.Headers that nothing in spec checks.
func CheckUAPI(t testing.TB, spec UAPISpec) {
	t.Helper()
	checkUAPI(t, LoadUAPI(t), spec)
}

// uapiChecker holds the state of one CheckUAPI run.
type uapiChecker struct {
	t       testing.TB
	byName  map[string]UAPIFact   // const, ioctl, absent and struct facts by name
	fields  map[string][]UAPIFact // field facts by struct tag, by offset
	checked map[int]bool          // lines checked
	mirrors map[string]reflect.Type
	// wants are nested types to check once every mirror is known: Go type → struct tag.
	wants []wantMirror
}

type wantMirror struct {
	what string
	got  reflect.Type
	tag  string
}

func checkUAPI(t testing.TB, facts []UAPIFact, spec UAPISpec) {
	t.Helper()
	c := &uapiChecker{
		t:       t,
		byName:  map[string]UAPIFact{},
		fields:  map[string][]UAPIFact{},
		checked: map[int]bool{},
		mirrors: map[string]reflect.Type{},
	}
	for _, f := range facts {
		if f.Kind == "field" {
			tag, _, _ := strings.Cut(f.Name, ".")
			c.fields[tag] = append(c.fields[tag], f)
		} else {
			c.byName[f.Name] = f
		}
	}
	for _, fs := range c.fields {
		sort.SliceStable(fs, func(i, j int) bool { return fs[i].Offset < fs[j].Offset })
	}

	for _, m := range spec.Structs {
		c.mirror(m)
	}
	for _, m := range spec.Composites {
		c.composite(m)
	}
	for _, w := range c.wants {
		if mt, ok := c.mirrors[w.tag]; !ok {
			t.Errorf("%s: struct %s has no mirror in the spec", w.what, w.tag)
		} else if w.got != mt {
			t.Errorf("%s: Go type %v, want %v (the mirror of struct %s)", w.what, w.got, mt, w.tag)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(spec.Consts)) {
		c.constant(name, spec.Consts[name])
	}
	for _, name := range slices.Sorted(maps.Keys(spec.Absent)) {
		f, ok := c.byName[name]
		if !ok {
			t.Errorf("%s: not in %s: add it to test/uapi/testdata/layout.c", name, UAPIFile)
			continue
		}
		c.checked[f.Line] = true
		if f.Kind != "absent" {
			t.Errorf("%s: the headers define it now (%s line %d), no longer absent (%s): check the Go value",
				name, UAPIFile, f.Line, spec.Absent[name])
		}
	}
	for _, name := range spec.NotMirrored {
		f, ok := c.byName[name]
		if !ok {
			t.Errorf("%s (NotMirrored): not in %s", name, UAPIFile)
			continue
		}
		c.checked[f.Line] = true
		if f.Kind == "struct" {
			for _, ff := range c.fields[name] {
				c.checked[ff.Line] = true
			}
		}
	}

	// Every fact of the package's headers is checked…
	for _, f := range facts {
		if slices.Contains(spec.Headers, f.Header) && !c.checked[f.Line] {
			t.Errorf("%s line %d: %s %s (%s) is not checked against a Go mirror: add the mirror to the test's spec, or list it in NotMirrored",
				UAPIFile, f.Line, f.Kind, f.Name, f.Header)
		}
	}
	// …and every mirror the package declares is in the spec.
	c.declared(spec)
}

// mirror checks one mirrored struct.
func (c *uapiChecker) mirror(m Mirror) {
	t := c.t
	t.Helper()
	gt := reflect.TypeOf(m.Go)
	what := fmt.Sprintf("%v (struct %s)", gt, m.C)
	if gt == nil || gt.Kind() != reflect.Struct {
		t.Errorf("%s: not a struct", what)
		return
	}
	c.mirrors[m.C] = gt
	sf, ok := c.byName[m.C]
	if !ok || sf.Kind != "struct" {
		t.Errorf("%s: struct %s is not in %s: add it to test/uapi/testdata/layout.c", what, m.C, UAPIFile)
		return
	}
	c.checked[sf.Line] = true
	if uint64(gt.Size()) != sf.Size {
		t.Errorf("%s: size %d, kernel %d", what, gt.Size(), sf.Size)
	}
	align := uint64(gt.Align())

	var goFields []reflect.StructField
	for i := range gt.NumField() {
		if f := gt.Field(i); f.Name != "_" {
			goFields = append(goFields, f)
		}
	}
	names := strings.Fields(m.Fields)
	if len(names) != len(goFields) {
		t.Errorf("%s: %d Go fields, %d kernel names in Fields %q", what, len(goFields), len(names), m.Fields)
		return
	}
	cfields := map[string]UAPIFact{}
	for _, f := range c.fields[m.C] {
		_, name, _ := strings.Cut(f.Name, ".")
		cfields[name] = f
	}
	paired := map[string]bool{}
	for i, gf := range goFields {
		cf, ok := cfields[names[i]]
		fwhat := fmt.Sprintf("%v.%s (%s.%s)", gt, gf.Name, m.C, names[i])
		switch {
		case !ok:
			t.Errorf("%s: no field %s.%s in %s", fwhat, m.C, names[i], UAPIFile)
			continue
		case cf.Flex():
			t.Errorf("%s: the kernel field is a flexible array, which a mirror leaves out (see Mirror.Flex)", fwhat)
			continue
		}
		paired[names[i]] = true
		c.checked[cf.Line] = true
		if uint64(gf.Offset) != cf.Offset {
			t.Errorf("%s: offset %d, kernel %d", fwhat, gf.Offset, cf.Offset)
		}
		if uint64(gf.Type.Size()) != cf.Size {
			t.Errorf("%s: size %d, kernel %d", fwhat, gf.Type.Size(), cf.Size)
		}
		c.checkType(fwhat, gf.Type, cf.Type)
	}
	for _, cf := range c.fields[m.C] {
		_, name, _ := strings.Cut(cf.Name, ".")
		if paired[name] {
			continue
		}
		if !cf.Flex() {
			t.Errorf("%s: kernel field %s (offset %d) has no Go field", what, name, cf.Offset)
			continue
		}
		c.checked[cf.Line] = true
		fwhat := fmt.Sprintf("%v (%s, flexible array)", gt, cf.Name)
		if m.Flex == nil {
			t.Errorf("%s: the kernel struct ends in a flexible array; set Mirror.Flex to its element type", fwhat)
			continue
		}
		if uint64(gt.Size()) != cf.Offset {
			t.Errorf("%s: the Go mirror is %d bytes, the array begins at %d", fwhat, gt.Size(), cf.Offset)
		}
		et := reflect.TypeOf(m.Flex)
		if uint64(et.Size()) != cf.Size {
			t.Errorf("%s: element size %d, kernel %d", fwhat, et.Size(), cf.Size)
		}
		c.checkType(fwhat+" element", et, strings.TrimSuffix(cf.Type, "[]"))
		// The array's alignment counts in the kernel struct's, not in the mirror's.
		align = max(align, uint64(et.Align()))
	}
	if m.Flex != nil && !slices.ContainsFunc(c.fields[m.C], UAPIFact.Flex) {
		t.Errorf("%s: Mirror.Flex set, but the kernel struct has no flexible array", what)
	}
	if align != sf.Align {
		t.Errorf("%s: alignment %d, kernel %d", what, align, sf.Align)
	}
}

// composite checks a mirrored header followed by data.
func (c *uapiChecker) composite(m Composite) {
	t := c.t
	t.Helper()
	gt := reflect.TypeOf(m.Go)
	what := fmt.Sprintf("%v (struct %s + data)", gt, m.Header)
	if gt == nil || gt.Kind() != reflect.Struct {
		t.Errorf("%s: not a struct", what)
		return
	}
	var first *reflect.StructField
	for i := range gt.NumField() {
		if f := gt.Field(i); f.Name != "_" {
			first = &f
			break
		}
	}
	if first == nil || first.Offset != 0 {
		t.Errorf("%s: the first field must be the header, at offset 0", what)
		return
	}
	c.wants = append(c.wants, wantMirror{what + " field " + first.Name, first.Type, m.Header})
	data, ok := gt.FieldByName(m.Data)
	if !ok {
		t.Errorf("%s: no field %s", what, m.Data)
		return
	}
	var flex *UAPIFact
	for _, f := range c.fields[m.Header] {
		if f.Flex() {
			flex = &f
		}
	}
	if flex == nil {
		t.Errorf("%s: struct %s has no flexible array in %s", what, m.Header, UAPIFile)
		return
	}
	if uint64(data.Offset) != flex.Offset {
		t.Errorf("%s: %s at offset %d, the kernel's %s begins at %d", what, m.Data, data.Offset, flex.Name, flex.Offset)
	}
}

// checkType compares a Go type with a kernel field type: a scalar or a struct tag.
func (c *uapiChecker) checkType(what string, gt reflect.Type, ctype string) {
	c.t.Helper()
	scalars := map[string]reflect.Kind{
		"u8": reflect.Uint8, "u16": reflect.Uint16, "u32": reflect.Uint32, "u64": reflect.Uint64,
		"s8": reflect.Int8, "s16": reflect.Int16, "s32": reflect.Int32, "s64": reflect.Int64,
	}
	if k, ok := scalars[ctype]; ok {
		if gt.Kind() != k {
			c.t.Errorf("%s: Go %v, kernel %s", what, gt, ctype)
		}
		return
	}
	c.wants = append(c.wants, wantMirror{what, gt, ctype})
}

// constant checks one constant or ioctl request number.
func (c *uapiChecker) constant(name string, got uint64) {
	c.t.Helper()
	f, ok := c.byName[name]
	switch {
	case !ok:
		c.t.Errorf("%s: not in %s: add it to test/uapi/testdata/layout.c", name, UAPIFile)
		return
	case f.Kind == "absent":
		c.t.Errorf("%s: the headers do not define it (%s line %d); if that is expected, move it to Absent", name, UAPIFile, f.Line)
	case f.Kind != "const" && f.Kind != "ioctl":
		c.t.Errorf("%s: %s line %d is a %s, not a constant", name, UAPIFile, f.Line, f.Kind)
	case got != f.Value:
		c.t.Errorf("%s = %#x, kernel %#x (%s)", name, got, f.Value, f.Header)
	}
	c.checked[f.Line] = true
}

// declared fails c.t for kernel mirrors that spec.Dir declares but spec leaves out, and
// for spec entries that spec.Dir does not declare.
func (c *uapiChecker) declared(spec UAPISpec) {
	t := c.t
	t.Helper()
	consts, structs, err := DeclaredMirrors(spec.Dir)
	if err != nil {
		t.Errorf("reading the package source: %v", err)
		return
	}
	inSpec := map[string]bool{}
	for _, m := range spec.Structs {
		inSpec[reflect.TypeOf(m.Go).Name()] = true
	}
	for _, m := range spec.Composites {
		inSpec[reflect.TypeOf(m.Go).Name()] = true
	}
	for _, name := range structs {
		if !inSpec[name] {
			t.Errorf("type %s has a structs.HostLayout field but is not in the spec: add it to Structs (and to test/uapi/testdata/layout.c) or Composites", name)
		}
		delete(inSpec, name)
	}
	for _, name := range slices.Sorted(maps.Keys(inSpec)) {
		t.Errorf("type %s is in the spec but is not a struct with a structs.HostLayout field in %s", name, spec.Dir)
	}
	for kname, goName := range consts {
		_, inConsts := spec.Consts[kname]
		_, inAbsent := spec.Absent[kname]
		if !inConsts && !inAbsent {
			t.Errorf("const %s mirrors the kernel's %s but is not in the spec: add it to Consts (and to test/uapi/testdata/layout.c) or Absent", goName, kname)
		}
	}
	names := slices.Concat(slices.Collect(maps.Keys(spec.Consts)), slices.Collect(maps.Keys(spec.Absent)))
	for _, kname := range names {
		if _, ok := consts[kname]; !ok {
			t.Errorf("%s is in the spec, but no constant of %s mirrors it (kernel spelling, or a doc comment \"Name (%s) …\")", kname, spec.Dir, kname)
		}
	}
}

var (
	// kernelSpelling matches VFIO_DEVICE_FEATURE, VFIO_TYPE1v2_IOMMU, KVMIO.
	kernelSpelling = regexp.MustCompile(`^[A-Z][A-Z0-9]*(_[A-Za-z0-9]+)*$`)
	// kernelNameDoc matches a Go-cased constant's doc comment naming its kernel constant:
	// "MapFixedIOVA (IOMMU_IOAS_MAP_FIXED_IOVA) places …".
	kernelNameDoc = regexp.MustCompile(`^(\w+) \(([A-Z][A-Z0-9]*_[A-Za-z0-9_]*)\)`)
)

// DeclaredMirrors lists what the non-test Go files of dir declare as kernel mirrors:
// exported constants in kernel spelling (upper case, words joined by underscores) or whose
// doc comment starts with their name and the kernel's in parentheses, mapped from the
// kernel name to the Go name; and the struct types with a structs.HostLayout field.
func DeclaredMirrors(dir string) (consts map[string]string, structs []string, err error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		return nil, nil, err
	}
	consts = map[string]string{}
	fset := token.NewFileSet()
	for _, path := range files {
		if strings.HasSuffix(path, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, path, nil, parser.ParseComments|parser.SkipObjectResolution)
		if err != nil {
			return nil, nil, err
		}
		for _, d := range f.Decls {
			gd, ok := d.(*ast.GenDecl)
			if !ok {
				continue
			}
			for _, s := range gd.Specs {
				switch s := s.(type) {
				case *ast.ValueSpec:
					if gd.Tok != token.CONST {
						continue
					}
					doc := s.Doc
					if doc == nil && len(gd.Specs) == 1 {
						doc = gd.Doc
					}
					for _, id := range s.Names {
						if !id.IsExported() {
							continue
						}
						if kernelSpelling.MatchString(id.Name) {
							consts[id.Name] = id.Name
						} else if m := kernelNameDoc.FindStringSubmatch(doc.Text()); m != nil && m[1] == id.Name {
							consts[m[2]] = id.Name
						}
					}
				case *ast.TypeSpec:
					if st, ok := s.Type.(*ast.StructType); ok && hasHostLayout(st) {
						structs = append(structs, s.Name.Name)
					}
				}
			}
		}
	}
	sort.Strings(structs)
	return consts, structs, nil
}

func hasHostLayout(st *ast.StructType) bool {
	for _, f := range st.Fields.List {
		if sel, ok := f.Type.(*ast.SelectorExpr); ok && sel.Sel.Name == "HostLayout" {
			if x, ok := sel.X.(*ast.Ident); ok && x.Name == "structs" {
				return true
			}
		}
	}
	return false
}
