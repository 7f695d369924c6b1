package journal

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/mmiobroker/mmiobroker/internal/testutil"
)

func TestRoundTrip(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	j := open(t, path, Options{})
	if fresh, reason := j.Fresh(); !fresh || reason != "no journal" {
		t.Errorf("Fresh() = %v, %q; want true, \"no journal\"", fresh, reason)
	}
	a, b := fullLease("lease-a", 1), fullLease("lease-b", 2)
	b.Created = a.Created.Add(-time.Minute) // sorts first
	b.State = "some-future-state"
	events := []Event{fullEvent(1, a), fullEvent(2, b)}
	commit(t, j, events, []Lease{a, b}, nil)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	j = open(t, path, Options{})
	if fresh, reason := j.Fresh(); fresh {
		t.Errorf("reopened journal is fresh: %s", reason)
	}
	want := State{Leases: []Lease{b, a}, Events: events, LastSeq: 2}
	if diff := cmp.Diff(want, load(t, j), cmpOpts...); diff != "" {
		t.Errorf("Load after reopen (-want +got):\n%s", diff)
	}
}

func TestUpsertAndDrop(t *testing.T) {
	testutil.FDLeakCheck(t)
	j := open(t, newPath(t), Options{})
	a := Lease{ID: "a", State: "allocated", Seq: 1}
	b := Lease{ID: "b", State: "allocated", Seq: 2}
	commit(t, j, []Event{{Seq: 1, Type: "allocated", Lease: a}, {Seq: 2, Type: "allocated", Lease: b}}, []Lease{a, b}, nil)
	a.State, a.Seq = "active", 3
	commit(t, j, []Event{{Seq: 3, Type: "claimed", Lease: a}}, []Lease{a}, []string{"b", "never-existed"})
	st := load(t, j)
	if diff := cmp.Diff([]Lease{a}, st.Leases, cmpOpts...); diff != "" {
		t.Errorf("leases (-want +got):\n%s", diff)
	}
	if st.LastSeq != 3 || len(st.Events) != 3 {
		t.Errorf("LastSeq %d, %d events; want 3, 3", st.LastSeq, len(st.Events))
	}
	// Leases alone, without an event, leave LastSeq alone.
	commit(t, j, nil, []Lease{b}, nil)
	if st := load(t, j); st.LastSeq != 3 || len(st.Leases) != 2 {
		t.Errorf("LastSeq %d, %d leases; want 3, 2", st.LastSeq, len(st.Leases))
	}
}

// TestCommitAtomic: a commit refused for any reason leaves the journal as it was.
func TestCommitAtomic(t *testing.T) {
	testutil.FDLeakCheck(t)
	j := open(t, newPath(t), Options{})
	l1 := fullLease("l1", 1)
	commit(t, j, []Event{fullEvent(1, l1)}, []Lease{l1}, nil)
	before := load(t, j)

	l2 := fullLease("l2", 2)
	for _, tc := range []struct {
		name   string
		events []Event
		leases []Lease
		drop   []string
	}{
		{"seq not above last", []Event{{Seq: 1}}, []Lease{l2}, []string{"l1"}},
		{"second event seq not above last", []Event{{Seq: 2}, {Seq: 2}}, []Lease{l2}, nil},
		{"descending", []Event{{Seq: 3}, {Seq: 2}}, []Lease{l2}, nil},
		{"seq 0", []Event{{Seq: 0}}, []Lease{l2}, nil},
		{"lease without id", []Event{{Seq: 2}}, []Lease{l2, {}}, nil},
		{"lease twice", []Event{{Seq: 2}}, []Lease{l2, l2}, nil},
		{"upsert and drop", []Event{{Seq: 2}}, []Lease{l2}, []string{"l2"}},
		{"empty drop id", []Event{{Seq: 2}}, []Lease{l2}, []string{""}},
		{"huge id", []Event{{Seq: 2}}, []Lease{{ID: strings.Repeat("x", 2000)}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := j.Commit(tc.events, tc.leases, tc.drop)
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("Commit = %v, want ErrInvalid", err)
			}
			var je *Error
			if !errors.As(err, &je) || je.Op != "commit" {
				t.Errorf("Commit error %v is not a journal commit *Error", err)
			}
			if diff := cmp.Diff(before, load(t, j), cmpOpts...); diff != "" {
				t.Errorf("journal changed (-before +after):\n%s", diff)
			}
		})
	}
	// The journal is still usable, and the refused seq 2 is still free.
	commit(t, j, []Event{fullEvent(2, l2)}, []Lease{l2}, nil)
	if st := load(t, j); st.LastSeq != 2 || len(st.Leases) != 2 {
		t.Errorf("after a good commit: LastSeq %d, %d leases; want 2, 2", st.LastSeq, len(st.Leases))
	}
}

func TestSeqMonotonic(t *testing.T) {
	testutil.FDLeakCheck(t)
	j := open(t, newPath(t), Options{})
	commit(t, j, []Event{{Seq: 5}, {Seq: 9}}, nil, nil) // gaps are the broker's business
	for _, seq := range []uint64{0, 1, 9} {
		if err := j.Commit([]Event{{Seq: seq}}, nil, nil); !errors.Is(err, ErrInvalid) {
			t.Errorf("Commit seq %d after 9 = %v, want ErrInvalid", seq, err)
		}
	}
	commit(t, j, []Event{{Seq: 10}}, nil, nil)
	st := load(t, j)
	var seqs []uint64
	for _, e := range st.Events {
		seqs = append(seqs, e.Seq)
	}
	if diff := cmp.Diff([]uint64{5, 9, 10}, seqs); diff != "" || st.LastSeq != 10 {
		t.Errorf("LastSeq %d, seqs (-want +got):\n%s", st.LastSeq, diff)
	}
}

func eventSeqs(st State) []uint64 {
	var seqs []uint64
	for _, e := range st.Events {
		seqs = append(seqs, e.Seq)
	}
	return seqs
}

func TestEventTrim(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	j := open(t, path, Options{EventBacklog: 3})
	for seq := uint64(1); seq <= 5; seq++ {
		commit(t, j, []Event{{Seq: seq, Type: "renewed"}}, nil, nil)
	}
	st := load(t, j)
	if diff := cmp.Diff([]uint64{3, 4, 5}, eventSeqs(st)); diff != "" || st.LastSeq != 5 {
		t.Errorf("LastSeq %d; seqs (-want +got):\n%s", st.LastSeq, diff)
	}
	// A batch larger than the backlog keeps its newest events.
	commit(t, j, []Event{{Seq: 6}, {Seq: 7}, {Seq: 8}, {Seq: 9}, {Seq: 10}}, nil, nil)
	if diff := cmp.Diff([]uint64{8, 9, 10}, eventSeqs(load(t, j))); diff != "" {
		t.Errorf("after a batch (-want +got):\n%s", diff)
	}
	j.Close()

	// A smaller backlog trims at Open; a larger one grows from there.
	j = open(t, path, Options{EventBacklog: 2})
	if diff := cmp.Diff([]uint64{9, 10}, eventSeqs(load(t, j))); diff != "" {
		t.Errorf("after reopen with backlog 2 (-want +got):\n%s", diff)
	}
	j.Close()
	j = open(t, path, Options{EventBacklog: 4})
	commit(t, j, []Event{{Seq: 11}, {Seq: 12}, {Seq: 13}}, nil, nil)
	st = load(t, j)
	if diff := cmp.Diff([]uint64{10, 11, 12, 13}, eventSeqs(st)); diff != "" || st.LastSeq != 13 {
		t.Errorf("LastSeq %d; after reopen with backlog 4 (-want +got):\n%s", st.LastSeq, diff)
	}
}

// TestEventTrimBatch: commits trim the oldest events in batches, so more than the backlog
// may be stored, never more than the backlog plus its slack, and Load returns only the
// backlog's newest; meta last_seq is not written by commits.
func TestEventTrimBatch(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	const backlog = 32
	slack := trimSlack(backlog)
	j := open(t, path, Options{EventBacklog: backlog})
	stored, maxStored := 0, 0
	for seq := uint64(1); seq <= 200; seq++ {
		commit(t, j, []Event{{Seq: seq, Type: "renewed"}}, nil, nil)
		st := load(t, j)
		if want := min(seq, backlog); uint64(len(st.Events)) != want || st.LastSeq != seq || st.Events[len(st.Events)-1].Seq != seq {
			t.Fatalf("after seq %d: Load has %d events ending at %v, LastSeq %d; want %d ending at %d", seq, len(st.Events), eventSeqs(st)[len(st.Events)-1:], st.LastSeq, want, seq)
		}
		stored = j.nevents
		maxStored = max(maxStored, stored)
	}
	if maxStored != backlog+slack || stored < backlog {
		t.Errorf("stored events peaked at %d (now %d); want backlog %d + slack %d", maxStored, stored, backlog, slack)
	}
	j.Close()
	rawUpdate(t, path, func(tx *bolt.Tx) error {
		if n := tx.Bucket([]byte(bucketEvents)).Stats().KeyN; n != stored {
			t.Errorf("events bucket holds %d events, the journal counted %d", n, stored)
		}
		if v, _ := getUint(tx.Bucket([]byte(bucketMeta)), keyLastSeq); v != 0 {
			t.Errorf("meta last_seq = %d; commits should not write it", v)
		}
		return nil
	})
}

func TestBootIDMismatch(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	j := open(t, path, Options{BootID: "boot-one"})
	l := fullLease("l1", 1)
	commit(t, j, []Event{fullEvent(1, l)}, []Lease{l}, nil)
	j.Close()

	j = open(t, path, Options{BootID: "boot-two"})
	fresh, reason := j.Fresh()
	if !fresh || reason != "journal from boot boot-one" {
		t.Errorf("Fresh() = %v, %q; want true, \"journal from boot boot-one\"", fresh, reason)
	}
	if diff := cmp.Diff(State{}, load(t, j), cmpOpts...); diff != "" {
		t.Errorf("old data survived (-want +got):\n%s", diff)
	}
	commit(t, j, []Event{{Seq: 1}}, nil, nil) // seqs start again
	j.Close()

	// The new boot's journal is not fresh on its next open.
	j = open(t, path, Options{BootID: "boot-two"})
	if fresh, reason := j.Fresh(); fresh {
		t.Errorf("reopen in the same boot is fresh: %s", reason)
	}
}

// TestRealBootID: an empty Options.BootID reads the kernel's.
func TestRealBootID(t *testing.T) {
	testutil.FDLeakCheck(t)
	if _, err := os.Stat(BootIDPath); err != nil {
		t.Skipf("no %s: %v", BootIDPath, err)
	}
	path := newPath(t)
	j, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	j.Close()
	b, _ := os.ReadFile(BootIDPath)
	j = open(t, path, Options{BootID: strings.TrimSpace(string(b))})
	if fresh, reason := j.Fresh(); fresh {
		t.Errorf("journal written with the real boot id is fresh: %s", reason)
	}
}

// rawUpdate changes the journal file with bbolt directly.
func rawUpdate(t *testing.T, path string, fn func(tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(fn); err != nil {
		t.Fatal(err)
	}
}

func TestSchemaUnsupported(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	j := open(t, path, Options{})
	commit(t, j, []Event{{Seq: 1}}, []Lease{{ID: "a"}}, nil)
	j.Close()
	rawUpdate(t, path, func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucketMeta)).Put([]byte(keySchema), seqKey(99))
	})
	j = open(t, path, Options{})
	if fresh, reason := j.Fresh(); !fresh || reason != "schema version 99 unsupported" {
		t.Errorf("Fresh() = %v, %q; want true, \"schema version 99 unsupported\"", fresh, reason)
	}
	if st := load(t, j); len(st.Leases) != 0 || st.LastSeq != 0 {
		t.Errorf("old data survived: %+v", st)
	}
}

// TestMigrateV1: a journal of schema version 1 (JSON records, the daemon's before the
// protobuf encoding) is migrated in place at Open and loads as it was written, so an
// upgrade restart keeps every lease; a schema-1 record that does not decode stays and
// Load names it.
func TestMigrateV1(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	j := open(t, path, Options{})
	j.Close()
	l1, l2 := fullLease("l1", 4), fullLease("l2", 5)
	l2.Labels, l2.Ranges = nil, nil
	want := State{Leases: []Lease{l1, l2}, Events: []Event{fullEvent(4, l1), fullEvent(5, l2)}, LastSeq: 5}
	v1 := func(v any) []byte {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	writeV1 := func(extra func(tx *bolt.Tx) error) {
		rawUpdate(t, path, func(tx *bolt.Tx) error {
			meta, lb, eb := tx.Bucket([]byte(bucketMeta)), tx.Bucket([]byte(bucketLeases)), tx.Bucket([]byte(bucketEvents))
			errs := []error{meta.Put([]byte(keySchema), seqKey(schemaVersionV1)), meta.Put([]byte(keyLastSeq), seqKey(5))}
			for _, l := range want.Leases {
				errs = append(errs, lb.Put([]byte(l.ID), v1(l)))
			}
			for _, e := range want.Events {
				errs = append(errs, eb.Put(seqKey(e.Seq), v1(e)))
			}
			if extra != nil {
				errs = append(errs, extra(tx))
			}
			return errors.Join(errs...)
		})
	}
	writeV1(nil)
	j = open(t, path, Options{})
	if fresh, reason := j.Fresh(); fresh {
		t.Fatalf("schema-1 journal started fresh: %s", reason)
	}
	if diff := cmp.Diff(want, load(t, j), cmpOpts...); diff != "" {
		t.Errorf("migrated journal (-want +got):\n%s", diff)
	}
	commit(t, j, []Event{{Seq: 6}}, nil, nil)
	j.Close()
	rawUpdate(t, path, func(tx *bolt.Tx) error {
		if v, _ := getUint(tx.Bucket([]byte(bucketMeta)), keySchema); v != schemaVersion {
			t.Errorf("schema version after migration = %d, want %d", v, schemaVersion)
		}
		if v := tx.Bucket([]byte(bucketLeases)).Get([]byte("l1")); len(v) == 0 || v[0] == '{' {
			t.Errorf("lease l1 still stored as JSON: %q", v)
		}
		return nil
	})

	// A schema-1 record that does not decode: migrated around, named by Load.
	path = newPath(t)
	open(t, path, Options{}).Close()
	writeV1(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucketLeases)).Put([]byte("bad"), []byte(`{"id":"bad","colour":1}`))
	})
	j = open(t, path, Options{})
	var re *RecordError
	if _, err := j.Load(); !errors.As(err, &re) || re.Key != `"bad"` {
		t.Errorf("Load = %v, want a *RecordError naming lease \"bad\"", err)
	}
}

func TestMetadataUnreadable(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	j := open(t, path, Options{})
	j.Close()
	rawUpdate(t, path, func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucketMeta)).Put([]byte(keyLastSeq), []byte("x"))
	})
	j = open(t, path, Options{})
	if fresh, reason := j.Fresh(); !fresh || !strings.Contains(reason, "last_seq") {
		t.Errorf("Fresh() = %v, %q; want true and a reason naming last_seq", fresh, reason)
	}
	j.Close()
	rawUpdate(t, path, func(tx *bolt.Tx) error { return tx.DeleteBucket([]byte(bucketMeta)) })
	j = open(t, path, Options{})
	if fresh, reason := j.Fresh(); !fresh || reason != "journal without metadata" {
		t.Errorf("Fresh() = %v, %q; want true, \"journal without metadata\"", fresh, reason)
	}
}

// TestLocked: a second Open of the same file fails with ErrLocked within its Timeout, and
// succeeds once the first is closed.
func TestLocked(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	j := open(t, path, Options{})
	const timeout = 200 * time.Millisecond
	start := time.Now()
	j2, err := Open(path, Options{BootID: testBoot, Timeout: timeout})
	elapsed := time.Since(start)
	if err == nil {
		j2.Close()
		t.Fatal("second Open succeeded")
	}
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "another mmiobrokerd") {
		t.Errorf("second Open = %v; want ErrLocked and a hint at another mmiobrokerd", err)
	}
	if elapsed > timeout+2*time.Second {
		t.Errorf("second Open took %v with timeout %v", elapsed, timeout)
	}
	t.Logf("second Open failed after %v: %v", elapsed, err)
	j.Close()
	j2 = open(t, path, Options{Timeout: timeout})
	j2.Close()
}

func TestCorruptFile(t *testing.T) {
	for _, tc := range []struct {
		name    string
		content []byte
	}{
		{"garbage", bytes.Repeat([]byte("not a bbolt file "), 4096)},
		{"short", []byte("xyz")},
		{"one page", make([]byte, 4096)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testutil.FDLeakCheck(t)
			path := newPath(t)
			if err := os.WriteFile(path, tc.content, 0o600); err != nil {
				t.Fatal(err)
			}
			j := open(t, path, Options{})
			fresh, reason := j.Fresh()
			if !fresh || !strings.HasPrefix(reason, "corrupt journal moved to "+path+".corrupt-") {
				t.Fatalf("Fresh() = %v, %q; want a corrupt journal moved aside", fresh, reason)
			}
			aside, _ := filepath.Glob(path + ".corrupt-*")
			if len(aside) != 1 {
				t.Fatalf("files moved aside: %v", aside)
			}
			if got, _ := os.ReadFile(aside[0]); !bytes.Equal(got, tc.content) {
				t.Errorf("%s does not hold the corrupt file", aside[0])
			}
			if st := load(t, j); st.LastSeq != 0 || len(st.Leases) != 0 {
				t.Errorf("fresh journal not empty: %+v", st)
			}
			commit(t, j, []Event{{Seq: 1}}, []Lease{{ID: "a"}}, nil)
		})
	}
}

// TestCorruptTree: valid meta pages over a damaged page tree make bbolt panic at open;
// the journal recovers, moves the file aside and starts clean.
func TestCorruptTree(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	j := open(t, path, Options{})
	for seq := uint64(1); seq <= 50; seq++ {
		l := fullLease(fmt.Sprintf("lease-%03d", seq), seq)
		commit(t, j, []Event{fullEvent(seq, l)}, []Lease{l}, nil)
	}
	j.Close()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	const page = 4096
	for i := 2 * page; i < len(b); i++ { // every page but the two metas
		b[i] = 0xa5
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	j2, err := Open(path, Options{BootID: testBoot})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer j2.Close()
	fresh, reason := j2.Fresh()
	if !fresh || !strings.HasPrefix(reason, "corrupt journal moved to ") {
		t.Errorf("Fresh() = %v, %q; want a corrupt journal moved aside", fresh, reason)
	}
	t.Log(reason)
}

// pbLease is a valid encoded lease record with id (and bar 3 in field 3's right type).
func pbLease(id string) []byte {
	l := Lease{ID: id, BAR: 3}
	b, err := encodeLease(&l)
	if err != nil {
		panic(err)
	}
	return b
}

// pbEvent is a valid encoded event record with seq.
func pbEvent(seq uint64) []byte {
	b, err := encodeEvent(&Event{Seq: seq, Type: "renewed", Lease: Lease{ID: "x"}})
	if err != nil {
		panic(err)
	}
	return b
}

// TestCorruptRecord: a record that does not decode fails Load with an error naming it.
func TestCorruptRecord(t *testing.T) {
	for _, tc := range []struct {
		bucket  string
		key     []byte
		val     []byte
		wantKey string
	}{
		// bar (field 3) as bytes: a field of an unexpected wire type is an unknown field.
		{bucketLeases, []byte("lease-x"), protowire.AppendString(protowire.AppendTag(pbLease("lease-x"), 3, protowire.BytesType), "two"), `"lease-x"`},
		{bucketLeases, []byte("lease-y"), pbLease("lease-z"), `"lease-y"`},
		{bucketLeases, []byte("lease-u"), protowire.AppendVarint(protowire.AppendTag(pbLease("lease-u"), 99, protowire.VarintType), 1), `"lease-u"`},
		{bucketLeases, []byte("lease-t"), pbLease("lease-t")[:5], `"lease-t"`},
		{bucketLeases, []byte("lease-j"), []byte(`{"id":"lease-j"}`), `"lease-j"`}, // schema 1 in a schema-2 journal
		{bucketEvents, seqKey(2), pbEvent(2)[:3], "seq 2"},
		{bucketEvents, seqKey(2), pbEvent(3), "seq 2"},
		{bucketEvents, seqKey(2), protowire.AppendVarint(protowire.AppendTag(pbEvent(2), 4, protowire.VarintType), 1), "seq 2"}, // lease as a varint
		{bucketEvents, []byte("k"), pbEvent(2), "0x6b"},
	} {
		t.Run(tc.bucket+"/"+tc.wantKey, func(t *testing.T) {
			testutil.FDLeakCheck(t)
			path := newPath(t)
			j := open(t, path, Options{})
			commit(t, j, []Event{{Seq: 1}, {Seq: 2}}, []Lease{{ID: "ok"}}, nil)
			j.Close()
			rawUpdate(t, path, func(tx *bolt.Tx) error { return tx.Bucket([]byte(tc.bucket)).Put(tc.key, tc.val) })
			j = open(t, path, Options{})
			_, err := j.Load()
			var re *RecordError
			if !errors.Is(err, ErrCorrupt) || !errors.As(err, &re) {
				t.Fatalf("Load = %v; want a *RecordError", err)
			}
			if re.Bucket != tc.bucket || re.Key != tc.wantKey || !strings.Contains(err.Error(), tc.wantKey) {
				t.Errorf("Load = %v (bucket %q key %q); want bucket %q key %q", err, re.Bucket, re.Key, tc.bucket, tc.wantKey)
			}
		})
	}
}

func TestReset(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	j := open(t, path, Options{})
	l := fullLease("l1", 4)
	commit(t, j, []Event{fullEvent(4, l)}, []Lease{l}, nil)
	if err := j.Reset("drain"); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(State{LastSeq: 4}, load(t, j), cmpOpts...); diff != "" {
		t.Errorf("after Reset (-want +got):\n%s", diff)
	}
	if err := j.Commit([]Event{{Seq: 4}}, nil, nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("Commit of seq 4 after Reset = %v, want ErrInvalid", err)
	}
	commit(t, j, []Event{{Seq: 5}}, nil, nil)
	j.Close()
	j = open(t, path, Options{})
	if fresh, reason := j.Fresh(); fresh {
		t.Errorf("journal fresh after Reset and reopen: %s", reason)
	}
	if st := load(t, j); st.LastSeq != 5 || len(st.Events) != 1 || len(st.Leases) != 0 {
		t.Errorf("after Reset and reopen: %+v", st)
	}
}

func TestClose(t *testing.T) {
	testutil.FDLeakCheck(t)
	j := open(t, newPath(t), Options{})
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if _, err := j.Load(); !errors.Is(err, ErrClosed) {
		t.Errorf("Load after Close = %v, want ErrClosed", err)
	}
	if err := j.Commit([]Event{{Seq: 1}}, nil, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Commit after Close = %v, want ErrClosed", err)
	}
	if err := j.Reset("x"); !errors.Is(err, ErrClosed) {
		t.Errorf("Reset after Close = %v, want ErrClosed", err)
	}
}

func TestOpenErrors(t *testing.T) {
	testutil.FDLeakCheck(t)
	_, err := Open(filepath.Join(t.TempDir(), "missing-dir", "journal.db"), Options{BootID: testBoot})
	var je *Error
	if !errors.As(err, &je) || je.Op != "open" || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open in a missing directory = %v; want an open *Error wrapping ErrNotExist", err)
	}
}

// TestConcurrent: commits and loads from several goroutines (for -race).
func TestConcurrent(t *testing.T) {
	testutil.FDLeakCheck(t)
	j := open(t, newPath(t), Options{EventBacklog: 8})
	done := make(chan error)
	for g := range 4 {
		go func() {
			var err error
			for i := range 20 {
				if g == 0 {
					_, err = j.Load()
				} else {
					err = j.Commit(nil, []Lease{{ID: fmt.Sprintf("g%d-%d", g, i)}}, nil)
				}
				if err != nil {
					break
				}
			}
			done <- err
		}()
	}
	for range 4 {
		if err := <-done; err != nil {
			t.Error(err)
		}
	}
	if st := load(t, j); len(st.Leases) != 60 {
		t.Errorf("%d leases, want 60", len(st.Leases))
	}
}

// TestLoadMany: Load decodes many records on several CPUs and returns each once, sorted,
// and a bad record among them still fails it, naming that record.
func TestLoadMany(t *testing.T) {
	testutil.FDLeakCheck(t)
	path := newPath(t)
	j := open(t, path, Options{})
	const n = 5000
	want := make([]Lease, 0, n)
	for i := range n {
		l := fullLease(fmt.Sprintf("lease-%05d", i), uint64(i%7))
		l.Created = l.Created.Add(time.Duration(i) * time.Millisecond)
		want = append(want, l)
	}
	for i := 0; i < n; i += 500 {
		commit(t, j, nil, want[i:i+500], nil)
	}
	st := load(t, j)
	if diff := cmp.Diff(want, st.Leases, cmpOpts...); diff != "" {
		t.Fatalf("leases (-want +got):\n%s", diff)
	}
	j.Close()
	rawUpdate(t, path, func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucketLeases)).Put([]byte("lease-03000"), pbLease("lease-other"))
	})
	j = open(t, path, Options{})
	var re *RecordError
	if _, err := j.Load(); !errors.As(err, &re) || re.Key != `"lease-03000"` {
		t.Errorf("Load with a bad record among %d = %v, want a *RecordError naming lease-03000", n, err)
	}
}
