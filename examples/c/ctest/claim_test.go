// Package ctest tests the C claim client ../mmb-claim.c (a directory with C files cannot
// hold Go files without cgo): gcc builds it with warnings as errors,
// and it runs against the daemon's claim server (in process, on a fake device) and against
// a hostile server that breaks the protocol's rules one at a time.
package ctest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// cflags are the flags of examples/c/README.md; test/vm/vmrig adds -static for the guest.
var cflags = []string{"-std=c11", "-O2", "-Wall", "-Wextra", "-Werror"}

// sanitizeFlags build the copy that runs against the hostile server: a read out of bounds
// or undefined behaviour on a malformed reply ends it with status sanitizerExit.
var sanitizeFlags = append(append([]string{}, cflags...), "-g", "-fno-omit-frame-pointer",
	"-fsanitize=address,undefined", "-fno-sanitize-recover=all")

const sanitizerExit = 66

// With envStage set, the test binary is the VMM whose process allocates a lease and
// claims it through mmb-claim (TestClaimC/ClaimAndReclaim), instead of a test run.
const (
	envStage    = "MMB_CLAIMC_STAGE" // allocate, hold, reclaimed
	envControl  = "MMB_CLAIMC_CONTROL"
	envClaim    = "MMB_CLAIMC_CLAIM"
	envBin      = "MMB_CLAIMC_BIN"
	envBDF      = "MMB_CLAIMC_BDF"
	envOldInode = "MMB_CLAIMC_OLD_INODE"
)

const (
	bdf       = "0000:00:03.0"
	leaseSize = 64 << 10
)

// buildDir holds the compiled clients for the whole test run.
var buildDir string

func TestMain(m *testing.M) {
	if stage := os.Getenv(envStage); stage != "" {
		// Exec from the thread-group leader, though the kernel would handle any thread.
		runtime.LockOSThread()
		if err := helper(stage); err != nil {
			fmt.Fprintf(os.Stderr, "helper %s: %v\n", stage, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "mmbclaimc")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	buildDir = dir
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		os.RemoveAll(dir)
		os.Exit(code)
	}))
}

// build compiles mmb-claim.c once per test binary.
type build struct {
	once sync.Once
	path string
	err  error
}

var plain, sanitized build

// get returns the client built with flags, or fails the test: a missing gcc is a failure
// (make setup installs build-essential), and so is any diagnostic gcc prints.
func (b *build) get(t *testing.T, name string, flags []string) string {
	t.Helper()
	b.once.Do(func() {
		gcc, err := exec.LookPath("gcc")
		if err != nil {
			b.err = fmt.Errorf("the C client cannot be tested without gcc (%v): install build-essential (make setup)", err)
			return
		}
		b.path = filepath.Join(buildDir, name)
		args := append(append([]string{}, flags...), "-o", b.path, "../mmb-claim.c")
		out, err := exec.Command(gcc, args...).CombinedOutput()
		if err != nil || len(out) > 0 {
			b.err = fmt.Errorf("gcc %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// result is how a run of the client ended.
type result struct {
	code           int
	stdout, stderr string
}

func runClient(t *testing.T, bin string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(),
		fmt.Sprintf("ASAN_OPTIONS=exitcode=%d:detect_leaks=0", sanitizerExit),
		fmt.Sprintf("UBSAN_OPTIONS=exitcode=%d:print_stacktrace=1", sanitizerExit))
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("run %s: %v", bin, err)
	}
	r := result{code: cmd.ProcessState.ExitCode(), stdout: stdout.String(), stderr: stderr.String()}
	if r.code == sanitizerExit || strings.Contains(r.stderr, "Sanitizer") || strings.Contains(r.stderr, "runtime error") {
		t.Fatalf("mmb-claim %q: sanitizer report (exit %d):\n%s", args, r.code, r.stderr)
	}
	return r
}

// fields parses the client's success line, key=value separated by spaces.
func fields(line string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(line) {
		if k, v, ok := strings.Cut(f, "="); ok {
			m[k] = v
		}
	}
	return m
}

// wantFields checks some fields of a success line.
func wantFields(t *testing.T, line string, want map[string]string) map[string]string {
	t.Helper()
	got := fields(line)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("client printed %s=%q, want %q (line %q)", k, got[k], v, line)
		}
	}
	return got
}

// TestClaimC runs the client against the claim server of the daemon (daemontest: the
// real wiring, fake devices): refusals by code and exit status, and from the allocating
// process a claim, a device cycle and the re-claim of the reissued generation.
func TestClaimC(t *testing.T) {
	testutil.FDLeakCheck(t)
	bin := plain.get(t, "mmb-claim", cflags)
	d := daemontest.Start(t, fmt.Sprintf("[[device]]\naddress = %q\nallow_uids = [%d]\n", bdf, os.Getuid()),
		brokertest.NewDevice(bdf))
	c, err := client.Dial(d.Control, client.WithClaimSocket(d.Claim))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	t.Run("NotFound", func(t *testing.T) {
		r := runClient(t, bin, d.Claim, "0123456789abcdef01234567", "0123456789abcdef0123456789abcdef")
		if r.code != 13 || !strings.Contains(r.stderr, "NOT_FOUND (3): ") || r.stdout != "" {
			t.Errorf("claim of an unknown lease: exit %d, stdout %q, stderr %q; want 13 and NOT_FOUND", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("BadTokenAndPermissionDenied", func(t *testing.T) {
		resp, err := c.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: bdf, Bar: 0,
			Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
		if err != nil {
			t.Fatal(err)
		}
		id, token := resp.GetLease().GetId(), resp.GetClaimToken()
		wrong := strings.Repeat("0", len(token))
		r := runClient(t, bin, d.Claim, id, wrong)
		if r.code != 14 || !strings.Contains(r.stderr, "BAD_TOKEN (4): ") || !strings.Contains(r.stderr, id) {
			t.Errorf("claim with a wrong token: exit %d, stderr %q; want 14 and BAD_TOKEN naming the lease", r.code, r.stderr)
		}
		// The right token from another process than the allocating one (this one).
		r = runClient(t, bin, d.Claim, id, token)
		if r.code != 16 || !strings.Contains(r.stderr, "PERMISSION_DENIED (6): ") {
			t.Errorf("claim from another process: exit %d, stderr %q; want 16 and PERMISSION_DENIED", r.code, r.stderr)
		}
		// Neither refusal spent the token: the allocating process claims with it.
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
	})

	t.Run("ClaimAndReclaim", func(t *testing.T) {
		lines := runChain(t, ctx, bin, d, func() {
			if _, err := c.API().CycleDevice(ctx, &brokerv1.CycleDeviceRequest{Bdf: bdf}); err != nil {
				t.Errorf("CycleDevice: %v", err)
			}
		})
		id := strings.TrimPrefix(lines["allocated"], "lease_id=")
		common := map[string]string{"lease_id": id, "size": strconv.Itoa(leaseSize), "bdf": bdf, "bar": "0", "cloexec": "1"}
		gen1 := wantFields(t, lines["claim 1"], common)
		gen2 := wantFields(t, lines["claim 2"], common)
		hold, reclaimed := fields(lines["holding"]), fields(lines["reclaimed"])
		if gen1["generation"] != "1" || gen2["generation"] != "2" {
			t.Errorf("claimed generations %s and %s, want 1 and 2", gen1["generation"], gen2["generation"])
		}
		if gen1["inode"] != hold["inode"] || gen2["inode"] != reclaimed["inode"] || gen1["inode"] == gen2["inode"] {
			t.Errorf("inodes: claimed %s then %s, the helper had %s then %s; want them equal pairwise and the two generations different",
				gen1["inode"], gen2["inode"], hold["inode"], reclaimed["inode"])
		}
		got, err := c.API().GetLease(ctx, &brokerv1.GetLeaseRequest{LeaseId: id})
		if err != nil {
			t.Fatal(err)
		}
		if l := got.GetLease(); l.GetGeneration() != 2 || strconv.FormatUint(l.GetInode(), 10) != gen2["inode"] {
			t.Errorf("lease after the re-claim: generation %d inode %d; want 2 and %s", l.GetGeneration(), l.GetInode(), gen2["inode"])
		}
	})
}

// runChain runs the helper VMM: one process that allocates a lease over gRPC, execs
// mmb-claim, which claims generation 1 and execs the helper again (fd 3), which waits for
// the reissue that cycle causes and execs mmb-claim with the new token, which claims
// generation 2 and execs the helper once more to check it. It returns the chain's output
// lines by what printed them: "allocated", "claim 1", "holding", "claim 2", "reclaimed".
func runChain(t *testing.T, ctx context.Context, bin string, d *daemontest.Daemon, cycle func()) map[string]string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, self, "-test.run=^$")
	cmd.Env = append(os.Environ(), envStage+"=allocate", envControl+"="+d.Control, envClaim+"="+d.Claim,
		envBin+"="+bin, envBDF+"="+bdf)
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
		t.Logf("chain: %s", line)
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
		t.Fatalf("the chain failed: %v\n%s", err, stderr.String())
	}
	for _, k := range []string{"allocated", "claim 1", "holding", "claim 2", "reclaimed"} {
		if _, ok := lines[k]; !ok {
			t.Fatalf("the chain printed no %q line; it printed %q\nstderr:\n%s", k, lines, stderr.String())
		}
	}
	return lines
}

// helper runs one stage of the chain (see runChain) in the child process.
func helper(stage string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	bin, claimSock := os.Getenv(envBin), os.Getenv(envClaim)
	self, err := os.Executable()
	if err != nil {
		return err
	}
	// claim execs mmb-claim, which execs this binary again at stage next.
	claim := func(id, token, next string) error {
		os.Setenv(envStage, next)
		argv := []string{bin, claimSock, id, token, self, "-test.run=^$"}
		return syscall.Exec(bin, argv, os.Environ())
	}
	switch stage {
	case "allocate":
		c, err := client.Dial(os.Getenv(envControl), client.WithClaimSocket(claimSock))
		if err != nil {
			return err
		}
		resp, err := c.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: os.Getenv(envBDF), Bar: 0,
			Ranges: []*brokerv1.Range{{Offset: 0, Length: leaseSize}}})
		c.Close()
		if err != nil {
			return err
		}
		fmt.Printf("allocated lease_id=%s\n", resp.GetLease().GetId())
		return claim(resp.GetLease().GetId(), resp.GetClaimToken(), "hold")

	case "hold":
		id, inode, err := checkFD3("1")
		if err != nil {
			return err
		}
		fmt.Printf("holding lease_id=%s inode=%d\n", id, inode)
		c, err := client.Dial(os.Getenv(envControl), client.WithClaimSocket(claimSock))
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
			unix.CloseOnExec(3) // the dead generation's fd stays behind
			os.Setenv(envOldInode, strconv.FormatUint(inode, 10))
			return claim(id, e.GetClaimToken(), "reclaimed")
		}
		return errors.New("the event stream ended before the reissue")

	case "reclaimed":
		id, inode, err := checkFD3("2")
		if err != nil {
			return err
		}
		if old := os.Getenv(envOldInode); old == strconv.FormatUint(inode, 10) {
			return fmt.Errorf("generation 2 has the inode of generation 1 (%s)", old)
		}
		fmt.Printf("reclaimed lease_id=%s inode=%d\n", id, inode)
		return nil
	}
	return fmt.Errorf("unknown stage %q", stage)
}

// checkFD3 checks the fd mmb-claim left as fd 3 against the MMIO_LEASE_* variables it set.
func checkFD3(generation string) (id string, inode uint64, err error) {
	var st unix.Stat_t
	if err := unix.Fstat(3, &st); err != nil {
		return "", 0, fmt.Errorf("fd 3: %w", err)
	}
	id = os.Getenv("MMIO_LEASE_ID")
	want := map[string]string{
		"MMIO_LEASE_FD":         "3",
		"MMIO_LEASE_INODE":      strconv.FormatUint(st.Ino, 10),
		"MMIO_LEASE_SIZE":       strconv.FormatInt(st.Size, 10),
		"MMIO_LEASE_GENERATION": generation,
		"MMIO_LEASE_BDF":        os.Getenv(envBDF),
		"MMIO_LEASE_BAR":        "0",
	}
	for k, v := range want {
		if os.Getenv(k) != v {
			return "", 0, fmt.Errorf("%s=%q, want %q (fd 3: inode %d, size %d)", k, os.Getenv(k), v, st.Ino, st.Size)
		}
	}
	if id == "" || st.Size != leaseSize {
		return "", 0, fmt.Errorf("MMIO_LEASE_ID %q, fd 3 of %d bytes; want an id and %d bytes", id, st.Size, leaseSize)
	}
	return id, st.Ino, nil
}

// hostile is one reply of the hostile server.
type hostile struct {
	name   string
	reply  []byte // nil: hang up without replying
	fds    [][]int
	unread bool // reply and close without reading the request: the client sees ECONNRESET first
	code   int
	output string // in stdout on success, in stderr otherwise
}

// TestClaimCHostile runs the sanitizer build against a server that sends replies
// fdpass.EncodeReply would never produce (and some it does): every rule of the protocol's
// §3 and §4 broken in turn must end in status 3, and the valid ones decode field by field.
func TestClaimCHostile(t *testing.T) {
	testutil.FDLeakCheck(t)
	bin := sanitized.get(t, "mmb-claim-asan", sanitizeFlags)
	const id, token = "f8993b72bc8a8ade9051692b", "54c6ce599a861833d03607d1e01dcff1"
	mfd, err := unix.MemfdCreate("hostile", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mfd)
	var st unix.Stat_t
	if err := unix.Fstat(mfd, &st); err != nil {
		t.Fatal(err)
	}
	enc := func(r fdpass.Reply) []byte {
		b, err := fdpass.EncodeReply(r)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ok := fdpass.Reply{Code: fdpass.CodeOK, LeaseID: id, Generation: 7, Size: 4096, Inode: st.Ino, BDF: "0000:00:03.0", BAR: 5}
	refusal := fdpass.Reply{Code: fdpass.CodeBadToken, LeaseID: id, Message: "claim token is wrong"}
	with := func(r fdpass.Reply, f func(*fdpass.Reply)) fdpass.Reply { f(&r); return r }
	// patch encodes r and changes bytes at off; the length field stays as encoded.
	patch := func(r fdpass.Reply, off int, b ...byte) []byte {
		m := enc(r)
		copy(m[off:], b)
		return m
	}
	one := [][]int{{mfd}}
	okLine := fmt.Sprintf("lease_id=%s generation=7 size=4096 inode=%d bdf=0000:00:03.0 bar=5 fd=", id, st.Ino)
	oversize := append(enc(refusal), make([]byte, fdpass.MaxReplySize+1-len(enc(refusal)))...)
	binary.LittleEndian.PutUint32(oversize[8:], uint32(len(oversize)))
	longest := with(refusal, func(r *fdpass.Reply) { r.LeaseID = ""; r.Message = strings.Repeat("é", fdpass.MaxMessageLen/2) })

	for _, tc := range []hostile{
		{name: "success", reply: enc(ok), fds: one, output: okLine},
		{name: "success after ECONNRESET", reply: enc(ok), fds: one, unread: true, output: okLine},
		{name: "refusal", reply: enc(refusal), code: 14, output: "mmb-claim: BAD_TOKEN (4): claim token is wrong\n"},
		{name: "refusal without lease id, longest message", reply: enc(longest), code: 14, output: "BAD_TOKEN (4): éé"},
		{name: "refusal with a code from the future", reply: enc(fdpass.Reply{Code: 99, Message: "new"}), code: 30, output: "CODE_99"},
		{name: "hang-up without a reply", code: 19, output: "UNAVAILABLE (9): the server closed the connection without a reply"},
		{name: "short", reply: enc(ok)[:40], fds: one, code: 3, output: "shorter than 56"},
		{name: "oversize", reply: oversize, code: 3, output: "larger than 1240"},
		{name: "magic", reply: patch(ok, 0, 'M', 'M', 'B', 'D'), fds: one, code: 3, output: "bad magic"},
		{name: "version 2", reply: patch(ok, 4, 2), fds: one, code: 3, output: "version is not 1"},
		{name: "type request", reply: patch(ok, 6, 1), fds: one, code: 3, output: "type is not 2"},
		{name: "length field", reply: patch(ok, 8, 0xff), fds: one, code: 3, output: "length field"},
		{name: "reserved", reply: patch(ok, 55, 1), fds: one, code: 3, output: "reserved"},
		{name: "field lengths", reply: patch(refusal, 48, 0xff), code: 3, output: "do not add up"},
		{name: "lease id too long", reply: patch(refusal, 44, 129), code: 3, output: "do not add up"},
		{name: "bdf not printable", reply: patch(ok, fdpass.ReplyFixedSize+len(id)+4, ' '), fds: one, code: 3, output: "not printable"},
		{name: "message not UTF-8", reply: patch(refusal, fdpass.ReplyFixedSize+len(id), 0xc0, 0xaf), code: 3, output: "not UTF-8"},
		{name: "success without an fd", reply: enc(ok), code: 3, output: "exactly one fd"},
		{name: "success with two fds", reply: enc(ok), fds: [][]int{{mfd, mfd}}, code: 3, output: "exactly one fd"},
		{name: "success with two SCM_RIGHTS messages", reply: enc(ok), fds: [][]int{{mfd}, {mfd}}, code: 3, output: "exactly one fd"},
		{name: "five fds", reply: enc(ok), fds: [][]int{{mfd, mfd, mfd, mfd, mfd}}, code: 3, output: "MSG_CTRUNC"},
		{name: "refusal with an fd", reply: enc(refusal), fds: one, code: 3, output: "error reply carries an fd"},
		{name: "refusal with lease facts", reply: patch(refusal, 16, 1), code: 3, output: "carries lease facts"},
		{name: "refusal for another lease", reply: enc(with(refusal, func(r *fdpass.Reply) { r.LeaseID = "another" })), code: 3, output: "another lease"},
		{name: "success for another lease", reply: enc(with(ok, func(r *fdpass.Reply) { r.LeaseID = "another" })), fds: one, code: 3, output: "another lease"},
		{name: "inode", reply: enc(with(ok, func(r *fdpass.Reply) { r.Inode++ })), fds: one, code: 3, output: "inode differs"},
		{name: "generation 0", reply: enc(with(ok, func(r *fdpass.Reply) { r.Generation = 0 })), fds: one, code: 3, output: "generation 0"},
		{name: "BAR 6", reply: enc(with(ok, func(r *fdpass.Reply) { r.BAR = 6 })), fds: one, code: 3, output: "BAR above 5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(testutil.ShortTempDir(t), "fd.sock")
			l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			served := make(chan error, 1)
			go func() { served <- serveOnce(l, tc, id, token) }()
			r := runClient(t, bin, sock, id, token)
			if err := <-served; err != nil {
				t.Error(err)
			}
			out := r.stderr
			if tc.code == 0 {
				out = r.stdout
			}
			if r.code != tc.code || !strings.Contains(out, tc.output) {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit %d with %q", r.code, r.stdout, r.stderr, tc.code, tc.output)
			}
			if tc.code == 0 {
				wantFields(t, r.stdout, map[string]string{"cloexec": "1", "exp_name": "-", "name": "-"})
			}
		})
	}
}

// serveOnce accepts one connection on l, checks that the request is the one
// fdpass.EncodeRequest makes, and answers it as tc says.
func serveOnce(l *net.UnixListener, tc hostile, id, token string) error {
	l.SetDeadline(time.Now().Add(30 * time.Second))
	c, err := l.AcceptUnix()
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	want, err := fdpass.EncodeRequest(fdpass.Request{LeaseID: id, Token: token})
	if err != nil {
		return err
	}
	buf := make([]byte, fdpass.MaxRequestSize+1)
	var n int
	if tc.unread {
		// Wait for the request but leave it queued: the close then resets the connection.
		rc, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var perr error
		if err := rc.Read(func(fd uintptr) bool {
			n, _, perr = unix.Recvfrom(int(fd), buf, unix.MSG_PEEK|unix.MSG_DONTWAIT)
			return !errors.Is(perr, unix.EAGAIN)
		}); err != nil {
			return err
		}
		if perr != nil {
			return perr
		}
	} else if n, _, _, _, err = c.ReadMsgUnix(buf, nil); err != nil {
		return err
	}
	if !bytes.Equal(buf[:n], want) {
		return fmt.Errorf("request\n% x\nwant (fdpass.EncodeRequest)\n% x", buf[:n], want)
	}
	if tc.reply == nil {
		return nil
	}
	var oob []byte
	for _, fds := range tc.fds {
		oob = append(oob, unix.UnixRights(fds...)...)
	}
	_, _, err = c.WriteMsgUnix(tc.reply, oob, nil)
	return err
}

// TestClaimCCommandLine: what the client refuses before it connects, and a socket that is
// not there.
func TestClaimCCommandLine(t *testing.T) {
	bin := plain.get(t, "mmb-claim", cflags)
	const id, token = "f8993b72bc8a8ade9051692b", "54c6ce599a861833d03607d1e01dcff1"
	missing := filepath.Join(testutil.ShortTempDir(t), "none.sock")
	for _, tc := range []struct {
		args   []string
		code   int
		stderr string
	}{
		{[]string{missing, id}, 2, "usage: mmb-claim SOCKET LEASE_ID TOKEN"},
		{[]string{missing, "lease id", token}, 2, "printable ASCII"},
		{[]string{missing, id, ""}, 2, "printable ASCII"},
		{[]string{missing, strings.Repeat("a", 129), token}, 2, "printable ASCII"},
		{[]string{missing, id, strings.Repeat("a", 257)}, 2, "printable ASCII"},
		{[]string{"/" + strings.Repeat("s", 107), id, token}, 2, "socket path at most 107 bytes"},
		{[]string{missing, id, token}, 1, "claim on " + missing + ": No such file or directory"},
	} {
		r := runClient(t, bin, tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.stderr) {
			t.Errorf("mmb-claim %.60q: exit %d, stderr %q; want %d with %q", tc.args, r.code, r.stderr, tc.code, tc.stderr)
		}
	}
}
