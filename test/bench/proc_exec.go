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
	mu      sync.Mutex
	max     int
	buf     []byte        // guarded by mu
	written chan struct{} // guarded by mu; closed and replaced by every Write
}

func newTail(max int) *tail { return &tail{max: max, written: make(chan struct{})} }

// Write implements io.Writer.
func (t *tail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	close(t.written)
	t.written = make(chan struct{})
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

// WaitMatching waits up to timeout for a line that contains sub and returns the last
// one kept, or "" if none came. The child's output reaches its tail through a pipe, so a
// line it wrote before telling something by another way (READY=1) may still be on its way.
func (t *tail) WaitMatching(ctx context.Context, sub string, timeout time.Duration) string {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		t.mu.Lock()
		written := t.written
		t.mu.Unlock()
		if line := t.Matching(1, sub); line != "" {
			return line
		}
		select {
		case <-written:
		case <-timer.C:
			return ""
		case <-ctx.Done():
			return ""
		}
	}
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
	return startChildWith(name, argv, env, stdin, stdout, childExtras{})
}

// childExtras are what some children get besides their command line and environment.
type childExtras struct {
	// Files become the child's fds 3, 4, … (the caller keeps owning and closes them).
	Files []*os.File
	// Cred, if set, is the uid and gids the child runs with (the parent must be root).
	Cred *syscall.Credential
	// Dir is the child's working directory ("": the parent's).
	Dir string
}

// startChildWith is startChild with extras.
func startChildWith(name string, argv, env []string, stdin io.Reader, stdout io.Writer, x childExtras) (*child, error) {
	c := &child{name: name, cmd: exec.Command(argv[0], argv[1:]...), log: newTail(64 << 10), exited: make(chan struct{})}
	c.cmd.Env = env
	c.cmd.Stdin = stdin
	c.cmd.Stderr = c.log
	c.cmd.Stdout = c.log
	c.cmd.ExtraFiles = x.Files
	c.cmd.Dir = x.Dir
	if x.Cred != nil {
		c.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: x.Cred}
	}
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
	d, err := runUnder(ctx, sd, argv, append(env, sd.Env()...), nil, timeout)
	if err != nil {
		sd.Close()
		return nil, err
	}
	return d, nil
}

// restartDaemon starts the daemon mode with argv again under the service manager of
// prev, which must have stopped (stopKeep), as systemd restarts a service: with the fds
// of its fd store passed as fds 3, 4, … (LISTEN_FDS, LISTEN_FDNAMES). It waits for the new
// process's READY=1 and returns it with the time from its start until then.
func restartDaemon(ctx context.Context, prev *daemonProc, argv, env []string, timeout time.Duration) (*daemonProc, time.Time, error) {
	sdEnv, files, err := prev.sd.Restart()
	if err != nil {
		prev.sd.Close()
		return nil, time.Time{}, err
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	start := time.Now()
	d, err := runUnder(ctx, prev.sd, argv, append(env, sdEnv...), files, timeout)
	if err != nil {
		prev.sd.Close()
		return nil, start, err
	}
	return d, start, nil
}

// runUnder starts the daemon process under sd and waits until it sent one more READY=1
// than sd has seen so far. It kills the process if it does not; sd stays open.
func runUnder(ctx context.Context, sd *systemdtest.Manager, argv, env []string, files []*os.File, timeout time.Duration) (*daemonProc, error) {
	readies := countState(sd.States(), "READY=1")
	c, err := startChildWith("daemon", argv, env, nil, nil, childExtras{Files: files})
	if err != nil {
		return nil, err
	}
	d := &daemonProc{child: c, sd: sd}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ready := make(chan error, 1)
	go func() {
		ready <- sd.Wait(wctx, func(states []string) bool { return countState(states, "READY=1") > readies })
	}()
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
	c.kill()
	return nil, err
}

// countState counts the notifications that have the line line.
func countState(states []string, line string) int {
	n := 0
	for _, s := range states {
		if slices.Contains(strings.Split(s, "\n"), line) {
			n++
		}
	}
	return n
}

// stop stops the daemon as systemd does (SIGTERM) and fails unless it exited with status 0
// after telling STOPPING=1, or the fake service manager saw something systemd would warn
// about. It closes the service manager, and with it the fd store.
func (d *daemonProc) stop(grace time.Duration) error {
	err := d.stopKeep(grace)
	return errors.Join(err, d.sd.Close())
}

// stopKeep is stop without closing the service manager, whose fd store keeps what the
// daemon kept there for its next start (restartDaemon). If it fails, the caller still
// closes d.sd (kill).
func (d *daemonProc) stopKeep(grace time.Duration) error {
	stopping := countState(d.sd.States(), "STOPPING=1")
	if err := d.terminate(grace); err != nil {
		return err
	}
	states, warnings := d.sd.States(), d.sd.Warnings()
	if len(warnings) > 0 {
		return d.failure(fmt.Sprintf("the service manager would warn: %q", warnings))
	}
	if countState(states, "STOPPING=1") <= stopping {
		return d.failure(fmt.Sprintf("exited without STOPPING=1 (notifications %q)", states))
	}
	return nil
}

// indent indents every line of s by four spaces.
func indent(s string) string {
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}
