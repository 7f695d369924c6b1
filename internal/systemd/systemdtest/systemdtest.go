// Package systemdtest is a fake systemd service manager for tests: a notify socket that
// records states, keeps an fd store and answers barriers the way src/core/service.c and
// src/core/manager.c do, and that can produce what the next start of the service would
// receive.
//
// Use it in process through [Manager.Client] (a *systemd.Manager connected to the fake,
// no environment involved) or [Manager.Setenv] followed by systemd.FromEnv, or for a child
// process through [Manager.Env] and [Manager.Restart].
//
// Fd ownership: the fake receives with MSG_CMSG_CLOEXEC and owns every fd it receives. It
// keeps the fds it stores and closes all others as soon as the message is handled (a
// removed entry, an fd beyond FDStoreMax, a duplicate of a stored open file description, the
// fd of a barrier, any fd on a message that does not store). [Manager.Restored] and
// [Manager.Restart] hand out duplicates that the caller owns. [Manager.Close] closes
// everything. Unlike systemd, which closes removed entries asynchronously in a helper
// process, the fake closes them before it handles the next message, so a barrier sees them
// closed.
package systemdtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/fdpass"
	"github.com/mmiobroker/mmiobroker/internal/systemd"
)

// notifyFDMax is how many fds systemd accepts with one notification (NOTIFY_FD_MAX).
const notifyFDMax = 768

// kcmpFile is KCMP_FILE of include/uapi/linux/kcmp.h.
const kcmpFile = 0

// Options configure a fake service manager.
type Options struct {
	// FDStoreMax is FileDescriptorStoreMax=: how many fds the store keeps, announced in
	// $FDSTORE. 0 disables the store; as in systemd, stored fds are then closed.
	FDStoreMax int
	// Abstract makes the notify socket an abstract one ("@…") instead of a path in a new
	// temporary directory.
	Abstract bool
}

// Manager is a fake service manager listening on a notify socket. Its methods are safe
// for concurrent use.
type Manager struct {
	conn *net.UnixConn
	addr string
	dir  string // "" for an abstract socket
	max  int
	done chan struct{} // closed when the receive loop has returned

	closeOnce sync.Once
	closeErr  error

	mu       sync.Mutex
	states   []string      // guarded by mu; plain notifications, in order
	warnings []string      // guarded by mu; what systemd would log as warnings
	barriers int           // guarded by mu; barriers answered
	store    []entry       // guarded by mu; newest first, as systemd's LIST_PREPEND
	changed  chan struct{} // guarded by mu; closed and replaced after every message
	loopErr  error         // guarded by mu; why the receive loop stopped early
}

// entry is one fd in the fake's store. The fake owns fd.
type entry struct {
	name string
	fd   int
}

// New starts a fake service manager. Close it when done.
func New(opts Options) (*Manager, error) {
	if opts.FDStoreMax < 0 {
		return nil, fmt.Errorf("systemdtest: negative FDStoreMax %d", opts.FDStoreMax)
	}
	m := &Manager{max: opts.FDStoreMax, done: make(chan struct{}), changed: make(chan struct{})}
	if opts.Abstract {
		var b [8]byte
		if _, err := unix.Getrandom(b[:], 0); err != nil {
			return nil, fmt.Errorf("systemdtest: %w", err)
		}
		m.addr = fmt.Sprintf("@mmb-systemdtest-%d-%x", os.Getpid(), b)
	} else {
		dir, err := os.MkdirTemp("", "sd")
		if err != nil {
			return nil, fmt.Errorf("systemdtest: %w", err)
		}
		m.dir = dir
		m.addr = filepath.Join(dir, "notify")
	}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: m.addr, Net: "unixgram"})
	if err != nil {
		if m.dir != "" {
			os.RemoveAll(m.dir)
		}
		return nil, fmt.Errorf("systemdtest: %w", err)
	}
	m.conn = conn
	go m.loop()
	return m, nil
}

// Start is [New] for a test: it fails t on error and closes the fake at cleanup, failing
// t if closing reports an error.
func Start(t testing.TB, opts Options) *Manager {
	t.Helper()
	m, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Error(err)
		}
	})
	return m
}

// Addr returns the notify socket's address, as $NOTIFY_SOCKET spells it.
func (m *Manager) Addr() string { return m.addr }

// FDStoreMax returns the store size from [Options].
func (m *Manager) FDStoreMax() int { return m.max }

// Env returns the variables a service started by this manager sees besides the fds:
// NOTIFY_SOCKET and, when the store is enabled, FDSTORE.
func (m *Manager) Env() []string {
	env := []string{"NOTIFY_SOCKET=" + m.addr}
	if m.max > 0 {
		env = append(env, "FDSTORE="+strconv.Itoa(m.max))
	}
	return env
}

// Setenv sets $NOTIFY_SOCKET and $FDSTORE for the rest of the test (t.Setenv, so not in
// parallel tests) and unsets the watchdog and LISTEN_* variables, for tests that call
// systemd.FromEnv.
func (m *Manager) Setenv(t testing.TB) {
	t.Helper()
	t.Setenv("NOTIFY_SOCKET", m.addr)
	for _, k := range []string{"FDSTORE", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
	if m.max > 0 {
		t.Setenv("FDSTORE", strconv.Itoa(m.max))
	}
}

// Client returns a *systemd.Manager connected to the fake, as the service would see it
// if it started now: its Restored holds duplicates of the store's fds. Calling Client
// again after the code under test "crashed" simulates a restart.
func (m *Manager) Client() (*systemd.Manager, error) {
	r, err := m.Restored()
	if err != nil {
		return nil, err
	}
	c, err := systemd.New(systemd.Config{NotifySocket: m.addr, FDStoreMax: m.max, Restored: r})
	if err != nil {
		r.Close()
		return nil, err
	}
	return c, nil
}

// Restored returns duplicates (O_CLOEXEC) of the store's fds under their names, in the
// order systemd passes them at the next start (newest first). The caller owns the result.
func (m *Manager) Restored() (*systemd.Restored, error) {
	files, names, err := m.dupStore()
	if err != nil {
		return nil, err
	}
	return systemd.NewRestored(files, names), nil
}

// Restart returns what the next start of the service would receive: env (Env plus
// LISTEN_FDS and LISTEN_FDNAMES when the store is not empty) and duplicates of the
// store's fds for exec.Cmd.ExtraFiles, so that they become fds 3, 4, …. The caller owns
// files and closes them after starting the child. systemd also sets LISTEN_PID to the
// child's pid, which is unknown before exec.Cmd.Start: the child must set LISTEN_PID to
// its own pid before it calls systemd.FromEnv.
func (m *Manager) Restart() (env []string, files []*os.File, err error) {
	files, names, err := m.dupStore()
	if err != nil {
		return nil, nil, err
	}
	env = m.Env()
	if len(files) > 0 {
		env = append(env, "LISTEN_FDS="+strconv.Itoa(len(files)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
	}
	return env, files, nil
}

func (m *Manager) dupStore() ([]*os.File, []string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	files := make([]*os.File, 0, len(m.store))
	names := make([]string, 0, len(m.store))
	for _, e := range m.store {
		nfd, err := unix.FcntlInt(uintptr(e.fd), unix.F_DUPFD_CLOEXEC, 3)
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, nil, fmt.Errorf("systemdtest: dup stored fd %q: %w", e.name, err)
		}
		files = append(files, os.NewFile(uintptr(nfd), e.name))
		names = append(names, e.name)
	}
	return files, names, nil
}

// States returns the plain notifications received so far, in order, each as sent
// ("READY=1", "RELOADING=1\nMONOTONIC_USEC=…"). Barriers and fd store messages
// (FDSTORE=1, FDSTOREREMOVE=1) are not states.
func (m *Manager) States() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.states)
}

// Warnings returns what systemd would have logged as warnings so far: invalid fd names,
// fds dropped because the store is full or already holds them, malformed barriers, fds on
// messages that do not store them, oversized or malformed datagrams.
func (m *Manager) Warnings() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.warnings)
}

// Stored returns the names in the store, newest first (the order of the next start).
func (m *Manager) Stored() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	names := make([]string, len(m.store))
	for i, e := range m.store {
		names[i] = e.name
	}
	return names
}

// Barriers returns how many barriers the fake has answered.
func (m *Manager) Barriers() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.barriers
}

// Flush closes every stored fd and empties the store, as systemd does when the unit stops
// for good ("systemctl stop" with the default FileDescriptorStorePreserve=restart).
func (m *Manager) Flush() {
	m.mu.Lock()
	store := m.store
	m.store = nil
	m.mu.Unlock()
	for _, e := range store {
		unix.Close(e.fd)
	}
}

// WaitState waits until a plain notification with a line equal to line (e.g. "READY=1")
// has been received, or ctx is done.
func (m *Manager) WaitState(ctx context.Context, line string) error {
	return m.Wait(ctx, func(states []string) bool {
		for _, s := range states {
			if slices.Contains(strings.Split(s, "\n"), line) {
				return true
			}
		}
		return false
	})
}

// Wait waits until cond, called with the states received so far after every message,
// returns true, or ctx is done, or the fake is closed.
func (m *Manager) Wait(ctx context.Context, cond func(states []string) bool) error {
	for {
		m.mu.Lock()
		ok := cond(slices.Clone(m.states))
		ch := m.changed
		m.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-m.done:
			return errors.New("systemdtest: manager closed")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Close stops the fake, closes every fd it holds and removes its socket. It returns an
// error if the receive loop failed. Closing again returns the same result.
func (m *Manager) Close() error {
	m.closeOnce.Do(func() {
		err := m.conn.Close()
		<-m.done
		m.Flush()
		if m.dir != "" {
			if rerr := os.RemoveAll(m.dir); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}
		m.mu.Lock()
		err = errors.Join(m.loopErr, err)
		m.mu.Unlock()
		m.closeErr = err
	})
	return m.closeErr
}

// loop receives notifications until the socket is closed.
func (m *Manager) loop() {
	defer close(m.done)
	buf := make([]byte, systemd.MaxMessageSize+1)
	oob := make([]byte, unix.CmsgSpace(4*notifyFDMax))
	for {
		// net.UnixConn.ReadMsgUnix receives with MSG_CMSG_CLOEXEC on Linux.
		n, oobn, flags, _, err := m.conn.ReadMsgUnix(buf, oob)
		fds := fdpass.ParseRights(oob[:oobn])
		if err != nil {
			closeAll(fds)
			if !errors.Is(err, net.ErrClosed) {
				m.mu.Lock()
				m.loopErr = fmt.Errorf("systemdtest: receive: %w", err)
				m.mu.Unlock()
			}
			return
		}
		m.handle(buf[:n], flags, fds)
	}
}

// handle processes one datagram as manager_dispatch_notify_fd and service_notify_message
// do, taking ownership of fds.
func (m *Manager) handle(msg []byte, flags int, fds []int) {
	m.mu.Lock()
	defer func() {
		close(m.changed)
		m.changed = make(chan struct{})
		m.mu.Unlock()
	}()
	switch {
	case flags&unix.MSG_CTRUNC != 0:
		m.warnf("message with truncated control data (more than %d fds), ignoring", notifyFDMax)
		closeAll(fds)
		return
	case len(msg) > systemd.MaxMessageSize || flags&unix.MSG_TRUNC != 0:
		m.warnf("message exceeds %d bytes, ignoring", systemd.MaxMessageSize)
		closeAll(fds)
		return
	case len(msg) > 1 && slices.Contains(msg[:len(msg)-1], 0):
		m.warnf("message with embedded NUL bytes, ignoring")
		closeAll(fds)
		return
	}
	text := strings.TrimSuffix(string(msg), "\x00")
	tags := strings.FieldsFunc(text, func(r rune) bool { return r == '\n' || r == '\r' })

	if slices.Contains(tags, "BARRIER=1") {
		switch {
		case len(tags) != 1:
			m.warnf("extra notification messages sent with BARRIER=1, ignoring everything")
		case len(fds) != 1:
			m.warnf("incorrect number of fds (%d) with BARRIER=1, closing them", len(fds))
		default:
			m.barriers++
		}
		closeAll(fds) // everything before this message has been handled
		return
	}

	name, hasName := findPrefix(tags, "FDNAME=")
	switch {
	case slices.Contains(tags, "FDSTOREREMOVE=1"):
		if !hasName || systemd.ValidateFDName(name) != nil {
			m.warnf("FDSTOREREMOVE=1 without a valid fd name (%q), ignoring", name)
			break
		}
		m.store = slices.DeleteFunc(m.store, func(e entry) bool {
			if e.name == name {
				unix.Close(e.fd)
				return true
			}
			return false
		})
	case slices.Contains(tags, "FDSTORE=1"):
		if hasName && systemd.ValidateFDName(name) != nil {
			m.warnf("invalid FDNAME=%q, storing as \"stored\"", name)
			hasName = false
		}
		if !hasName {
			name = "stored"
		}
		for i, fd := range fds {
			if len(m.store) >= m.max {
				m.warnf("cannot store more fds than FileDescriptorStoreMax=%d, closing %d", m.max, len(fds)-i)
				closeAll(fds[i:])
				break
			}
			if m.isStored(fd) {
				m.warnf("suppressing duplicate fd for %q in the fd store", name)
				unix.Close(fd)
				continue
			}
			m.store = slices.Insert(m.store, 0, entry{name: name, fd: fd})
		}
		return
	default:
		m.states = append(m.states, text)
	}
	if len(fds) > 0 {
		m.warnf("got %d extra auxiliary fds with a notification message, closing them", len(fds))
		closeAll(fds)
	}
}

// isStored reports whether fd's open file description is in the store (kcmp KCMP_FILE,
// as systemd's same_fd). Without kcmp it reports false. Called with mu held.
func (m *Manager) isStored(fd int) bool {
	pid := uintptr(os.Getpid())
	for _, e := range m.store {
		r, _, errno := unix.Syscall6(unix.SYS_KCMP, pid, pid, kcmpFile, uintptr(e.fd), uintptr(fd), 0)
		if errno == 0 && r == 0 {
			return true
		}
	}
	return false
}

// warnf records a warning. Called with mu held.
func (m *Manager) warnf(format string, args ...any) {
	m.warnings = append(m.warnings, fmt.Sprintf(format, args...))
}

// findPrefix returns the rest of the first tag that starts with prefix
// (strv_find_startswith).
func findPrefix(tags []string, prefix string) (string, bool) {
	for _, t := range tags {
		if rest, ok := strings.CutPrefix(t, prefix); ok {
			return rest, true
		}
	}
	return "", false
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
