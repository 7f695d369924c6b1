package systemd

import (
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/activation"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// maxSockPath is the size of sockaddr_un.sun_path: a path plus its NUL, or an abstract
// name plus its leading NUL, must fit.
const maxSockPath = 108

// Error is a failed exchange with the service manager.
type Error struct {
	Op   string // "notify", "store-fd", "remove-fd", "barrier", "from-env"
	Name string // fd name for store-fd and remove-fd, else empty
	Err  error
}

func (e *Error) Error() string {
	if e.Name != "" {
		return "systemd: " + e.Op + " " + strconv.Quote(e.Name) + ": " + e.Err.Error()
	}
	return "systemd: " + e.Op + ": " + e.Err.Error()
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

func opError(op, name string, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, Name: name, Err: err}
}

// Config is what a [Manager] knows about its service manager. [FromEnv] fills it from the
// environment; tests and the fake in package systemdtest build it directly.
type Config struct {
	// NotifySocket is $NOTIFY_SOCKET: an absolute path, or an abstract socket name with a
	// leading '@'. Empty means the process is not run by a service manager.
	NotifySocket string
	// FDStoreMax is $FDSTORE (FileDescriptorStoreMax=); 0 means no fd store.
	FDStoreMax int
	// Watchdog is $WATCHDOG_USEC for this process; 0 means no watchdog.
	Watchdog time.Duration
	// Restored holds the fds passed at start; nil means none. The Manager takes it over.
	Restored *Restored
}

// Manager is the connection to the service manager, from the environment. Its methods
// are safe for concurrent use. Each send opens a socket, sends one datagram and closes the
// socket, like sd_notify(3), so a Manager holds no fd of its own and needs no Close; the
// fds passed at start are in [Manager.Restored].
type Manager struct {
	addr       string
	fdStoreMax int
	watchdog   time.Duration
	restored   *Restored
}

// New returns a Manager for cfg. It fails only on a NotifySocket that is neither an
// absolute path nor an abstract name, or too long for a unix socket address.
func New(cfg Config) (*Manager, error) {
	if err := checkNotifySocket(cfg.NotifySocket); err != nil {
		return nil, opError("new", "", err)
	}
	if cfg.FDStoreMax < 0 {
		return nil, opError("new", "", fmt.Errorf("negative fd store size %d: %w", cfg.FDStoreMax, errdefs.ErrInvalidArgument))
	}
	r := cfg.Restored
	if r == nil {
		r = NewRestored(nil, nil)
	}
	return &Manager{addr: cfg.NotifySocket, fdStoreMax: cfg.FDStoreMax, watchdog: max(cfg.Watchdog, 0), restored: r}, nil
}

// FromEnv reads $NOTIFY_SOCKET, $LISTEN_PID/$LISTEN_FDS/$LISTEN_FDNAMES (through
// go-systemd's activation.Files(true), which unsets them), $WATCHDOG_USEC/$WATCHDOG_PID and
// $FDSTORE. It never fails because $NOTIFY_SOCKET is missing: the Manager then reports
// Managed() == false and every send is a no-op returning nil. It fails on a malformed value
// (a relative or vsock $NOTIFY_SOCKET, a non-numeric or zero $WATCHDOG_USEC, a bad
// $WATCHDOG_PID or $FDSTORE); then it closes the fds passed at start (systemd keeps its
// copies in the store, so nothing is lost).
//
// Call it once per process, early: the LISTEN_* variables are gone after the first call.
func FromEnv() (*Manager, error) {
	files := activation.Files(true)
	restored := NewRestored(files, nil)
	cfg, err := parseEnv(os.Getenv, os.Getpid())
	if err != nil {
		restored.Close()
		return nil, opError("from-env", "", err)
	}
	cfg.Restored = restored
	m, err := New(cfg)
	if err != nil {
		restored.Close()
		return nil, err
	}
	return m, nil
}

// Managed reports whether $NOTIFY_SOCKET was set, that is whether notifications reach a
// service manager.
func (m *Manager) Managed() bool { return m.addr != "" }

// NotifySocket returns the address notifications go to ("" when not managed).
func (m *Manager) NotifySocket() string { return m.addr }

// FDStoreMax returns FileDescriptorStoreMax= as systemd 254 and later announce it in
// $FDSTORE. 0 means the fd store is not enabled (or systemd is older than 254), and the
// daemon must not rely on it.
func (m *Manager) FDStoreMax() int { return m.fdStoreMax }

// WatchdogInterval returns $WATCHDOG_USEC when $WATCHDOG_PID is unset or names this
// process, else 0. The service must send "WATCHDOG=1" more often than that; half the
// interval is the usual period.
func (m *Manager) WatchdogInterval() time.Duration { return m.watchdog }

// Restored returns the fds passed at start, by name. It is never nil and is the same
// value on every call.
func (m *Manager) Restored() *Restored { return m.restored }

// parseEnv reads the service manager's environment through getenv for the process pid.
// Empty variables count as unset.
func parseEnv(getenv func(string) string, pid int) (Config, error) {
	var cfg Config
	cfg.NotifySocket = getenv("NOTIFY_SOCKET")
	var errs []error
	if err := checkNotifySocket(cfg.NotifySocket); err != nil {
		errs = append(errs, err)
		cfg.NotifySocket = ""
	}
	wd, err := parseWatchdog(getenv("WATCHDOG_USEC"), getenv("WATCHDOG_PID"), pid)
	if err != nil {
		errs = append(errs, err)
	}
	cfg.Watchdog = wd
	n, err := parseFDStore(getenv("FDSTORE"))
	if err != nil {
		errs = append(errs, err)
	}
	cfg.FDStoreMax = n
	return cfg, errors.Join(errs...)
}

// checkNotifySocket accepts what sd_notify accepts for AF_UNIX: "" (not managed), an
// absolute path, or '@' and an abstract name. AF_VSOCK addresses are not supported.
func checkNotifySocket(addr string) error {
	switch {
	case addr == "":
		return nil
	case addr[0] != '/' && addr[0] != '@':
		return fmt.Errorf("NOTIFY_SOCKET %q: only absolute paths and abstract ('@') unix sockets are supported: %w",
			addr, errdefs.ErrNotSupported)
	case addr == "@":
		return fmt.Errorf("NOTIFY_SOCKET %q: empty abstract name: %w", addr, errdefs.ErrInvalidArgument)
	case strings.IndexByte(addr, 0) >= 0:
		return fmt.Errorf("NOTIFY_SOCKET %q contains a NUL byte: %w", addr, errdefs.ErrInvalidArgument)
	case addr[0] == '/' && len(addr) >= maxSockPath, addr[0] == '@' && len(addr) > maxSockPath:
		return fmt.Errorf("NOTIFY_SOCKET %q is longer than a unix socket address: %w", addr, errdefs.ErrInvalidArgument)
	}
	return nil
}

// parseWatchdog follows sd_watchdog_enabled(3): no $WATCHDOG_USEC means no watchdog; a
// $WATCHDOG_USEC that is not a decimal in (0, 2^64-1) is an error; a $WATCHDOG_PID that is
// set must be a valid pid, and one other than pid means the watchdog is not ours (0).
// Intervals beyond time.Duration's range are clamped.
func parseWatchdog(usec, wpid string, pid int) (time.Duration, error) {
	if usec == "" {
		return 0, nil
	}
	u, err := strconv.ParseUint(usec, 10, 64)
	if err != nil || u == 0 || u == math.MaxUint64 {
		return 0, fmt.Errorf("WATCHDOG_USEC %q is not a positive number of microseconds: %w", usec, errdefs.ErrInvalidArgument)
	}
	if wpid != "" {
		p, err := strconv.ParseInt(wpid, 10, 32)
		if err != nil || p <= 0 {
			return 0, fmt.Errorf("WATCHDOG_PID %q is not a pid: %w", wpid, errdefs.ErrInvalidArgument)
		}
		if int(p) != pid {
			return 0, nil
		}
	}
	if u > uint64(math.MaxInt64/int64(time.Microsecond)) {
		return time.Duration(math.MaxInt64), nil
	}
	return time.Duration(u) * time.Microsecond, nil
}

// parseFDStore parses $FDSTORE, an unsigned decimal; unset means 0.
func parseFDStore(s string) (int, error) {
	if s == "" {
		return 0, nil
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("FDSTORE %q is not a number of fds: %w", s, errdefs.ErrInvalidArgument)
	}
	return int(n), nil
}
