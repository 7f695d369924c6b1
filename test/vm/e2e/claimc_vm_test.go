//go:build vmtest

package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/client/iommufd"
	"github.com/mmiobroker/mmiobroker/examples/c/claimchain"
	"github.com/mmiobroker/mmiobroker/internal/dmabuf"
)

const (
	claimcBAR  = 2
	claimcSize = 64 << 10
)

// claimcChain is TestClaimC/ClaimAndReclaim's VMM chain on the rig's devices: 64 KiB of
// BAR 2, whose fd is the lease's vfio_pci_core dma-buf, and on the iommufd kernel each
// generation is imported into iommufd (and the dead one refused with ENODEV).
func claimcChain() claimchain.Chain {
	ch := claimchain.Chain{BAR: claimcBAR, Size: claimcSize, VMName: "claimc", CheckFD: claimcDMABuf,
		Claimed: func(id string) map[string]string {
			return map[string]string{"fdinfo_size": strconv.Itoa(claimcSize), "exp_name": "vfio_pci_core", "name": "mmb-" + id}
		}}
	if iommufdKernel() {
		ch.Import = claimcImport
	}
	return ch
}

// init runs the VMM's stages (TestMain in e2e_vm_test.go serves the other tests'
// children). Package initialization runs on the main thread, so the VMM execs from its
// thread-group leader.
func init() { claimcChain().Main() }

// TestClaimC runs the C claim client (examples/c/mmb-claim.c, mmb-claim-c in the guest,
// built static with -Wall -Wextra -Werror by the rig) against mmiobrokerd on the rig's
// devices: refusals by code and exit status, and, from the process that allocated, a claim
// of a working vfio_pci_core dma-buf and, after the device cycles, the claim of the
// reissued generation with the new token.
func TestClaimC(t *testing.T) {
	bin, err := exec.LookPath("mmb-claim-c")
	if err != nil {
		t.Fatalf("mmb-claim-c is not in the guest (the rig builds it from examples/c/mmb-claim.c): %v", err)
	}
	d := startDaemon(t)
	tg := claimchain.Target{Bin: bin, Control: d.control, Claim: d.claim, Client: d.client(t),
		Run: func(t *testing.T, args ...string) claimchain.Result {
			t.Helper()
			return claimchain.RunClient(t, ctx(t), nil, bin, args...)
		}}

	t.Run("NotFound", tg.NotFound)
	t.Run("BadTokenAndPermissionDenied", func(t *testing.T) { tg.BadTokenAndPermissionDenied(t, ctx(t), env(t, "EDU1")) })
	t.Run("ClaimAndReclaim", func(t *testing.T) { tg.ClaimAndReclaim(t, ctx(t), env(t, "IVSHMEM"), claimcChain()) })
}

// claimcDMABuf checks that fd 3 is the lease's dma-buf: exported by vfio-pci, of the
// lease's size and named after the lease.
func claimcDMABuf(id string, st *unix.Stat_t) error {
	text, err := os.ReadFile("/proc/self/fdinfo/3")
	if err != nil {
		return err
	}
	info, err := dmabuf.ParseFDInfo(string(text))
	if err != nil {
		return err
	}
	if info.ExpName != "vfio_pci_core" || info.Name != "mmb-"+id || info.Size != claimcSize || info.Inode != st.Ino {
		return fmt.Errorf("fdinfo %+v (inode %d); want a %d-byte vfio_pci_core dma-buf named mmb-%s", info, st.Ino, claimcSize, id)
	}
	return nil
}

// claimcImport maps the whole dma-buf into a fresh iommufd IOAS with the importer a VMM
// uses (client/iommufd). Errors keep the kernel's errno (ENODEV for a revoked dma-buf).
func claimcImport(f *os.File) error {
	io, err := iommufd.Open("")
	if err != nil {
		return err
	}
	defer io.Close()
	ioas, err := io.AllocIOAS()
	if err != nil {
		return err
	}
	m, err := ioas.Map(f, iommufd.MapOptions{IOVA: 0x100000, Fixed: true})
	if err != nil {
		return err
	}
	if m.IOVA != 0x100000 || m.Length != claimcSize {
		return fmt.Errorf("mapped %d bytes at IOVA %#x, want %d at 0x100000", m.Length, m.IOVA, claimcSize)
	}
	return nil
}
