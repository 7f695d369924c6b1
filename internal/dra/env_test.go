package dra

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/client-go/kubernetes"

	"github.com/mmiobroker/mmiobroker/internal/dra/dratest"
)

// testLog sends a logger's lines to t until the test ends.
func testLog(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(logWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type logWriter struct{ t testing.TB }

func (w logWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// plugin is a driver under test.
type plugin struct {
	t    testing.TB
	opt  Options
	kube kubernetes.Interface
	drv  *Driver
}

// pluginDirs makes the kubelet's and the runtime's directories in dir (a short
// temporary directory: unix socket paths stay under 108 bytes).
func pluginDirs(t testing.TB, dir string) (cdi, plugins, registry string) {
	cdi, plugins, registry = filepath.Join(dir, "cdi"), filepath.Join(dir, "plugins"), filepath.Join(dir, "registry")
	for _, d := range []string{cdi, plugins, registry} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return cdi, plugins, registry
}

// startPlugin starts a driver with opt (NodeName and Log filled in if unset) and stops
// it when the test ends.
func startPlugin(t testing.TB, opt Options) *plugin {
	t.Helper()
	if opt.NodeName == "" {
		opt.NodeName = dratest.Node
	}
	if opt.Log == nil {
		opt.Log = testLog(t)
	}
	d, err := Start(context.Background(), opt)
	if err != nil {
		t.Fatalf("start plugin: %v", err)
	}
	p := &plugin{t: t, opt: opt, kube: opt.Kube, drv: d}
	t.Cleanup(func() { p.stop() })
	return p
}

// stop stops the driver (idempotent).
func (p *plugin) stop() {
	if p.drv == nil {
		return
	}
	if err := p.drv.Stop(); err != nil {
		p.t.Errorf("plugin stop: %v", err)
	}
	p.drv = nil
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(fmt.Sprintf("must: %v", err))
	}
	return v
}

// TestDriverName: dratest, which cannot import this package, names the same driver.
func TestDriverName(t *testing.T) {
	if dratest.Driver != DriverName || dratest.ClaimUIDLabel != claimUIDLabel {
		t.Errorf("dratest names driver %q and label %q, the plugin %q and %q", dratest.Driver, dratest.ClaimUIDLabel, DriverName, claimUIDLabel)
	}
}
