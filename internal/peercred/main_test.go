package peercred

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"go.uber.org/goleak"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// The test binary doubles as the peer process: with envChild set, TestMain runs the child
// instead of the tests.
const (
	envChild  = "MMB_PEERCRED_CHILD" // "hold": connect, wait for EOF; "exit": connect, exit
	envSock   = "MMB_PEERCRED_SOCK"
	envUID    = "MMB_PEERCRED_UID"
	envGID    = "MMB_PEERCRED_GID"
	envGroups = "MMB_PEERCRED_GROUPS" // comma-separated
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(envChild); mode != "" {
		if err := runChild(mode); err != nil {
			fmt.Fprintf(os.Stderr, "peercred child: %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// runChild drops to the requested credentials, connects and then either exits at once or
// waits until the parent closes the connection.
func runChild(mode string) error {
	if g := os.Getenv(envGroups); g != "" {
		var groups []int
		for _, s := range strings.Split(g, ",") {
			n, err := strconv.Atoi(s)
			if err != nil {
				return err
			}
			groups = append(groups, n)
		}
		if err := syscall.Setgroups(groups); err != nil {
			return fmt.Errorf("setgroups: %w", err)
		}
	}
	if g := os.Getenv(envGID); g != "" {
		n, _ := strconv.Atoi(g)
		if err := syscall.Setgid(n); err != nil {
			return fmt.Errorf("setgid: %w", err)
		}
	}
	if u := os.Getenv(envUID); u != "" {
		n, _ := strconv.Atoi(u)
		if err := syscall.Setuid(n); err != nil {
			return fmt.Errorf("setuid: %w", err)
		}
	}
	c, err := net.Dial("unix", os.Getenv(envSock))
	if err != nil {
		return err
	}
	defer c.Close()
	if mode == "exit" {
		return nil
	}
	// Tell the parent we are connected, then wait for it to hang up.
	if _, err := c.Write([]byte("ready\n")); err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, c)
	return err
}

// child is a peer process started from the test binary.
type child struct {
	pid  int32
	conn *net.UnixConn // the parent's end
	done chan struct{} // closed when the child has been reaped
	err  error         // the child's exit; set before done is closed
}

// wait reaps the child and returns its exit error.
func (c *child) wait() error {
	<-c.done
	return c.err
}

type childCreds struct {
	uid, gid int // -1: keep
	groups   []uint32
}

var keepCreds = childCreds{uid: -1, gid: -1}

// startChild listens on a fresh socket, starts the child in mode and accepts its
// connection. The socket is world-accessible so a child that dropped root can connect.
func startChild(t *testing.T, mode string, cc childCreds) *child {
	t.Helper()
	dir := testutil.ShortTempDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := dir + "/s"
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := os.Chmod(path, 0o777); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0])
	// atexit_sleep_ms=0: a race-enabled child would otherwise linger a second at exit.
	cmd.Env = append(os.Environ(), envChild+"="+mode, envSock+"="+path,
		"GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0")
	if cc.uid >= 0 {
		cmd.Env = append(cmd.Env, envUID+"="+strconv.Itoa(cc.uid))
	}
	if cc.gid >= 0 {
		cmd.Env = append(cmd.Env, envGID+"="+strconv.Itoa(cc.gid))
	}
	if cc.groups != nil {
		var s []string
		for _, g := range cc.groups {
			s = append(s, strconv.FormatUint(uint64(g), 10))
		}
		cmd.Env = append(cmd.Env, envGroups+"="+strings.Join(s, ","))
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ch := &child{pid: int32(cmd.Process.Pid), done: make(chan struct{})}
	go func() {
		ch.err = cmd.Wait()
		close(ch.done)
	}()
	accepted := make(chan *net.UnixConn, 1)
	go func() {
		c, _ := l.AcceptUnix()
		accepted <- c
	}()
	select {
	case ch.conn = <-accepted:
	case <-ch.done:
		if ch.err != nil {
			l.Close()
			if c := <-accepted; c != nil {
				c.Close()
			}
			t.Fatalf("child failed: %v", ch.err)
		}
		// The child connected and exited; its connection waits in the backlog.
		ch.conn = <-accepted
	}
	if ch.conn == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() {
		ch.conn.Close()
		<-ch.done
	})
	return ch
}

// ready waits for the child's "ready" line.
func (c *child) ready(t *testing.T) {
	t.Helper()
	line, err := bufio.NewReader(c.conn).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("child not ready: %q, %v", line, err)
	}
}
