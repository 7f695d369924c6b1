// Package claimchain is test code for the C claim client ../mmb-claim.c, shared by its two
// tests: examples/c/ctest (on the host, against the daemon in process on a fake device)
// and test/vm/e2e's TestClaimC (in the rig's guest, against mmiobrokerd on real devices).
// It runs the client and reads its output, checks its refusals, and runs the VMM chain: a
// process that allocates a lease execs mmb-claim, which claims the lease and execs the
// VMM with the fd; after a device cycle the VMM execs mmb-claim with the reissued
// generation's token, which claims it and execs the VMM once more.
//
// What differs between the two sides (the device, BAR and size, what fd 3 is, an iommufd
// import in the guest, how the client is run) is a field of Target or Chain. It is not an
// example of a VMM; it imports testing.
package claimchain

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
)

// Result is how a run of mmb-claim ended.
type Result struct {
	Code           int
	Stdout, Stderr string
}

// RunClient runs the client bin with args, with env added to the test's environment (nil:
// the test's environment), and logs how it ended.
func RunClient(t *testing.T, ctx context.Context, env []string, bin string, args ...string) Result {
	t.Helper()
	cmd := exec.CommandContext(ctx, bin, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("run %s: %v", bin, err)
	}
	r := Result{Code: cmd.ProcessState.ExitCode(), Stdout: stdout.String(), Stderr: stderr.String()}
	t.Logf("$ %s %s  (exit %d)\n%s%s", filepath.Base(bin), strings.Join(args, " "), r.Code, r.Stdout, r.Stderr)
	return r
}

// Fields parses a line of key=value words, such as the client's success line.
func Fields(line string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(line) {
		if k, v, ok := strings.Cut(f, "="); ok {
			m[k] = v
		}
	}
	return m
}

// WantFields checks some fields of the client's success line and returns them all.
func WantFields(t *testing.T, line string, want map[string]string) map[string]string {
	t.Helper()
	got := Fields(line)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("mmb-claim printed %s=%q, want %q (line %q)", k, got[k], v, line)
		}
	}
	return got
}

// Target is what a test runs mmb-claim against.
type Target struct {
	Bin string // the built client, which the VMM chain execs
	// Run runs Bin with args: RunClient, with what the side adds (the host's sanitizer
	// check).
	Run     func(t *testing.T, args ...string) Result
	Control string         // the daemon's control socket
	Claim   string         // the daemon's claim socket
	Client  *client.Client // the daemon's client in the test's process, which is not the VMM
}

// NotFound: the claim of a lease the daemon does not know exits 13 with NOT_FOUND and
// prints nothing on stdout.
func (tg Target) NotFound(t *testing.T) {
	r := tg.Run(t, tg.Claim, "0123456789abcdef01234567", "0123456789abcdef0123456789abcdef")
	if r.Code != 13 || !strings.Contains(r.Stderr, "NOT_FOUND (3): ") || r.Stdout != "" {
		t.Errorf("claim of an unknown lease: exit %d, stdout %q, stderr %q; want 13 and NOT_FOUND", r.Code, r.Stdout, r.Stderr)
	}
}

// BadTokenAndPermissionDenied allocates a page of bdf's BAR 0 from the test's process: a
// claim with a wrong token exits 14 with BAD_TOKEN naming the lease, one with the right
// token 16 with PERMISSION_DENIED (mmb-claim is not the allocating process), and neither
// spent the token: the test's process claims with it.
func (tg Target) BadTokenAndPermissionDenied(t *testing.T, ctx context.Context, bdf string) {
	c := tg.Client
	resp, err := c.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: bdf, Bar: 0,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	id, token := resp.GetLease().GetId(), resp.GetClaimToken()
	r := tg.Run(t, tg.Claim, id, strings.Repeat("0", len(token)))
	if r.Code != 14 || !strings.Contains(r.Stderr, "BAD_TOKEN (4): ") || !strings.Contains(r.Stderr, id) {
		t.Errorf("claim with a wrong token: exit %d, stderr %q; want 14 and BAD_TOKEN naming the lease", r.Code, r.Stderr)
	}
	r = tg.Run(t, tg.Claim, id, token)
	if r.Code != 16 || !strings.Contains(r.Stderr, "PERMISSION_DENIED (6): ") {
		t.Errorf("claim from another process: exit %d, stderr %q; want 16 and PERMISSION_DENIED", r.Code, r.Stderr)
	}
	f, info, err := c.Claim(ctx, id, token)
	if err != nil {
		t.Fatalf("claim by the allocating process after the refusals: %v", err)
	}
	f.Close()
	if info.Generation != 1 {
		t.Errorf("claimed %+v", info)
	}
	if _, err := c.Release(ctx, id); err != nil {
		t.Fatal(err)
	}
}

// Chain is one side's VMM chain: the lease it allocates, and the checks the side adds to
// the shared ones. The test's process and the VMM's must use the same Chain.
type Chain struct {
	BAR    uint32
	Size   uint64 // of the lease, one range from offset 0
	VMName string // the lease's vm_name; "" for none

	// CheckFD, if set, checks more of the claimed fd 3 in the VMM (after the MMIO_LEASE_*
	// variables mmb-claim set), with fstat's answer for it.
	CheckFD func(id string, st *unix.Stat_t) error
	// Import, if set, maps a claimed fd as a VMM's importer would. The VMM imports both
	// generations and, after the reissue, the dead one again, which must fail with ENODEV.
	Import func(f *os.File) error
	// Claimed, if set, gives fields the client's success lines must have besides the
	// lease's own (lease_id, size, bdf, bar, cloexec=1).
	Claimed func(id string) map[string]string
}

// The environment of the VMM's stages.
const (
	envStage    = "MMB_CLAIMCHAIN_STAGE" // allocate, hold, reclaimed
	envControl  = "MMB_CLAIMCHAIN_CONTROL"
	envClaim    = "MMB_CLAIMCHAIN_CLAIM"
	envBin      = "MMB_CLAIMCHAIN_BIN"
	envBDF      = "MMB_CLAIMCHAIN_BDF"
	envOldInode = "MMB_CLAIMCHAIN_OLD_INODE"
)

// Main runs a stage of the VMM and exits when the environment names one, and returns at
// once otherwise. The test binary is the VMM: call Main before the tests run, from
// TestMain or init, so that the VMM execs mmb-claim from its main thread.
func (ch Chain) Main() {
	stage := os.Getenv(envStage)
	if stage == "" {
		return
	}
	// Exec from the thread-group leader, though the kernel would handle any thread.
	runtime.LockOSThread()
	if err := ch.stage(stage); err != nil {
		fmt.Fprintf(os.Stderr, "claimchain VMM %s: %v\n", stage, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// ClaimAndReclaim runs the VMM chain on a lease of bdf and cycles the device when the VMM
// holds generation 1: each generation is claimed with its own inode, as the VMM saw it,
// and the lease ends at generation 2 with the inode claimed last.
func (tg Target) ClaimAndReclaim(t *testing.T, ctx context.Context, bdf string, ch Chain) {
	lines := tg.chain(t, ctx, bdf, func() {
		resp, err := tg.Client.API().CycleDevice(ctx, &brokerv1.CycleDeviceRequest{Bdf: bdf})
		if err != nil {
			t.Errorf("CycleDevice %s: %v", bdf, err)
		}
		t.Logf("CycleDevice: %v", resp)
	})
	id := strings.TrimPrefix(lines["allocated"], "lease_id=")
	common := map[string]string{"lease_id": id, "size": strconv.FormatUint(ch.Size, 10), "bdf": bdf,
		"bar": strconv.FormatUint(uint64(ch.BAR), 10), "cloexec": "1"}
	if ch.Claimed != nil {
		maps.Copy(common, ch.Claimed(id))
	}
	gen1 := WantFields(t, lines["claim 1"], common)
	gen2 := WantFields(t, lines["claim 2"], common)
	hold, reclaimed := Fields(lines["holding"]), Fields(lines["reclaimed"])
	if gen1["generation"] != "1" || gen2["generation"] != "2" {
		t.Errorf("claimed generations %s and %s, want 1 and 2", gen1["generation"], gen2["generation"])
	}
	if gen1["inode"] != hold["inode"] || gen2["inode"] != reclaimed["inode"] || gen1["inode"] == gen2["inode"] {
		t.Errorf("inodes: claimed %s then %s, the VMM had %s then %s; want them equal pairwise and the generations different",
			gen1["inode"], gen2["inode"], hold["inode"], reclaimed["inode"])
	}
	if ch.Import != nil && (hold["mapped"] != "yes" || hold["old"] != "ENODEV" || reclaimed["mapped"] != "yes") {
		t.Errorf("imports: generation 1 mapped=%s, after the cycle %s, generation 2 mapped=%s; want yes, ENODEV, yes",
			hold["mapped"], hold["old"], reclaimed["mapped"])
	}
	got, err := tg.Client.API().GetLease(ctx, &brokerv1.GetLeaseRequest{LeaseId: id})
	if err != nil {
		t.Fatal(err)
	}
	if l := got.GetLease(); l.GetGeneration() != 2 || strconv.FormatUint(l.GetInode(), 10) != gen2["inode"] {
		t.Errorf("lease after the re-claim: generation %d inode %d; want 2 and %s", l.GetGeneration(), l.GetInode(), gen2["inode"])
	}
}

// chain runs the VMM: one process that allocates a lease of bdf over gRPC and execs
// mmb-claim, which claims generation 1 and execs the VMM again with the fd as fd 3; the
// VMM checks it and prints "ready", on which chain calls cycle, and waits for the reissue
// that causes, then execs mmb-claim with the new token, which claims generation 2 and
// execs the VMM to check that one. It returns the output lines by what printed them:
// "allocated", "claim 1", "holding", "claim 2", "reclaimed".
func (tg Target) chain(t *testing.T, ctx context.Context, bdf string, cycle func()) map[string]string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, self, "-test.run=^$")
	cmd.Env = append(os.Environ(), envStage+"=allocate", envControl+"="+tg.Control, envClaim+"="+tg.Claim,
		envBin+"="+tg.Bin, envBDF+"="+bdf)
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

// stage runs one stage of the VMM (see chain).
func (ch Chain) stage(stage string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	bin, sock := os.Getenv(envBin), os.Getenv(envClaim)
	self, err := os.Executable()
	if err != nil {
		return err
	}
	// claim execs mmb-claim, which execs this binary again at stage next.
	claim := func(id, token, next string) error {
		os.Setenv(envStage, next)
		return syscall.Exec(bin, []string{bin, sock, id, token, self, "-test.run=^$"}, os.Environ())
	}
	switch stage {
	case "allocate":
		c, err := client.Dial(os.Getenv(envControl), client.WithClaimSocket(sock))
		if err != nil {
			return err
		}
		resp, err := c.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: os.Getenv(envBDF), Bar: ch.BAR,
			Ranges: []*brokerv1.Range{{Offset: 0, Length: ch.Size}}, VmName: ch.VMName})
		c.Close()
		if err != nil {
			return err
		}
		fmt.Printf("allocated lease_id=%s\n", resp.GetLease().GetId())
		return claim(resp.GetLease().GetId(), resp.GetClaimToken(), "hold")

	case "hold":
		f, id, inode, err := ch.leaseFD(1)
		if err != nil {
			return err
		}
		mapped, err := ch.imported(f)
		if err != nil {
			return fmt.Errorf("import generation 1: %w", err)
		}
		c, err := client.Dial(os.Getenv(envControl), client.WithClaimSocket(sock))
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
			fmt.Printf("holding lease_id=%s inode=%d mapped=%s old=%s\n", id, inode, mapped, ch.importDead(f))
			runtime.KeepAlive(f) // its finalizer would close fd 3
			unix.CloseOnExec(3)  // the dead generation's fd stays behind
			os.Setenv(envOldInode, strconv.FormatUint(inode, 10))
			return claim(id, e.GetClaimToken(), "reclaimed")
		}
		return errors.New("the event stream ended before the reissue")

	case "reclaimed":
		f, id, inode, err := ch.leaseFD(2)
		if err != nil {
			return err
		}
		if old := os.Getenv(envOldInode); old == strconv.FormatUint(inode, 10) {
			return fmt.Errorf("generation 2 has the inode of generation 1 (%s)", old)
		}
		mapped, err := ch.imported(f)
		if err != nil {
			return fmt.Errorf("import generation 2: %w", err)
		}
		fmt.Printf("reclaimed lease_id=%s inode=%d mapped=%s\n", id, inode, mapped)
		return nil
	}
	return fmt.Errorf("unknown stage %q", stage)
}

// leaseFD checks the fd mmb-claim left as fd 3 against the MMIO_LEASE_* variables it set,
// and with CheckFD.
func (ch Chain) leaseFD(generation int) (f *os.File, id string, inode uint64, err error) {
	var st unix.Stat_t
	if err := unix.Fstat(3, &st); err != nil {
		return nil, "", 0, fmt.Errorf("fd 3: %w", err)
	}
	id = os.Getenv("MMIO_LEASE_ID")
	want := map[string]string{
		"MMIO_LEASE_FD":         "3",
		"MMIO_LEASE_INODE":      strconv.FormatUint(st.Ino, 10),
		"MMIO_LEASE_SIZE":       strconv.FormatUint(ch.Size, 10),
		"MMIO_LEASE_GENERATION": strconv.Itoa(generation),
		"MMIO_LEASE_BDF":        os.Getenv(envBDF),
		"MMIO_LEASE_BAR":        strconv.FormatUint(uint64(ch.BAR), 10),
	}
	for k, v := range want {
		if os.Getenv(k) != v {
			return nil, "", 0, fmt.Errorf("%s=%q, want %q (fd 3: inode %d, size %d)", k, os.Getenv(k), v, st.Ino, st.Size)
		}
	}
	if id == "" {
		return nil, "", 0, errors.New("no MMIO_LEASE_ID")
	}
	if ch.CheckFD != nil {
		if err := ch.CheckFD(id, &st); err != nil {
			return nil, "", 0, fmt.Errorf("fd 3: %w", err)
		}
	}
	return os.NewFile(3, "lease-"+id), id, st.Ino, nil
}

// imported imports f with Import and reports "yes", or "-" without an Import.
func (ch Chain) imported(f *os.File) (string, error) {
	if ch.Import == nil {
		return "-", nil
	}
	if err := ch.Import(f); err != nil {
		return "", err
	}
	return "yes", nil
}

// importDead imports f, the dead generation's fd, once more and reports how that ended:
// "ENODEV" (the importer refuses it), another error as one word, "mapped", or "-"
// without an Import.
func (ch Chain) importDead(f *os.File) string {
	if ch.Import == nil {
		return "-"
	}
	switch err := ch.Import(f); {
	case errors.Is(err, unix.ENODEV):
		return "ENODEV"
	case err != nil:
		return strings.ReplaceAll(err.Error(), " ", "_")
	}
	return "mapped"
}
