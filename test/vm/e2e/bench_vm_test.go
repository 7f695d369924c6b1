//go:build vmtest

package e2e

import (
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/hostdev"
	"github.com/mmiobroker/mmiobroker/internal/pci"
	"github.com/mmiobroker/mmiobroker/internal/peercred"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

// The benchmarks measure leasing and revocation on the real kernel, all in the same guest
// and on the same device and range (benchDevice's BAR benchBAR, its first benchLen bytes):
// a bare VFIO ioctl as the floor of any call into VFIO, the dma-buf export alone, a VMM
// opening the device and exporting itself, the brokered lease round trip (benchcmp_vm_test.go),
// the broker's RevokeLease path, holder-exit reclaim and the device cycle alone.
// `go run ./test/vm/cmd/rig bench` (part of `make bench`) runs them on both kernels and
// writes docs/benchmarks-vm.md; `make test` runs each once as a smoke test (test/vm's
// TestVM, MMIOBROKER_VM_BENCH). Under QEMU's software emulation absolute
// numbers are far slower than on hardware; the ratios are what to read.

// The device and range every benchmark here uses: the ivshmem device's 1 MiB BAR2, its
// first page.
const (
	benchDevice = "IVSHMEM"
	benchBAR    = 2
	benchLen    = 4096
)

func benchAddr(b *testing.B, name string) pci.Address {
	v := os.Getenv("MMIOBROKER_VM_" + name)
	a, err := pci.ParseAddress(v)
	if err != nil {
		b.Fatalf("MMIOBROKER_VM_%s=%q: %v (run in the rig)", name, v, err)
	}
	return a
}

// BenchmarkVMIoctlBare is one VFIO_DEVICE_GET_REGION_INFO on an open device: the cost of
// crossing into the kernel's VFIO code at all.
func BenchmarkVMIoctlBare(b *testing.B) {
	d, err := vfio.Open(benchAddr(b, benchDevice), vfio.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		if _, err := d.Region(benchBAR); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(start))
	}
	b.StopTimer()
	testutil.ReportPercentiles(b, ds)
}

// BenchmarkVMDeviceCycle is the kernel side of one revocation: memory decode off, device fd
// closed and reopened, memory decode on.
func BenchmarkVMDeviceCycle(b *testing.B) {
	d, err := hostdev.Open(benchAddr(b, benchDevice), hostdev.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		if err := d.Revoke(); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(start))
	}
	b.StopTimer()
	testutil.ReportPercentiles(b, ds)
}

func benchBroker(b *testing.B, bdf pci.Address) *broker.Broker {
	br, err := broker.New(broker.Config{
		Devices: []broker.DeviceConfig{{BDF: bdf.String()}},
		Limits:  broker.Limits{MaxLeasesPerHolder: 1 << 20, MaxLeases: 1 << 20},
	}, func(s string) (broker.Device, error) {
		a, err := pci.ParseAddress(s)
		if err != nil {
			return nil, err
		}
		return hostdev.Open(a, hostdev.Options{})
	}, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { br.Close() })
	return br
}

func benchLease(b *testing.B, br *broker.Broker, bdf pci.Address, off uint64, proc broker.Process, pid int32) broker.Lease {
	l, tok, err := br.Allocate(broker.AllocateRequest{BDF: bdf.String(), BAR: benchBAR, Admin: true,
		Ranges: []broker.Range{{Offset: off, Length: benchLen}}, Holder: broker.Holder{PID: pid, Proc: proc}})
	if err != nil {
		b.Fatal(err)
	}
	_, f, err := br.Claim(l.ID, tok, broker.Peer{PID: pid})
	if err != nil {
		b.Fatal(err)
	}
	f.Close()
	return l
}

// BenchmarkVMRevoke is RevokeLease in the broker on the real ivshmem device, with one
// surviving lease that is reissued: from the call until the revoked fd is dead for good
// and the survivor is re-exported.
func BenchmarkVMRevoke(b *testing.B) {
	bdf := benchAddr(b, benchDevice)
	br := benchBroker(b, bdf)
	self := int32(os.Getpid())
	benchLease(b, br, bdf, 0, nil, self)
	admin := broker.Actor{Admin: true}
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		l := benchLease(b, br, bdf, benchLen, nil, self)
		b.StartTimer()
		start := time.Now()
		if _, err := br.Revoke(l.ID, admin, 0); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(start))
	}
	b.StopTimer()
	testutil.ReportPercentiles(b, ds)
}

// BenchmarkVMHolderExit measures holder-death reclaim on the real kernel: a child process
// holds a claimed lease (pinned by its pidfd); from its SIGKILL until its lease is released
// and the device cycle that kills its dma-buf is done (the survivor's reissue event).
func BenchmarkVMHolderExit(b *testing.B) {
	bdf := benchAddr(b, benchDevice)
	br := benchBroker(b, bdf)
	self := int32(os.Getpid())
	survivor := benchLease(b, br, bdf, 0, nil, self)
	sub, err := br.Subscribe(0)
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Close()
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		child := exec.Command("sleep", "1000")
		if err := child.Start(); err != nil {
			b.Fatal(err)
		}
		pid := int32(child.Process.Pid)
		proc, err := peercred.Open(pid)
		if err != nil {
			b.Fatal(err)
		}
		benchLease(b, br, bdf, benchLen, proc, pid)
		for len(sub.Events()) > 0 {
			<-sub.Events()
		}
		b.StartTimer()
		start := time.Now()
		child.Process.Kill()
		for e := range sub.Events() {
			if e.Type == broker.EventReissued && e.Lease.ID == survivor.ID {
				break
			}
		}
		ds = append(ds, time.Since(start))
		b.StopTimer()
		child.Wait()
	}
	testutil.ReportPercentiles(b, ds)
}
