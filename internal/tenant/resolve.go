package tenant

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Resolver maps a peer to its tenant. The zero Resolver resolves [ByCgroup] with
// [DefaultUnits] under /proc. A Resolver is a value: it is safe for concurrent use as long
// as nobody changes its Units slice.
type Resolver struct {
	// Mode says how peers are grouped; zero means [DefaultMode].
	Mode Mode
	// Units lists the cgroup parents whose direct children are tenants, such as
	// "/machine.slice", "/vms.slice" or "/system.slice". nil means [DefaultUnits]; an
	// empty non-nil slice means no parents (Kubernetes pods are still recognised, see
	// [Unit]).
	Units []string
	// ProcRoot is where procfs is mounted, "" meaning /proc; tests point it at a fake
	// tree. It must show the processes of the pid namespace the peer pids come from.
	ProcRoot string
}

// Validate reports a Resolver that [Resolver.Resolve] would not use as configured: an
// unknown Mode; a unit parent that is not absolute and clean, is "/", is listed twice or
// lies below another (the outer one would always win); a relative ProcRoot. Its errors
// wrap errdefs.ErrInvalidArgument.
func (r Resolver) Validate() error {
	var errs []error
	if r.Mode != 0 && !r.Mode.valid() {
		errs = append(errs, fmt.Errorf("tenant mode %v: want one of uid, cgroup, label", r.Mode))
	}
	for i, u := range r.Units {
		switch {
		case !validPath(u):
			errs = append(errs, fmt.Errorf("tenant unit parent %q: want an absolute, clean cgroup path such as /machine.slice", truncate(u)))
			continue
		case u == "/":
			errs = append(errs, fmt.Errorf("tenant unit parent %q: the root would make every top-level cgroup (user.slice, system.slice) a tenant", u))
			continue
		case slices.Contains(r.Units[:i], u):
			errs = append(errs, fmt.Errorf("tenant unit parent %q is listed twice", u))
			continue
		}
		for _, v := range r.Units {
			if validPath(v) && strings.HasPrefix(u, v+"/") {
				errs = append(errs, fmt.Errorf("tenant unit parent %q lies below parent %q, which always wins", u, v))
			}
		}
	}
	if r.ProcRoot != "" && !filepath.IsAbs(r.ProcRoot) {
		errs = append(errs, fmt.Errorf("tenant proc root %q is not absolute", r.ProcRoot))
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %w", errors.Join(errs...), errdefs.ErrInvalidArgument)
}

func (r Resolver) mode() Mode {
	if r.Mode == 0 {
		return DefaultMode
	}
	return r.Mode
}

func (r Resolver) units() []string {
	if r.Units == nil {
		return DefaultUnits()
	}
	return r.Units
}

// Resolve returns the tenant of the peer with uid and pid (from SO_PEERCRED, pid in the
// pid namespace of ProcRoot) and LSM label (from [PeerLabel], or ""):
//
//   - [ByUID]: uid=<uid>; pid and label are not used.
//   - [ByCgroup]: uid=<uid>,cgroup=<unit> if the peer's cgroup ([ReadCgroup]) is in a
//     [Unit] of r.Units, else uid=<uid>; label is not used.
//   - [ByLabel]: uid=<uid>,label=<label> if label is not empty. An empty label means no
//     LSM labels the peer's socket; such a peer gets the ByCgroup identity rather than the
//     bare uid, so that VMs on a host (or of a profile) without labels stay apart by
//     cgroup. Either way no label identity can equal a cgroup or bare-uid one, so an
//     unlabelled peer can never share a labelled peer's tenant.
//
// Resolve fails, rather than fall back to the coarser uid identity, if it cannot read the
// cgroup (the process is gone: errdefs.ErrNotFound; /proc hides it: the errno is kept; a
// v1-only host: errdefs.ErrNotSupported) or if the cgroup path is not clean and absolute
// (the daemon is in a cgroup namespace that does not contain the peer:
// errdefs.ErrFailedPrecondition).
//
// Resolve reads /proc/<pid> by pid: the caller must have pinned the peer with a pidfd
// and must check that the pidfd is still alive after Resolve returns, as
// [Resolver.ResolveProcess] does.
func (r Resolver) Resolve(uid uint32, pid int32, label string) (ID, error) {
	id, _, err := r.resolve(uid, pid, label)
	return id, err
}

// resolve is Resolve, also reporting whether it read /proc/<pid>.
func (r Resolver) resolve(uid uint32, pid int32, label string) (ID, bool, error) {
	if uid == InvalidUID {
		return "", false, fmt.Errorf("tenant of uid %d: %w", uid, errdefs.ErrInvalidArgument)
	}
	switch m := r.mode(); m {
	case ByUID:
		return ForUID(uid), false, nil
	case ByLabel:
		if label != "" {
			if err := checkLabel(label); err != nil {
				return "", false, fmt.Errorf("tenant of uid %d pid %d: %w: %w", uid, pid, err, errdefs.ErrInvalidArgument)
			}
			return forLabel(uid, label), false, nil
		}
	case ByCgroup:
	default:
		return "", false, fmt.Errorf("tenant mode %v: %w", m, errdefs.ErrInvalidArgument)
	}
	cg, err := ReadCgroup(r.ProcRoot, pid)
	if err != nil {
		return "", true, fmt.Errorf("tenant of uid %d: %w", uid, err)
	}
	if !validPath(cg) {
		return "", true, fmt.Errorf("tenant of uid %d pid %d: cgroup %q is not a clean absolute path (is the daemon in a cgroup namespace of its own?): %w",
			uid, pid, truncate(cg), errdefs.ErrFailedPrecondition)
	}
	if unit, ok := Unit(cg, r.units()); ok {
		return forUnit(uid, unit), true, nil
	}
	return ForUID(uid), true, nil
}

// Process is a peer process pinned by a pidfd, as *peercred.Process is.
type Process interface {
	// PID returns the pid the process had when it was pinned.
	PID() int32
	// Alive reports whether the pinned process has not exited yet.
	Alive() bool
}

// ResolveProcess is [Resolver.Resolve] for a pinned peer: it resolves p.PID() and, if it
// read /proc/<pid>, checks afterwards that p is still alive. If p has exited meanwhile,
// the pid may have named another process during the read, and ResolveProcess fails with
// errdefs.ErrNotFound instead of returning that process's tenant.
func (r Resolver) ResolveProcess(uid uint32, p Process, label string) (ID, error) {
	if p == nil {
		return "", fmt.Errorf("tenant of uid %d: no process: %w", uid, errdefs.ErrInvalidArgument)
	}
	pid := p.PID()
	id, readProc, err := r.resolve(uid, pid, label)
	if err != nil {
		return "", err
	}
	if readProc && !p.Alive() {
		return "", fmt.Errorf("tenant of uid %d: pid %d exited while its cgroup was read: %w", uid, pid, errdefs.ErrNotFound)
	}
	return id, nil
}
