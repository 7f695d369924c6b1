package dmabuf

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// FDInfo is what /proc/PID/fdinfo/FD says about a dma-buf descriptor (the generic lines of
// fs/proc/fd.c followed by dma_buf_show_fdinfo, drivers/dma-buf/dma-buf.c).
type FDInfo struct {
	// Inode is "ino": the dma-buf's unique id, equal to fstat st_ino.
	Inode uint64
	// Size is "size" in bytes.
	Size uint64
	// Count is "count": the file's reference count minus the one procfs takes while
	// printing, so every descriptor in every process plus kernel references (each iommufd
	// MAP_FILE mapping holds one).
	Count int
	// ExpName is "exp_name", the exporter, e.g. "vfio_pci_core" or "udmabuf".
	ExpName string
	// Name is "name", set with DMA_BUF_SET_NAME; "" if the line is absent (never named).
	Name string
	// Flags is "flags", the open file's f_flags (printed in octal), with O_CLOEXEC added if
	// this descriptor has FD_CLOEXEC.
	Flags uint32
	// Pos is "pos", the file position.
	Pos int64
	// MntID is "mnt_id", the id of the dmabuf pseudo-filesystem mount.
	MntID int
}

// ParseFDInfo parses the text of a dma-buf's /proc/PID/fdinfo/FD. Lines are "key:<TAB>value";
// unknown keys and lines without a colon are ignored. ino, size, count and exp_name must be
// present, otherwise the descriptor is not a dma-buf and the error wraps
// [errdefs.ErrInvalidArgument], as does a malformed value.
//
// When a key repeats, the first occurrence wins: a dma-buf name may contain a newline (any
// holder can set one) and so inject lines, but the kernel prints the name last.
func ParseFDInfo(text string) (FDInfo, error) {
	var (
		info FDInfo
		seen = make(map[string]bool, 8)
	)
	for line := range strings.Lines(text) {
		line = strings.TrimSuffix(line, "\n")
		key, val, ok := strings.Cut(line, ":")
		if !ok || seen[key] {
			continue
		}
		if v, ok := strings.CutPrefix(val, "\t"); ok {
			val = v
		} else {
			val = strings.TrimLeft(val, " \t")
		}
		num := strings.TrimSpace(val)
		var err error
		switch key {
		case "pos":
			info.Pos, err = strconv.ParseInt(num, 10, 64)
		case "flags":
			var v uint64
			v, err = strconv.ParseUint(num, 8, 32)
			info.Flags = uint32(v)
		case "mnt_id":
			info.MntID, err = strconv.Atoi(num)
		case "ino":
			info.Inode, err = strconv.ParseUint(num, 10, 64)
		case "size":
			info.Size, err = strconv.ParseUint(num, 10, 64)
		case "count":
			info.Count, err = strconv.Atoi(num)
		case "exp_name":
			info.ExpName = val
		case "name":
			info.Name = val
		default:
			continue
		}
		if err != nil {
			return FDInfo{}, fmt.Errorf("dma-buf fdinfo: %s: bad value %q: %w", key, clip(val), errdefs.ErrInvalidArgument)
		}
		seen[key] = true
	}
	for _, k := range []string{"ino", "size", "count", "exp_name"} {
		if !seen[k] {
			return FDInfo{}, fmt.Errorf("dma-buf fdinfo: no %q line (not a dma-buf?): %w", k, errdefs.ErrInvalidArgument)
		}
	}
	return info, nil
}

// Lookup identifies the dma-buf that descriptor fd of process pid refers to, from
// /proc/PID/fd/FD (whose link must read "/dmabuf:<name>") and /proc/PID/fdinfo/FD. It
// checks that the inode seen through the link (stat) is the one fdinfo reports, so a
// descriptor closed and reused meanwhile gives an error wrapping [errdefs.ErrUnavailable]
// rather than a wrong answer. It needs ptrace-read access to the process (same user, or
// CAP_SYS_PTRACE).
//
// Errors wrap [errdefs.ErrNotFound] if the process or descriptor does not exist,
// [errdefs.ErrPermissionDenied] without access, and [errdefs.ErrInvalidArgument] if the
// descriptor is not a dma-buf; the errno is kept.
func Lookup(pid, fd int) (FDInfo, error) {
	if pid <= 0 || fd < 0 {
		return FDInfo{}, fmt.Errorf("dma-buf lookup: pid %d fd %d: %w", pid, fd, errdefs.ErrInvalidArgument)
	}
	where := fmt.Sprintf("pid %d fd %d", pid, fd)
	p, f := strconv.Itoa(pid), strconv.Itoa(fd)
	link, err := os.Readlink("/proc/" + p + "/fd/" + f)
	if err != nil {
		return FDInfo{}, lookupError(where, err)
	}
	if !strings.HasPrefix(link, "/dmabuf:") {
		return FDInfo{}, fmt.Errorf("dma-buf lookup %s: not a dma-buf (it is %q): %w", where, clip(link), errdefs.ErrInvalidArgument)
	}
	// The descriptor may be closed and its number reused between the reads; the inode
	// from stat and from fdinfo must agree.
	var st unix.Stat_t
	if err := unix.Stat("/proc/"+p+"/fd/"+f, &st); err != nil {
		return FDInfo{}, lookupError(where, &fs.PathError{Op: "stat", Path: "/proc/" + p + "/fd/" + f, Err: err})
	}
	text, err := os.ReadFile("/proc/" + p + "/fdinfo/" + f)
	if err != nil {
		return FDInfo{}, lookupError(where, err)
	}
	info, err := ParseFDInfo(string(text))
	if err != nil {
		return FDInfo{}, fmt.Errorf("dma-buf lookup %s: %w", where, err)
	}
	if info.Inode != st.Ino {
		return FDInfo{}, fmt.Errorf("dma-buf lookup %s: descriptor changed while reading (ino %d, then %d): %w",
			where, st.Ino, info.Inode, errdefs.ErrUnavailable)
	}
	return info, nil
}

func lookupError(where string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("dma-buf lookup %s: %w: %w", where, errdefs.ErrNotFound, err)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("dma-buf lookup %s: %w: %w", where, errdefs.ErrPermissionDenied, err)
	}
	return fmt.Errorf("dma-buf lookup %s: %w", where, err)
}

func clip(s string) string {
	const max = 64
	if len(s) > max {
		return s[:max] + "…"
	}
	return s
}
