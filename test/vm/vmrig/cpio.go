package vmrig

import (
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
)

// cpio "newc" (SVR4, no CRC) constants: the format the kernel's initramfs unpacker reads
// (Documentation/driver-api/early-userspace/buffer-format.rst).
const (
	cpioMagic   = "070701"
	cpioHdrLen  = 110
	cpioTrailer = "TRAILER!!!"

	cpioModeDir  = 0o040000
	cpioModeReg  = 0o100000
	cpioModeLink = 0o120000
	cpioModeChr  = 0o020000
)

// CPIOWriter writes a newc cpio archive, the initramfs format. Entries carry uid/gid 0
// and mtime 0, so the same entries always give the same bytes. The caller writes parent
// directories before their entries. The first error sticks and is returned by every later
// call.
type CPIOWriter struct {
	w   io.Writer
	ino uint32
	err error
}

// NewCPIOWriter returns a writer that appends a cpio archive to w; Close writes the trailer.
func NewCPIOWriter(w io.Writer) *CPIOWriter { return &CPIOWriter{w: w, ino: 1} }

// Dir adds a directory with permission bits perm.
func (c *CPIOWriter) Dir(name string, perm fs.FileMode) error {
	return c.entry(name, cpioModeDir|uint32(perm.Perm()), 2, 0, 0, nil)
}

// File adds a regular file with permission bits perm and the given contents.
func (c *CPIOWriter) File(name string, perm fs.FileMode, data []byte) error {
	return c.entry(name, cpioModeReg|uint32(perm.Perm()), 1, 0, 0, data)
}

// Symlink adds a symbolic link name -> target.
func (c *CPIOWriter) Symlink(name, target string) error {
	return c.entry(name, cpioModeLink|0o777, 1, 0, 0, []byte(target))
}

// CharDev adds a character device node.
func (c *CPIOWriter) CharDev(name string, perm fs.FileMode, major, minor uint32) error {
	return c.entry(name, cpioModeChr|uint32(perm.Perm()), 1, major, minor, nil)
}

// Close writes the trailer entry. It does not close the underlying writer.
func (c *CPIOWriter) Close() error {
	if c.err != nil {
		return c.err
	}
	c.ino = 0
	return c.raw(cpioTrailer, 0, 1, 0, 0, nil)
}

func (c *CPIOWriter) entry(name string, mode, nlink, rmajor, rminor uint32, data []byte) error {
	if c.err != nil {
		return c.err
	}
	clean := strings.TrimPrefix(path.Clean("/"+name), "/")
	if clean == "" || clean != strings.TrimPrefix(name, "/") || clean == cpioTrailer {
		c.err = fmt.Errorf("cpio: bad entry name %q", name)
		return c.err
	}
	c.ino++
	return c.raw(clean, mode, nlink, rmajor, rminor, data)
}

func (c *CPIOWriter) raw(name string, mode, nlink, rmajor, rminor uint32, data []byte) error {
	if uint64(len(data)) > 0xffffffff {
		c.err = fmt.Errorf("cpio: %s: file too large (%d bytes)", name, len(data))
		return c.err
	}
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		cpioMagic, c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	buf := make([]byte, 0, cpioHdrLen+len(name)+4)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = append(buf, make([]byte, pad4(len(buf)))...)
	if _, err := c.w.Write(buf); err != nil {
		c.err = fmt.Errorf("cpio: write %s: %w", name, err)
		return c.err
	}
	if len(data) > 0 {
		if _, err := c.w.Write(data); err != nil {
			c.err = fmt.Errorf("cpio: write %s: %w", name, err)
			return c.err
		}
		if p := pad4(len(data)); p > 0 {
			if _, err := c.w.Write(make([]byte, p)); err != nil {
				c.err = fmt.Errorf("cpio: write %s: %w", name, err)
				return c.err
			}
		}
	}
	return nil
}

// pad4 returns how many zero bytes bring n to a multiple of 4.
func pad4(n int) int { return (4 - n%4) % 4 }
