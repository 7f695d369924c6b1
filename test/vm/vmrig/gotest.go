package vmrig

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Status is the outcome of one guest test as its -test.v output reports it.
type Status string

// Test statuses. NoResult means the test started (=== RUN) but never reported a result.
const (
	Pass     Status = "PASS"
	Fail     Status = "FAIL"
	Skip     Status = "SKIP"
	NoResult Status = ""
)

// TestCase is one guest test or subtest.
type TestCase struct {
	Name     string // full name, e.g. TestK3ExportErrnoMatrix/unaligned
	Status   Status
	Elapsed  string // as printed, e.g. "0.01s"
	Output   []string
	Subtests []*TestCase
}

// Leaf returns the last element of the test's name relative to its parent.
func (tc *TestCase) Leaf(parent string) string {
	if parent == "" {
		return tc.Name
	}
	return strings.TrimPrefix(tc.Name, parent+"/")
}

// BinaryResult is what one guest test binary (or the demo) produced.
type BinaryResult struct {
	Name     string
	Tests    []*TestCase // top-level tests, in start order
	Output   []string    // lines not attributed to a test (TestMain, the final PASS/FAIL, crashes)
	Summary  string      // the binary's final "PASS" or "FAIL" line, if printed
	Ended    bool        // the end marker arrived
	ExitCode int         // exit status from the end marker
}

// Problems lists what is wrong with the binary as a whole, beyond individual test results:
// it did not finish, its exit status disagrees with its results, or a test never ended.
func (b *BinaryResult) Problems() []string {
	var p []string
	if !b.Ended {
		p = append(p, "the binary did not finish (no end marker): the guest panicked, hung or timed out")
	}
	failed := 0
	b.Walk(func(tc *TestCase) {
		switch tc.Status {
		case Fail:
			failed++
		case NoResult:
			p = append(p, fmt.Sprintf("%s started but reported no result", tc.Name))
		}
	})
	if b.Ended {
		switch {
		case b.ExitCode == 127 && len(b.Tests) == 0:
			p = append(p, "the test binary is missing from the guest image")
		case b.ExitCode != 0 && failed == 0:
			p = append(p, fmt.Sprintf("exit status %d without a failed test (TestMain, leak check, crash or timeout; see its output)", b.ExitCode))
		case b.ExitCode == 0 && b.Summary != "PASS":
			p = append(p, "exit status 0 without the final PASS line")
		}
	}
	return p
}

// Failed reports whether anything about the binary failed.
func (b *BinaryResult) Failed() bool {
	if len(b.Problems()) > 0 {
		return true
	}
	failed := false
	b.Walk(func(tc *TestCase) { failed = failed || tc.Status == Fail })
	return failed
}

// Walk calls fn for every test and subtest, parents first.
func (b *BinaryResult) Walk(fn func(*TestCase)) {
	var walk func([]*TestCase)
	walk = func(l []*TestCase) {
		for _, tc := range l {
			fn(tc)
			walk(tc.Subtests)
		}
	}
	walk(b.Tests)
}

// Counts returns how many tests (subtests included) passed, failed, skipped or have no result.
func (b *BinaryResult) Counts() (pass, fail, skip, none int) {
	b.Walk(func(tc *TestCase) {
		switch tc.Status {
		case Pass:
			pass++
		case Fail:
			fail++
		case Skip:
			skip++
		default:
			none++
		}
	})
	return
}

var (
	reTestEvent  = regexp.MustCompile(`^=== (RUN|PAUSE|CONT|NAME)\s+(\S+)\s*$`)
	reTestResult = regexp.MustCompile(`^(\s*)--- (PASS|FAIL|SKIP): (\S+) \(([0-9.]+s)\)\s*$`)
	// Benchmarks under -test.v: the name alone on a line when one starts, its result line
	// ("BenchmarkX[-GOMAXPROCS] <N> <ns> ns/op ..."), or a FAIL or SKIP line without a
	// duration. A benchmark with sub-benchmarks prints no result line of its own.
	reBenchStart  = regexp.MustCompile(`^(Benchmark\S*)$`)
	reBenchResult = regexp.MustCompile(`^(Benchmark\S*)\s+\d+\s+\S+ ns/op`)
	reBenchEnd    = regexp.MustCompile(`^(\s*)--- (FAIL|SKIP): (Benchmark\S*)\s*$`)
)

// GoTestParser turns the `-test.v` output of one Go test binary into a BinaryResult. Feed
// it lines in order; it needs no framing beyond them.
type GoTestParser struct {
	res    *BinaryResult
	byName map[string]*TestCase
	cur    *TestCase // where plain output goes
	after  *TestCase // test whose result line was just printed
	indent int       // indentation of that result line
	panic  *TestCase // failed test whose panic trace is being printed
}

// NewGoTestParser returns a parser for the binary called name.
func NewGoTestParser(name string) *GoTestParser {
	return &GoTestParser{res: &BinaryResult{Name: name}, byName: map[string]*TestCase{}}
}

// Result returns the result so far (the parser keeps updating it).
func (p *GoTestParser) Result() *BinaryResult { return p.res }

// End records the binary's exit status.
func (p *GoTestParser) End(exitCode int) {
	p.res.Ended, p.res.ExitCode = true, exitCode
}

func (p *GoTestParser) test(name string) *TestCase {
	if tc, ok := p.byName[name]; ok {
		return tc
	}
	tc := &TestCase{Name: name}
	p.byName[name] = tc
	parent := (*TestCase)(nil)
	for i := len(name) - 1; i > 0; i-- {
		if name[i] == '/' {
			if pt, ok := p.byName[name[:i]]; ok {
				parent = pt
				break
			}
		}
	}
	if parent != nil {
		parent.Subtests = append(parent.Subtests, tc)
	} else {
		p.res.Tests = append(p.res.Tests, tc)
	}
	return tc
}

// Line consumes one line of output (without the newline).
func (p *GoTestParser) Line(line string) {
	line = strings.TrimRight(line, "\r")
	if m := reTestEvent.FindStringSubmatch(line); m != nil {
		p.after = nil
		tc := p.test(m[2])
		if m[1] != "PAUSE" {
			p.cur = tc
		}
		return
	}
	m := reTestResult.FindStringSubmatch(line)
	if m == nil {
		if m = reBenchEnd.FindStringSubmatch(line); m != nil {
			m = append(m, "")
		}
	}
	if m != nil {
		tc := p.test(m[3])
		tc.Status, tc.Elapsed = Status(m[2]), m[4]
		p.after, p.indent = tc, len(m[1])
		if p.cur == tc {
			p.cur = nil
		}
		return
	}
	if m := reBenchStart.FindStringSubmatch(line); m != nil {
		p.after, p.cur = nil, p.test(m[1])
		return
	}
	if m := reBenchResult.FindStringSubmatch(line); m != nil {
		if tc := p.benchmark(m[1]); tc != nil {
			tc.Status = Pass
			tc.Output = append(tc.Output, line)
			p.after = nil
			if p.cur == tc {
				p.cur = nil
			}
			return
		}
	}
	if line == "PASS" || line == "FAIL" {
		p.endBenchmarks()
		p.res.Summary = line
		p.after, p.cur = nil, nil
		p.res.Output = append(p.res.Output, line)
		return
	}
	if p.panic != nil {
		p.panic.Output = append(p.panic.Output, line)
		return
	}
	if strings.HasPrefix(line, "panic: ") && p.after != nil && p.after.Status == Fail {
		// tRunner prints the test's FAIL line, then the panic and the goroutine dump
		p.panic = p.after
		p.panic.Output = append(p.panic.Output, line)
		return
	}
	if p.after != nil {
		if ind := len(line) - len(strings.TrimLeft(line, " \t")); ind > p.indent && strings.TrimSpace(line) != "" {
			p.after.Output = append(p.after.Output, line)
			return
		}
		p.after = nil
	}
	if p.cur != nil && p.cur.Status == NoResult {
		p.cur.Output = append(p.cur.Output, line)
		return
	}
	p.res.Output = append(p.res.Output, line)
}

// benchmark returns the started benchmark that a result line names: name as printed, or
// without its -GOMAXPROCS suffix.
func (p *GoTestParser) benchmark(name string) *TestCase {
	if tc, ok := p.byName[name]; ok {
		return tc
	}
	if i := strings.LastIndexByte(name, '-'); i > 0 {
		if _, err := strconv.Atoi(name[i+1:]); err == nil {
			return p.byName[name[:i]]
		}
	}
	return nil
}

// endBenchmarks gives the benchmarks that ran sub-benchmarks, which print no result line
// of their own when they pass, the status their sub-benchmarks had, once the binary's
// summary line shows that they are done.
func (p *GoTestParser) endBenchmarks() {
	var end func(tc *TestCase) bool // reports whether tc ended
	end = func(tc *TestCase) bool {
		if tc.Status != NoResult {
			return true
		}
		if !strings.HasPrefix(tc.Name, "Benchmark") || len(tc.Subtests) == 0 {
			return false
		}
		st := Pass
		for _, sub := range tc.Subtests {
			if !end(sub) {
				return false
			}
			if sub.Status == Fail {
				st = Fail
			}
		}
		tc.Status = st
		return true
	}
	for _, tc := range p.res.Tests {
		end(tc)
	}
}
