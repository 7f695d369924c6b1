// Package metricstest scrapes the daemon's metrics as a Prometheus server would (HTTP
// GET /metrics on its unix socket, the text exposition parsed by the Prometheus
// libraries), or gathers a registry in process, and reads samples by name and labels, for
// the tests that check the metrics move: internal/metrics' own, the daemon's on fake
// devices, and the rig's against the real kernel.
package metricstest

import (
	"context"
	"net"
	"net/http"
	"runtime"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Scrape is one exposition of the metrics, by family name.
type Scrape map[string]*dto.MetricFamily

// Socket GETs /metrics over HTTP on the unix socket at path, failing t if that fails.
func Socket(t testing.TB, path string) Scrape {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}
	resp, err := c.Get("http://mmiobrokerd/metrics")
	if err != nil {
		t.Fatalf("scrape %s: %v", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s", path, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("scrape %s: parse: %v", path, err)
	}
	return mfs
}

// Gather reads g's metrics as a scrape would see them (a registry in the test's own
// process), failing t if that fails.
func Gather(t testing.TB, g prometheus.Gatherer) Scrape {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	s := make(Scrape, len(mfs))
	for _, mf := range mfs {
		s[mf.GetName()] = mf
	}
	return s
}

// Wait scrapes the socket at path until ready accepts a scrape, and returns that one. It
// fails t after within (a bound on failure: what it waits for happens well within it).
func Wait(t testing.TB, path string, within time.Duration, ready func(Scrape) bool) Scrape {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		s := Socket(t, path)
		if ready(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("the metrics on %s did not reach the expected values in %v", path, within)
		}
		runtime.Gosched()
	}
}

// Value returns the sample of name whose labels include labels (name, value pairs): a
// counter's or gauge's value, a histogram's sample count; 0 if there is none.
func (s Scrape) Value(name string, labels ...string) float64 {
	mf := s[name]
	if mf == nil {
		return 0
	}
samples:
	for _, m := range mf.GetMetric() {
		got := map[string]string{}
		for _, lp := range m.GetLabel() {
			got[lp.GetName()] = lp.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if got[labels[i]] != labels[i+1] {
				continue samples
			}
		}
		switch mf.GetType() {
		case dto.MetricType_COUNTER:
			return m.GetCounter().GetValue()
		case dto.MetricType_GAUGE:
			return m.GetGauge().GetValue()
		case dto.MetricType_HISTOGRAM:
			return float64(m.GetHistogram().GetSampleCount())
		}
		return m.GetUntyped().GetValue()
	}
	return 0
}

// Lint fails t for every promlint problem of s.
func Lint(t testing.TB, s Scrape) {
	t.Helper()
	problems, err := promtest.GatherAndLint(prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		out := make([]*dto.MetricFamily, 0, len(s))
		for _, mf := range s {
			out = append(out, mf)
		}
		return out, nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}
