package dra

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2"

	"github.com/mmiobroker/mmiobroker/client"
)

// Defaults of [Options].
const (
	DefaultCDIDir             = "/var/run/cdi"
	DefaultContainerClaimSock = "/run/mmiobroker/fd.sock"
	DefaultResync             = 10 * time.Second
	DefaultHealthCheckTimeout = 30 * time.Second
)

// Labels of the leases the plugin allocates: the claim's uid (what ListLeases finds a
// claim's leases by), the request and DRA device each lease is for, and the claim's
// namespace/name for people.
const (
	claimUIDLabel = "resource.kubernetes.io/claim-uid"
	requestLabel  = DriverName + "/request"
	deviceLabel   = DriverName + "/device"
	claimLabel    = DriverName + "/claim"
)

const (
	brokerCallTimeout       = 30 * time.Second // one call to the daemon
	minResync               = 10 * time.Millisecond
	watchRetry              = time.Second      // between event streams
	releaseOnFailureTimeout = 10 * time.Second // undoing a failed prepare
	maxLeasesListedPerClaim = 10000
	maxVMNameBytes          = 64 // AllocateLeaseRequest.vm_name
)

// Options configure a [Driver].
type Options struct {
	// NodeName is the node the plugin runs on (required): its ResourceSlices' node and
	// pool name.
	NodeName string
	// NodeUID is the Node object's uid; empty: looked up once.
	NodeUID types.UID
	// Kube is the API server client (required): ResourceClaims are read and
	// ResourceSlices written through it.
	Kube kubernetes.Interface
	// ControlSocket is mmiobrokerd's control socket (required; client.DefaultSocket on a
	// real node). The plugin must be an admin of the daemon.
	ControlSocket string
	// ClaimSocketHost is the daemon's claim socket on the host, the source of the CDI
	// mount; empty: the path the daemon reports in AllocateLease (a prepare that
	// allocates nothing, after a restart and without its spec file, then fails).
	ClaimSocketHost string
	// ClaimSocketContainer is where containers find the claim socket (MMIO_CLAIM_SOCKET);
	// empty: [DefaultContainerClaimSock].
	ClaimSocketContainer string
	// CDIDir is where the CDI spec files are written; empty: [DefaultCDIDir].
	CDIDir string
	// PluginDataDir holds the DRA gRPC socket (dra.sock); empty:
	// /var/lib/kubelet/plugins/mmio.mmiobroker.dev.
	PluginDataDir string
	// RegistrarDir is the kubelet's plugin registration directory; empty:
	// /var/lib/kubelet/plugins_registry.
	RegistrarDir string
	// Partitions split BARs into equal ranges, each a device of its own.
	Partitions []Partition
	// Resync is how often the devices are listed again besides the daemon's events;
	// 0: [DefaultResync].
	Resync time.Duration
	// HealthCheckTimeout is how long the kubelet trusts a health report; 0:
	// [DefaultHealthCheckTimeout]. Reports are re-sent every Resync, which must be shorter.
	HealthCheckTimeout time.Duration
	// SysFS is the host's /sys, read for the NUMA node and PCIe root of each device (the
	// daemon does not report them); nil leaves those attributes out.
	SysFS fs.FS
	// Log receives the plugin's log (and the Kubernetes helpers' through logr); nil
	// discards.
	Log *slog.Logger
}

func (o *Options) setDefaults() error {
	if o.NodeName == "" {
		return errors.New("dra: NodeName is required")
	}
	if o.Kube == nil {
		return errors.New("dra: Kube is required")
	}
	if o.ControlSocket == "" {
		return errors.New("dra: ControlSocket is required")
	}
	if o.ClaimSocketContainer == "" {
		o.ClaimSocketContainer = DefaultContainerClaimSock
	}
	if !filepath.IsAbs(o.ClaimSocketContainer) || (o.ClaimSocketHost != "" && !filepath.IsAbs(o.ClaimSocketHost)) {
		return fmt.Errorf("dra: claim socket paths must be absolute (host %q, container %q)", o.ClaimSocketHost, o.ClaimSocketContainer)
	}
	if o.CDIDir == "" {
		o.CDIDir = DefaultCDIDir
	}
	if o.PluginDataDir == "" {
		o.PluginDataDir = filepath.Join(kubeletplugin.KubeletPluginsDir, DriverName)
	}
	if o.RegistrarDir == "" {
		o.RegistrarDir = kubeletplugin.KubeletRegistryDir
	}
	if o.Resync == 0 {
		o.Resync = DefaultResync
	}
	if o.HealthCheckTimeout == 0 {
		o.HealthCheckTimeout = DefaultHealthCheckTimeout
	}
	if o.Resync < minResync || o.Resync >= o.HealthCheckTimeout {
		return fmt.Errorf("dra: resync %v must be at least %v and shorter than the health check timeout %v", o.Resync, minResync, o.HealthCheckTimeout)
	}
	seen := map[string]bool{}
	for _, p := range o.Partitions {
		k := fmt.Sprintf("%s/%d", p.BDF, p.BAR)
		if seen[k] {
			return fmt.Errorf("dra: partition of %s given twice", k)
		}
		seen[k] = true
		if p.Count < 1 || p.Count > 64 {
			return fmt.Errorf("dra: partition %s: count must be 1-64", p)
		}
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Driver is the running plugin: the kubelet's registration and DRA services, and the
// ResourceSlice publication.
type Driver struct {
	opt    Options
	log    *slog.Logger
	broker *client.Client
	helper *kubeletplugin.Helper

	ctx    context.Context
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup

	mu          sync.Mutex
	synced      bool                                  // guarded by mu: a device list has been published
	health      map[string]kubeletplugin.DeviceHealth // guarded by mu: every device ever listed, by name
	changed     chan struct{}                         // guarded by mu: closed when health changes
	published   string                                // guarded by mu: fingerprint of the published devices
	failure     error                                 // guarded by mu: why the driver stopped by itself
	claimSocket string                                // guarded by mu: the claim socket the daemon last reported
}

// Start connects to the daemon, starts the kubelet plugin helper (registration socket,
// DRA gRPC socket) and the ResourceSlice publication, and returns. The driver runs until
// ctx ends, [Driver.Stop] is called or a fatal error stops it ([Driver.Done]).
func Start(ctx context.Context, opt Options) (*Driver, error) {
	if err := opt.setDefaults(); err != nil {
		return nil, err
	}
	bc, err := client.Dial(opt.ControlSocket)
	if err != nil {
		return nil, fmt.Errorf("dra: %w", err)
	}
	d := &Driver{opt: opt, log: opt.Log, broker: bc,
		health: map[string]kubeletplugin.DeviceHealth{}, changed: make(chan struct{})}
	d.ctx, d.cancel = context.WithCancelCause(ctx)
	hctx := klog.NewContext(d.ctx, logr.FromSlogHandler(opt.Log.Handler()))
	helper, err := kubeletplugin.Start(hctx, d,
		kubeletplugin.DriverName(DriverName),
		kubeletplugin.KubeClient(opt.Kube),
		kubeletplugin.NodeName(opt.NodeName),
		kubeletplugin.NodeUID(opt.NodeUID),
		kubeletplugin.PluginDataDirectoryPath(opt.PluginDataDir),
		kubeletplugin.RegistrarDirectoryPath(opt.RegistrarDir),
	)
	if err != nil {
		d.cancel(err)
		bc.Close()
		return nil, fmt.Errorf("dra: kubelet plugin: %w", err)
	}
	d.helper = helper
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		d.publishLoop(d.ctx)
	}()
	return d, nil
}

// Stop stops the driver and waits for it: the sockets are removed, the publication
// stops. ResourceSlices stay as published (a restarted plugin takes them over; the
// kubelet deletes a node's slices when its plugin unregisters for good). Leases and CDI
// files stay: they belong to prepared claims. It returns the error that stopped the
// driver by itself, if any. Stop is idempotent.
func (d *Driver) Stop() error {
	d.cancel(errors.New("dra: driver stopped"))
	d.helper.Stop()
	d.wg.Wait()
	d.broker.Close()
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.failure
}

// Done is closed when the driver stops, by [Driver.Stop], its context or a fatal error.
func (d *Driver) Done() <-chan struct{} { return d.ctx.Done() }

// HandleError implements [kubeletplugin.DRAPlugin]: background errors of the helper
// (publishing ResourceSlices, its gRPC servers) are logged; a fatal one stops the driver.
func (d *Driver) HandleError(ctx context.Context, err error, msg string) {
	if errors.Is(err, kubeletplugin.ErrRecoverable) {
		d.log.Warn(msg, "err", err)
		return
	}
	d.log.Error(msg+": stopping", "err", err)
	d.mu.Lock()
	if d.failure == nil {
		d.failure = fmt.Errorf("%s: %w", msg, err)
	}
	d.mu.Unlock()
	d.cancel(err)
}

// callCtx bounds one call to the daemon.
func callCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, brokerCallTimeout)
}
