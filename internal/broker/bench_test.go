package broker_test

import (
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func benchBroker(b *testing.B) (*broker.Broker, *brokertest.Device) {
	dev := brokertest.NewDevice(dev0)
	br, err := broker.New(broker.Config{
		Devices: []broker.DeviceConfig{{BDF: dev0, UIDs: []uint32{1000}}},
		Limits:  broker.Limits{MaxLeasesPerHolder: 1 << 20, MaxLeases: 1 << 20},
	}, brokertest.Opener(dev), nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { br.Close() })
	return br, dev
}

func benchClaimed(b *testing.B, br *broker.Broker, proc *brokertest.Process, off uint64) broker.Lease {
	l, tok, err := br.Allocate(broker.AllocateRequest{BDF: dev0, BAR: 0,
		Ranges: []broker.Range{{Offset: off, Length: page}}, Holder: broker.Holder{UID: 1000, PID: proc.Pid, Proc: proc}})
	if err != nil {
		b.Fatal(err)
	}
	_, f, err := br.Claim(l.ID, tok, broker.Peer{UID: 1000, PID: proc.Pid})
	if err != nil {
		b.Fatal(err)
	}
	f.Close()
	return l
}

// BenchmarkRevoke measures RevokeLease on the fake device: end the lease, one device cycle,
// reissue one surviving lease. Compare with BenchmarkDeviceCycleBare, the fake cycle alone.
func BenchmarkRevoke(b *testing.B) {
	br, _ := benchBroker(b)
	benchClaimed(b, br, &brokertest.Process{Pid: 1}, 0) // the survivor each revoke reissues
	ds := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		l := benchClaimed(b, br, &brokertest.Process{Pid: 2}, page)
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

// BenchmarkDeviceCycleBare is the fake device's own revoke, the floor of BenchmarkRevoke.
func BenchmarkDeviceCycleBare(b *testing.B) {
	dev := brokertest.NewDevice(dev0)
	for i := 0; i < b.N; i++ {
		if err := dev.Revoke(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkHolderExit measures from the holder's exit (its pidfd becoming readable, here
// the fake process's exit) to the lease being released and its buffer revoked.
func BenchmarkHolderExit(b *testing.B) {
	br, _ := benchBroker(b)
	sub, err := br.Subscribe(0)
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Close()
	ds := make([]time.Duration, 0, b.N)
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		proc := &brokertest.Process{Pid: int32(10 + i)}
		l := benchClaimed(b, br, proc, 0)
		for len(sub.Events()) > 0 {
			<-sub.Events()
		}
		b.StartTimer()
		start := time.Now()
		proc.Exit()
		for e := range sub.Events() {
			if e.Lease.ID == l.ID && e.Type == broker.EventReleased {
				break
			}
		}
		ds = append(ds, time.Since(start))
	}
	b.StopTimer()
	testutil.ReportPercentiles(b, ds)
}
