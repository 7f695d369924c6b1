package journal

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

// FuzzDecodeLease: decoding stored bytes never panics, and whatever decodes encodes back
// to a record that decodes to the same lease.
func FuzzDecodeLease(f *testing.F) {
	full, _ := encodeLease(new(fullLease("lease-a", 7)))
	f.Add("lease-a", full)
	f.Add("b", pbLease("b"))
	f.Add("c", pbLease("c")[:4])
	f.Add("d", []byte(`{"id":"d"}`)) // schema 1
	f.Add("e", []byte{})
	f.Fuzz(func(t *testing.T, key string, val []byte) {
		l, err := decodeLease([]byte(key), val)
		if err != nil {
			if _, ok := err.(*RecordError); !ok {
				t.Fatalf("error %T %v is not a *RecordError", err, err)
			}
			return
		}
		again, err := encodeLease(&l)
		if err != nil {
			t.Fatalf("decoded lease %+v does not encode: %v", l, err)
		}
		l2, err := decodeLease([]byte(key), again)
		if err != nil {
			t.Fatalf("re-encoded lease does not decode: %v\n%s", err, again)
		}
		if diff := cmp.Diff(l, l2, cmpOpts...); diff != "" {
			t.Fatalf("round trip changed the lease (-first +second):\n%s", diff)
		}
	})
}

// FuzzDecodeEvent: as FuzzDecodeLease, for events (key: 8 bytes big-endian seq).
func FuzzDecodeEvent(f *testing.F) {
	full, _ := encodeEvent(new(fullEvent(9, fullLease("lease-a", 9))))
	f.Add(seqKey(9), full)
	f.Add(seqKey(1), pbEvent(1))
	f.Add(seqKey(1), []byte(`{"seq":1,"type":"allocated","lease":{"id":"x"}}`)) // schema 1
	f.Add([]byte("short"), pbEvent(1))
	f.Fuzz(func(t *testing.T, key, val []byte) {
		e, err := decodeEvent(key, val)
		if err != nil {
			if _, ok := err.(*RecordError); !ok {
				t.Fatalf("error %T %v is not a *RecordError", err, err)
			}
			return
		}
		again, err := encodeEvent(&e)
		if err != nil {
			t.Fatalf("decoded event %+v does not encode: %v", e, err)
		}
		e2, err := decodeEvent(key, again)
		if err != nil {
			t.Fatalf("re-encoded event does not decode: %v\n%s", err, again)
		}
		if diff := cmp.Diff(e, e2, cmpOpts...); diff != "" {
			t.Fatalf("round trip changed the event (-first +second):\n%s", diff)
		}
	})
}
