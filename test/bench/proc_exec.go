package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/systemd/systemdtest"
)

// tail keeps at least the last max bytes written to it (at most twice as many): a
// child's log, for the reason of a failure. The daemon logs a few lines per lease, so
// Write must stay cheap: it moves the kept bytes once per max bytes written.
type tail struct {
	mu  sync.Mutex
	max int
	buf []byte // guarded by mu
}

func newTail(max int) *tail { return &tail{max: max} }

// Write implements io.Writer.
func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := len(p)
	if len(p) > t.max {
		p = p[len(p)-t.max:]
	}
	if len(t.buf)+len(p) > 2*t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
	}
	t.buf = append(t.buf, p...)
	return n, nil
}

// Matching returns up to n of the last lines kept that contain any of subs.
func (t *tail) Matching(n int, subs ...string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []string
	for line := range strings.SplitSeq(string(t.buf), "\n") {
		for _, sub := range subs {
			if strings.Contains(line, sub) {
				out = append(out, line)
				break
			}
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return strings.Join(out, "\n")
}

// Last returns up to n of the last lines written.
func (t *tail) Last(n int) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	lines := strings.Split(strings.TrimRight(string(t.buf), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// lineWriter sends every complete line written to it to lines (dropping lines when
// nobody reads: a client writes two).
type lineWriter struct {
	mu    sync.Mutex
	part  []byte // guarded by mu
	lines chan string
}

// Write implements io.Writer.
func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.part = append(w.part, p...)
	for {
		i := bytes.IndexByte(w.part, '\n')
		if i < 0 {
			return len(p), nil
		}
		select {
		case w.lines <- string(w.part[:i]):
		default:
		}
		w.part = w.part[i+1:]
	}
}

// child is a process of the run: the daemon or a client.
type child struct {
	name   string
	cmd    *exec.Cmd
	log    *tail
	exited chan struct{} // closed once Wait returned; err is set then
	err    error
}

// childEnv is the environment of the children: this process's, without what a service
// manager may have given it (the daemon gets its own NOTIFY_SOCKET).
func childEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "FDSTORE":
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// startChild starts argv with env; its stderr (and stdout, unless stdout is set) go to
// its log.
func startChild(name string, argv, env []string, stdin io.Reader, stdout io.Writer) (*child, error) {
	c := &child{name: name, cmd: exec.Command(argv[0], argv[1:]...), log: newTail(64 << 10), exited: make(chan struct{})}
	c.cmd.Env = env
	c.cmd.Stdin = stdin
	c.cmd.Stderr = c.log
	c.cmd.Stdout = c.log
	if stdout != nil {
		c.cmd.Stdout = stdout
	}
	if err := c.cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	go func() {
		c.err = c.cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

// pid returns the child's process id.
func (c *child) pid() int { return c.cmd.Process.Pid }

// failure describes how the child failed, with the end of its log.
func (c *child) failure(what string) error {
	msg := fmt.Sprintf("%s (pid %d): %s", c.name, c.pid(), what)
	select {
	case <-c.exited:
		msg += fmt.Sprintf(": exited: %v", c.err)
	default:
	}
	if l := c.log.Last(20); l != "" {
		msg += "\n" + indent(l)
	}
	return errors.New(msg)
}

// kill ends the child if it still runs and waits for it.
func (c *child) kill() {
	select {
	case <-c.exited:
		return
	default:
	}
	c.cmd.Process.Kill()
	<-c.exited
}

// terminate sends SIGTERM and waits up to grace for the child to exit (then kills it); it
// fails unless the child exited with status 0.
func (c *child) terminate(grace time.Duration) error {
	select {
	case <-c.exited:
		return c.failure("exited before it was stopped")
	default:
	}
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("%s: %w", c.name, err)
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-c.exited:
	case <-t.C:
		c.kill()
		return c.failure(fmt.Sprintf("still running %v after SIGTERM; killed", grace))
	}
	if c.err != nil {
		return c.failure("stop failed")
	}
	return nil
}

// daemonProc is the daemon process of a scenario, under a fake service manager.
type daemonProc struct {
	*child
	sd *systemdtest.Manager
}

// startDaemon starts the daemon mode with argv under a fake systemd whose fd store holds
// fdStoreMax fds (0: none) and waits until the daemon sent READY=1.
func startDaemon(ctx context.Context, argv, env []string, fdStoreMax int, timeout time.Duration) (*daemonProc, error) {
	sd, err := systemdtest.New(systemdtest.Options{FDStoreMax: fdStoreMax})
	if err != nil {
		return nil, err
	}
	c, err := startChild("daemon", argv, append(env, sd.Env()...), nil, nil)
	if err != nil {
		sd.Close()
		return nil, err
	}
	d := &daemonProc{child: c, sd: sd}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ready := make(chan error, 1)
	go func() { ready <- sd.WaitState(wctx, "READY=1") }()
	select {
	case err = <-ready:
		if err == nil {
			return d, nil
		}
		err = c.failure(fmt.Sprintf("no READY=1: %v", err))
	case <-c.exited:
		err = c.failure("exited before READY=1")
	}
	cancel()
	<-ready
	d.kill()
	return nil, err
}

// kill ends the daemon if it runs and closes its service manager.
func (d *daemonProc) kill() {
	d.child.kill()
	d.sd.Close()
}

// stop stops the daemon as systemd does (SIGTERM) and fails unless it exited with status 0
// after telling STOPPING=1, or the fake service manager saw something systemd would warn
// about.
func (d *daemonProc) stop(grace time.Duration) error {
	err := d.terminate(grace)
	states, warnings := d.sd.States(), d.sd.Warnings()
	err = errors.Join(err, d.sd.Close())
	if err != nil {
		return err
	}
	if len(warnings) > 0 {
		return d.failure(fmt.Sprintf("the service manager would warn: %q", warnings))
	}
	if !slices.Contains(states, "STOPPING=1") {
		return d.failure(fmt.Sprintf("exited without STOPPING=1 (notifications %q)", states))
	}
	return nil
}

// indent indents every line of s by four spaces.
func indent(s string) string {
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}
