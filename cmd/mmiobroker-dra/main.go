// Command mmiobroker-dra is mmiobroker's Kubernetes DRA kubelet plugin (driver
// mmio.mmiobroker.dev): it publishes the BARs mmiobrokerd leases as devices of the node's
// ResourceSlices and prepares ResourceClaims as leases delegated to the claim's pod, with
// a CDI spec that gives the pod's VMM the claim socket and the lease's claim token. It
// runs on every node as a DaemonSet (deploy/kubernetes) and talks to the daemon only over
// its control socket, as an admin. See docs/kubernetes.md; the logic is internal/dra.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/dra"
)

// partitionsFlag collects -partition values.
type partitionsFlag []dra.Partition

func (p *partitionsFlag) String() string {
	var s []string
	for _, x := range *p {
		s = append(s, x.String())
	}
	return strings.Join(s, ",")
}

func (p *partitionsFlag) Set(v string) error {
	x, err := dra.ParsePartition(v)
	if err != nil {
		return err
	}
	*p = append(*p, x)
	return nil
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "mmiobroker-dra:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("mmiobroker-dra", flag.ContinueOnError)
	var (
		parts         partitionsFlag
		nodeName      = fs.String("node-name", os.Getenv("NODE_NAME"), "this node's name (default $NODE_NAME, from the downward API)")
		nodeUID       = fs.String("node-uid", os.Getenv("NODE_UID"), "this node's uid (default $NODE_UID; empty: looked up)")
		control       = fs.String("control-socket", client.DefaultSocket, "mmiobrokerd's control socket")
		claimHost     = fs.String("claim-socket-host", client.DefaultClaimSocket, "the daemon's claim socket on the host, mounted into containers (empty: the path the daemon reports)")
		claimCtr      = fs.String("claim-socket-container", dra.DefaultContainerClaimSock, "where containers find the claim socket (MMIO_CLAIM_SOCKET)")
		cdiDir        = fs.String("cdi-dir", dra.DefaultCDIDir, "directory of the CDI spec files (the container runtime's CDI spec directory)")
		pluginDir     = fs.String("plugin-dir", "/var/lib/kubelet/plugins/"+dra.DriverName, "directory of the DRA gRPC socket")
		registrarDir  = fs.String("registrar-dir", "/var/lib/kubelet/plugins_registry", "the kubelet's plugin registration directory")
		sysfs         = fs.String("sysfs", "/sys", "the host's sysfs, for NUMA node and PCIe root (empty: leave those attributes out)")
		resync        = fs.Duration("resync", dra.DefaultResync, "how often the daemon's devices are listed besides its events")
		healthTimeout = fs.Duration("health-timeout", dra.DefaultHealthCheckTimeout, "how long the kubelet trusts a device health report (longer than -resync)")
		logLevel      = fs.String("log-level", "info", "debug, info, warn or error")
	)
	fs.Var(&parts, "partition", "BDF/BAR=N: publish the BAR as N devices of equal ranges instead of one (repeatable), e.g. 0000:3b:00.0/2=4")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("-log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	cfg, err := rest.InClusterConfig()
	if err != nil {
		return fmt.Errorf("kubernetes client (the plugin runs in a pod of its DaemonSet): %w", err)
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	opt := dra.Options{
		NodeName: *nodeName, NodeUID: types.UID(*nodeUID), Kube: kube,
		ControlSocket: *control, ClaimSocketHost: *claimHost, ClaimSocketContainer: *claimCtr,
		CDIDir: *cdiDir, PluginDataDir: *pluginDir, RegistrarDir: *registrarDir,
		Partitions: parts, Resync: *resync, HealthCheckTimeout: *healthTimeout, Log: log,
	}
	if *sysfs != "" {
		opt.SysFS = os.DirFS(*sysfs)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	d, err := dra.Start(ctx, opt)
	if err != nil {
		return err
	}
	log.Info("started", "driver", dra.DriverName, "node", *nodeName, "control_socket", *control)
	<-d.Done()
	start := time.Now()
	err = d.Stop()
	log.Info("stopped", "took", time.Since(start).String())
	if err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
