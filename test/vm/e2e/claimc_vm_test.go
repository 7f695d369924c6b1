//go:build vmtest

package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/client/iommufd"
	"github.com/mmiobroker/mmiobroker/internal/dmabuf"
)

// With claimcStage set, the test binary is the VMM of TestClaimC/ClaimAndReclaim.
const (
	claimcStage    = "MMB_E2E_CLAIMC" // allocate, hold, reclaimed
	claimcControl  = "MMB_E2E_CLAIMC_CONTROL"
	claimcSocket   = "MMB_E2E_CLAIMC_SOCKET"
	claimcBin      = "MMB_E2E_CLAIMC_BIN"
	claimcBDF      = "MMB_E2E_CLAIMC_BDF"
	claimcOldInode = "MMB_E2E_CLAIMC_OLD_INODE"

	claimcBAR  = 2
	claimcSize = 64 << 10
)

// init runs the VMM's stages (TestMain in e2e_vm_test.go serves the other tests'
// children). Package initialization runs on the main thread, so the VMM execs from its
// thread-group leader.
func init() {
	stage := os.Getenv(claimcStage)
	if stage == "" {
		return
	}
	if err := claimcVMM(stage); err != nil {
		fmt.Fprintf(os.Stderr, "claimc %s: %v\n", stage, err)
		os.Exit(1)
	}
	os.Exit(0)
}

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
	c := d.client(t)

	t.Run("NotFound", func(t *testing.T) {
		r := claimcRun(t, bin, d.claim, "0123456789abcdef01234567", "0123456789abcdef0123456789abcdef")
		if r.code != 13 || !strings.Contains(r.stderr, "NOT_FOUND (3): ") || r.stdout != "" {
			t.Errorf("claim of an unknown lease: exit %d, stdout %q, stderr %q; want 13 and NOT_FOUND", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("BadTokenAndPermissionDenied", func(t *testing.T) {
		edu := env(t, "EDU1")
		resp, err := c.API().AllocateLease(ctx(t), &brokerv1.AllocateLeaseRequest{Bdf: edu, Bar: 0,
			Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
		if err != nil {
			t.Fatal(err)
		}
		id, token := resp.GetLease().GetId(), resp.GetClaimToken()
		r := claimcRun(t, bin, d.claim, id, strings.Repeat("0", len(token)))
		if r.code != 14 || !strings.Contains(r.stderr, "BAD_TOKEN (4): ") || !strings.Contains(r.stderr, id) {
			t.Errorf("claim with a wrong token: exit %d, stderr %q; want 14 and BAD_TOKEN naming the lease", r.code, r.stderr)
		}
		r = claimcRun(t, bin, d.claim, id, token)
		if r.code != 16 || !strings.Contains(r.stderr, "PERMISSION_DENIED (6): ") {
			t.Errorf("claim from another process: exit %d, stderr %q; want 16 and PERMISSION_DENIED", r.code, r.stderr)
		}
		f, info, err := c.Claim(ctx(t), id, token)
		if err != nil {
			t.Fatalf("claim by the allocating process after the refusals: %v", err)
		}
		f.Close()
		if info.Generation != 1 {
			t.Errorf("claimed %+v", info)
		}
		if _, err := c.Release(ctx(t), id); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("ClaimAndReclaim", func(t *testing.T) {
		ivshmem := env(t, "IVSHMEM")
		lines := claimcChain(t, bin, d, ivshmem, func() {
			resp, err := c.API().CycleDevice(ctx(t), &brokerv1.CycleDeviceRequest{Bdf: ivshmem})
			if err != nil {
				t.Errorf("CycleDevice %s: %v", ivshmem, err)
			}
			t.Logf("CycleDevice: %v", resp)
		})
		id := strings.TrimPrefix(lines["allocated"], "lease_id=")
		common := map[string]string{"lease_id": id, "size": strconv.Itoa(claimcSize), "bdf": ivshmem,
			"bar": strconv.Itoa(claimcBAR), "cloexec": "1", "fdinfo_size": strconv.Itoa(claimcSize),
			"exp_name": "vfio_pci_core", "name": "mmb-" + id}
		gen1 := claimcWant(t, lines["claim 1"], common)
		gen2 := claimcWant(t, lines["claim 2"], common)
		hold, reclaimed := claimcFields(lines["holding"]), claimcFields(lines["reclaimed"])
		if gen1["generation"] != "1" || gen2["generation"] != "2" {
			t.Errorf("claimed generations %s and %s, want 1 and 2", gen1["generation"], gen2["generation"])
		}
		if gen1["inode"] != hold["inode"] || gen2["inode"] != reclaimed["inode"] || gen1["inode"] == gen2["inode"] {
			t.Errorf("inodes: claimed %s then %s, the VMM had %s then %s; want them equal pairwise and the generations different",
				gen1["inode"], gen2["inode"], hold["inode"], reclaimed["inode"])
		}
		if iommufdKernel() && (hold["mapped"] != "yes" || hold["old"] != "ENODEV" || reclaimed["mapped"] != "yes") {
			t.Errorf("iommufd imports: generation 1 mapped=%s, after the cycle %s, generation 2 mapped=%s; want yes, ENODEV, yes",
				hold["mapped"], hold["old"], reclaimed["mapped"])
		}
		got, err := c.API().GetLease(ctx(t), &brokerv1.GetLeaseRequest{LeaseId: id})
		if err != nil {
			t.Fatal(err)
		}
		if l := got.GetLease(); l.GetGeneration() != 2 || strconv.FormatUint(l.GetInode(), 10) != gen2["inode"] {
			t.Errorf("lease after the re-claim: generation %d inode %d; want 2 and %s", l.GetGeneration(), l.GetInode(), gen2["inode"])
		}
	})
}

// claimcResult is how a run of mmb-claim-c ended.
type claimcResult struct {
	code           int
	stdout, stderr string
}

func claimcRun(t *testing.T, bin string, args ...string) claimcResult {
	t.Helper()
	cmd := exec.CommandContext(ctx(t), bin, args...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("run %s: %v", bin, err)
	}
	r := claimcResult{code: cmd.ProcessState.ExitCode(), stdout: stdout.String(), stderr: stderr.String()}
	t.Logf("$ mmb-claim-c %s  (exit %d)\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	return r
}

// claimcFields parses a line of key=value words.
func claimcFields(line string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(line) {
		if k, v, ok := strings.Cut(f, "="); ok {
			m[k] = v
		}
	}
	return m
}

// claimcWant checks fields of mmb-claim-c's success line.
func claimcWant(t *testing.T, line string, want map[string]string) map[string]string {
	t.Helper()
	got := claimcFields(line)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("mmb-claim-c printed %s=%q, want %q (line %q)", k, got[k], v, line)
		}
	}
	return got
}

// claimcChain runs the VMM: one process that allocates a lease of bdf over gRPC and execs
// mmb-claim-c, which claims generation 1 and execs the VMM again with the fd as fd 3; the
// VMM checks it and waits for the reissue that cycle causes, then execs mmb-claim-c with
// the new token, which claims generation 2 and execs the VMM to check that one. It returns
// the output lines by what printed them: "allocated", "claim 1", "holding", "claim 2",
// "reclaimed".
func claimcChain(t *testing.T, bin string, d *daemon, bdf string, cycle func()) map[string]string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx(t), self, "-test.run=^$")
	cmd.Env = append(os.Environ(), claimcStage+"=allocate", claimcControl+"="+d.control, claimcSocket+"="+d.claim,
		claimcBin+"="+bin, claimcBDF+"="+bdf)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := map[string]string{}
	claims := 0
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		t.Logf("VMM: %s", line)
		key, rest, _ := strings.Cut(line, " ")
		switch {
		case key == "ready":
			cycle()
			continue
		case strings.HasPrefix(line, "lease_id="):
			claims++
			key, rest = fmt.Sprintf("claim %d", claims), line
		}
		lines[key] = rest
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the VMM failed: %v\n%s", err, stderr.String())
	}
	for _, k := range []string{"allocated", "claim 1", "holding", "claim 2", "reclaimed"} {
		if _, ok := lines[k]; !ok {
			t.Fatalf("the VMM printed no %q line; it printed %q\nstderr:\n%s", k, lines, stderr.String())
		}
	}
	return lines
}

// claimcVMM runs one stage of the VMM (see claimcChain).
func claimcVMM(stage string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	bin, sock := os.Getenv(claimcBin), os.Getenv(claimcSocket)
	self, err := os.Executable()
	if err != nil {
		return err
	}
	// claim execs mmb-claim-c, which execs this binary again at stage next.
	claim := func(id, token, next string) error {
		os.Setenv(claimcStage, next)
		return syscall.Exec(bin, []string{bin, sock, id, token, self, "-test.run=^$"}, os.Environ())
	}
	switch stage {
	case "allocate":
		c, err := client.Dial(os.Getenv(claimcControl), client.WithClaimSocket(sock))
		if err != nil {
			return err
		}
		resp, err := c.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: os.Getenv(claimcBDF), Bar: claimcBAR,
			Ranges: []*brokerv1.Range{{Offset: 0, Length: claimcSize}}, VmName: "claimc"})
		c.Close()
		if err != nil {
			return err
		}
		fmt.Printf("allocated lease_id=%s\n", resp.GetLease().GetId())
		return claim(resp.GetLease().GetId(), resp.GetClaimToken(), "hold")

	case "hold":
		f, id, inode, err := claimcLeaseFD("1")
		if err != nil {
			return err
		}
		mapped, err := claimcImport(f)
		if err != nil {
			return fmt.Errorf("import generation 1: %w", err)
		}
		c, err := client.Dial(os.Getenv(claimcControl), client.WithClaimSocket(sock))
		if err != nil {
			return err
		}
		defer c.Close()
		fmt.Println("ready")
		// From the first event on, so that the reissue is seen whenever it comes.
		for e, err := range c.Watch(ctx, 1) {
			if err != nil {
				return fmt.Errorf("waiting for the reissue: %w", err)
			}
			if e.GetLease().GetId() != id || e.GetType() != brokerv1.EventType_EVENT_TYPE_REISSUED {
				continue
			}
			if g := e.GetLease().GetGeneration(); g != 2 || e.GetClaimToken() == "" {
				return fmt.Errorf("REISSUED of generation %d with token %q; want generation 2 and a token", g, e.GetClaimToken())
			}
			// The old generation's fd is dead: an importer refuses it.
			old := "-"
			if _, err := claimcImport(f); errors.Is(err, unix.ENODEV) {
				old = "ENODEV"
			} else if err != nil {
				old = strings.ReplaceAll(err.Error(), " ", "_")
			} else if iommufdKernel() {
				old = "mapped"
			}
			fmt.Printf("holding lease_id=%s inode=%d mapped=%s old=%s\n", id, inode, mapped, old)
			unix.CloseOnExec(3) // the dead generation's fd stays behind
			os.Setenv(claimcOldInode, strconv.FormatUint(inode, 10))
			return claim(id, e.GetClaimToken(), "reclaimed")
		}
		return errors.New("the event stream ended before the reissue")

	case "reclaimed":
		f, id, inode, err := claimcLeaseFD("2")
		if err != nil {
			return err
		}
		if old := os.Getenv(claimcOldInode); old == strconv.FormatUint(inode, 10) {
			return fmt.Errorf("generation 2 has the inode of generation 1 (%s)", old)
		}
		mapped, err := claimcImport(f)
		if err != nil {
			return fmt.Errorf("import generation 2: %w", err)
		}
		fmt.Printf("reclaimed lease_id=%s inode=%d mapped=%s\n", id, inode, mapped)
		return nil
	}
	return fmt.Errorf("unknown stage %q", stage)
}

// claimcLeaseFD checks the fd mmb-claim-c left as fd 3: the lease's dma-buf, exported by
// vfio-pci and named after the lease, as the MMIO_LEASE_* variables describe it.
func claimcLeaseFD(generation string) (f *os.File, id string, inode uint64, err error) {
	text, err := os.ReadFile("/proc/self/fdinfo/3")
	if err != nil {
		return nil, "", 0, err
	}
	info, err := dmabuf.ParseFDInfo(string(text))
	if err != nil {
		return nil, "", 0, fmt.Errorf("fd 3: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(3, &st); err != nil {
		return nil, "", 0, fmt.Errorf("fd 3: %w", err)
	}
	id = os.Getenv("MMIO_LEASE_ID")
	want := map[string]string{
		"MMIO_LEASE_FD":         "3",
		"MMIO_LEASE_INODE":      strconv.FormatUint(st.Ino, 10),
		"MMIO_LEASE_SIZE":       strconv.Itoa(claimcSize),
		"MMIO_LEASE_GENERATION": generation,
		"MMIO_LEASE_BDF":        os.Getenv(claimcBDF),
		"MMIO_LEASE_BAR":        strconv.Itoa(claimcBAR),
	}
	for k, v := range want {
		if os.Getenv(k) != v {
			return nil, "", 0, fmt.Errorf("%s=%q, want %q", k, os.Getenv(k), v)
		}
	}
	if info.ExpName != "vfio_pci_core" || info.Name != "mmb-"+id || info.Size != claimcSize || info.Inode != st.Ino {
		return nil, "", 0, fmt.Errorf("fd 3 fdinfo %+v (inode %d); want a %d-byte vfio_pci_core dma-buf named mmb-%s", info, st.Ino, claimcSize, id)
	}
	return os.NewFile(3, "lease-"+id), id, st.Ino, nil
}

// claimcImport maps the whole dma-buf into a fresh iommufd IOAS with the importer a VMM
// uses (client/iommufd), and reports "yes"; on the stock kernel, which has no iommufd, it
// reports "-". Errors keep the kernel's errno (ENODEV for a revoked dma-buf).
func claimcImport(f *os.File) (string, error) {
	if !iommufdKernel() {
		return "-", nil
	}
	io, err := iommufd.Open("")
	if err != nil {
		return "", err
	}
	defer io.Close()
	ioas, err := io.AllocIOAS()
	if err != nil {
		return "", err
	}
	m, err := ioas.Map(f, iommufd.MapOptions{IOVA: 0x100000, Fixed: true})
	if err != nil {
		return "", err
	}
	if m.IOVA != 0x100000 || m.Length != claimcSize {
		return "", fmt.Errorf("mapped %d bytes at IOVA %#x, want %d at 0x100000", m.Length, m.IOVA, claimcSize)
	}
	return "yes", nil
}
