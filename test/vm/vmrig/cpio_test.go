package vmrig

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/google/go-cmp/cmp"
)

type cpioEntry struct {
	Name         string
	Mode         uint32
	NLink        uint32
	RMaj, RMin   uint32
	Data         string
	HeaderOffset int
}

// readCPIO is an independent newc reader for the tests.
func readCPIO(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	for {
		if off%4 != 0 {
			t.Fatalf("entry at offset %d is not 4-byte aligned", off)
		}
		if len(b) < off+110 || string(b[off:off+6]) != "070701" {
			t.Fatalf("no newc header at offset %d", off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("header field %d at %d: %v", i, off, err)
			}
			return uint32(v)
		}
		mode, nlink, size, rmaj, rmin, namesize := field(1), field(4), field(6), field(9), field(10), field(11)
		name := string(b[off+110 : off+110+int(namesize)-1])
		if b[off+110+int(namesize)-1] != 0 {
			t.Fatalf("%s: name not NUL terminated", name)
		}
		data := off + 110 + int(namesize)
		data += pad4(data)
		e := cpioEntry{Name: name, Mode: mode, NLink: nlink, RMaj: rmaj, RMin: rmin,
			Data: string(b[data : data+int(size)]), HeaderOffset: off}
		off = data + int(size)
		off += pad4(off)
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
		out = append(out, e)
	}
}

func writeSample(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := NewCPIOWriter(&buf)
	for _, err := range []error{
		w.Dir("bin", 0o755),
		w.Dir("dev", 0o755),
		w.CharDev("dev/console", 0o600, 5, 1),
		w.File("init", 0o755, []byte("#!/bin/sh\necho hi\n")),
		w.File("bin/odd", 0o644, []byte("abcde")), // length 5: needs padding
		w.File("empty", 0o644, nil),
		w.Symlink("bin/sh", "busybox"),
		w.Close(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

func TestCPIOWriter(t *testing.T) {
	b := writeSample(t)
	got := readCPIO(t, b)
	for i := range got {
		got[i].HeaderOffset = 0
	}
	want := []cpioEntry{
		{Name: "bin", Mode: 0o040755, NLink: 2},
		{Name: "dev", Mode: 0o040755, NLink: 2},
		{Name: "dev/console", Mode: 0o020600, NLink: 1, RMaj: 5, RMin: 1},
		{Name: "init", Mode: 0o100755, NLink: 1, Data: "#!/bin/sh\necho hi\n"},
		{Name: "bin/odd", Mode: 0o100644, NLink: 1, Data: "abcde"},
		{Name: "empty", Mode: 0o100644, NLink: 1},
		{Name: "bin/sh", Mode: 0o120777, NLink: 1, Data: "busybox"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("entries (-want +got):\n%s", diff)
	}
	if !bytes.Equal(b, writeSample(t)) {
		t.Error("the same entries gave different archives")
	}
}

func TestCPIOWriterRejectsBadNames(t *testing.T) {
	for _, name := range []string{"", "/", "../etc", "a/../b", "a//b", "dir/", "TRAILER!!!"} {
		var buf bytes.Buffer
		w := NewCPIOWriter(&buf)
		if err := w.File(name, 0o644, nil); err == nil {
			t.Errorf("File(%q) accepted", name)
		}
		if err := w.Close(); err == nil {
			t.Errorf("Close after File(%q) did not return the sticky error", name)
		}
	}
	var buf bytes.Buffer
	if err := NewCPIOWriter(&buf).File("/abs/ok", 0o644, nil); err != nil {
		t.Errorf("a leading slash should be accepted and dropped: %v", err)
	}
}

// TestCPIOWriterWithCpioTool extracts the archive with GNU cpio, an independent reader.
func TestCPIOWriterWithCpioTool(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("no cpio tool on this host (apt-get install cpio)")
	}
	dir := t.TempDir()
	cmd := exec.Command("cpio", "-id", "--quiet", "--no-absolute-filenames")
	cmd.Dir = dir
	var b []byte
	{
		var buf bytes.Buffer
		w := NewCPIOWriter(&buf)
		w.Dir("bin", 0o755)
		w.File("init", 0o755, []byte("#!/bin/sh\n"))
		w.File("bin/odd", 0o640, []byte("abcde"))
		w.Symlink("bin/sh", "busybox")
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		b = buf.Bytes()
	}
	cmd.Stdin = bytes.NewReader(b)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -id: %v: %s", err, out)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "bin/odd")); err != nil || string(got) != "abcde" {
		t.Errorf("bin/odd = %q, %v", got, err)
	}
	if st, err := os.Stat(filepath.Join(dir, "init")); err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("init: %v, %v", st, err)
	}
	if l, err := os.Readlink(filepath.Join(dir, "bin/sh")); err != nil || l != "busybox" {
		t.Errorf("bin/sh -> %q, %v", l, err)
	}
}
