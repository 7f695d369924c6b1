package journal

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/mmiobroker/mmiobroker/internal/journal/recordpb"
)

// Range is a byte range of a BAR, as the broker's Range.
type Range struct {
	Offset uint64 `json:"off,omitzero"`
	Length uint64 `json:"len,omitzero"`
}

// Lease is the stored record of one lease, live or ended. It mirrors the broker's lease
// with plain types (strings for kind, state and reasons) so that this package does not
// depend on the broker; the broker converts. Unknown future states are stored as given.
// It is stored as a recordpb.Lease; the JSON names are schema version 1's, read when
// migrating such a journal.
//
// Nil and empty slices and maps are not told apart: both are stored as absent and come
// back nil. Times come back without a monotonic reading and in a fixed zone; compare them
// with time.Time.Equal.
type Lease struct {
	ID     string  `json:"id"`
	BDF    string  `json:"bdf,omitzero"`
	BAR    int     `json:"bar,omitzero"`
	Ranges []Range `json:"ranges,omitzero"`
	// Kind is "shared" or "private".
	Kind string `json:"kind,omitzero"`
	// State is "allocated", "active", "revoked" or "released" (or a later state).
	State      string `json:"state,omitzero"`
	Generation uint64 `json:"gen,omitzero"`
	Inode      uint64 `json:"inode,omitzero"`
	Size       uint64 `json:"size,omitzero"`
	HolderUID  uint32 `json:"holder_uid,omitzero"`
	HolderGID  uint32 `json:"holder_gid,omitzero"`
	HolderPID  int32  `json:"holder_pid,omitzero"`
	// HolderStart stamps the holder process (its pidfs inode, or on kernels before 6.9
	// its start time in clock ticks since boot), which tells the holder from a later
	// process that reuses its pid (peercred.Process.Stamp).
	HolderStart uint64 `json:"holder_start,omitzero"`
	// Tenant is the holder's tenant identity; may be empty.
	Tenant     string `json:"tenant,omitzero"`
	VMName     string `json:"vm_name,omitzero"`
	Unattested bool   `json:"unattested,omitzero"`
	// TokenDigest is the SHA-256 of the current claim token; empty once claimed. The
	// token itself is never stored in a lease record.
	TokenDigest    []byte            `json:"token_digest,omitzero"`
	Created        time.Time         `json:"created,omitzero"`
	Claimed        time.Time         `json:"claimed,omitzero"`
	ClaimDeadline  time.Time         `json:"claim_deadline,omitzero"`
	Expires        time.Time         `json:"expires,omitzero"`
	RevokeDeadline time.Time         `json:"revoke_deadline,omitzero"`
	Ended          time.Time         `json:"ended,omitzero"`
	TTL            time.Duration     `json:"ttl,omitzero"`
	EndReason      string            `json:"end_reason,omitzero"`
	EndedBy        string            `json:"ended_by,omitzero"`
	Dead           bool              `json:"dead,omitzero"`       // an ended lease's dma-buf is dead in every process
	RevokeDue      time.Time         `json:"revoke_due,omitzero"` // an ended-but-live lease's fd dies at the latest then
	Reissuing      bool              `json:"reissuing,omitzero"`  // a device cycle killed its fd; not reissued yet
	Seq            uint64            `json:"seq,omitzero"`        // the seq of the event that produced this record
	Labels         map[string]string `json:"labels,omitzero"`
	// ClaimantPodUID or ClaimantUnit is set on a delegated lease: who may claim it.
	ClaimantPodUID string `json:"claimant_pod_uid,omitzero"`
	ClaimantUnit   string `json:"claimant_unit,omitzero"`
}

// Event is one stored lease transition, kept for replay to watchers after a restart.
type Event struct {
	Seq  uint64    `json:"seq"`
	Time time.Time `json:"time,omitzero"`
	// Type is the broker's event type ("allocated", "claimed", "reissued", …).
	Type string `json:"type,omitzero"`
	// Lease is the lease after the transition.
	Lease Lease `json:"lease"`
	// Token is the new claim token of a reissued event, stored so that the holder can
	// still collect it after a restart; only the holder may be shown it.
	Token string `json:"token,omitzero"`
	// CausedBy names who caused the device cycle behind the event, if one did.
	CausedBy string `json:"caused_by,omitzero"`
}

// RecordError reports a stored record that cannot be decoded. It matches [ErrCorrupt].
type RecordError struct {
	Bucket string // "leases", "events" or "meta"
	Key    string // printable form of the key: the lease id, the event seq, a meta name
	Err    error
}

func (e *RecordError) Error() string {
	return fmt.Sprintf("corrupt %s record %s: %v", e.Bucket, e.Key, e.Err)
}

// Unwrap returns the decoding error.
func (e *RecordError) Unwrap() error { return e.Err }

// Is reports whether target is [ErrCorrupt].
func (e *RecordError) Is(target error) bool { return target == ErrCorrupt }

// encodeLease encodes l as a schema-2 record (recordpb.Lease).
func encodeLease(l *Lease) ([]byte, error) {
	return proto.MarshalOptions{Deterministic: true}.Marshal(leaseToPB(l))
}

// encodeEvent encodes e as a schema-2 record (recordpb.Event).
func encodeEvent(e *Event) ([]byte, error) {
	return proto.MarshalOptions{Deterministic: true}.Marshal(&recordpb.Event{
		Seq: e.Seq, Time: nanos(e.Time), Type: e.Type, Lease: leaseToPB(&e.Lease), Token: e.Token, CausedBy: e.CausedBy,
	})
}

func leaseToPB(l *Lease) *recordpb.Lease {
	p := &recordpb.Lease{
		Id: l.ID, Bdf: l.BDF, Bar: int32(l.BAR), Kind: l.Kind, State: l.State,
		Generation: l.Generation, Inode: l.Inode, Size: l.Size,
		HolderUid: l.HolderUID, HolderGid: l.HolderGID, HolderPid: l.HolderPID, HolderStart: l.HolderStart,
		Tenant: l.Tenant, VmName: l.VMName, Unattested: l.Unattested, TokenDigest: l.TokenDigest,
		Created: nanos(l.Created), Claimed: nanos(l.Claimed), ClaimDeadline: nanos(l.ClaimDeadline),
		Expires: nanos(l.Expires), RevokeDeadline: nanos(l.RevokeDeadline), Ended: nanos(l.Ended),
		Ttl: int64(l.TTL), EndReason: l.EndReason, EndedBy: l.EndedBy, Dead: l.Dead,
		RevokeDue: nanos(l.RevokeDue), Reissuing: l.Reissuing, Seq: l.Seq, Labels: l.Labels,
		ClaimantPodUid: l.ClaimantPodUID, ClaimantUnit: l.ClaimantUnit,
	}
	if len(l.Ranges) > 0 {
		p.Ranges = make([]*recordpb.Range, len(l.Ranges))
		for i, r := range l.Ranges {
			p.Ranges[i] = &recordpb.Range{Offset: r.Offset, Length: r.Length}
		}
	}
	return p
}

func leaseFromPB(p *recordpb.Lease) Lease {
	l := Lease{
		ID: p.Id, BDF: p.Bdf, BAR: int(p.Bar), Kind: p.Kind, State: p.State,
		Generation: p.Generation, Inode: p.Inode, Size: p.Size,
		HolderUID: p.HolderUid, HolderGID: p.HolderGid, HolderPID: p.HolderPid, HolderStart: p.HolderStart,
		Tenant: p.Tenant, VMName: p.VmName, Unattested: p.Unattested,
		Created: fromNanos(p.Created), Claimed: fromNanos(p.Claimed), ClaimDeadline: fromNanos(p.ClaimDeadline),
		Expires: fromNanos(p.Expires), RevokeDeadline: fromNanos(p.RevokeDeadline), Ended: fromNanos(p.Ended),
		TTL: time.Duration(p.Ttl), EndReason: p.EndReason, EndedBy: p.EndedBy, Dead: p.Dead,
		RevokeDue: fromNanos(p.RevokeDue), Reissuing: p.Reissuing, Seq: p.Seq,
		ClaimantPodUID: p.ClaimantPodUid, ClaimantUnit: p.ClaimantUnit,
	}
	if len(p.TokenDigest) > 0 {
		l.TokenDigest = p.TokenDigest
	}
	if len(p.Labels) > 0 {
		l.Labels = p.Labels
	}
	if len(p.Ranges) > 0 {
		l.Ranges = make([]Range, len(p.Ranges))
		for i, r := range p.Ranges {
			l.Ranges[i] = Range{Offset: r.GetOffset(), Length: r.GetLength()}
		}
	}
	return l
}

// nanos stores t as nanoseconds since the Unix epoch; the zero time is 0.
func nanos(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// fromNanos is the inverse of nanos, in UTC.
func fromNanos(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// unknownLease reports whether a decoded lease record had fields this version does not
// know (also a field of an unexpected wire type): such a record is refused.
func unknownLease(p *recordpb.Lease) bool {
	if p == nil {
		return false
	}
	if len(p.ProtoReflect().GetUnknown()) > 0 {
		return true
	}
	for _, r := range p.Ranges {
		if len(r.ProtoReflect().GetUnknown()) > 0 {
			return true
		}
	}
	return false
}

var errUnknownFields = errors.New("unknown fields in record")

// seqKey is the key of the event with sequence number seq: 8 bytes big-endian, so that
// bbolt's byte order is seq order.
func seqKey(seq uint64) []byte { return binary.BigEndian.AppendUint64(make([]byte, 0, 8), seq) }

// printKey renders a key for an error message: quoted if it is a lease id, decimal if it is
// an event key, hex otherwise.
func printKey(bucket string, key []byte) string {
	if bucket == bucketEvents {
		if len(key) == 8 {
			return fmt.Sprintf("seq %d", binary.BigEndian.Uint64(key))
		}
		return "0x" + hex.EncodeToString(key)
	}
	return fmt.Sprintf("%q", key)
}

// decodeStrict decodes exactly one JSON object from b into v, refusing unknown fields and
// trailing data: the record encoding of schema version 1, read only to migrate such a
// journal (migrateV1).
func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after record")
	}
	return nil
}

// decodeLease decodes the lease stored under key. The record's id must equal the key.
func decodeLease(key, val []byte) (Lease, error) {
	var p recordpb.Lease
	err := proto.Unmarshal(val, &p)
	if err == nil && unknownLease(&p) {
		err = errUnknownFields
	}
	if err != nil {
		return Lease{}, &RecordError{Bucket: bucketLeases, Key: printKey(bucketLeases, key), Err: err}
	}
	l := leaseFromPB(&p)
	if l.ID != string(key) {
		return Lease{}, &RecordError{Bucket: bucketLeases, Key: printKey(bucketLeases, key),
			Err: fmt.Errorf("record id %q differs from its key", l.ID)}
	}
	return l, nil
}

// decodeEvent decodes the event stored under key. The key must be the record's seq, 8 bytes
// big-endian, and seq 0 is never stored.
func decodeEvent(key, val []byte) (Event, error) {
	fail := func(err error) (Event, error) {
		return Event{}, &RecordError{Bucket: bucketEvents, Key: printKey(bucketEvents, key), Err: err}
	}
	if len(key) != 8 {
		return fail(fmt.Errorf("key is %d bytes, want 8", len(key)))
	}
	var p recordpb.Event
	err := proto.Unmarshal(val, &p)
	if err == nil && (len(p.ProtoReflect().GetUnknown()) > 0 || unknownLease(p.Lease)) {
		err = errUnknownFields
	}
	if err != nil {
		return fail(err)
	}
	e := Event{Seq: p.Seq, Time: fromNanos(p.Time), Type: p.Type, Token: p.Token, CausedBy: p.CausedBy}
	if p.Lease != nil {
		e.Lease = leaseFromPB(p.Lease)
	}
	if e.Seq == 0 || e.Seq != binary.BigEndian.Uint64(key) {
		return fail(fmt.Errorf("record seq %d differs from its key", e.Seq))
	}
	return e, nil
}
