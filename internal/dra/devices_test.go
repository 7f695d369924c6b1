package dra

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/dra/dratest"
)

func TestDeviceNames(t *testing.T) {
	for _, c := range []struct {
		bdf              string
		bar, part, count int
		name             string
	}{
		{"0000:3b:00.0", 2, 0, 1, "0000-3b-00-0-bar2"},
		{"0000:3B:1f.7", 0, 0, 1, "0000-3b-1f-7-bar0"},
		{"abcd:00:03.0", 4, 3, 4, "abcd-00-03-0-bar4-p3of4"},
	} {
		if got := DeviceName(c.bdf, c.bar, c.part, c.count); got != c.name {
			t.Errorf("DeviceName(%s, %d, %d, %d) = %s, want %s", c.bdf, c.bar, c.part, c.count, got, c.name)
		}
		bdf, bar, part, count, err := parseDeviceName(c.name)
		if err != nil || bdf != strings.ToLower(c.bdf) || bar != c.bar || part != c.part || count != c.count {
			t.Errorf("parseDeviceName(%s) = %s %d %d %d %v", c.name, bdf, bar, part, count, err)
		}
	}
	for _, bad := range []string{"", "gpu-0", "0000-3b-00-0-bar6", "0000-3b-00-0-bar02", "0000-3b-00-0-bar2-p4of4",
		"0000-3b-00-0-bar2-p0of1", "0000-3b-00-0-bar2-p01of4", "0000-3b-00-0-bar2-x", "0000-zz-00-0-bar2", "0000-3b-00-0-0-bar2"} {
		if _, _, _, _, err := parseDeviceName(bad); err == nil {
			t.Errorf("parseDeviceName(%q) accepted", bad)
		}
	}
}

// FuzzParseDeviceName: every name parseDeviceName accepts is the one DeviceName gives.
func FuzzParseDeviceName(f *testing.F) {
	for _, s := range []string{"0000-3b-00-0-bar2", "abcd-00-03-0-bar4-p3of4", "0000-3b-00-0-bar2-p1of2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		bdf, bar, part, count, err := parseDeviceName(name)
		if err != nil {
			return
		}
		if back := DeviceName(bdf, bar, part, count); back != name {
			t.Errorf("parseDeviceName(%q) = %s %d %d %d, which DeviceName names %q", name, bdf, bar, part, count, back)
		}
	})
}

func TestParsePartition(t *testing.T) {
	p, err := ParsePartition("0000:3b:00.0/2=4")
	if err != nil || p != (Partition{BDF: "0000:3b:00.0", BAR: 2, Count: 4}) || p.String() != "0000:3b:00.0/2=4" {
		t.Errorf("ParsePartition: %v, %v", p, err)
	}
	for _, bad := range []string{"", "0000:3b:00.0", "0000:3b:00.0/2", "0000:3b:00.0=4", "3b:00.0/2=4", "0000:3b:00.0/6=4",
		"0000:3b:00.0/2=0", "0000:3b:00.0/2=65", "0000:3b:00.0/x=4", "0000:3b:00.0/2=four"} {
		if _, err := ParsePartition(bad); err == nil {
			t.Errorf("ParsePartition(%q) accepted", bad)
		}
	}
}

func TestTargets(t *testing.T) {
	d := &brokerv1.Device{Bdf: "0000:3b:00.0", Bars: []*brokerv1.Bar{
		{Index: 0, Size: 1 << 20, Mem: true},
		{Index: 1, Size: 256, Mem: true},     // smaller than a page: no device
		{Index: 2, Size: 32},                 // I/O BAR: no device
		{Index: 3, Size: 3 << 12, Mem: true}, // three pages: does not split in two
		{Index: 4, Size: 16 << 20, Mem: true},
	}}
	ts, err := targets(d, []Partition{{BDF: "0000:3b:00.0", BAR: 4, Count: 2}, {BDF: "0000:3b:00.0", BAR: 3, Count: 2}})
	if err == nil || !strings.Contains(err.Error(), "BAR 3") {
		t.Errorf("targets: error %v, want one about BAR 3", err)
	}
	want := []target{
		{Name: "0000-3b-00-0-bar0", BDF: "0000:3b:00.0", BAR: 0, Partitions: 1, Length: 1 << 20},
		{Name: "0000-3b-00-0-bar4-p0of2", BDF: "0000:3b:00.0", BAR: 4, Partition: 0, Partitions: 2, Length: 8 << 20},
		{Name: "0000-3b-00-0-bar4-p1of2", BDF: "0000:3b:00.0", BAR: 4, Partition: 1, Partitions: 2, Offset: 8 << 20, Length: 8 << 20},
	}
	if diff := cmp.Diff(want, ts); diff != "" {
		t.Errorf("targets (-want +got):\n%s", diff)
	}
	// The policy's allowed BARs.
	d.Policy = &brokerv1.DevicePolicy{AllowedBars: []uint32{0}}
	if ts, err := targets(d, nil); err != nil || len(ts) != 1 || ts[0].BAR != 0 {
		t.Errorf("targets of a device allowing BAR 0 only: %v, %v", ts, err)
	}
}

func TestOptions(t *testing.T) {
	base := func() Options {
		return Options{NodeName: "n", Kube: dratest.NewKube(t), ControlSocket: "/run/x.sock"}
	}
	o := base()
	if err := o.setDefaults(); err != nil || o.CDIDir != DefaultCDIDir || o.ClaimSocketContainer != DefaultContainerClaimSock ||
		o.Resync != DefaultResync || o.HealthCheckTimeout != DefaultHealthCheckTimeout {
		t.Errorf("defaults: %+v, %v", o, err)
	}
	for name, f := range map[string]func(*Options){
		"no node":           func(o *Options) { o.NodeName = "" },
		"no client":         func(o *Options) { o.Kube = nil },
		"no control socket": func(o *Options) { o.ControlSocket = "" },
		"relative socket":   func(o *Options) { o.ClaimSocketContainer = "fd.sock" },
		"resync too long":   func(o *Options) { o.Resync = time.Minute },
		"resync too short":  func(o *Options) { o.Resync = time.Microsecond },
		"partition twice":   func(o *Options) { o.Partitions = []Partition{{"0000:3b:00.0", 2, 2}, {"0000:3b:00.0", 2, 4}} },
		"partition count 0": func(o *Options) { o.Partitions = []Partition{{"0000:3b:00.0", 2, 0}} },
	} {
		o := base()
		f(&o)
		if err := o.setDefaults(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
