package host

import (
	"errors"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/kvm"
)

// Probe names, in the order [Prober.Report] reports them (see the package doc). The kvm
// checks follow ProbeKVM, named "kvm." and the check's name (kvm.CheckVMTypes, …).
const (
	ProbeVFIO         = "vfio"
	ProbeVFIOCdev     = "vfio_cdev"
	ProbeIOMMUFD      = "iommufd"
	ProbeDMABufExport = "dma_buf_export"
	ProbeDMABufRevoke = "dma_buf_revoke"
	ProbeP2PDMA       = "p2pdma"
	ProbeKVM          = "kvm"
	ProbeTSM          = "tsm"
	ProbePrivateMMIO  = "private_mmio"
)

// kvmCheckNamePrefix starts the names of the probes made from internal/kvm's checks.
const kvmCheckNamePrefix = ProbeKVM + "."

// DefaultKVMMaxAge is how long [Prober] reuses KVM's answers by default.
const DefaultKVMMaxAge = time.Minute

// Probe is the answer to one probe.
type Probe struct {
	// Name is one of the Probe* constants, or "kvm." and an internal/kvm check name.
	Name string
	// OK is true when the feature is present and usable by this process.
	OK bool
	// Value is what was found, readable: a device node, a kernel answer ("0x3 (default,
	// sw-protected)"), the devices that have the feature; empty when there was nothing.
	Value string
	// Reason says why OK is false, in a sentence an operator can act on; empty when OK.
	Reason string
	// Err is the error behind Reason when a syscall failed (errno kept); nil otherwise.
	Err error
}

// TSM is a TEE security manager registered with the kernel (/sys/class/tsm/tsmN).
type TSM struct {
	// Name is the class device's name, "tsm0".
	Name string
	// Parent is the device that registered it (the base name of its "device" link, e.g.
	// "0000:00:00.2" for AMD's PSP); "" if it has none.
	Parent string
	// Driver is the parent's driver ("ccp"); "" if unknown.
	Driver string
	// Connected lists the PCI devices connected to it (their tsm/connect names it: SPDM
	// session, possibly IDE, up), sorted.
	Connected []string
	// Bound lists the PCI devices whose TDI is bound to it (tsm/bound: LOCKED, RUN or
	// ERROR), sorted.
	Bound []string
}

// Device is what the daemon knows of one configured device, for the probes that need a
// VFIO device fd, which only the daemon (its broker) holds.
type Device struct {
	// BDF is the device's canonical PCI address.
	BDF string
	// Err is nil when the device is open, else why it is not; an unopened device answers
	// no probe.
	Err error
	// Mode is how it is open: "group" or "cdev".
	Mode string
	// DMABuf is nil when the device exports dma-bufs (VFIO_DEVICE_FEATURE_DMA_BUF), else why
	// it cannot.
	DMABuf error
	// RevokeBuffers reports per-buffer revoke (VFIO_DEVICE_FEATURE_DMA_BUF_REVOKE).
	RevokeBuffers bool
	// Private reports that its policy allows private leases; Unattested that it grants
	// them without a TSM binding (test rigs).
	Private, Unattested bool
	// TSMPresent, TSMConnect and TSMBound are its TSM state (pci.TSMState).
	TSMPresent           bool
	TSMConnect, TSMBound string
}

// Limits are the daemon's bounds, which it reports with the host; [Prober] leaves them
// zero and the daemon fills them in. Zero durations and counts mean what they mean in the
// daemon's configuration (docs/config.md): revoke at once, no interval, no budget, no
// minimum.
type Limits struct {
	// MaxLeases, MaxLeasesPerHolder (per tenant) and MaxRangesPerLease bound leases.
	MaxLeases, MaxLeasesPerHolder, MaxRangesPerLease int
	// ClaimTimeout is how long a claim token stays valid.
	ClaimTimeout time.Duration
	// RevokeWithin (R) and TenantCycleInterval (C) are the revocation bounds;
	// TenantCycleBudget bounds a tenant's on-demand device cycles per hour.
	RevokeWithin, TenantCycleInterval time.Duration
	TenantCycleBudget                 int
	// MinTTL is the shortest ttl a non-admin may ask for.
	MinTTL time.Duration
	// MaxConnections and MaxConnectionsPerTenant bound control socket connections;
	// MaxConcurrentClaims the claims served at once.
	MaxConnections, MaxConnectionsPerTenant, MaxConcurrentClaims int
	// FDLimit is RLIMIT_NOFILE; FDBudget the fds the configuration can need at most.
	FDLimit, FDBudget uint64
	// TenantsBy is how callers are grouped into tenants: "cgroup", "uid" or "label".
	TenantsBy string
}

// Report is what this host offers.
type Report struct {
	// KernelRelease is uname -r.
	KernelRelease string
	// Probes are the probes' answers, in the order of the Probe* constants.
	Probes []Probe
	// VMTypes are the VM types KVM_CREATE_VM accepts; nil without KVM. With KVM but without
	// KVM_CAP_VM_TYPES (before Linux 6.8, or not x86) it is the default type alone.
	VMTypes []kvm.VMType
	// TSMs are the registered TSMs, by name.
	TSMs []TSM
	// Limits are the daemon's (see [Limits]).
	Limits Limits
}

// Lookup returns the probe called name.
func (r Report) Lookup(name string) (Probe, bool) {
	for _, p := range r.Probes {
		if p.Name == name {
			return p, true
		}
	}
	return Probe{}, false
}

// Options locate what [Prober] reads. The zero value probes the real host.
type Options struct {
	// SysfsRoot is where sysfs is mounted; "" means "/sys".
	SysfsRoot string
	// DevRoot is where the device nodes live (vfio/, iommu, kvm); "" means "/dev".
	DevRoot string
	// ProcRoot is where procfs is mounted (config.gz, kallsyms); "" means "/proc".
	ProcRoot string
	// BootDir holds config-<release>; "" means "/boot".
	BootDir string
	// Uname returns the kernel release; nil means uname(2).
	Uname func() (string, error)
	// ProbeKVM probes the KVM device node at path; nil means kvm.Probe. Tests replace it.
	ProbeKVM func(path string) (kvm.Facts, error)
	// KVMMaxAge is how long KVM's answers are reused before KVM is probed again (each
	// probe creates and destroys a VM); 0 means DefaultKVMMaxAge, negative: never reused.
	KVMMaxAge time.Duration
}

// Prober makes the probes. It caches what cannot change while the kernel runs (its
// config, its symbols) and KVM's answers for Options.KVMMaxAge. It is safe for concurrent
// use; reports are made one at a time, so however many callers ask, probing holds only a
// few fds open at once.
type Prober struct {
	opt     Options
	kconfig func() kconfig
	p2psyms func() (bool, error)

	mu       sync.Mutex // held for a whole report
	kvmFacts kvm.Facts  // guarded by mu
	kvmErr   error      // guarded by mu
	kvmAt    time.Time  // guarded by mu; zero: never probed
}

// New returns a Prober of the host opt locates.
func New(opt Options) *Prober {
	if opt.SysfsRoot == "" {
		opt.SysfsRoot = "/sys"
	}
	if opt.DevRoot == "" {
		opt.DevRoot = "/dev"
	}
	if opt.ProcRoot == "" {
		opt.ProcRoot = "/proc"
	}
	if opt.BootDir == "" {
		opt.BootDir = "/boot"
	}
	if opt.Uname == nil {
		opt.Uname = uname
	}
	if opt.ProbeKVM == nil {
		opt.ProbeKVM = kvm.Probe
	}
	if opt.KVMMaxAge == 0 {
		opt.KVMMaxAge = DefaultKVMMaxAge
	}
	p := &Prober{opt: opt}
	p.kconfig = sync.OnceValue(func() kconfig {
		rel, _ := opt.Uname()
		return readKconfig(opt.ProcRoot, opt.BootDir, rel)
	})
	p.p2psyms = sync.OnceValues(func() (bool, error) {
		return hasSymbol(filepath.Join(opt.ProcRoot, "kallsyms"), p2pdmaSymbol)
	})
	return p
}

// Report probes the host. devs are the configured devices as the daemon holds them (nil
// if none). It never fails: what could not be probed is a probe that is absent, with why.
func (p *Prober) Report(devs []Device) Report {
	p.mu.Lock()
	defer p.mu.Unlock()
	var r Report
	rel, err := p.opt.Uname()
	if err == nil {
		r.KernelRelease = rel
	}
	kc := p.kconfig()
	r.Probes = append(r.Probes, p.vfio(devs), p.vfioCdev(kc), p.iommufd())
	export := p.dmaBufExport(devs, kc)
	r.Probes = append(r.Probes, export, dmaBufRevoke(devs), p.p2pdma(kc, export))
	kvmProbes, types := p.kvm()
	r.VMTypes = types
	r.Probes = append(r.Probes, kvmProbes...)
	tsms, tsmProbe := p.tsms()
	r.TSMs = tsms
	r.Probes = append(r.Probes, tsmProbe, privateMMIO(tsms, types, devs))
	return r
}

// kvmCached returns KVM's facts, probing again once they are older than KVMMaxAge.
// p.mu is held.
func (p *Prober) kvmCached() (kvm.Facts, error) {
	if p.kvmAt.IsZero() || time.Since(p.kvmAt) >= p.opt.KVMMaxAge {
		p.kvmFacts, p.kvmErr = p.opt.ProbeKVM(filepath.Join(p.opt.DevRoot, "kvm"))
		p.kvmAt = time.Now()
	}
	return p.kvmFacts, p.kvmErr
}

func uname() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return unix.ByteSliceToString(u.Release[:]), nil
}

// errnoSuffix returns " (ENAME)" for the errno in err's chain, "" if there is none.
func errnoSuffix(err error) string {
	var errno unix.Errno
	if !errors.As(err, &errno) {
		return ""
	}
	if n := unix.ErrnoName(errno); n != "" {
		return " (" + n + ")"
	}
	return ""
}
