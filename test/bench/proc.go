package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Sample is what the orchestrator reads of the daemon process at one moment: its memory
// from /proc/PID/status and its counters from its metrics socket.
type Sample struct {
	// RSS and HWM are VmRSS and VmHWM (peak RSS) in bytes.
	RSS, HWM uint64
	// Metrics are the counters of [sampledMetrics] (each summed over its labels).
	Metrics map[string]float64
}

// Metrics the orchestrator samples.
const (
	metricMallocs      = "go_memstats_mallocs_total"
	metricAllocBytes   = "go_memstats_alloc_bytes_total"
	metricClaimRefused = "mmiobroker_claim_connections_refused_total"
	metricCycles       = "mmiobroker_device_cycles_total"
	metricOpenFDs      = "process_open_fds"
)

var sampledMetrics = []string{metricMallocs, metricAllocBytes, metricClaimRefused, metricCycles, metricOpenFDs,
	metricHeapInuse, metricHeapAlloc, metricHeapIdle, metricHeapFreed, metricLeases, metricReissues, metricCPU}

// sampleDaemon reads the memory of process pid and the metrics served on the unix socket
// metricsSock.
func sampleDaemon(ctx context.Context, pid int, metricsSock string) (Sample, error) {
	var s Sample
	var err error
	if s.RSS, s.HWM, err = procMemory(pid); err != nil {
		return s, err
	}
	s.Metrics, err = scrape(ctx, metricsSock, sampledMetrics)
	return s, err
}

// procMemory returns VmRSS and VmHWM of process pid in bytes.
func procMemory(pid int) (rss, hwm uint64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	return parseStatus(data)
}

// parseStatus reads VmRSS and VmHWM (kB) of a /proc/PID/status file.
func parseStatus(data []byte) (rss, hwm uint64, err error) {
	var found int
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok || key != "VmRSS" && key != "VmHWM" {
			continue
		}
		kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(val), " kB"), 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc status %s: %w", key, err)
		}
		if key == "VmRSS" {
			rss = kb << 10
		} else {
			hwm = kb << 10
		}
		found++
	}
	if found != 2 {
		return 0, 0, fmt.Errorf("/proc status: no VmRSS and VmHWM")
	}
	return rss, hwm, nil
}

// scrape fetches GET /metrics from the unix socket sock and returns the named metrics,
// each summed over its label sets (absent ones are absent from the map).
func scrape(ctx context.Context, sock string, names []string) (map[string]float64, error) {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://daemon/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("metrics socket: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("metrics socket: %s", resp.Status)
	}
	return parseMetrics(resp.Body, names)
}

// parseMetrics reads the Prometheus text format and sums the samples of each of names.
func parseMetrics(r io.Reader, names []string) (map[string]float64, error) {
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest, _ := strings.Cut(line, " ")
		if i := strings.IndexByte(name, '{'); i >= 0 {
			name = name[:i]
			_, rest, _ = strings.Cut(line[strings.LastIndexByte(line, '}')+1:], " ")
		}
		if !want[name] {
			continue
		}
		val, _, _ := strings.Cut(strings.TrimSpace(rest), " ") // a timestamp may follow
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			return nil, fmt.Errorf("metric %s: %w", name, err)
		}
		out[name] += v
	}
	return out, sc.Err()
}

// Machine describes where a run ran.
type Machine struct {
	CPUs      int
	CPU       string // model name
	Kernel    string
	GoVersion string
	Date      time.Time
	// Dir is the run's directory (sockets, journal); TmpFS says whether it is on a tmpfs,
	// as mmiobrokerd's /run is.
	Dir   string
	TmpFS bool
}

// machineFacts describes this machine; dir is the run's directory.
func machineFacts(dir string) Machine {
	m := Machine{CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), Date: time.Now().UTC(), Dir: dir}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(data), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	var st unix.Statfs_t
	m.TmpFS = unix.Statfs(dir, &st) == nil && st.Type == unix.TMPFS_MAGIC
	return m
}

// defaultBaseDir is where runs make their directory: a tmpfs like mmiobrokerd's /run
// (the journal's writes then cost what they cost there), else the temporary directory.
func defaultBaseDir() string {
	var st unix.Statfs_t
	if unix.Statfs("/dev/shm", &st) == nil && st.Type == unix.TMPFS_MAGIC && unix.Access("/dev/shm", unix.W_OK) == nil {
		return "/dev/shm"
	}
	return os.TempDir()
}
