package dmabuf

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Samples shaped like docs/kernel.md §4.1 (fs/proc/fd.c then dma_buf_show_fdinfo).
const (
	vfioFDInfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1041\nsize:\t1048576\ncount:\t2\nexp_name:\tvfio_pci_core\nname:\tmmb-35add933c68d16d74b0b32d1\n"
	// Unnamed; an unknown trailing key as later kernels may add.
	udmabufFDInfo = "pos:\t0\nflags:\t0100002\nmnt_id:\t16\nino:\t7\nsize:\t8192\ncount:\t1\nexp_name:\tudmabuf\nfuture_key:\t42\n"
	// An eventfd: generic lines only.
	eventfdFDInfo = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\neventfd-count:                0\neventfd-id: 1\n"
)

func TestParseFDInfo(t *testing.T) {
	for _, tc := range []struct {
		name, text string
		want       FDInfo
	}{
		{"vfio", vfioFDInfo, FDInfo{Pos: 0, Flags: 0o2000002, MntID: 16, Inode: 1041, Size: 1 << 20, Count: 2, ExpName: "vfio_pci_core", Name: "mmb-35add933c68d16d74b0b32d1"}},
		{"udmabuf", udmabufFDInfo, FDInfo{Flags: 0o100002, MntID: 16, Inode: 7, Size: 8192, Count: 1, ExpName: "udmabuf"}},
		{"no trailing newline", strings.TrimSuffix(vfioFDInfo, "\n"), FDInfo{Flags: 0o2000002, MntID: 16, Inode: 1041, Size: 1 << 20, Count: 2, ExpName: "vfio_pci_core", Name: "mmb-35add933c68d16d74b0b32d1"}},
		{"name with spaces and colon", "ino:\t1\nsize:\t4096\ncount:\t0\nexp_name:\tx\nname:\t a: b \n", FDInfo{Inode: 1, Size: 4096, ExpName: "x", Name: " a: b "}},
		{"space instead of tab", "ino: 1\nsize: 4096\ncount: 0\nexp_name: x\n", FDInfo{Inode: 1, Size: 4096, ExpName: "x"}},
		// A name with a newline cannot override what the kernel printed before it.
		{"injected lines", "ino:\t1\nsize:\t4096\ncount:\t0\nexp_name:\tx\nname:\tevil\nino:\t99\nsize:\t1\n", FDInfo{Inode: 1, Size: 4096, ExpName: "x", Name: "evil"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseFDInfo(tc.text)
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Fatalf("ParseFDInfo (-want +got):\n%s", d)
			}
		})
	}
}

func TestParseFDInfoRejects(t *testing.T) {
	for _, text := range []string{
		"",
		eventfdFDInfo,
		strings.Replace(vfioFDInfo, "ino:\t1041", "ino:\t-1", 1),
		strings.Replace(vfioFDInfo, "flags:\t02000002", "flags:\t09", 1),
		strings.Replace(vfioFDInfo, "size:\t1048576", "size:\t1 MiB", 1),
		strings.Replace(vfioFDInfo, "count:\t2", "count:\tx", 1),
		strings.Replace(vfioFDInfo, "exp_name:\tvfio_pci_core\n", "", 1),
		strings.Replace(vfioFDInfo, "pos:\t0", "pos:\t", 1),
		strings.Replace(vfioFDInfo, "flags:\t02000002", "flags:\t077777777777", 1), // > 32 bits
	} {
		if got, err := ParseFDInfo(text); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseFDInfo(%q) = %+v, %v; want ErrInvalidArgument", text, got, err)
		}
	}
}

// The fdinfo of this process's own descriptors parses up to the dma-buf part.
func TestParseFDInfoRealGeneric(t *testing.T) {
	text, err := os.ReadFile("/proc/self/fdinfo/0")
	if err != nil {
		t.Skip(err)
	}
	_, err = ParseFDInfo(string(text) + "size:\t1\ncount:\t1\nexp_name:\tx\n")
	if err != nil {
		t.Fatalf("generic fdinfo of this kernel:\n%s\n%v", text, err)
	}
}

func formatFDInfo(i FDInfo) string {
	s := fmt.Sprintf("pos:\t%d\nflags:\t0%o\nmnt_id:\t%d\nino:\t%d\nsize:\t%d\ncount:\t%d\nexp_name:\t%s\n",
		i.Pos, i.Flags, i.MntID, i.Inode, i.Size, i.Count, i.ExpName)
	if i.Name != "" {
		s += "name:\t" + i.Name + "\n"
	}
	return s
}

func FuzzParseFDInfo(f *testing.F) {
	for _, s := range []string{vfioFDInfo, udmabufFDInfo, eventfdFDInfo, "ino:\t1\nsize:\t1\ncount:\t1\nexp_name:\t\n", "name:\n:\n::\tx\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		info, err := ParseFDInfo(text)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("error %v does not wrap ErrInvalidArgument", err)
			}
			return
		}
		again, err := ParseFDInfo(formatFDInfo(info))
		if err != nil {
			t.Fatalf("reparse of %+v: %v", info, err)
		}
		if d := cmp.Diff(info, again); d != "" {
			t.Fatalf("round trip (-first +second):\n%s", d)
		}
	})
}
