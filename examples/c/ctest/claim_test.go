// Package ctest tests the C claim client ../mmb-claim.c (a directory with C files cannot
// hold Go files without cgo): gcc builds it with warnings as errors,
// and it runs against the daemon's claim server (in process, on a fake device) and against
// a hostile server that breaks the protocol's rules one at a time.
package ctest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/examples/c/claimchain"
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

const (
	bdf       = "0000:00:03.0"
	leaseSize = 64 << 10
)

// chain is TestClaimC's VMM chain on the fake device: 64 KiB of BAR 0, whose fd 3 (a
// memfd) is of that size. With its stage in the environment, the test binary is the VMM.
var chain = claimchain.Chain{BAR: 0, Size: leaseSize, CheckFD: func(_ string, st *unix.Stat_t) error {
	if st.Size != leaseSize {
		return fmt.Errorf("%d bytes, want %d", st.Size, leaseSize)
	}
	return nil
}}

// buildDir holds the compiled clients for the whole test run.
var buildDir string

func TestMain(m *testing.M) {
	chain.Main()
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

// runClient runs the client bin; a sanitizer report fails the test.
func runClient(t *testing.T, bin string, args ...string) claimchain.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := claimchain.RunClient(t, ctx, []string{
		fmt.Sprintf("ASAN_OPTIONS=exitcode=%d:detect_leaks=0", sanitizerExit),
		fmt.Sprintf("UBSAN_OPTIONS=exitcode=%d:print_stacktrace=1", sanitizerExit)}, bin, args...)
	if r.Code == sanitizerExit || strings.Contains(r.Stderr, "Sanitizer") || strings.Contains(r.Stderr, "runtime error") {
		t.Fatalf("mmb-claim %q: sanitizer report (exit %d):\n%s", args, r.Code, r.Stderr)
	}
	return r
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
	tg := claimchain.Target{Bin: bin, Run: func(t *testing.T, args ...string) claimchain.Result { return runClient(t, bin, args...) },
		Control: d.Control, Claim: d.Claim, Client: c}

	t.Run("NotFound", tg.NotFound)
	t.Run("BadTokenAndPermissionDenied", func(t *testing.T) { tg.BadTokenAndPermissionDenied(t, ctx, bdf) })
	t.Run("ClaimAndReclaim", func(t *testing.T) { tg.ClaimAndReclaim(t, ctx, bdf, chain) })
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
			out := r.Stderr
			if tc.code == 0 {
				out = r.Stdout
			}
			if r.Code != tc.code || !strings.Contains(out, tc.output) {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit %d with %q", r.Code, r.Stdout, r.Stderr, tc.code, tc.output)
			}
			if tc.code == 0 {
				claimchain.WantFields(t, r.Stdout, map[string]string{"cloexec": "1", "exp_name": "-", "name": "-"})
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
		if r.Code != tc.code || !strings.Contains(r.Stderr, tc.stderr) {
			t.Errorf("mmb-claim %.60q: exit %d, stderr %q; want %d with %q", tc.args, r.Code, r.Stderr, tc.code, tc.stderr)
		}
	}
}
