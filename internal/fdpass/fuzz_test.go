package fdpass

import (
	"bytes"
	"testing"
)

// FuzzDecodeRequest: the decoder never panics, and whatever it accepts re-encodes to the
// same bytes (one valid encoding per request).
func FuzzDecodeRequest(f *testing.F) {
	for _, r := range []Request{exampleRequest, {LeaseID: "a", Token: "b"}} {
		b, _ := EncodeRequest(r)
		f.Add(b)
	}
	f.Add([]byte("MMBC"))
	f.Add(req(Magic, 2, TypeRequest, -1, 0, 1, 1, "ab"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRequest(b)
		if err != nil {
			return
		}
		again, err := EncodeRequest(r)
		if err != nil {
			t.Fatalf("decoded request %+v does not encode: %v", r, err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", b, again)
		}
	})
}

// FuzzDecodeReply: as FuzzDecodeRequest, for replies.
func FuzzDecodeReply(f *testing.F) {
	for _, r := range []Reply{exampleReply, exampleError, {Code: CodeInternal}} {
		b, _ := EncodeReply(r)
		f.Add(b)
	}
	f.Add([]byte("MMBC\x01\x00\x02\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeReply(b)
		if err != nil {
			return
		}
		again, err := EncodeReply(r)
		if err != nil {
			t.Fatalf("decoded reply %+v does not encode: %v", r, err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", b, again)
		}
	})
}
