package fdpass

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Sample messages: the examples of docs/claim-protocol.md §9, with a lease id and token of
// the daemon's shape (24 and 32 hex digits; the wire format takes any printable id).
// test/docs checks the same hexdumps against the encoder from the document itself.
var (
	exampleRequest = Request{LeaseID: "bc6aa2a3bc934f5b0cfd53cf", Token: "0dee6c6c3fcb789887f23a6807a13f60"}
	exampleReply   = Reply{Code: CodeOK, LeaseID: "bc6aa2a3bc934f5b0cfd53cf", Generation: 2,
		Size: 0x10000, Inode: 0x1c3f, BDF: "0000:00:03.0", BAR: 0}
	exampleError = Reply{Code: CodeBadToken, LeaseID: "bc6aa2a3bc934f5b0cfd53cf",
		Message: "claim token does not match"}
)

// The hexdumps in docs/claim-protocol.md §9, byte for byte: one string per 16-byte row.
const (
	exampleRequestHex = "4d4d4243010001004c00000000000000" + "18002000626336616132613362633933" +
		"34663562306366643533636630646565" + "36633663336663623738393838376632" + "336136383037613133663630"
	exampleReplyHex = "4d4d4243010002005c00000000000000" + "02000000000000000000010000000000" +
		"3f1c0000000000000000000018000c00" + "00000000000000006263366161326133" +
		"62633933346635623063666435336366" + "303030303a30303a30332e30"
	exampleErrorHex = "4d4d4243010002006a00000004000000" + "00000000000000000000000000000000" +
		"00000000000000000000000018000000" + "1a000000000000006263366161326133" +
		"62633933346635623063666435336366" + "636c61696d20746f6b656e20646f6573" + "206e6f74206d61746368"
)

func TestRequestRoundTrip(t *testing.T) {
	for _, r := range []Request{
		exampleRequest,
		{LeaseID: "a", Token: "b"},
		{LeaseID: strings.Repeat("L", MaxLeaseIDLen), Token: strings.Repeat("~", MaxTokenLen)},
	} {
		b, err := EncodeRequest(r)
		if err != nil {
			t.Fatalf("EncodeRequest(%+v): %v", r, err)
		}
		if got := binary.LittleEndian.Uint32(b[8:12]); int(got) != len(b) {
			t.Errorf("length field %d, message %d bytes", got, len(b))
		}
		got, err := DecodeRequest(b)
		if err != nil {
			t.Fatalf("DecodeRequest: %v", err)
		}
		if diff := cmp.Diff(r, got); diff != "" {
			t.Errorf("round trip (-want +got):\n%s", diff)
		}
	}
}

func TestReplyRoundTrip(t *testing.T) {
	for _, r := range []Reply{
		exampleReply,
		exampleError,
		{Code: CodeInternal},
		{Code: CodeOK, LeaseID: strings.Repeat("x", MaxLeaseIDLen), Generation: ^uint64(0), Size: ^uint64(0),
			Inode: ^uint64(0), BAR: 5, BDF: strings.Repeat("b", MaxBDFLen), Message: strings.Repeat("é", MaxMessageLen/2)},
		{Code: Code(999), Message: "a code from the future"},
	} {
		b, err := EncodeReply(r)
		if err != nil {
			t.Fatalf("EncodeReply(%+v): %v", r, err)
		}
		got, err := DecodeReply(b)
		if err != nil {
			t.Fatalf("DecodeReply: %v", err)
		}
		if diff := cmp.Diff(r, got); diff != "" {
			t.Errorf("round trip (-want +got):\n%s", diff)
		}
	}
}

func TestExampleHexdumps(t *testing.T) {
	for _, tc := range []struct {
		name string
		enc  func() ([]byte, error)
		want string
	}{
		{"request", func() ([]byte, error) { return EncodeRequest(exampleRequest) }, exampleRequestHex},
		{"reply", func() ([]byte, error) { return EncodeReply(exampleReply) }, exampleReplyHex},
		{"error reply", func() ([]byte, error) { return EncodeReply(exampleError) }, exampleErrorHex},
	} {
		b, err := tc.enc()
		if err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(b); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s\n%s", tc.name, got, tc.want, hex.Dump(b))
		}
	}
}

// req builds a request by hand so that tests can break any field.
func req(magic string, version, typ uint16, length int, flags uint32, idLen, tokLen uint16, data string) []byte {
	b := make([]byte, RequestFixedSize+len(data))
	copy(b, magic)
	binary.LittleEndian.PutUint16(b[4:], version)
	binary.LittleEndian.PutUint16(b[6:], typ)
	if length < 0 {
		length = len(b)
	}
	binary.LittleEndian.PutUint32(b[8:], uint32(length))
	binary.LittleEndian.PutUint32(b[12:], flags)
	binary.LittleEndian.PutUint16(b[16:], idLen)
	binary.LittleEndian.PutUint16(b[18:], tokLen)
	copy(b[RequestFixedSize:], data)
	return b
}

func TestDecodeRequestErrors(t *testing.T) {
	good := req(Magic, Version, TypeRequest, -1, 0, 2, 3, "idtok")
	if _, err := DecodeRequest(good); err != nil {
		t.Fatalf("the base case does not decode: %v", err)
	}
	long := req(Magic, Version, TypeRequest, -1, 0, 1, uint16(MaxTokenLen+1), "i"+strings.Repeat("t", MaxTokenLen+1))
	for name, b := range map[string][]byte{
		"empty":            nil,
		"short header":     []byte("MMBC\x01\x00"),
		"bad magic":        req("MMBX", Version, TypeRequest, -1, 0, 2, 3, "idtok"),
		"reply type":       req(Magic, Version, TypeReply, -1, 0, 2, 3, "idtok"),
		"length too big":   req(Magic, Version, TypeRequest, 26, 0, 2, 3, "idtok"),
		"length too small": req(Magic, Version, TypeRequest, 24, 0, 2, 3, "idtok"),
		"header only":      good[:HeaderSize],
		"flags":            req(Magic, Version, TypeRequest, -1, 1, 2, 3, "idtok"),
		"fields too long":  req(Magic, Version, TypeRequest, -1, 0, 3, 3, "idtok"),
		"fields too short": req(Magic, Version, TypeRequest, -1, 0, 1, 3, "idtok"),
		"empty lease id":   req(Magic, Version, TypeRequest, -1, 0, 0, 5, "idtok"),
		"empty token":      req(Magic, Version, TypeRequest, -1, 0, 5, 0, "idtok"),
		"space in id":      req(Magic, Version, TypeRequest, -1, 0, 2, 3, "i tok"),
		"nul in token":     req(Magic, Version, TypeRequest, -1, 0, 2, 3, "idt\x00k"),
		"high byte":        req(Magic, Version, TypeRequest, -1, 0, 2, 3, "id\xfeok"),
		"token too long":   long,
		"id too long": req(Magic, Version, TypeRequest, -1, 0, uint16(MaxLeaseIDLen+1), 1,
			strings.Repeat("i", MaxLeaseIDLen+1)+"t"),
		"oversized": append(req(Magic, Version, TypeRequest, MaxRequestSize+1, 0, 2, 3, "idtok"),
			make([]byte, MaxRequestSize+1-RequestFixedSize-5)...),
	} {
		_, err := DecodeRequest(b)
		if !errors.Is(err, errdefs.ErrInvalidArgument) || errors.Is(err, ErrUnsupportedVersion) {
			t.Errorf("%s: err = %v, want ErrInvalidArgument (not a version error)", name, err)
		}
		if CodeOf(err) != CodeInvalidRequest {
			t.Errorf("%s: code %s, want INVALID_REQUEST", name, CodeOf(err))
		}
	}
	_, err := DecodeRequest(req(Magic, 2, TypeRequest, -1, 0, 2, 3, "idtok"))
	if !errors.Is(err, ErrUnsupportedVersion) || CodeOf(err) != CodeUnsupportedVersion {
		t.Errorf("version 2: err = %v (code %s), want ErrUnsupportedVersion", err, CodeOf(err))
	}
}

func TestDecodeReplyErrors(t *testing.T) {
	good, err := EncodeReply(exampleReply)
	if err != nil {
		t.Fatal(err)
	}
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	for name, b := range map[string][]byte{
		"request":    mutate(func(b []byte) []byte { b[6] = TypeRequest; return b }),
		"truncated":  good[:len(good)-1],
		"short":      mutate(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[8:], 20); return b[:20] }),
		"reserved":   mutate(func(b []byte) []byte { b[53] = 1; return b }),
		"lengths":    mutate(func(b []byte) []byte { b[44]++; return b }),
		"no lease":   mutate(func(b []byte) []byte { return rewriteLens(b, 0, 26+12) }),
		"bad utf8":   mustEncode(t, Reply{Code: CodeInternal, Message: "ab"}, func(b []byte) { b[len(b)-1] = 0xff }),
		"error+bdf":  mutate(func(b []byte) []byte { b[12] = byte(CodeNotFound); return b }),
		"error+size": mustEncode(t, Reply{Code: CodeNotFound}, func(b []byte) { b[24] = 1 }),
	} {
		if _, err := DecodeReply(b); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: err = %v, want ErrInvalidArgument", name, err)
		}
	}
}

// rewriteLens moves bytes from the lease id to the bdf field.
func rewriteLens(b []byte, idLen, bdfLen uint16) []byte {
	binary.LittleEndian.PutUint16(b[44:], idLen)
	binary.LittleEndian.PutUint16(b[46:], bdfLen)
	return b
}

func mustEncode(t *testing.T, r Reply, mut func([]byte)) []byte {
	t.Helper()
	b, err := EncodeReply(r)
	if err != nil {
		t.Fatal(err)
	}
	mut(b)
	return b
}

func TestEncodeRejects(t *testing.T) {
	for name, r := range map[string]Request{
		"empty id":    {Token: "t"},
		"empty token": {LeaseID: "l"},
		"long id":     {LeaseID: strings.Repeat("l", MaxLeaseIDLen+1), Token: "t"},
		"long token":  {LeaseID: "l", Token: strings.Repeat("t", MaxTokenLen+1)},
		"space":       {LeaseID: "l l", Token: "t"},
	} {
		if _, err := EncodeRequest(r); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("request %s: err = %v, want ErrInvalidArgument", name, err)
		}
	}
	for name, r := range map[string]Reply{
		"ok without lease": {Code: CodeOK},
		"error with inode": {Code: CodeNotFound, Inode: 1},
		"error with bdf":   {Code: CodeNotFound, BDF: "0000:00:01.0"},
		"long message":     {Code: CodeInternal, Message: strings.Repeat("m", MaxMessageLen+1)},
		"invalid utf8":     {Code: CodeInternal, Message: "\xff"},
		"long bdf":         {Code: CodeOK, LeaseID: "l", BDF: strings.Repeat("b", MaxBDFLen+1)},
	} {
		if _, err := EncodeReply(r); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("reply %s: err = %v, want ErrInvalidArgument", name, err)
		}
	}
}

func TestTruncateMessage(t *testing.T) {
	long := strings.Repeat("a", MaxMessageLen-1) + "é" + "tail"
	got := TruncateMessage(long)
	if len(got) != MaxMessageLen-1 || !strings.HasSuffix(got, "a") {
		t.Errorf("TruncateMessage cut at %d bytes, want %d (before the 2-byte rune)", len(got), MaxMessageLen-1)
	}
	if got := TruncateMessage("ok\xff"); got != "ok\uFFFD" {
		t.Errorf("TruncateMessage(invalid utf8) = %q", got)
	}
	if _, err := EncodeReply(Reply{Code: CodeInternal, Message: TruncateMessage(strings.Repeat("€", 2000))}); err != nil {
		t.Errorf("a truncated message does not encode: %v", err)
	}
}
