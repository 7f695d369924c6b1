package systemd

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
)

// Restored holds the fds received at start (socket-unit fds first, then the fd store), by
// their $LISTEN_FDNAMES names. It owns them until they are taken. Its methods are safe for
// concurrent use.
type Restored struct {
	mu      sync.Mutex
	entries []restoredFD // guarded by mu; in received order
}

type restoredFD struct {
	name string
	f    *os.File
}

// NewRestored returns a Restored that owns files, named names[i], or files[i].Name() where
// names is shorter or names[i] is empty (activation.Files names each file after its
// $LISTEN_FDNAMES entry, or LISTEN_FD_<n>). Nil files are skipped. It is what [FromEnv]
// builds, exported for tests that simulate a start with restored fds.
func NewRestored(files []*os.File, names []string) *Restored {
	r := &Restored{}
	for i, f := range files {
		if f == nil {
			continue
		}
		name := f.Name()
		if i < len(names) && names[i] != "" {
			name = names[i]
		}
		r.entries = append(r.entries, restoredFD{name: name, f: f})
	}
	return r
}

// Take removes and returns the fd named name (the first one if several have that name),
// or nil if none is held. The caller owns the returned file.
func (r *Restored) Take(name string) *os.File {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, e := range r.entries {
		if e.name == name {
			r.entries = append(r.entries[:i], r.entries[i+1:]...)
			return e.f
		}
	}
	return nil
}

// TakeListener takes the fd named name, as [Restored.Take], and returns it as a
// net.Listener (net.FileListener, which duplicates the fd) after closing the file. It
// returns nil, nil if no fd has that name. The fd is consumed even on error.
func (r *Restored) TakeListener(name string) (net.Listener, error) {
	f := r.Take(name)
	if f == nil {
		return nil, nil
	}
	defer f.Close()
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("restored fd %q: %w", name, err)
	}
	return l, nil
}

// TakePrefix takes the fds whose names start with prefix and returns them by name. For a
// name held more than once only the first fd is taken; the later ones stay held (they
// show in [Restored.Names] and [Restored.Close] closes them). The caller owns the returned
// files.
func (r *Restored) TakePrefix(prefix string) map[string]*os.File {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]*os.File)
	kept := r.entries[:0]
	for _, e := range r.entries {
		if _, dup := out[e.name]; !dup && strings.HasPrefix(e.name, prefix) {
			out[e.name] = e.f
			continue
		}
		kept = append(kept, e)
	}
	clear(r.entries[len(kept):])
	r.entries = kept
	return out
}

// Names returns the names of the fds still held, in received order, duplicates included.
func (r *Restored) Names() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	names := make([]string, len(r.entries))
	for i, e := range r.entries {
		names[i] = e.name
	}
	return names
}

// Close closes every fd not taken and returns the errors joined. Afterwards the Restored
// is empty; closing again returns nil.
func (r *Restored) Close() error {
	r.mu.Lock()
	entries := r.entries
	r.entries = nil
	r.mu.Unlock()
	var errs []error
	for _, e := range entries {
		if err := e.f.Close(); err != nil {
			errs = append(errs, fmt.Errorf("restored fd %q: %w", e.name, err))
		}
	}
	return errors.Join(errs...)
}
