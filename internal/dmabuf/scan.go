package dmabuf

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// Ref is one descriptor of a dma-buf in one process, as a [ScanProcesses] found it.
type Ref struct {
	// PID is the process (thread group) that has the descriptor open.
	PID int
	// FD is the descriptor's number in that process.
	FD int
	// Info is what /proc/PID/fdinfo/FD said about it.
	Info FDInfo
}

// Process is what a scan reports about a process that holds at least one matching dma-buf.
type Process struct {
	PID int
	// Comm is the process's name (/proc/PID/comm), at most 15 bytes.
	Comm string
	// UID is its real uid (/proc/PID/status "Uid:").
	UID uint32
}

// ScanOptions says where and what [ScanProcesses] looks for.
type ScanOptions struct {
	// Root is procfs; "" means "/proc".
	Root string
	// Keep selects the dma-bufs to report; nil keeps every one.
	Keep func(FDInfo) bool
	// MaxRefs bounds the references reported (memory stays bounded on a host with very many
	// dma-bufs); the scan stops early and sets [Scan.Truncated] when it is reached. 0 means
	// 65536.
	MaxRefs int
}

// DefaultMaxRefs is the bound of a scan's references when ScanOptions.MaxRefs is 0.
const DefaultMaxRefs = 65536

// Scan is the result of [ScanProcesses].
type Scan struct {
	// Refs are the matching descriptors, by PID then FD.
	Refs []Ref
	// Processes describes every PID in Refs.
	Processes map[int]Process
	// Scanned counts the processes whose descriptors were read.
	Scanned int
	// Inaccessible counts the processes whose descriptors could not be read (no
	// CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH for another user's process, or a hidepid
	// procfs): their dma-bufs are missing from Refs.
	Inaccessible int
	// Truncated is set when MaxRefs was reached.
	Truncated bool
}

// ScanProcesses walks every process in procfs and reports the dma-buf descriptors each
// has open: /proc/PID/fd/N links that read "/dmabuf:…", then /proc/PID/fdinfo/N for the
// dma-buf's inode, exporter and name. A reference is only as exact as the moment it was
// read: a process may open, pass or close descriptors while the scan runs, and processes
// that exit meanwhile are skipped. Processes it may not inspect are counted in
// Scan.Inaccessible, not reported as errors. Reading a process's descriptors needs the
// same uid or CAP_SYS_PTRACE plus CAP_DAC_READ_SEARCH (/proc/PID/fd is mode 0500 and owned
// by the process's user; the links and fdinfo are behind a ptrace read check).
//
// The error is non-nil only if procfs itself cannot be listed.
func ScanProcesses(opt ScanOptions) (Scan, error) {
	root := opt.Root
	if root == "" {
		root = "/proc"
	}
	limit := opt.MaxRefs
	if limit <= 0 {
		limit = DefaultMaxRefs
	}
	ents, err := os.ReadDir(root)
	if err != nil {
		return Scan{}, fmt.Errorf("dma-buf scan: list %s: %w", root, err)
	}
	s := Scan{Processes: make(map[int]Process)}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		if len(s.Refs) >= limit {
			s.Truncated = true
			break
		}
		refs, err := scanProcess(root, pid, opt.Keep, limit-len(s.Refs))
		switch {
		case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ESRCH):
			continue // exited
		case err != nil:
			s.Inaccessible++
			continue
		}
		s.Scanned++
		if len(refs) == 0 {
			continue
		}
		if len(refs) > limit-len(s.Refs) {
			refs = refs[:limit-len(s.Refs)]
			s.Truncated = true
		}
		s.Refs = append(s.Refs, refs...)
		s.Processes[pid] = readProcess(root, pid)
	}
	slices.SortFunc(s.Refs, func(a, b Ref) int {
		if a.PID != b.PID {
			return a.PID - b.PID
		}
		return a.FD - b.FD
	})
	return s, nil
}

// scanProcess reads process pid's dma-buf descriptors, at most limit+1 of them.
func scanProcess(root string, pid int, keep func(FDInfo) bool, limit int) ([]Ref, error) {
	dir := root + "/" + strconv.Itoa(pid)
	f, err := os.Open(dir + "/fd")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var refs []Ref
	for {
		names, err := f.Readdirnames(256)
		for _, n := range names {
			fd, err := strconv.Atoi(n)
			if err != nil {
				continue
			}
			link, err := os.Readlink(dir + "/fd/" + n)
			if err != nil || !strings.HasPrefix(link, "/dmabuf:") {
				continue // closed meanwhile, or not a dma-buf
			}
			text, err := os.ReadFile(dir + "/fdinfo/" + n)
			if err != nil {
				continue
			}
			info, err := ParseFDInfo(string(text))
			if err != nil || (keep != nil && !keep(info)) {
				continue // the number was reused for something else meanwhile, or not wanted
			}
			refs = append(refs, Ref{PID: pid, FD: fd, Info: info})
			if len(refs) > limit {
				return refs, nil
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return refs, nil
			}
			return nil, err
		}
	}
}

// readProcess reads what a scan reports about pid; fields it cannot read stay empty.
func readProcess(root string, pid int) Process {
	p := Process{PID: pid}
	dir := root + "/" + strconv.Itoa(pid)
	if b, err := os.ReadFile(dir + "/comm"); err == nil {
		p.Comm = strings.TrimSuffix(string(b), "\n")
	}
	f, err := os.Open(dir + "/status")
	if err != nil {
		return p
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Uid:"); ok {
			if fields := strings.Fields(v); len(fields) > 0 {
				if uid, err := strconv.ParseUint(fields[0], 10, 32); err == nil {
					p.UID = uint32(uid)
				}
			}
			break
		}
	}
	return p
}
