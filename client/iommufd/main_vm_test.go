//go:build vmtest

package iommufd_test

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/mmiobroker/mmiobroker/client/internal/fakedaemon"
	"github.com/mmiobroker/mmiobroker/client/iommufd"
)

// In the VM rig the examples of example_vm_test.go run for real: the kernel's iommufd
// maps the dma-bufs of a daemon that runs in this process on fake devices (its dma-bufs
// are memfds, which IOMMU_IOAS_MAP_FILE takes as well). On a kernel without iommufd they
// are skipped.
var (
	exampleDaemon *fakedaemon.Daemon
	controlSocket string // client.DefaultSocket on a real host
)

// exampleBDFs are the fake devices, one per example.
const (
	importBDF = "0000:3b:00.0"
	mapBDF    = "0000:3c:00.0"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(withExampleDaemon{m}) }

type withExampleDaemon struct{ m *testing.M }

func (w withExampleDaemon) Run() int {
	flag.Parse()
	if fd, err := iommufd.Open(""); err != nil {
		fmt.Fprintf(os.Stderr, "skipping the examples: %v\n", err)
		skip := "^Example"
		if cur := flag.Lookup("test.skip").Value.String(); cur != "" {
			skip = cur + "|" + skip
		}
		flag.Set("test.skip", skip)
	} else {
		fd.Close()
	}
	d, err := fakedaemon.Start(importBDF, mapBDF)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	exampleDaemon, controlSocket = d, d.Control
	code := w.m.Run()
	if err := d.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "example daemon:", err)
		return max(code, 1)
	}
	return code
}
