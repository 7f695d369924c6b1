package journal

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"go.uber.org/goleak"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

// With envChild set the test binary is a committing daemon instead of a test run (see
// crash_test.go).
const (
	envChild = "MMB_JOURNAL_CHILD" // "commit"
	envPath  = "MMB_JOURNAL_PATH"
)

const testBoot = "11111111-2222-3333-4444-555555555555"

func TestMain(m *testing.M) {
	if os.Getenv(envChild) == "commit" {
		if err := runCommitChild(os.Getenv(envPath)); err != nil {
			fmt.Fprintf(os.Stderr, "error=%v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// newPath returns a journal path in a fresh temporary directory.
func newPath(t testing.TB) string {
	t.Helper()
	return filepath.Join(t.TempDir(), "journal.db")
}

// open opens path with opt (BootID defaulting to testBoot) and closes it at cleanup.
func open(t testing.TB, path string, opt Options) *Journal {
	t.Helper()
	if opt.BootID == "" {
		opt.BootID = testBoot
	}
	j, err := Open(path, opt)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { j.Close() })
	return j
}

func load(t testing.TB, j *Journal) State {
	t.Helper()
	st, err := j.Load()
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return st
}

func commit(t testing.TB, j *Journal, events []Event, leases []Lease, drop []string) {
	t.Helper()
	if err := j.Commit(events, leases, drop); err != nil {
		t.Fatalf("Commit: %v", err)
	}
}

// cmpOpts compares records as they come back: nil and empty alike, times by Equal (cmp
// uses the Equal method).
var cmpOpts = []cmp.Option{cmpopts.EquateEmpty()}

var zone = time.FixedZone("CEST", 2*3600)

// fullLease returns a lease with every field set (TestFullLeaseIsFull checks that).
func fullLease(id string, seq uint64) Lease {
	base := time.Date(2026, 11, 25, 10, 30, 0, 123456789, zone)
	return Lease{
		ID:             id,
		BDF:            "0000:3b:00.0",
		BAR:            2,
		Ranges:         []Range{{Offset: 0x1000, Length: 0x2000}, {Offset: 0x10000, Length: 0x1000}},
		Kind:           "private",
		State:          "active",
		Generation:     3,
		Inode:          123456,
		Size:           0x3000,
		HolderUID:      1000,
		HolderGID:      1001,
		HolderPID:      4242,
		HolderStart:    987654321,
		Tenant:         "tenant-a",
		VMName:         "vm-0",
		Unattested:     true,
		TokenDigest:    []byte{0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3},
		Created:        base,
		Claimed:        base.Add(time.Second),
		ClaimDeadline:  base.Add(30 * time.Second),
		Expires:        base.Add(time.Hour),
		RevokeDeadline: base.Add(2 * time.Minute),
		Ended:          base.Add(3 * time.Minute).UTC(),
		TTL:            time.Hour,
		EndReason:      "revoked",
		EndedBy:        "uid 0 (admin) pid 1",
		Dead:           true,
		RevokeDue:      time.Now().Add(30 * time.Second),
		Reissuing:      true,
		Seq:            seq,
		Labels:         map[string]string{"team": "gpu", "ünicode": "✓ \"quoted\""},
		ClaimantPodUID: "8d1c4e2a-11f0-9c3b-0242ac120002",
		ClaimantUnit:   "/machine.slice/machine-qemu\\x2d1\\x2dvm1.scope",
	}
}

func fullEvent(seq uint64, l Lease) Event {
	return Event{Seq: seq, Time: time.Now(), Type: "reissued", Lease: l, Token: "token-" + l.ID, CausedBy: "uid=1000"}
}

// TestFullLeaseIsFull guards the round-trip test: a field added to Lease or Event must be
// set in fullLease or fullEvent.
func TestFullLeaseIsFull(t *testing.T) {
	testutil.FDLeakCheck(t)
	for _, v := range []any{fullLease("x", 1), fullEvent(1, fullLease("x", 1))} {
		rv := reflect.ValueOf(v)
		for i := range rv.NumField() {
			if rv.Field(i).IsZero() {
				t.Errorf("%s.%s is zero in the sample", rv.Type().Name(), rv.Type().Field(i).Name)
			}
		}
	}
}
