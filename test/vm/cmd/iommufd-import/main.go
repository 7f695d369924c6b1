// Command iommufd-import plays a VMM's importer in the rig demo (test/vm/vmrig/guest/demo.sh).
// It maps a dma-buf it inherited (fd 3 by default, as `mmiobrokerctl allocate --exec`
// passes it) into a new iommufd IO address space with IOMMU_IOAS_MAP_FILE and prints the
// IOVA, with the public importer package client/iommufd, as a Go VMM would. With -ready PATH it then writes the value of the environment variable -ready-env
// (default MMIO_LEASE_ID) to PATH, the demo's cue that the import is done. With -wait FIFO
// it then blocks until a line arrives on FIFO (the demo writes one
// after revoking the lease) and shows what the revoke did: a new IOMMU_IOAS_MAP_FILE of the
// same dma-buf fails with ENODEV, and the dead mapping can still be unmapped.
//
//	iommufd-import [-fd 3] [-iova 0x400000] [-ready PATH [-ready-env VAR]] [-wait FIFO] [-dev /dev]
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/client/iommufd"
)

func main() {
	fd := flag.Int("fd", 3, "inherited dma-buf file descriptor")
	iova := flag.Uint64("iova", 0x400000, "IOVA to map the dma-buf at")
	ready := flag.String("ready", "", "file or FIFO to write the lease id to once the import is done")
	readyEnv := flag.String("ready-env", "MMIO_LEASE_ID", "environment variable holding what -ready writes")
	wait := flag.String("wait", "", "FIFO to wait on before showing the effect of a revoke")
	dev := flag.String("dev", "/dev", "device node root (iommu)")
	prefix := flag.String("prefix", "  [vmm] ", "output line prefix")
	flag.Parse()
	if err := run(*fd, *iova, *ready, os.Getenv(*readyEnv), *wait, *dev, *prefix, os.Stdout); err != nil {
		fmt.Fprintf(os.Stdout, "%siommufd-import: %v\n", *prefix, err)
		os.Exit(1)
	}
}

func run(fd int, iova uint64, ready, readyText, wait, dev, prefix string, w io.Writer) error {
	say := func(format string, a ...any) { fmt.Fprintf(w, prefix+format+"\n", a...) }
	f := os.NewFile(uintptr(fd), "dma-buf")
	if f == nil {
		return fmt.Errorf("fd %d is not open", fd)
	}
	defer f.Close()
	ifd, err := iommufd.Open(filepath.Join(dev, "iommu"))
	if err != nil {
		return err
	}
	defer ifd.Close()
	ioas, err := ifd.AllocIOAS()
	if err != nil {
		return err
	}
	m, err := ioas.Map(f, iommufd.MapOptions{IOVA: iova, Fixed: true})
	if err != nil {
		return err
	}
	say("iommufd: IOMMU_IOAS_MAP_FILE of the dma-buf (%d bytes) into IOAS %d at IOVA %#x: ok", m.Length, ioas.ID(), m.IOVA)
	say("iommufd: the BAR is now reachable by DMA of any device attached to IOAS %d", ioas.ID())
	if ready != "" {
		if err := os.WriteFile(ready, []byte(readyText+"\n"), 0o600); err != nil {
			return err
		}
	}
	if wait == "" {
		return nil
	}
	fifo, err := os.Open(wait)
	if err != nil {
		return err
	}
	line, _ := bufio.NewReader(fifo).ReadString('\n')
	fifo.Close()
	say("cue from the demo: %q", trimNL(line))
	if again, err := ioas.Map(f, iommufd.MapOptions{IOVA: iova + m.Length, Fixed: true}); errors.Is(err, unix.ENODEV) {
		say("iommufd: IOMMU_IOAS_MAP_FILE of the same dma-buf again: ENODEV: the exporter revoked it")
	} else if err != nil {
		say("iommufd: IOMMU_IOAS_MAP_FILE again: %v", err)
	} else {
		say("iommufd: IOMMU_IOAS_MAP_FILE again: ok (the dma-buf is NOT revoked)")
		if err := ioas.Unmap(again); err != nil {
			return err
		}
	}
	if err := ioas.Unmap(m); err != nil {
		return err
	}
	say("iommufd: IOMMU_IOAS_UNMAP of the dead mapping: %d bytes", m.Length)
	return nil
}

func trimNL(s string) string {
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == '\r') {
		s = s[:len(s)-1]
	}
	return s
}
