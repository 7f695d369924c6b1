package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/daemon"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
	"github.com/mmiobroker/mmiobroker/internal/vfio"
)

// FloorRequestSize is the size of a floor claim request.
const FloorRequestSize = 32

// floorReplySize is the size of the floor's reply: that of a claim reply for a 24-digit
// lease id on a 12-byte BDF, the daemon's usual reply.
const floorReplySize = fdpass.ReplyFixedSize + 24 + 12

// Profile labels: the daemon's goroutines carry role=daemon and the floor's role=floor
// (goroutines inherit the labels of the one that started them), so that a CPU profile of
// the daemon process can leave the floor out (go tool pprof -tagignore role=floor).
const (
	labelRole  = "role"
	roleDaemon = "daemon"
	roleFloor  = "floor"
)

// DaemonOptions are the daemon mode's settings.
type DaemonOptions struct {
	// Config is mmiobrokerd's configuration file; every [[device]] is a fake device.
	Config string
	// FloorGRPC and FloorClaim are the floor's socket paths.
	FloorGRPC, FloorClaim string
	// CPUProfile, if set, is where the process's CPU profile is written at exit.
	CPUProfile string
	// MemProfile, if set, is where the process's heap profile is written when it is told
	// to stop (SIGTERM), after a garbage collection, while the daemon still holds every
	// lease.
	MemProfile string
	// KeptDevices serves the fake devices of [keptOpener], which survive a restart of
	// the daemon process through the fd store, instead of brokertest's.
	KeptDevices bool
	// FDLimit is daemon.Options.FDLimit: the RLIMIT_NOFILE that the daemon's start-up
	// check of its fd budget assumes (0: the process's own). Only the scale scenario sets
	// it; see scaleFDLimit.
	FDLimit uint64
}

// RunDaemon runs the daemon as mmiobrokerd does (daemon.Run with the configuration file
// and the service manager of the environment, $NOTIFY_SOCKET and $FDSTORE) on fake
// devices, and the floor next to it, until ctx ends. The daemon logs to stderr. Unlike
// mmiobrokerd it does not listen to kernel uevents: fake devices have none.
func RunDaemon(ctx context.Context, o DaemonOptions, stderr io.Writer) (err error) {
	cfg, err := config.Load(o.Config)
	if err != nil {
		return err
	}
	res, err := cfg.Resolve(config.OSLookup())
	if err != nil {
		return err
	}
	bdfs := make([]string, len(res.Broker.Devices))
	devs := make([]*brokertest.Device, len(res.Broker.Devices))
	for i, d := range res.Broker.Devices {
		bdfs[i] = d.BDF
		devs[i] = brokertest.NewDevice(d.BDF)
	}
	opener := func(vfio.Keeper) broker.Opener { return brokertest.Opener(devs...) }
	if o.KeptDevices {
		opener = func(k vfio.Keeper) broker.Opener { return keptOpener(k, bdfs) }
	}
	// systemd sets LISTEN_PID to the pid of the service it passes fds to (a restart with
	// its fd store); the orchestrator cannot know that pid before it starts the process,
	// so the process names itself (systemdtest.Manager.Restart).
	if os.Getenv("LISTEN_FDS") != "" && os.Getenv("LISTEN_PID") == "" {
		os.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
	}
	if o.CPUProfile != "" {
		f, err := os.Create(o.CPUProfile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			return err
		}
		defer func() {
			pprof.StopCPUProfile()
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}()
	}
	log := cfg.Daemon.Logger(stderr)
	fl, err := startFloor(ctx, log, o.FloorGRPC, o.FloorClaim)
	if err != nil {
		return err
	}
	defer fl.stop()
	runCtx := ctx
	if o.MemProfile != "" {
		// A sample every 64 KiB allocated instead of 512 KiB: finer, for little cost.
		runtime.MemProfileRate = 64 << 10
		// Written when told to stop, before the daemon sees the stop (it runs until the
		// profile is written, every lease still in memory); not if it fails first.
		var stopRun context.CancelFunc
		runCtx, stopRun = context.WithCancel(context.WithoutCancel(ctx))
		profiled, finished := make(chan error, 1), make(chan struct{})
		go func() {
			defer stopRun()
			select {
			case <-ctx.Done():
				profiled <- writeHeapProfile(o.MemProfile)
			case <-finished:
				profiled <- nil
			}
		}()
		defer func() {
			close(finished)
			if perr := <-profiled; err == nil {
				err = perr
			}
		}()
	}
	pprof.Do(runCtx, pprof.Labels(labelRole, roleDaemon), func(ctx context.Context) {
		err = daemon.Run(ctx, daemon.Options{
			Config:   cfg,
			Resolved: res,
			Opener:   opener,
			Log:      log,
			FDLimit:  o.FDLimit,
			// As mmiobrokerd: its soft memory limit from the configuration.
			MemoryLimit: true,
		})
	})
	return err
}

// writeHeapProfile collects garbage and writes the heap profile to path. Twice: the first
// collection moves what sync.Pools hold (gRPC's and protobuf's buffers) to their victim
// caches, the second frees it, so that the profile shows what the daemon keeps.
func writeHeapProfile(path string) error {
	runtime.GC()
	runtime.GC()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	return errors.Join(pprof.Lookup("heap").WriteTo(f, 0), f.Close())
}

// floor is the bare counterpart of the daemon's two sockets.
type floor struct {
	log    *slog.Logger
	memfd  *os.File
	grpc   *grpc.Server
	claims *net.UnixListener
	reply  []byte
	wg     sync.WaitGroup
}

// startFloor serves the floor's gRPC server and claim socket at the two paths. It logs
// every floor claim it could not answer (as "floor claim dropped"): the client fails then.
func startFloor(ctx context.Context, log *slog.Logger, grpcPath, claimPath string) (*floor, error) {
	fd, err := unix.MemfdCreate("mmiobroker-bench-floor", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("memfd_create", err)
	}
	f := &floor{log: log, memfd: os.NewFile(uintptr(fd), "memfd:floor"), reply: make([]byte, floorReplySize)}
	if err := unix.Ftruncate(fd, 1<<16); err != nil {
		f.memfd.Close()
		return nil, os.NewSyscallError("ftruncate", err)
	}
	os.Remove(grpcPath)
	gl, err := net.Listen("unix", grpcPath)
	if err != nil {
		f.memfd.Close()
		return nil, fmt.Errorf("floor: %w", err)
	}
	os.Remove(claimPath)
	cl, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: claimPath, Net: "unixpacket"})
	if err != nil {
		gl.Close()
		f.memfd.Close()
		return nil, fmt.Errorf("floor: %w", err)
	}
	f.claims = cl
	f.grpc = grpc.NewServer()
	healthpb.RegisterHealthServer(f.grpc, health.NewServer())
	pprof.Do(ctx, pprof.Labels(labelRole, roleFloor), func(context.Context) {
		f.wg.Go(func() { f.grpc.Serve(gl) })
		f.wg.Go(f.serveClaims)
	})
	return f, nil
}

// serveClaims accepts floor claims until the listener is closed.
func (f *floor) serveClaims() {
	var conns sync.WaitGroup
	defer conns.Wait()
	for {
		c, err := f.claims.AcceptUnix()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// A client that gave up (ECONNABORTED) or a shortage (EMFILE): the client
			// waits in the backlog meanwhile.
			f.log.Warn("floor accept failed", "err", err)
			time.Sleep(time.Millisecond)
			continue
		}
		conns.Go(func() { f.handle(c) })
	}
}

// handle answers one floor claim: read the 32-byte request, send the reply with a dup of
// the memfd, close.
func (f *floor) handle(c *net.UnixConn) {
	defer c.Close()
	if err := f.answer(c); err != nil {
		f.log.Warn("floor claim dropped", "err", err)
	}
}

func (f *floor) answer(c *net.UnixConn) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var req [FloorRequestSize + 1]byte
	n, err := c.Read(req[:])
	if err != nil {
		return fmt.Errorf("read request: %w", err)
	}
	if n != FloorRequestSize {
		return fmt.Errorf("request of %d bytes, want %d", n, FloorRequestSize)
	}
	rc, err := f.memfd.SyscallConn()
	if err != nil {
		return err
	}
	var dup int
	var derr error
	if err := rc.Control(func(fd uintptr) { dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return err
	}
	if derr != nil {
		return os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", derr)
	}
	defer unix.Close(dup)
	if _, _, err := c.WriteMsgUnix(f.reply, unix.UnixRights(dup), nil); err != nil {
		return fmt.Errorf("send reply: %w", err)
	}
	return nil
}

// stop stops both servers, waits for them and closes the memfd.
func (f *floor) stop() {
	f.grpc.Stop()
	f.claims.Close()
	f.wg.Wait()
	f.memfd.Close()
}
