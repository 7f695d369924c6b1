package dra

import (
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strconv"
	"strings"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/dynamic-resource-allocation/deviceattribute"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

// DriverName is the DRA driver name: the domain of the driver's device attributes, the
// DeviceClasses' selector and the CDI vendor.
const DriverName = "mmio.mmiobroker.dev"

// pageSize is the granularity of lease ranges (AllocateLeaseRequest.ranges).
const pageSize = 4096

// maxDevicesPerSlice is the ResourceSlice limit on devices (without taints).
const maxDevicesPerSlice = 128

// Attribute names of the driver's domain (unqualified: they belong to [DriverName]). The
// standard resource.kubernetes.io/pciBusID, pcieRoot and numaNode come with them.
const (
	AttrVendorID          = "vendorID"          // int: PCI vendor id
	AttrDeviceID          = "deviceID"          // int: PCI device id
	AttrClassCode         = "classCode"         // int: 24-bit PCI class code
	AttrIOMMUGroup        = "iommuGroup"        // int; absent if the device has none
	AttrAccessMode        = "accessMode"        // string: "group" or "cdev"
	AttrBAR               = "bar"               // int: BAR index 0-5
	AttrBARSize           = "barSize"           // int: size of the whole BAR in bytes
	AttrOffset            = "offset"            // int: first byte of the device's range in the BAR
	AttrPartition         = "partition"         // int: index of the range, 0 for a whole BAR
	AttrPartitions        = "partitions"        // int: how many ranges the BAR is split into, 1 for a whole BAR
	AttrPrefetchable      = "prefetchable"      // bool
	AttrAddr64            = "addr64"            // bool: a 64-bit BAR
	AttrLeaseKindShared   = "leaseKindShared"   // bool: shared leases allowed
	AttrLeaseKindPrivate  = "leaseKindPrivate"  // bool: private leases allowed
	AttrUnattestedPrivate = "unattestedPrivate" // bool: private leases granted without TSM binding (test rigs)
	AttrTSMPresent        = "tsmPresent"        // bool: the kernel knows a TSM for the device
	AttrTSMConnected      = "tsmConnected"      // bool: SPDM session (and IDE) up
	AttrTSMBound          = "tsmBound"          // bool: the TDI is bound (TDISP LOCKED/RUN)
	// CapSize is the capacity of the device's range in bytes.
	CapSize = "size"
)

// Partition splits one BAR of one device into Count equal ranges, each published as a
// device of its own instead of the whole BAR.
type Partition struct {
	BDF   string
	BAR   int
	Count int
}

// String gives the flag form, BDF/BAR=COUNT.
func (p Partition) String() string { return fmt.Sprintf("%s/%d=%d", p.BDF, p.BAR, p.Count) }

// ParsePartition parses BDF/BAR=COUNT, e.g. 0000:3b:00.0/2=4: BAR 2 of 0000:3b:00.0 as
// four devices of a quarter each. COUNT is 1-64.
func ParsePartition(s string) (Partition, error) {
	where, count, ok := strings.Cut(s, "=")
	bdf, bar, ok2 := strings.Cut(where, "/")
	if !ok || !ok2 {
		return Partition{}, fmt.Errorf("partition %q: want BDF/BAR=COUNT, e.g. 0000:3b:00.0/2=4", s)
	}
	if _, err := deviceattribute.GetPCIBusIDAttribute(bdf); err != nil {
		return Partition{}, fmt.Errorf("partition %q: %w", s, err)
	}
	b, err := strconv.Atoi(bar)
	if err != nil || b < 0 || b > 5 {
		return Partition{}, fmt.Errorf("partition %q: BAR %q: want 0-5", s, bar)
	}
	n, err := strconv.Atoi(count)
	if err != nil || n < 1 || n > 64 {
		return Partition{}, fmt.Errorf("partition %q: count %q: want 1-64", s, count)
	}
	return Partition{BDF: bdf, BAR: b, Count: n}, nil
}

// partitions looks up the partitioning of (bdf, bar): 1 unless configured.
func partitions(parts []Partition, bdf string, bar int) int {
	for _, p := range parts {
		if p.BDF == bdf && p.BAR == bar {
			return p.Count
		}
	}
	return 1
}

// target is one DRA device: a range of a BAR.
type target struct {
	Name       string
	BDF        string
	BAR        int
	Partition  int
	Partitions int
	Offset     uint64
	Length     uint64
}

// DeviceName names the DRA device for partition part of count of a BAR: the BDF with
// "-" for ":" and ".", then "-barN", then "-pIofN" for a partition
// (0000:3b:00.0 BAR 2 → 0000-3b-00-0-bar2, its second quarter 0000-3b-00-0-bar2-p1of4).
func DeviceName(bdf string, bar, part, count int) string {
	name := strings.NewReplacer(":", "-", ".", "-").Replace(strings.ToLower(bdf)) + "-bar" + strconv.Itoa(bar)
	if count > 1 {
		name += fmt.Sprintf("-p%dof%d", part, count)
	}
	return name
}

// parseDeviceName reverses [DeviceName].
func parseDeviceName(name string) (bdf string, bar, part, count int, err error) {
	bad := func(why string) (string, int, int, int, error) {
		return "", 0, 0, 0, fmt.Errorf("device name %q: %s", name, why)
	}
	// dddd-bb-dd-f-barN[-pIofN]
	f := strings.Split(name, "-")
	if len(f) != 5 && len(f) != 6 {
		return bad("not a device of this driver")
	}
	bdf = f[0] + ":" + f[1] + ":" + f[2] + "." + f[3]
	if _, err := deviceattribute.GetPCIBusIDAttribute(bdf); err != nil {
		return bad("no PCI address")
	}
	b, ok := strings.CutPrefix(f[4], "bar")
	if bar, err = strconv.Atoi(b); !ok || err != nil || bar < 0 || bar > 5 || b != strconv.Itoa(bar) {
		return bad("no BAR index")
	}
	part, count = 0, 1
	if len(f) == 6 {
		i, n, ok := strings.Cut(strings.TrimPrefix(f[5], "p"), "of")
		p, err1 := strconv.Atoi(i)
		c, err2 := strconv.Atoi(n)
		if !ok || !strings.HasPrefix(f[5], "p") || err1 != nil || err2 != nil || c < 2 || p < 0 || p >= c ||
			f[5] != fmt.Sprintf("p%dof%d", p, c) {
			return bad("bad partition suffix")
		}
		part, count = p, c
	}
	return bdf, bar, part, count, nil
}

// leasableBAR reports whether bar of d may be leased by policy: a memory BAR listed in
// allowed_bars (or any memory BAR if the list is empty).
func leasableBAR(d *brokerv1.Device, b *brokerv1.Bar) bool {
	if !b.GetMem() || b.GetSize() == 0 {
		return false
	}
	allowed := d.GetPolicy().GetAllowedBars()
	return len(allowed) == 0 || slices.Contains(allowed, b.GetIndex())
}

// targets lists the DRA devices of a device's leasable BARs, whether or not the device
// can be leased now. A BAR that is not a whole number of pages has none (no range of it
// can be leased); a BAR whose configured partitioning does not split it into page-aligned
// ranges yields an error for that BAR and no targets.
func targets(d *brokerv1.Device, parts []Partition) ([]target, error) {
	var out []target
	var errs []error
	for _, b := range d.GetBars() {
		if !leasableBAR(d, b) {
			continue
		}
		bar := int(b.GetIndex())
		n := partitions(parts, d.GetBdf(), bar)
		size := b.GetSize()
		if n == 1 && size%pageSize != 0 {
			continue // smaller than a page or not page-sized: the daemon leases no range of it
		}
		if size%(uint64(n)*pageSize) != 0 {
			errs = append(errs, fmt.Errorf("device %s BAR %d (%d bytes) does not split into %d page-aligned ranges: its devices are not published",
				d.GetBdf(), bar, size, n))
			continue
		}
		for i := range n {
			out = append(out, target{
				Name: DeviceName(d.GetBdf(), bar, i, n), BDF: d.GetBdf(), BAR: bar,
				Partition: i, Partitions: n, Offset: uint64(i) * (size / uint64(n)), Length: size / uint64(n),
			})
		}
	}
	return out, errors.Join(errs...)
}

// leasable reports whether new leases of d can be granted now, and why not.
func leasable(d *brokerv1.Device) (bool, string) {
	switch {
	case !d.GetUsable():
		if e := d.GetError(); e != "" {
			return false, "not usable: " + e
		}
		return false, "not usable"
	case !d.GetDmaBufSupported():
		return false, "cannot export dma-bufs: " + d.GetDmaBufUnsupportedReason()
	case d.GetSuspended():
		return false, "suspended for maintenance"
	}
	return true, ""
}

// resourceDevice describes target t of d as a ResourceSlice device. sysfs, if not nil,
// is the host's /sys, for the NUMA node and PCIe root.
func resourceDevice(d *brokerv1.Device, t target, sysfs fs.FS) resourceapi.Device {
	attrs := map[resourceapi.QualifiedName]resourceapi.DeviceAttribute{}
	i := func(name string, v int64) {
		attrs[resourceapi.QualifiedName(name)] = resourceapi.DeviceAttribute{IntValue: &v}
	}
	b := func(name string, v bool) {
		attrs[resourceapi.QualifiedName(name)] = resourceapi.DeviceAttribute{BoolValue: &v}
	}
	s := func(name string, v string) {
		attrs[resourceapi.QualifiedName(name)] = resourceapi.DeviceAttribute{StringValue: &v}
	}

	bdf := t.BDF
	attrs[deviceattribute.StandardDeviceAttributePCIBusID] = resourceapi.DeviceAttribute{StringValue: &bdf}
	if sysfs != nil {
		if rfs, ok := sysfs.(fs.ReadLinkFS); ok {
			if a, err := deviceattribute.GetPCIeRootAttributeByPCIBusID(bdf, deviceattribute.WithFS(rfs)); err == nil {
				attrs[a.Name] = a.Value
			}
			if a, err := deviceattribute.GetNUMANodeAttributeByPCIBusID(bdf, deviceattribute.ScalarAttribute, deviceattribute.WithFS(rfs)); err == nil {
				attrs[a.Name] = a.Value
			}
		}
	}
	i(AttrVendorID, int64(d.GetVendorId()))
	i(AttrDeviceID, int64(d.GetDeviceId()))
	i(AttrClassCode, int64(d.GetClassCode()))
	if g := d.GetIommuGroup(); g >= 0 {
		i(AttrIOMMUGroup, int64(g))
	}
	switch d.GetAccessMode() {
	case brokerv1.AccessMode_ACCESS_MODE_GROUP:
		s(AttrAccessMode, "group")
	case brokerv1.AccessMode_ACCESS_MODE_CDEV:
		s(AttrAccessMode, "cdev")
	}
	var bar *brokerv1.Bar
	for _, x := range d.GetBars() {
		if int(x.GetIndex()) == t.BAR {
			bar = x
		}
	}
	i(AttrBAR, int64(t.BAR))
	i(AttrBARSize, int64(bar.GetSize()))
	i(AttrOffset, int64(t.Offset))
	i(AttrPartition, int64(t.Partition))
	i(AttrPartitions, int64(t.Partitions))
	b(AttrPrefetchable, bar.GetPrefetch())
	b(AttrAddr64, bar.GetAddr64())
	kinds := d.GetPolicy().GetAllowedKinds()
	b(AttrLeaseKindShared, len(kinds) == 0 || slices.Contains(kinds, brokerv1.LeaseKind_LEASE_KIND_SHARED))
	b(AttrLeaseKindPrivate, slices.Contains(kinds, brokerv1.LeaseKind_LEASE_KIND_PRIVATE))
	b(AttrUnattestedPrivate, d.GetPolicy().GetAllowUnattestedPrivate())
	b(AttrTSMPresent, d.GetTsm().GetPresent())
	b(AttrTSMConnected, d.GetTsm().GetConnect() != "")
	b(AttrTSMBound, d.GetTsm().GetBound() != "")
	return resourceapi.Device{
		Name:       t.Name,
		Attributes: attrs,
		Capacity: map[resourceapi.QualifiedName]resourceapi.DeviceCapacity{
			CapSize: {Value: *resource.NewQuantity(int64(t.Length), resource.BinarySI)},
		},
	}
}
