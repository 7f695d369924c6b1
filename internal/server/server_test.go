package server

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/descriptorpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func TestHealth(t *testing.T) {
	e := newEnv(t)
	h := healthpb.NewHealthClient(e.conn)
	for _, svc := range []string{"", "mmiobroker.v1.Broker"} {
		resp, err := h.Check(stranger.ctx(t), &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("Check(%q) = %v, %v; want SERVING", svc, resp, err)
		}
	}
	_, err := h.Check(t.Context(), &healthpb.HealthCheckRequest{Service: "nope.v1.Nope"})
	wantCode(t, err, codes.NotFound)

	// Stop turns the health NOT_SERVING before it waits for RPCs such as this watch.
	ctx, cancel := context.WithCancel(t.Context())
	w, err := h.Watch(ctx, &healthpb.HealthCheckRequest{Service: "mmiobroker.v1.Broker"})
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := w.Recv(); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Watch = %v, %v; want SERVING", resp, err)
	}
	stopped := make(chan error)
	go func() { stopped <- e.srv.Stop(ctx) }()
	if resp, err := w.Recv(); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("Watch after Stop = %v, %v; want NOT_SERVING", resp, err)
	}
	cancel() // the health watch would hold a graceful stop forever: cut it off
	if err := <-stopped; !errors.Is(err, context.Canceled) {
		t.Errorf("Stop = %v, want context.Canceled (it had to cut the watch off)", err)
	}
	if err := <-e.served; err != nil {
		t.Errorf("Serve after Stop = %v", err)
	}
	e.stopped = true
}

func TestReflection(t *testing.T) {
	e := newEnv(t)
	s, err := reflectionpb.NewServerReflectionClient(e.conn).ServerReflectionInfo(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer s.CloseSend()
	ask := func(req *reflectionpb.ServerReflectionRequest) *reflectionpb.ServerReflectionResponse {
		t.Helper()
		if err := s.Send(req); err != nil {
			t.Fatal(err)
		}
		resp, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}

	resp := ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}})
	var names []string
	for _, svc := range resp.GetListServicesResponse().GetService() {
		names = append(names, svc.GetName())
	}
	slices.Sort(names)
	want := []string{"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection", "mmiobroker.v1.Broker"}
	if diff := cmp.Diff(want, names); diff != "" {
		t.Errorf("services (-want +got):\n%s", diff)
	}

	// The service's file describes every method, as grpcurl describe shows them.
	resp = ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "mmiobroker.v1.Broker"}})
	var methods []string
	for _, raw := range resp.GetFileDescriptorResponse().GetFileDescriptorProto() {
		var fd descriptorpb.FileDescriptorProto
		if err := proto.Unmarshal(raw, &fd); err != nil {
			t.Fatal(err)
		}
		if fd.GetName() != "mmiobroker/v1/broker.proto" {
			continue
		}
		for _, m := range fd.GetService()[0].GetMethod() {
			methods = append(methods, m.GetName())
		}
	}
	wantMethods := []string{"ListDevices", "GetDevice", "GetHost", "AllocateLease", "GetLease", "ScanHolders", "ListLeases", "RevokeLease", "ReleaseLease", "WatchEvents",
		"RenewLease", "SuspendDevice", "ResumeDevice", "CycleDevice", "Drain"}
	if diff := cmp.Diff(wantMethods, methods); diff != "" {
		t.Errorf("methods (-want +got):\n%s", diff)
	}
}

// TestRealPeerCredentials runs without the test identity override: the caller is this
// process as the kernel reports it.
func TestRealPeerCredentials(t *testing.T) {
	e := newEnv(t, func(o *envOptions) { o.identify = IdentifyPeer })
	resp, err := e.client.AllocateLease(t.Context(), oneRange(bdfA, 0, 0, page(1)))
	if err != nil {
		t.Fatal(err)
	}
	h := resp.GetLease().GetHolder()
	if h.GetUid() != uint32(os.Getuid()) || h.GetPid() != int32(os.Getpid()) {
		t.Errorf("holder = %v, want uid %d pid %d", h, os.Getuid(), os.Getpid())
	}
	// The broker pinned this (live) process: the claim goes through.
	e.claim(resp.GetLease(), resp.GetClaimToken())

	// Admin rights follow the real uid.
	_, err = e.client.RevokeLease(t.Context(), &brokerv1.RevokeLeaseRequest{LeaseId: resp.GetLease().GetId()})
	if os.Getuid() == 0 {
		if err != nil {
			t.Errorf("RevokeLease as root: %v", err)
		}
	} else {
		wantCode(t, err, codes.PermissionDenied, "is not an admin")
	}
}

func TestIdentifyPeerWithoutPeerCredentials(t *testing.T) {
	_, err := IdentifyPeer(context.Background())
	wantCode(t, err, codes.Unauthenticated, "no peer credentials")
}

func TestUnauthenticated(t *testing.T) {
	e := newEnv(t)
	ctx := metadata.AppendToOutgoingContext(t.Context(), "x-test-deny", "1")
	_, err := e.client.ListDevices(ctx, &brokerv1.ListDevicesRequest{})
	wantCode(t, err, codes.Unauthenticated, "test identity refused")
	s, err := e.client.WatchEvents(ctx, &brokerv1.WatchEventsRequest{})
	if err == nil {
		_, err = s.Recv()
	}
	wantCode(t, err, codes.Unauthenticated, "test identity refused")
	if _, err := healthpb.NewHealthClient(e.conn).Check(ctx, &healthpb.HealthCheckRequest{}); err == nil {
		t.Error("health Check with a refused identity succeeded")
	}
}

func TestPanicRecovery(t *testing.T) {
	e := newEnv(t)
	ctx := metadata.AppendToOutgoingContext(t.Context(), "x-test-panic", "1")
	_, err := e.client.ListDevices(ctx, &brokerv1.ListDevicesRequest{})
	wantCode(t, err, codes.Internal, "internal error in /mmiobroker.v1.Broker/ListDevices")
	s, err := e.client.WatchEvents(ctx, &brokerv1.WatchEventsRequest{})
	if err == nil {
		_, err = s.Recv()
	}
	wantCode(t, err, codes.Internal, "internal error in /mmiobroker.v1.Broker/WatchEvents")
	// The server lives on.
	if _, err := e.client.ListDevices(holder.ctx(t), &brokerv1.ListDevicesRequest{}); err != nil {
		t.Fatalf("ListDevices after a panic: %v", err)
	}
	logs := e.logs.String()
	if !strings.Contains(logs, `"msg":"panic in rpc handler"`) || !strings.Contains(logs, "test panic in identify") {
		t.Errorf("panic not logged:\n%s", logs)
	}
}

// TestPanicInHandler serves a server without a broker, whose handlers panic.
func TestPanicInHandler(t *testing.T) {
	testutil.FDLeakCheck(t)
	logs := &syncBuffer{}
	srv := New(nil, Options{Identify: testIdentify, Log: newTestLogger(logs)})
	l, err := Listen(filepath.Join(testutil.ShortTempDir(t), "c.sock"), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	var sockets connTracker
	conn, err := grpc.NewClient("passthrough:///"+l.Addr().String(), grpc.WithTransportCredentials(newEnvCreds()),
		grpc.WithContextDialer(sockets.dial))
	if err != nil {
		t.Fatal(err)
	}
	c := brokerv1.NewBrokerClient(conn)
	_, err = c.ListDevices(t.Context(), &brokerv1.ListDevicesRequest{})
	wantCode(t, err, codes.Internal, "internal error in /mmiobroker.v1.Broker/ListDevices")
	s, err := c.WatchEvents(t.Context(), &brokerv1.WatchEventsRequest{})
	if err == nil {
		_, err = s.Recv()
	}
	wantCode(t, err, codes.Internal, "internal error in /mmiobroker.v1.Broker/WatchEvents")
	conn.Close()
	if err := srv.Stop(t.Context()); err != nil {
		t.Error(err)
	}
	if err := <-served; err != nil {
		t.Error(err)
	}
	sockets.wait(t)
	if n := strings.Count(logs.String(), `"msg":"panic in rpc handler"`); n != 2 {
		t.Errorf("%d panics logged, want 2:\n%s", n, logs)
	}
}

func TestLogging(t *testing.T) {
	e := newEnv(t)
	if _, err := e.client.GetLease(holder.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: "0123456789abcdef01234567"}); err == nil {
		t.Fatal("GetLease of an unknown lease succeeded")
	}
	if _, err := e.client.ListDevices(stranger.ctx(t), &brokerv1.ListDevicesRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := healthpb.NewHealthClient(e.conn).Check(holder.ctx(t), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatal(err)
	}
	lines := e.rpcLogLines()
	if len(lines) != 3 {
		t.Fatalf("%d rpc log lines, want 3:\n%s", len(lines), e.logs)
	}
	for i, want := range []map[string]any{
		{"level": "INFO", "method": "/mmiobroker.v1.Broker/GetLease", "code": "NotFound", "uid": float64(uidHolder),
			"client_pid": float64(os.Getpid()), "err": "lease 0123456789abcdef01234567: not found"},
		{"level": "DEBUG", "method": "/mmiobroker.v1.Broker/ListDevices", "code": "OK", "uid": float64(uidStranger),
			"client_pid": float64(os.Getpid())},
		{"level": "DEBUG", "method": "/grpc.health.v1.Health/Check", "code": "OK", "uid": float64(uidHolder),
			"client_pid": float64(os.Getpid())},
	} {
		got := lines[i]
		if d, ok := got["duration"].(float64); !ok || d <= 0 {
			t.Errorf("line %d: duration %v", i, got["duration"])
		}
		delete(got, "duration")
		delete(got, "time")
		delete(got, "msg")
		delete(got, "component")
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("line %d (-want +got):\n%s", i, diff)
		}
	}
}

func TestListen(t *testing.T) {
	testutil.FDLeakCheck(t)
	dir := testutil.ShortTempDir(t)
	path := filepath.Join(dir, "s.sock")

	// A stale socket (its listener died without unlinking it) is replaced.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	l, err := Listen(path, 0o660)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want socket 0660", fi.Mode())
	}

	// A live one is not.
	if _, err := Listen(path, 0o660); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("Listen over a live socket: %v, want ErrAlreadyExists", err)
	}
	l.Close()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file after Close: %v, want it removed", err)
	}

	// Nor is a file that is not a socket.
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(file, 0o660); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("Listen over a regular file: %v, want ErrAlreadyExists", err)
	}
	if _, err := Listen(filepath.Join(dir, "no", "such", "dir"), 0o660); err == nil {
		t.Error("Listen in a missing directory succeeded")
	}
}

func TestStopIsIdempotent(t *testing.T) {
	e := newEnv(t)
	e.stop()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	if err := e.srv.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

// TestMaxRecvMsgSize: a request larger than the daemon accepts is refused without being
// buffered (RESOURCE_EXHAUSTED), and the connection stays usable.
func TestMaxRecvMsgSize(t *testing.T) {
	e := newEnv(t)
	_, err := e.client.GetLease(root.ctx(t), &brokerv1.GetLeaseRequest{LeaseId: strings.Repeat("a", maxRecvMsgSize+1)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("oversized request: %v, want ResourceExhausted", err)
	}
	if _, err := e.client.ListDevices(root.ctx(t), &brokerv1.ListDevicesRequest{}); err != nil {
		t.Errorf("request after an oversized one: %v", err)
	}
}
