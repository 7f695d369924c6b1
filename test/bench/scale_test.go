package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/broker"
)

func TestScaleLevels(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want []int
	}{
		{100000, []int{1000, 10000, 50000, 100000}},
		{2000, []int{20, 200, 1000, 2000}},
		{50, []int{5, 25, 50}},
		{3, []int{1, 3}},
		{1, []int{1}},
	} {
		if got := scaleLevels(tc.n); !cmp.Equal(got, tc.want) {
			t.Errorf("scaleLevels(%d) = %v, want %v", tc.n, got, tc.want)
		}
	}
}

func TestScaleProcsShare(t *testing.T) {
	for _, tc := range []struct{ n, perProc, uids, want int }{
		{100000, 4000, 10, 25},
		{2000, 4000, 10, 10},
		{3, 4000, 10, 3},
		{100001, 4000, 1, 26},
	} {
		procs := scaleProcs(tc.n, tc.perProc, tc.uids)
		if procs != tc.want {
			t.Errorf("scaleProcs(%d, %d, %d) = %d, want %d", tc.n, tc.perProc, tc.uids, procs, tc.want)
		}
		sum := 0
		for i := range procs {
			s := share(tc.n, procs, i)
			if s > tc.perProc || s < 1 {
				t.Errorf("%d leases over %d processes: process %d holds %d", tc.n, procs, i, s)
			}
			sum += s
		}
		if sum != tc.n {
			t.Errorf("%d leases over %d processes: shares add up to %d", tc.n, procs, sum)
		}
	}
}

// TestScaleRange: the scenario's leases never share a page of a device, the probes' come
// after the fill's, and everything fits the BAR.
func TestScaleRange(t *testing.T) {
	o := ScaleOptions{Leases: 1000, Devices: 7, UIDs: 3, PerProcess: 100, Probes: 20}
	if err := o.validate(5); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	pad := (o.Leases + o.Devices - 1) / o.Devices * o.Devices
	probes := len(scaleLevels(o.Leases)) * (5 + o.Probes)
	for _, g := range append(seqInts(0, o.Leases), seqInts(pad, pad+probes)...) {
		bdf, r := scaleRange(g, o.Devices)
		key := fmt.Sprintf("%s/%d", bdf, r.Offset)
		if seen[key] {
			t.Fatalf("lease %d: %s page %d taken twice", g, bdf, r.Offset/scalePage)
		}
		seen[key] = true
		if r.Length != scalePage || r.Offset+r.Length > 16<<20 {
			t.Fatalf("lease %d: range %+v beyond BAR 4", g, r)
		}
	}
	big := ScaleOptions{Leases: 100 * 4096, Devices: 100, UIDs: 1, PerProcess: 1, Probes: 1}
	if err := big.validate(0); err == nil || !strings.Contains(err.Error(), "pages") {
		t.Errorf("validate of more leases than pages: %v", err)
	}
	bad := ScaleOptions{Leases: 10, Devices: 0, UIDs: 1, PerProcess: 1, Probes: 1, Watchers: 5}
	if err := bad.validate(0); err == nil || !strings.Contains(err.Error(), "-scale-devices 0") || !strings.Contains(err.Error(), "-scale-watchers 5") {
		t.Errorf("validate of bad options: %v", err)
	}
	if err := (ScaleOptions{}).validate(0); err != nil {
		t.Errorf("validate of a skipped scenario: %v", err)
	}
}

func seqInts(from, to int) []int {
	var s []int
	for i := from; i < to; i++ {
		s = append(s, i)
	}
	return s
}

func TestLogTime(t *testing.T) {
	want := time.Date(2026, 12, 6, 7, 20, 58, 266e6, time.UTC)
	for _, line := range []string{
		`time=2026-12-06T07:20:58.266Z level=INFO msg="leases restored" leases=2220`,
		`{"time":"2026-12-06T07:20:58.266Z","level":"INFO","msg":"leases restored"}`,
	} {
		got, ok := logTime(line)
		if !ok || !got.Equal(want) {
			t.Errorf("logTime(%q) = %v, %v; want %v", line, got, ok, want)
		}
	}
	for _, line := range []string{"", "level=INFO msg=x", "time=yesterday msg=x", "{bad json"} {
		if _, ok := logTime(line); ok {
			t.Errorf("logTime(%q): ok", line)
		}
	}
	tl := newTail(1 << 10)
	tl.Write([]byte("time=2026-12-06T07:20:58.000Z level=INFO msg=serving\n"))
	ctx := context.Background()
	if d, line := logSince(ctx, tl, want.Add(-time.Second), "msg=serving"); d != 734*time.Millisecond || line == "" {
		t.Errorf("logSince = %v, %q", d, line)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if d, _ := logSince(cctx, tl, want, "msg=absent"); d != -1 {
		t.Errorf("logSince of a missing line = %v, want -1", d)
	}
	// A line that arrives while logSince waits.
	go tl.Write([]byte("time=2026-12-06T07:20:59.000Z level=INFO msg=late\n"))
	if d, _ := logSince(ctx, tl, want.Add(-time.Second), "msg=late"); d != 1734*time.Millisecond {
		t.Errorf("logSince of a late line = %v, want 1.734s", d)
	}
}

func TestFmtCount(t *testing.T) {
	for n, want := range map[int]string{0: "0", 999: "999", 1000: "1,000", 100000: "100,000", 1048576: "1,048,576", -2500: "-2,500"} {
		if got := fmtCount(n); got != want {
			t.Errorf("fmtCount(%d) = %q, want %q", n, got, want)
		}
	}
}

// memKeeper is an in-memory vfio.Keeper: an fd store that outlives the openers given it.
type memKeeper struct {
	mu     sync.Mutex
	fds    map[string]*os.File
	forgot []string
}

func (k *memKeeper) Take(name string) *os.File {
	k.mu.Lock()
	defer k.mu.Unlock()
	f := k.fds[name]
	if f == nil {
		return nil
	}
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	return os.NewFile(uintptr(fd), name)
}

func (k *memKeeper) TakePrefix(string) (string, *os.File) { return "", nil }

func (k *memKeeper) Keep(name string, f *os.File) error {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.fds == nil {
		k.fds = map[string]*os.File{}
	}
	k.fds[name] = os.NewFile(uintptr(fd), name)
	return nil
}

func (k *memKeeper) Forget(name string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if f := k.fds[name]; f != nil {
		f.Close()
		delete(k.fds, name)
	}
	k.forgot = append(k.forgot, name)
	return nil
}

func (k *memKeeper) close() {
	for _, f := range k.fds {
		f.Close()
	}
}

// TestKeptDevice: a kept device's first run keeps a marker; a second "process" (a new
// opener on the same store) finds it and is restored; a drain (Close) forgets it, so the
// next is not; buffers are memfds of the ranges' size, duplicated for delivery.
func TestKeptDevice(t *testing.T) {
	k := &memKeeper{}
	defer k.close()
	bdf := DeviceBDF(0)
	open := func() *keptDevice {
		t.Helper()
		dev, err := keptOpener(k, []string{bdf})(bdf)
		if err != nil {
			t.Fatal(err)
		}
		return dev.(*keptDevice)
	}
	d := open()
	if d.Restored() {
		t.Error("first open: restored")
	}
	if _, ok := k.fds[keptName(bdf)]; !ok || strings.Contains(keptName(bdf), ":") {
		t.Fatalf("marker %q not kept (store %v)", keptName(bdf), k.fds)
	}
	buf, err := d.Export(4, []broker.Range{{Offset: 0, Length: 4096}, {Offset: 8192, Length: 4096}}, "mmb-test")
	if err != nil {
		t.Fatal(err)
	}
	f, err := buf.Dup()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Ino != buf.Inode() || st.Size != 8192 || buf.Size() != 8192 {
		t.Errorf("dup: ino %d size %d (%v); buffer ino %d size %d", st.Ino, st.Size, err, buf.Inode(), buf.Size())
	}
	f.Close()
	if err := buf.Close(); err != nil {
		t.Error(err)
	}
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Export(4, []broker.Range{{Offset: 0, Length: 4096}}, "mmb-x"); err == nil {
		t.Error("export after Detach: no error")
	}

	d2 := open() // the next process
	if !d2.Restored() {
		t.Error("open after a keeping stop: not restored")
	}
	if _, err := d2.AdoptBuffer(buf.Inode()); err == nil {
		t.Error("AdoptBuffer: no error, but buffers are not kept")
	}
	if err := d2.Close(); err != nil {
		t.Fatal(err)
	}
	if len(k.forgot) != 1 || len(k.fds) != 0 {
		t.Errorf("Close: forgot %v, store %v; want the marker forgotten", k.forgot, k.fds)
	}
	if d3 := open(); d3.Restored() {
		t.Error("open after a draining stop: restored")
	}

	none, err := keptOpener(nil, []string{bdf})(bdf)
	if err != nil || none.(*keptDevice).Restored() {
		t.Errorf("without a keeper: %v, restored %v", err, err == nil && none.(*keptDevice).Restored())
	}
	if _, err := keptOpener(nil, []string{bdf})(DeviceBDF(9)); err == nil {
		t.Error("open of an unknown device: no error")
	}
}

// fakeScale is a scale result of made-up figures: RSS 150 MB at 100,000 leases (met),
// ListLeases p99 60 ms (missed), GetLease flat (met), AllocateLease rising 50% (missed),
// 1,000 subscribers cut at 1,000 events/s but not at 500 (missed), restart 0.8 s (met).
func fakeScale() *ScaleResult {
	us := time.Microsecond
	lat := func(p50, p99 time.Duration) Summary {
		return Summary{N: 500, P50: p50, P90: p50, P99: p99, P999: p99, Mean: p50, Max: p99}
	}
	sample := func(rss uint64, heap, fds float64) Sample {
		return Sample{RSS: rss, HWM: rss + 1e6, Metrics: map[string]float64{metricHeapInuse: heap, metricHeapAlloc: heap / 2, metricOpenFDs: fds}}
	}
	var levels []ScaleLevel
	for i, n := range []int{1000, 10000, 50000, 100000} {
		levels = append(levels, ScaleLevel{Leases: n, FillAdded: n - []int{0, 1000, 10000, 50000}[i], FillWall: time.Second,
			Fill: lat(900*us, 3000*us), Sample: sample(uint64(20e6+1300*n), float64(4e6+1000*n), 60), List: lat(9000*us, 12000*us+time.Duration(n/2000)*time.Millisecond),
			Pages: n/1000 + 1, Get: lat(150*us, 400*us), Alloc: lat(time.Duration(1000+n/200)*us, 5000*us), Spare: lat(900*us, 4000*us)})
	}
	step := func(rate int, cut int, missing uint64) WatchStep {
		var h Histogram
		h.Record(2 * time.Millisecond)
		return WatchStep{Rate: rate, Renews: rate * 10, Skipped: 7, Elapsed: 10 * time.Second, Achieved: float64(rate), Events: uint64(rate * 10),
			Report:  WatchReport{Streams: 1000, Completed: 1000 - cut, Cut: cut, Received: uint64(rate*10*1000) - missing, Missing: missing, Latency: h},
			Latency: h.Summary(), Sample: sample(200e6, 1, 80)}
	}
	return &ScaleResult{
		Leases: 100000, Devices: 100, Procs: 25, Probes: 500, Warmup: 20, CPUs: 2, UIDs: []int{200000, 200001}, MaxLeases: 102064, RevokeWithin: "1h",
		Config:  "[daemon]\n\n[[device]]\naddress = \"0000:01:00.0\"\n\n[[device]]\naddress = \"0000:02:00.0\"\n",
		FDLimit: scaleFDLimit, RealFDLimit: 20000, Base: sample(20e6, 4e6, 18), Levels: levels, JournalBytes: 64 << 20,
		Lists: []ListWalk{{Name: "every lease", Calls: 103, Leases: 102024, Lat: lat(9*time.Millisecond, 60*time.Millisecond), Wall: time.Second},
			{Name: "live_only", Calls: 100, Leases: 100000, Lat: lat(9*time.Millisecond, 20*time.Millisecond), Wall: time.Second}},
		Watch: &WatchResult{Subscribers: 1000, Procs: 4, Conns: 20, Steps: []WatchStep{step(1000, 600, 5000000), step(500, 0, 0)}},
		Restart: &RestartResult{Leases: 100000, JournalBytes: 64 << 20, Stop: 100 * time.Millisecond, Ready: 900 * time.Millisecond,
			Loaded: 500 * time.Millisecond, Restored: 800 * time.Millisecond, Serving: 890 * time.Millisecond,
			RestoredLine: `time=x level=INFO msg="leases restored" leases=100000`, SeqBefore: 7, SeqAfter: 7, LiveAfter: 100000, HoldersMatched: 25,
			After: sample(180e6, 1, 60)},
	}
}

func TestScaleTargets(t *testing.T) {
	got := fakeScale().targets()
	want := []Target{
		{Name: "scale: daemon RSS, 100,000 live leases", Measured: "150.0 MB", Floor: "-", Ratio: "-", Goal: "< 200 MB", Met: true},
		{Name: "scale: ListLeases p99 per page (page_size 1000), 102,024 leases", Measured: "60.00 ms", Floor: "-", Ratio: "-", Goal: "< 50 ms", Met: false},
		{Name: "scale: GetLease p50, slope over 1,000 to 100,000 leases", Measured: "+0.0 µs per 10k leases (+0%)", Floor: "-", Ratio: "-", Goal: "flat: the fit rises ≤ 25%", Met: true},
		{Name: "scale: AllocateLease + claim p50, slope over 1,000 to 100,000 leases", Measured: "+50.0 µs per 10k leases (+49%)", Floor: "-", Ratio: "-", Goal: "flat: the fit rises ≤ 25%", Met: false},
		{Name: "scale: WatchEvents, 1,000 subscribers at 1,000 events/s", Measured: "1000 events/s made, 600 of 1000 cut, 5000000 events missing; no drops at 500 events/s", Floor: "-", Ratio: "-", Goal: "no drops", Met: false},
		{Name: "scale: restart with 100,000 leases, journal replayed (start → leases restored)", Measured: "0.800 s", Floor: "-", Ratio: "-", Goal: "< 1 s", Met: true},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("targets (-want +got):\n%s", diff)
	}
	if got := (&ScaleResult{}).targets(); got != nil {
		t.Errorf("targets of no levels = %+v", got)
	}
}

func TestScaleMarkdown(t *testing.T) {
	r := fakeReport()
	r.Scale = fakeScale()
	var b bytes.Buffer
	if err := r.Markdown(&b); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	checkTable(t, md, 32)
	for _, want := range []string{
		"| scale: daemon RSS, 100,000 live leases | 150.0 MB | - | - | < 200 MB | yes |",
		"## Scale: 100,000 live leases",
		"100,000 live leases on 100 fake devices (and a spare device without leases), held by 25 holder processes running as 2 uids (200000–200001)",
		"in 4 watcher processes over 20 connections",
		"- AllocateLease + claim on the spare device: +0.0 µs per 10,000 leases",
		"| 100,000 | 50,000 in 1.0 s (50000 /s) | 900.0 µs / 3.00 ms | 143.1 MiB |",
		"- GetLease: +0.0 µs per 10,000 leases, from 150.0 µs to 150.0 µs (+0%).",
		"- AllocateLease + claim: +50.0 µs per 10,000 leases",
		"| daemon RSS (VmRSS) | 19.1 MiB | 143.1 MiB | 1300 B |",
		"| open fds (process_open_fds) | 18 | 60 | 0.0004 |",
		"| lease journal file | 0 B | 64.0 MiB | 671 B |",
		"| every lease | 103 | 102,024 | 9.00 ms | 60.00 ms |",
		"| walk | calls | leases listed | call p50 | call p99 | call max | whole walk |",
		"### WatchEvents: 1,000 subscribers",
		"| 1,000 /s | 10,000 | 1000 | 7 | 500000 | 400 of 1000 | 600 | 5,000,000 |",
		"| 500 /s | 5,000 | 500 | 7 | 500000 | 1000 of 1000 | 0 | 0 |",
		"| start → every lease taken back, holders re-pinned (log: leases restored) | 0.800 s |",
		"| holder processes whose leases all came back | 25 of 25 |",
		"| events the restart emitted (reissues, ends) | 0 |",
		"told RLIMIT_NOFILE is 1,048,576 (daemon.Options.FDLimit; the real limit, 20,000, is unchanged)",
		"# … one [[device]] table per fake device",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("table lacks %q", want)
		}
	}
	if strings.Count(md, "address = ") != 1 {
		t.Errorf("the scale configuration shows %d devices, want 1", strings.Count(md, "address = "))
	}
	r.Scale.Restart, r.Scale.RestartNote = nil, "no fd store"
	b.Reset()
	if err := r.Markdown(&b); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "Not run: no fd store.") || strings.Contains(b.String(), "scale: restart") {
		t.Error("a scale run without restart: no note, or a restart target")
	}
	if t.Failed() {
		t.Logf("table:\n%s", md)
	}
}
