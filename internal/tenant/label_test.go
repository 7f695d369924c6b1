package tenant

import (
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func TestPeerLabelSocketpair(t *testing.T) {
	testutil.FDLeakCheck(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := os.NewFile(uintptr(fds[0]), "a"), os.NewFile(uintptr(fds[1]), "b")
	defer a.Close()
	defer b.Close()
	rc, err := a.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	label, err := PeerLabel(rc)
	if err != nil {
		t.Fatalf("PeerLabel: %v", err)
	}
	if strings.IndexByte(label, 0) >= 0 {
		t.Errorf("PeerLabel = %q holds a NUL", label)
	}
	if label == "" {
		t.Logf("no LSM labels sockets on this host (ENOPROTOOPT)")
	} else {
		t.Logf("peer label: %q", label)
		if _, err := ParseID("uid=1,label=" + label); err != nil {
			t.Errorf("label %q cannot be part of an ID: %v", label, err)
		}
	}
}

func TestPeerLabelNotSocket(t *testing.T) {
	testutil.FDLeakCheck(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	rc, err := r.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if label, err := PeerLabel(rc); !errors.Is(err, unix.ENOTSOCK) {
		t.Errorf("PeerLabel(pipe) = %q, %v; want an error matching ENOTSOCK", label, err)
	}
	r.Close()
	if label, err := PeerLabel(rc); err == nil || !strings.Contains(err.Error(), "SO_PEERSEC") {
		t.Errorf("PeerLabel(closed) = %q, %v; want an error naming SO_PEERSEC", label, err)
	}
}
