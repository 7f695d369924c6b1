// Package guestd starts mmiobrokerd for the guest tests of the VM rig (test/vm): the
// guest's own binary with a test's configuration file, readiness by sd_notify, and a clean
// stop when the test ends. Only guest test binaries (build tag vmtest) import it.
package guestd

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Daemon is an mmiobrokerd a guest test started.
type Daemon struct {
	// Cmd is the daemon's process.
	Cmd *exec.Cmd
	// LogPath is the file that gets the daemon's stdout and stderr.
	LogPath string
}

// Start runs the guest's mmiobrokerd with the configuration file cfgPath, its sd_notify
// socket and log in dir, and returns once it said READY=1 (failing t if it exits or stays
// silent for 60 s first). When the test ends it stops the daemon with SIGTERM, failing t
// unless it exits cleanly within 30 s, and logs the daemon's output if t failed or the
// test runs verbose.
func Start(t testing.TB, dir, cfgPath string) *Daemon {
	t.Helper()
	bin, err := exec.LookPath("mmiobrokerd")
	if err != nil {
		t.Fatalf("mmiobrokerd is not in the guest: %v", err)
	}
	notifyPath := filepath.Join(dir, "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	d := &Daemon{LogPath: filepath.Join(dir, "mmiobrokerd.log")}
	logf, err := os.Create(d.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	d.Cmd = exec.Command(bin, "-config", cfgPath)
	d.Cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notifyPath)
	d.Cmd.Stdout, d.Cmd.Stderr = logf, logf
	if err := d.Cmd.Start(); err != nil {
		logf.Close()
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- d.Cmd.Wait() }()
	t.Cleanup(func() {
		d.Cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("mmiobrokerd exited with %v after SIGTERM", err)
			}
		case <-time.After(30 * time.Second):
			d.Cmd.Process.Kill()
			<-exited
			t.Errorf("mmiobrokerd did not stop within 30 s of SIGTERM")
		}
		logf.Close()
		d.dumpLog(t)
	})

	ready := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		notify.SetReadDeadline(time.Now().Add(60 * time.Second))
		for {
			n, err := notify.Read(buf)
			if err != nil {
				ready <- err
				return
			}
			if strings.Contains("\n"+string(buf[:n])+"\n", "\nREADY=1\n") {
				ready <- nil
				return
			}
		}
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("mmiobrokerd never said READY=1: %v", err)
		}
	case err := <-exited:
		exited <- err // for the cleanup
		t.Fatalf("mmiobrokerd exited during start-up: %v", err)
	}
	return d
}

// dumpLog logs the daemon's output if t failed or the test runs verbose.
func (d *Daemon) dumpLog(t testing.TB) {
	t.Helper()
	if t.Failed() || testing.Verbose() {
		b, _ := os.ReadFile(d.LogPath)
		t.Logf("mmiobrokerd log:\n%s", b)
	}
}
