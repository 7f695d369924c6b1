package fdpass

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Wire format constants; docs/claim-protocol.md is the normative description.
const (
	// Magic opens every message: the bytes "MMBC".
	Magic = "MMBC"
	// Version is the protocol version this package speaks.
	Version = 1

	// TypeRequest and TypeReply are the message types.
	TypeRequest = 1
	TypeReply   = 2

	// HeaderSize is the size of the common header: magic, version, type, length.
	HeaderSize = 12
	// RequestFixedSize is the size of a request before its variable-length fields.
	RequestFixedSize = 20
	// ReplyFixedSize is the size of a reply before its variable-length fields.
	ReplyFixedSize = 56

	// MaxLeaseIDLen, MaxTokenLen, MaxBDFLen and MaxMessageLen bound the variable fields.
	MaxLeaseIDLen = 128
	MaxTokenLen   = 256
	MaxBDFLen     = 32
	MaxMessageLen = 1024

	// MaxRequestSize is the largest valid request.
	MaxRequestSize = RequestFixedSize + MaxLeaseIDLen + MaxTokenLen
	// MaxReplySize is the largest valid reply.
	MaxReplySize = ReplyFixedSize + MaxLeaseIDLen + MaxBDFLen + MaxMessageLen
)

// ErrUnsupportedVersion is returned by the decoders for a message of another protocol
// version. It wraps errdefs.ErrInvalidArgument.
var ErrUnsupportedVersion = fmt.Errorf("unsupported claim protocol version: %w", errdefs.ErrInvalidArgument)

// Request is a claim request: the lease to claim and its one-time claim token.
type Request struct {
	LeaseID string
	Token   string
}

// Reply is a claim reply. On success (Code == CodeOK) exactly one fd, the lease's dma-buf,
// travels with it; on failure none does and Message says why.
type Reply struct {
	Code       Code
	LeaseID    string
	Generation uint64
	Size       uint64
	Inode      uint64
	BDF        string
	BAR        uint32
	Message    string
}

// printable reports whether s is non-empty printable ASCII without spaces (0x21..0x7e),
// the alphabet of lease IDs, tokens and BDFs.
func printable(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("claim message: "+format+": %w", append(args, errdefs.ErrInvalidArgument)...)
}

func putHeader(b []byte, typ uint16) {
	copy(b[0:4], Magic)
	binary.LittleEndian.PutUint16(b[4:6], Version)
	binary.LittleEndian.PutUint16(b[6:8], typ)
	binary.LittleEndian.PutUint32(b[8:12], uint32(len(b)))
}

// checkHeader validates the common header of b against the wanted type.
func checkHeader(b []byte, typ uint16) error {
	if len(b) < HeaderSize {
		return invalid("%d bytes is shorter than the %d-byte header", len(b), HeaderSize)
	}
	if string(b[0:4]) != Magic {
		return invalid("bad magic %q", b[0:4])
	}
	if v := binary.LittleEndian.Uint16(b[4:6]); v != Version {
		return fmt.Errorf("claim message: version %d (want %d): %w", v, Version, ErrUnsupportedVersion)
	}
	if t := binary.LittleEndian.Uint16(b[6:8]); t != typ {
		return invalid("message type %d, want %d", t, typ)
	}
	if l := binary.LittleEndian.Uint32(b[8:12]); l != uint32(len(b)) {
		return invalid("length field %d but %d bytes received", l, len(b))
	}
	return nil
}

// EncodeRequest returns the wire form of r.
func EncodeRequest(r Request) ([]byte, error) {
	if len(r.LeaseID) > MaxLeaseIDLen || !printable(r.LeaseID) {
		return nil, invalid("lease id %q: want 1..%d printable ASCII characters", r.LeaseID, MaxLeaseIDLen)
	}
	if len(r.Token) > MaxTokenLen || !printable(r.Token) {
		return nil, invalid("token: want 1..%d printable ASCII characters, got %d bytes", MaxTokenLen, len(r.Token))
	}
	b := make([]byte, RequestFixedSize+len(r.LeaseID)+len(r.Token))
	putHeader(b, TypeRequest)
	// b[12:16] flags: 0
	binary.LittleEndian.PutUint16(b[16:18], uint16(len(r.LeaseID)))
	binary.LittleEndian.PutUint16(b[18:20], uint16(len(r.Token)))
	n := copy(b[RequestFixedSize:], r.LeaseID)
	copy(b[RequestFixedSize+n:], r.Token)
	return b, nil
}

// DecodeRequest parses a request. It accepts exactly what [EncodeRequest] produces.
func DecodeRequest(b []byte) (Request, error) {
	if err := checkHeader(b, TypeRequest); err != nil {
		return Request{}, err
	}
	if len(b) > MaxRequestSize {
		return Request{}, invalid("request of %d bytes exceeds %d", len(b), MaxRequestSize)
	}
	if len(b) < RequestFixedSize {
		return Request{}, invalid("request of %d bytes is shorter than %d", len(b), RequestFixedSize)
	}
	if f := binary.LittleEndian.Uint32(b[12:16]); f != 0 {
		return Request{}, invalid("request flags %#x, want 0", f)
	}
	idLen := int(binary.LittleEndian.Uint16(b[16:18]))
	tokLen := int(binary.LittleEndian.Uint16(b[18:20]))
	if RequestFixedSize+idLen+tokLen != len(b) {
		return Request{}, invalid("field lengths %d+%d do not match the %d-byte request", idLen, tokLen, len(b))
	}
	r := Request{
		LeaseID: string(b[RequestFixedSize : RequestFixedSize+idLen]),
		Token:   string(b[RequestFixedSize+idLen:]),
	}
	if idLen > MaxLeaseIDLen || !printable(r.LeaseID) {
		return Request{}, invalid("lease id: want 1..%d printable ASCII characters", MaxLeaseIDLen)
	}
	if tokLen > MaxTokenLen || !printable(r.Token) {
		return Request{}, invalid("token: want 1..%d printable ASCII characters", MaxTokenLen)
	}
	return r, nil
}

// TruncateMessage makes msg fit a reply: valid UTF-8 of at most MaxMessageLen bytes, cut
// at a rune boundary.
func TruncateMessage(msg string) string {
	msg = strings.ToValidUTF8(msg, "\uFFFD")
	if len(msg) <= MaxMessageLen {
		return msg
	}
	cut := MaxMessageLen
	for cut > 0 && !utf8.RuneStart(msg[cut]) {
		cut--
	}
	return msg[:cut]
}

// EncodeReply returns the wire form of r. A success reply needs a lease id; an error
// reply carries no lease facts (generation, size, inode, BDF, BAR are zero) but may echo
// the lease id. Message must be valid UTF-8 of at most MaxMessageLen bytes (see
// [TruncateMessage]).
func EncodeReply(r Reply) ([]byte, error) {
	if err := r.validate(); err != nil {
		return nil, err
	}
	b := make([]byte, ReplyFixedSize+len(r.LeaseID)+len(r.BDF)+len(r.Message))
	putHeader(b, TypeReply)
	binary.LittleEndian.PutUint32(b[12:16], uint32(r.Code))
	binary.LittleEndian.PutUint64(b[16:24], r.Generation)
	binary.LittleEndian.PutUint64(b[24:32], r.Size)
	binary.LittleEndian.PutUint64(b[32:40], r.Inode)
	binary.LittleEndian.PutUint32(b[40:44], r.BAR)
	binary.LittleEndian.PutUint16(b[44:46], uint16(len(r.LeaseID)))
	binary.LittleEndian.PutUint16(b[46:48], uint16(len(r.BDF)))
	binary.LittleEndian.PutUint16(b[48:50], uint16(len(r.Message)))
	// b[50:56] reserved: 0
	off := ReplyFixedSize
	off += copy(b[off:], r.LeaseID)
	off += copy(b[off:], r.BDF)
	copy(b[off:], r.Message)
	return b, nil
}

func (r Reply) validate() error {
	if len(r.LeaseID) > MaxLeaseIDLen || (r.LeaseID != "" && !printable(r.LeaseID)) {
		return invalid("reply lease id: want at most %d printable ASCII characters", MaxLeaseIDLen)
	}
	if len(r.BDF) > MaxBDFLen || (r.BDF != "" && !printable(r.BDF)) {
		return invalid("reply bdf: want at most %d printable ASCII characters", MaxBDFLen)
	}
	if len(r.Message) > MaxMessageLen || !utf8.ValidString(r.Message) {
		return invalid("reply message: want at most %d bytes of UTF-8", MaxMessageLen)
	}
	if r.Code == CodeOK {
		if r.LeaseID == "" {
			return invalid("success reply without a lease id")
		}
		return nil
	}
	if r.Generation != 0 || r.Size != 0 || r.Inode != 0 || r.BAR != 0 || r.BDF != "" {
		return invalid("error reply %s carries lease facts", r.Code)
	}
	return nil
}

// DecodeReply parses a reply. It accepts exactly what [EncodeReply] produces.
func DecodeReply(b []byte) (Reply, error) {
	if err := checkHeader(b, TypeReply); err != nil {
		return Reply{}, err
	}
	if len(b) > MaxReplySize {
		return Reply{}, invalid("reply of %d bytes exceeds %d", len(b), MaxReplySize)
	}
	if len(b) < ReplyFixedSize {
		return Reply{}, invalid("reply of %d bytes is shorter than %d", len(b), ReplyFixedSize)
	}
	for _, x := range b[50:56] {
		if x != 0 {
			return Reply{}, invalid("reply reserved bytes are not zero")
		}
	}
	idLen := int(binary.LittleEndian.Uint16(b[44:46]))
	bdfLen := int(binary.LittleEndian.Uint16(b[46:48]))
	msgLen := int(binary.LittleEndian.Uint16(b[48:50]))
	if ReplyFixedSize+idLen+bdfLen+msgLen != len(b) {
		return Reply{}, invalid("field lengths %d+%d+%d do not match the %d-byte reply", idLen, bdfLen, msgLen, len(b))
	}
	off := ReplyFixedSize
	r := Reply{
		Code:       Code(binary.LittleEndian.Uint32(b[12:16])),
		Generation: binary.LittleEndian.Uint64(b[16:24]),
		Size:       binary.LittleEndian.Uint64(b[24:32]),
		Inode:      binary.LittleEndian.Uint64(b[32:40]),
		BAR:        binary.LittleEndian.Uint32(b[40:44]),
		LeaseID:    string(b[off : off+idLen]),
		BDF:        string(b[off+idLen : off+idLen+bdfLen]),
		Message:    string(b[off+idLen+bdfLen:]),
	}
	if err := r.validate(); err != nil {
		return Reply{}, err
	}
	return r, nil
}

// errProtocol marks replies a client cannot accept.
var errProtocol = errors.New("claim protocol violation")
