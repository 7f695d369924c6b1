package host

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/mmiobroker/mmiobroker/internal/iommufd"
	"github.com/mmiobroker/mmiobroker/internal/kvm"
)

// sys returns the sysfs path of the parts.
func (p *Prober) sys(parts ...string) string {
	return filepath.Join(append([]string{p.opt.SysfsRoot}, parts...)...)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// inKernelNotHere explains a device node missing from the dev root although the kernel
// registered it (sysfs shows it): what to bind into a private /dev, and the device to allow.
func inKernelNotHere(node, sysPath, bind, allow string) string {
	return fmt.Sprintf("the kernel has it (%s exists) but %s is not in this process's /dev (a private /dev: bind it in, e.g. BindPaths=-%s and DeviceAllow=%s rw in the unit)",
		sysPath, node, bind, allow)
}

// vfio probes the group/container path.
func (p *Prober) vfio(devs []Device) Probe {
	pr := Probe{Name: ProbeVFIO}
	node := filepath.Join(p.opt.DevRoot, "vfio", "vfio")
	_, err := os.Stat(node)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		switch misc := p.sys("class", "misc", "vfio"); {
		case exists(misc):
			pr.Reason = node + ": " + inKernelNotHere(node, misc, filepath.Dir(node), node)
		case exists(p.sys("module", "vfio")):
			pr.Reason = "VFIO is loaded but has no container (" + node + "): the kernel is built without CONFIG_VFIO_CONTAINER; use the cdev path"
		default:
			pr.Reason = "VFIO is not loaded (no " + p.sys("module", "vfio") + "): modprobe vfio-pci"
		}
		pr.Err = err
		pr.Reason += errnoSuffix(err)
		return pr
	case err != nil:
		pr.Reason, pr.Err = err.Error()+errnoSuffix(err), err
		return pr
	}
	grouped := 0
	for _, d := range devs {
		if d.Err == nil && d.Mode == "group" {
			grouped++
		}
	}
	type1 := exists(p.sys("module", "vfio_iommu_type1"))
	if !type1 && grouped == 0 {
		pr.Value = node
		pr.Reason = "no type1 IOMMU backend for the container (" + p.sys("module", "vfio_iommu_type1") + " is missing): modprobe vfio_iommu_type1"
		return pr
	}
	pr.OK = true
	pr.Value = node
	if type1 {
		pr.Value += ", vfio_iommu_type1"
	}
	if grouped > 0 {
		pr.Value += fmt.Sprintf(", %d device(s) open in group mode", grouped)
	}
	return pr
}

// vfioCdev probes VFIO device cdevs.
func (p *Prober) vfioCdev(kc kconfig) Probe {
	pr := Probe{Name: ProbeVFIOCdev}
	// Every VFIO PCI driver registers a vfio-dev/vfioN device under the PCI device; with
	// CONFIG_VFIO_DEVICE_CDEV it has a "dev" attribute (pci.Device.CdevNode).
	entries, _ := filepath.Glob(p.sys("bus", "pci", "devices", "*", "vfio-dev", "vfio*"))
	slices.Sort(entries)
	var withDev, without []string
	firstDev := ""
	for _, e := range entries {
		if exists(filepath.Join(e, "dev")) {
			withDev = append(withDev, filepath.Base(e))
			if firstDev == "" {
				firstDev = filepath.Join(e, "dev")
			}
		} else {
			without = append(without, filepath.Base(e))
		}
	}
	dir := filepath.Join(p.opt.DevRoot, "vfio", "devices")
	switch {
	case len(withDev) > 0:
		var here []string
		for _, n := range withDev {
			if exists(filepath.Join(dir, n)) {
				here = append(here, n)
			}
		}
		if len(here) == 0 {
			pr.Reason = dir + ": " + inKernelNotHere(dir, firstDev, filepath.Dir(dir), "char-vfio-dev")
			return pr
		}
		pr.OK, pr.Value = true, dir+" ("+strings.Join(here, ", ")+")"
		return pr
	case len(without) > 0:
		pr.Reason = "VFIO devices (" + strings.Join(without, ", ") + ") have no cdev: the kernel is built without CONFIG_VFIO_DEVICE_CDEV (which needs CONFIG_IOMMUFD; Debian's stock kernel has neither); only the group path is available"
		return pr
	}
	switch v, known := kc.lookup("CONFIG_VFIO_DEVICE_CDEV"); {
	case known && v == "y":
		pr.OK, pr.Value = true, "CONFIG_VFIO_DEVICE_CDEV=y ("+kc.source()+"; no device is bound to a VFIO driver yet)"
	case known:
		pr.Reason = "the kernel is built without CONFIG_VFIO_DEVICE_CDEV (" + kc.source() + ")"
	case !exists(p.sys("module", "vfio")):
		pr.Reason = "VFIO is not loaded (no " + p.sys("module", "vfio") + "): modprobe vfio-pci"
	default:
		pr.Reason = "cannot tell: no PCI device is bound to a VFIO driver (none has a vfio-dev entry in sysfs) and there is no kernel config to read"
	}
	return pr
}

// iommufd opens <dev>/iommu.
func (p *Prober) iommufd() Probe {
	pr := Probe{Name: ProbeIOMMUFD}
	node := filepath.Join(p.opt.DevRoot, "iommu")
	fd, err := iommufd.Open(p.opt.DevRoot)
	if err == nil {
		fd.Close()
		pr.OK, pr.Value = true, node
		return pr
	}
	pr.Err = err
	if errors.Is(err, fs.ErrNotExist) {
		if misc := p.sys("class", "misc", "iommu"); exists(misc) {
			pr.Reason = node + ": " + inKernelNotHere(node, misc, node, node) + errnoSuffix(err)
		} else {
			pr.Reason = "no " + node + ": the kernel is built without CONFIG_IOMMUFD (as Debian's is): no cdev access path, and no importer for brokered dma-bufs" + errnoSuffix(err)
		}
		return pr
	}
	pr.Reason = err.Error() + errnoSuffix(err)
	return pr
}

// open returns the devices the daemon holds open.
func open(devs []Device) []Device {
	var o []Device
	for _, d := range devs {
		if d.Err == nil {
			o = append(o, d)
		}
	}
	return o
}

// dmaBufExport reports VFIO_DEVICE_FEATURE_DMA_BUF from the open devices, or the kernel
// config without one.
func (p *Prober) dmaBufExport(devs []Device, kc kconfig) Probe {
	pr := Probe{Name: ProbeDMABufExport}
	var yes, no []string
	var firstErr error
	for _, d := range open(devs) {
		if d.DMABuf == nil {
			yes = append(yes, d.BDF)
			continue
		}
		no = append(no, d.BDF+" cannot: "+d.DMABuf.Error())
		if firstErr == nil {
			firstErr = d.DMABuf
		}
	}
	switch {
	case len(yes) > 0:
		pr.OK, pr.Value = true, strings.Join(yes, ", ")
		if len(no) > 0 {
			pr.Value += "; " + strings.Join(no, "; ")
		}
		return pr
	case len(no) > 0:
		pr.Reason = "no open device can export: " + strings.Join(no, "; ")
		pr.Err = firstErr
		return pr
	}
	switch v, known := kc.lookup("CONFIG_VFIO_PCI_DMABUF"); {
	case known && v == "y":
		pr.OK, pr.Value = true, "CONFIG_VFIO_PCI_DMABUF=y ("+kc.source()+"; no open device to ask)"
	case known:
		pr.Reason = "the kernel is built without CONFIG_VFIO_PCI_DMABUF (" + kc.source() + "): it needs Linux 6.19+ with CONFIG_PCI_P2PDMA and CONFIG_DMA_SHARED_BUFFER"
	default:
		pr.Reason = "cannot tell: no configured device is open to ask (VFIO_DEVICE_FEATURE_DMA_BUF needs a VFIO device fd), and there is no kernel config to read"
	}
	return pr
}

// dmaBufRevoke reports per-buffer revoke from the open devices.
func dmaBufRevoke(devs []Device) Probe {
	pr := Probe{Name: ProbeDMABufRevoke}
	o := open(devs)
	var yes []string
	for _, d := range o {
		if d.RevokeBuffers {
			yes = append(yes, d.BDF)
		}
	}
	switch {
	case len(yes) > 0:
		pr.OK, pr.Value = true, strings.Join(yes, ", ")
	case len(o) == 0:
		pr.Reason = "cannot tell: no configured device is open to ask (the probe needs a VFIO device fd)"
	default:
		pr.Reason = "the kernel has no VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE (proposed in \"vfio/pci: DMABUF mmap and explicit revoke\", not in Linux 7.2): revoking one lease's dma-buf cycles its whole device, which reissues the device's other leases"
	}
	return pr
}

// p2pdmaSymbol is defined by drivers/pci/p2pdma.c, which only CONFIG_PCI_P2PDMA builds.
const p2pdmaSymbol = "pci_p2pdma_add_resource"

// p2pdma reports CONFIG_PCI_P2PDMA: from the kernel config, else from a device exporting
// dma-bufs, else from /proc/kallsyms.
func (p *Prober) p2pdma(kc kconfig, export Probe) Probe {
	pr := Probe{Name: ProbeP2PDMA}
	if v, known := kc.lookup("CONFIG_PCI_P2PDMA"); known {
		if v == "y" {
			pr.OK, pr.Value = true, "CONFIG_PCI_P2PDMA=y ("+kc.source()+")"
		} else {
			pr.Reason = "the kernel is built without CONFIG_PCI_P2PDMA (" + kc.source() + "): VFIO cannot export BARs as dma-bufs (CONFIG_VFIO_PCI_DMABUF depends on it)"
		}
		return pr
	}
	if export.OK {
		pr.OK, pr.Value = true, "implied by dma_buf_export (CONFIG_VFIO_PCI_DMABUF depends on CONFIG_PCI_P2PDMA)"
		return pr
	}
	syms := filepath.Join(p.opt.ProcRoot, "kallsyms")
	switch found, err := p.p2psyms(); {
	case found:
		pr.OK, pr.Value = true, p2pdmaSymbol+" in "+syms
	case err == nil:
		pr.Reason = "the kernel is built without CONFIG_PCI_P2PDMA (" + syms + " has no " + p2pdmaSymbol + ")"
	default:
		pr.Reason, pr.Err = "cannot tell: no kernel config to read, no device exporting dma-bufs, and "+err.Error()+errnoSuffix(err), err
	}
	return pr
}

// kvm probes KVM and returns its probes and VM types.
func (p *Prober) kvm() ([]Probe, []kvm.VMType) {
	facts, err := p.kvmCached()
	top := Probe{Name: ProbeKVM}
	if err == nil {
		top.OK = true
		top.Value = facts.Path + ", API " + strconv.Itoa(facts.APIVersion)
	} else {
		top.Err = err
		top.Reason = err.Error() + errnoSuffix(err)
		if errors.Is(err, fs.ErrNotExist) {
			if misc := p.sys("class", "misc", "kvm"); exists(misc) {
				top.Reason += "; but " + inKernelNotHere(facts.Path, misc, facts.Path, facts.Path)
			}
		}
	}
	probes := []Probe{top}
	for _, c := range facts.Checks {
		if c.Name == kvm.CheckOpen {
			continue // it is the kvm probe itself
		}
		pr := Probe{Name: kvmCheckNamePrefix + c.Name, OK: c.OK, Value: c.Value, Reason: c.Reason, Err: c.Err}
		if c.Err != nil {
			pr.Reason += errnoSuffix(c.Err)
		}
		probes = append(probes, pr)
	}
	if err != nil {
		return probes, nil
	}
	types := slices.Clone(facts.VMTypes)
	if types == nil {
		types = []kvm.VMType{kvm.KVM_X86_DEFAULT_VM}
	}
	return probes, types
}

// tsms reads /sys/class/tsm.
func (p *Prober) tsms() ([]TSM, Probe) {
	pr := Probe{Name: ProbeTSM}
	class := p.sys("class", "tsm")
	ents, err := os.ReadDir(class)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		pr.Reason = "no " + class + ": the kernel has no TSM core (CONFIG_TSM, Linux 6.19+; module tsm), so no TEE security manager is registered"
		return nil, pr
	case err != nil:
		pr.Reason, pr.Err = err.Error()+errnoSuffix(err), err
		return nil, pr
	}
	var tsms []TSM
	for _, e := range ents {
		t := TSM{Name: e.Name()}
		if parent, err := filepath.EvalSymlinks(filepath.Join(class, e.Name(), "device")); err == nil {
			t.Parent = filepath.Base(parent)
			if drv, err := os.Readlink(filepath.Join(parent, "driver")); err == nil {
				t.Driver = filepath.Base(drv)
			}
		}
		tsms = append(tsms, t)
	}
	if len(tsms) == 0 {
		pr.Reason = class + " is empty: no TEE security manager is registered (AMD SEV-TIO through ccp, the only host TSM in Linux 7.2, needs SEV-SNP firmware with TIO)"
		return nil, pr
	}
	p.tsmDevices(tsms)
	names := make([]string, len(tsms))
	for i, t := range tsms {
		names[i] = t.Name
	}
	pr.OK, pr.Value = true, strings.Join(names, ", ")
	return tsms, pr
}

// tsmDevices fills the TSMs' connected and bound PCI devices from every device's tsm/.
func (p *Prober) tsmDevices(tsms []TSM) {
	dirs, _ := filepath.Glob(p.sys("bus", "pci", "devices", "*", "tsm"))
	slices.Sort(dirs)
	read := func(path string) string {
		b, err := os.ReadFile(path)
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	for _, dir := range dirs {
		bdf := filepath.Base(filepath.Dir(dir))
		connect, bound := read(filepath.Join(dir, "connect")), read(filepath.Join(dir, "bound"))
		for i := range tsms {
			if connect == tsms[i].Name {
				tsms[i].Connected = append(tsms[i].Connected, bdf)
			}
			if bound == tsms[i].Name {
				tsms[i].Bound = append(tsms[i].Bound, bdf)
			}
		}
	}
}

// confidentialTypes are the VM types whose guests can own private (TDISP) MMIO: SEV-SNP
// with SEV-TIO, TDX with TDX Connect.
var confidentialTypes = []kvm.VMType{kvm.KVM_X86_SNP_VM, kvm.KVM_X86_TDX_VM}

// privateMMIO is the verdict on private MMIO for a confidential VM.
func privateMMIO(tsms []TSM, types []kvm.VMType, devs []Device) Probe {
	pr := Probe{Name: ProbePrivateMMIO}
	var missing []string
	if len(tsms) == 0 {
		missing = append(missing, "no TSM is registered")
	}
	var coco []string
	for _, t := range types {
		if slices.Contains(confidentialTypes, t) {
			coco = append(coco, t.String())
		}
	}
	if len(coco) == 0 {
		have := "KVM is not usable"
		if len(types) > 0 {
			names := make([]string, len(types))
			for i, t := range types {
				names[i] = t.String()
			}
			have = "KVM creates only " + strings.Join(names, ", ")
		}
		missing = append(missing, "no confidential VM type (snp or tdx): "+have)
	}
	var bound, unbound, unattested []string
	for _, d := range open(devs) {
		switch {
		case !d.Private:
		case d.TSMBound != "":
			bound = append(bound, d.BDF+" (bound to "+d.TSMBound+")")
		default:
			unbound = append(unbound, d.BDF+" ("+tsmState(d)+")")
			if d.Unattested {
				unattested = append(unattested, d.BDF)
			}
		}
	}
	if len(bound) == 0 {
		m := "no open device that allows private leases is TSM-bound"
		if len(unbound) > 0 {
			m += ": " + strings.Join(unbound, ", ")
		}
		if len(unattested) > 0 {
			m += "; " + strings.Join(unattested, ", ") + " grant(s) unattested private leases (test rigs only)"
		}
		missing = append(missing, m)
	}
	if len(missing) > 0 {
		pr.Reason = strings.Join(missing, "; ")
		return pr
	}
	pr.OK = true
	pr.Value = strings.Join(coco, ", ") + "; " + strings.Join(bound, ", ")
	return pr
}

func tsmState(d Device) string {
	switch {
	case d.TSMConnect != "":
		return "connected to " + d.TSMConnect + ", not bound"
	case d.TSMPresent:
		return "TSM-capable, not connected"
	}
	return "not TSM-capable"
}
