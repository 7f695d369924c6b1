package vmrig

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// parseFile feeds a captured -test.v transcript (testdata/gotest, made with go1.26 from
// testdata/gotest/sample_test.go.txt; bench.txt from bench_test.go.txt with GOMAXPROCS=1
// and -test.bench . -test.benchmem -test.benchtime 3x) to the parser.
func parseFile(t *testing.T, name string, exit int, ended bool) *BinaryResult {
	t.Helper()
	f, err := os.Open("testdata/gotest/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := NewGoTestParser("sample")
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		p.Line(sc.Text())
	}
	if ended {
		p.End(exit)
	}
	return p.Result()
}

// flatten renders every test as "name STATUS output-lines..." for comparison.
func flatten(b *BinaryResult) []string {
	var out []string
	b.Walk(func(tc *TestCase) {
		st := string(tc.Status)
		if st == "" {
			st = "NONE"
		}
		var lines []string
		for _, l := range tc.Output {
			lines = append(lines, strings.TrimSpace(l))
		}
		out = append(out, fmt.Sprintf("%s %s %q", tc.Name, st, lines))
	})
	return out
}

func TestParseMixed(t *testing.T) {
	b := parseFile(t, "mixed.txt", 1, true)
	want := []string{
		`TestPass PASS ["sample_test.go:19: hello from pass"]`,
		`TestSkip SKIP ["sample_test.go:20: needs CONFIG_IOMMUFD"]`,
		`TestFail FAIL ["sample_test.go:22: before failing" "sample_test.go:23: want 1, got 2"]`,
		`TestNested FAIL ["sample_test.go:26: parent log" "sample_test.go:32: parent after subtests"]`,
		`TestNested/ok PASS ["sample_test.go:27: sub ok"]`,
		`TestNested/bad_case FAIL []`,
		`TestNested/bad_case/deep FAIL ["sample_test.go:29: deep failure"]`,
		`TestNested/skipped SKIP ["sample_test.go:31: nope"]`,
		`TestParallel PASS []`,
		`TestParallel/a PASS ["sample_test.go:38: parallel a"]`,
		`TestParallel/b PASS ["sample_test.go:38: parallel b"]`,
		`TestMultiline PASS ["sample_test.go:42: line1" "line2"]`,
		`TestPanic PASS []`,
	}
	if diff := cmp.Diff(want, flatten(b)); diff != "" {
		t.Errorf("tests (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"testmain: before", "FAIL"}, b.Output); diff != "" {
		t.Errorf("binary output (-want +got):\n%s", diff)
	}
	if b.Summary != "FAIL" {
		t.Errorf("summary %q, want FAIL", b.Summary)
	}
	if p := b.Problems(); len(p) != 0 {
		t.Errorf("problems %q, want none (the failures are the tests')", p)
	}
	if !b.Failed() {
		t.Error("Failed() = false with failing tests")
	}
	pass, fail, skip, none := b.Counts()
	if pass != 7 || fail != 4 || skip != 2 || none != 0 {
		t.Errorf("counts %d/%d/%d/%d, want 7 pass, 4 fail, 2 skip, 0 none", pass, fail, skip, none)
	}
	if got := b.Tests[3].Subtests[1].Subtests[0].Leaf("TestNested/bad_case"); got != "deep" {
		t.Errorf("Leaf = %q, want deep", got)
	}
}

func TestParsePanic(t *testing.T) {
	b := parseFile(t, "panic.txt", 2, true)
	var panicked *TestCase
	b.Walk(func(tc *TestCase) {
		if tc.Name == "TestPanic" {
			panicked = tc
		}
	})
	if panicked == nil || panicked.Status != Fail {
		t.Fatalf("TestPanic = %+v, want FAIL", panicked)
	}
	if len(panicked.Output) < 3 || panicked.Output[0] != "panic: boom [recovered, repanicked]" {
		t.Errorf("TestPanic output %q, want the panic and its goroutine dump", panicked.Output)
	}
	if p := b.Problems(); len(p) != 0 {
		t.Errorf("problems %q, want none", p)
	}
}

func TestParseTestMainFailure(t *testing.T) {
	b := parseFile(t, "leak.txt", 1, true)
	p := b.Problems()
	if len(p) != 1 || !strings.Contains(p[0], "exit status 1 without a failed test") {
		t.Errorf("problems %q, want the exit status mismatch", p)
	}
	if got := b.Output[len(b.Output)-1]; got != "goleak: found unexpected goroutines" {
		t.Errorf("last binary output %q", got)
	}
}

func TestParseCutShort(t *testing.T) {
	// The guest died in the middle of TestNested/bad_case: no result lines, no end marker.
	f, err := os.ReadFile("testdata/gotest/mixed.txt")
	if err != nil {
		t.Fatal(err)
	}
	p := NewGoTestParser("sample")
	for _, l := range strings.Split(string(f), "\n") {
		if strings.HasPrefix(l, "=== RUN   TestNested/skipped") {
			break
		}
		p.Line(l)
	}
	b := p.Result()
	want := []string{
		"the binary did not finish (no end marker): the guest panicked, hung or timed out",
		"TestNested started but reported no result",
		"TestNested/ok started but reported no result", // -v prints subtest results after the parent's
		"TestNested/bad_case started but reported no result",
		"TestNested/bad_case/deep started but reported no result",
	}
	if diff := cmp.Diff(want, b.Problems()); diff != "" {
		t.Errorf("problems (-want +got):\n%s", diff)
	}
	if !b.Failed() {
		t.Error("Failed() = false")
	}
}

func TestParseTimeout(t *testing.T) {
	p := NewGoTestParser("x")
	for _, l := range []string{
		"=== RUN   TestHang",
		"    x_test.go:5: waiting",
		"panic: test timed out after 3m0s",
		"\trunning tests:",
		"\t\tTestHang (3m0s)",
	} {
		p.Line(l)
	}
	p.End(2)
	b := p.Result()
	if got := flatten(b); len(got) != 1 || !strings.Contains(got[0], "TestHang NONE") || !strings.Contains(got[0], "panic: test timed out") {
		t.Errorf("got %q, want TestHang without result holding the timeout panic", got)
	}
	if !b.Failed() {
		t.Error("Failed() = false")
	}
}

func TestParseStatusMismatch(t *testing.T) {
	for _, tc := range []struct {
		name  string
		lines []string
		exit  int
		want  string
	}{
		{"exit 0 without PASS", []string{"=== RUN   TestA", "--- PASS: TestA (0.00s)"}, 0, "without the final PASS line"},
		{"missing binary", []string{"no test binary /tests/x.test"}, 127, "missing from the guest image"},
		{"passing", []string{"=== RUN   TestA", "--- PASS: TestA (0.01s)", "PASS"}, 0, ""},
		{"no tests", []string{"testing: warning: no tests to run", "PASS"}, 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := NewGoTestParser("x")
			for _, l := range tc.lines {
				p.Line(l)
			}
			p.End(tc.exit)
			got := strings.Join(p.Result().Problems(), "; ")
			if tc.want == "" && got != "" || !strings.Contains(got, tc.want) {
				t.Errorf("problems %q, want %q", got, tc.want)
			}
			if p.Result().Failed() != (tc.want != "") {
				t.Errorf("Failed() = %v", p.Result().Failed())
			}
		})
	}
}

func TestParseCarriageReturns(t *testing.T) {
	p := NewGoTestParser("x")
	for _, l := range []string{"=== RUN   TestA\r", "--- SKIP: TestA (0.00s)\r", "PASS\r"} {
		p.Line(l)
	}
	p.End(0)
	if got := flatten(p.Result()); len(got) != 1 || got[0] != `TestA SKIP []` {
		t.Errorf("got %q", got)
	}
}

func TestParseBenchmarks(t *testing.T) {
	b := parseFile(t, "bench.txt", 1, true)
	const ok = "BenchmarkOK      \t       3\t     17417 ns/op\t        12.50 p50-µs\t     314 B/op\t       3 allocs/op"
	want := []string{
		`TestBefore PASS ["bench_test.go:5: a test runs before the benchmarks"]`,
		fmt.Sprintf(`BenchmarkOK PASS ["bench_test.go:8: setup" "bench_test.go:8: setup" %q]`, strings.TrimSpace(ok)),
		`BenchmarkFail FAIL ["bench_test.go:13: device gone"]`,
		`BenchmarkSkip SKIP ["bench_test.go:14: needs iommufd"]`,
		`BenchmarkSub PASS []`,
		`BenchmarkSub/size-64 PASS ["BenchmarkSub/size-64         \t       3\t        37.00 ns/op\t       0 B/op\t       0 allocs/op"]`,
		`BenchmarkSub/size-4096 PASS ["BenchmarkSub/size-4096       \t       3\t        46.67 ns/op\t       0 B/op\t       0 allocs/op"]`,
		`BenchmarkSubFail FAIL []`,
		`BenchmarkSubFail/bad FAIL ["bench_test.go:26: sub failure"]`,
	}
	if diff := cmp.Diff(want, flatten(b)); diff != "" {
		t.Errorf("tests (-want +got):\n%s", diff)
	}
	wantOut := []string{"goos: linux", "goarch: amd64", "pkg: sample", "cpu: AMD EPYC Processor", "FAIL"}
	if diff := cmp.Diff(wantOut, b.Output); diff != "" {
		t.Errorf("binary output (-want +got):\n%s", diff)
	}
	if p := b.Problems(); len(p) != 0 {
		t.Errorf("problems %q, want none (the failures are the benchmarks')", p)
	}

	// The same benchmarks passing with GOMAXPROCS 2: result names carry a -2.
	p := NewGoTestParser("x")
	for _, l := range []string{"BenchmarkSub", "BenchmarkSub/size-64", "BenchmarkSub/size-64-2 \t 3\t 37.00 ns/op",
		"BenchmarkOK", "BenchmarkOK-2 \t 3\t 17417 ns/op\t 12.50 p50-µs", "PASS"} {
		p.Line(l)
	}
	p.End(0)
	got := flatten(p.Result())
	wantPass := []string{`BenchmarkSub PASS []`, `BenchmarkSub/size-64 PASS ["BenchmarkSub/size-64-2 \t 3\t 37.00 ns/op"]`,
		`BenchmarkOK PASS ["BenchmarkOK-2 \t 3\t 17417 ns/op\t 12.50 p50-µs"]`}
	if diff := cmp.Diff(wantPass, got); diff != "" {
		t.Errorf("GOMAXPROCS 2 (-want +got):\n%s", diff)
	}
	if p.Result().Failed() {
		t.Errorf("Failed() with passing benchmarks: %q", p.Result().Problems())
	}

	// A guest that dies in a benchmark leaves it without a result.
	p = NewGoTestParser("x")
	for _, l := range []string{"BenchmarkSub", "BenchmarkSub/size-64", "    x_test.go:3: started"} {
		p.Line(l)
	}
	if probs := p.Result().Problems(); len(probs) != 3 || !strings.Contains(probs[1], "BenchmarkSub started but reported no result") {
		t.Errorf("problems %q, want no end marker and the two benchmarks without result", probs)
	}
}
