package tenant

import (
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// ID is a tenant identity: a canonical, comparable string that always names the uid and
// at most one finer key after it, whose value runs to the end of the string:
//
//	uid=107
//	uid=107,cgroup=/machine.slice/machine-qemu\x2d1\x2dvm1.scope
//	uid=107,label=system_u:system_r:svirt_t:s0:c10,c20
//
// The uid is decimal without leading zeros; the cgroup is a unit path as [Unit] returns
// it; the label is an LSM label as [PeerLabel] returns it. Equal tenants have equal IDs.
// IDs from [Resolver.Resolve], [ForUID] and [ParseID] are well formed; the accessors
// report a malformed ID (one converted from an arbitrary string) as [InvalidUID] and
// false.
type ID string

// InvalidUID is (uid_t)-1, which names no user. [ID.UID] returns it for a malformed ID;
// no well-formed ID carries it.
const InvalidUID = math.MaxUint32

const (
	uidKey    = "uid="
	cgroupKey = ",cgroup="
	labelKey  = ",label="
)

// MaxLabel bounds the length of a label in an [ID]; [PeerLabel] fails on longer labels.
const MaxLabel = 4096

// maxPath bounds a cgroup path: the kernel prints at most PATH_MAX-1 bytes.
const maxPath = 4095

// ForUID returns the identity of uid alone, the tenant of [ByUID] and of peers outside
// any unit. uid must not be [InvalidUID].
func ForUID(uid uint32) ID {
	return ID(uidKey + strconv.FormatUint(uint64(uid), 10))
}

func forUnit(uid uint32, unit string) ID   { return ForUID(uid) + ID(cgroupKey+unit) }
func forLabel(uid uint32, label string) ID { return ForUID(uid) + ID(labelKey+label) }

// ParseID returns s as an ID if it is well formed, as stored IDs (the lease journal) must
// be; the error says what is wrong and wraps errdefs.ErrInvalidArgument.
func ParseID(s string) (ID, error) {
	if _, _, _, err := parseID(s); err != nil {
		return "", fmt.Errorf("tenant id %q: %w: %w", truncate(s), err, errdefs.ErrInvalidArgument)
	}
	return ID(s), nil
}

// parseID splits s into the uid and the finer key (cgroupKey, labelKey or "") and value.
func parseID(s string) (uid uint32, key, value string, err error) {
	rest, ok := strings.CutPrefix(s, uidKey)
	if !ok {
		return 0, "", "", fmt.Errorf("does not start with %q", uidKey)
	}
	n := 0
	for n < len(rest) && rest[n] >= '0' && rest[n] <= '9' {
		n++
	}
	digits := rest[:n]
	if n == 0 || (n > 1 && digits[0] == '0') {
		return 0, "", "", fmt.Errorf("uid %q is not a canonical decimal number", digits)
	}
	u, perr := strconv.ParseUint(digits, 10, 32)
	if perr != nil || u == InvalidUID {
		return 0, "", "", fmt.Errorf("uid %s is out of range", digits)
	}
	uid, rest = uint32(u), rest[n:]
	switch {
	case rest == "":
		return uid, "", "", nil
	case strings.HasPrefix(rest, cgroupKey):
		value = rest[len(cgroupKey):]
		if !validUnit(value) {
			return 0, "", "", fmt.Errorf("cgroup %q is not a clean absolute path below the root", truncate(value))
		}
		return uid, cgroupKey, value, nil
	case strings.HasPrefix(rest, labelKey):
		value = rest[len(labelKey):]
		if err := checkLabel(value); err != nil {
			return 0, "", "", err
		}
		return uid, labelKey, value, nil
	default:
		return 0, "", "", fmt.Errorf("%q follows the uid; want %q or %q", truncate(rest), cgroupKey, labelKey)
	}
}

// checkLabel reports whether label can be part of an ID.
func checkLabel(label string) error {
	switch {
	case label == "":
		return fmt.Errorf("empty label")
	case len(label) > MaxLabel:
		return fmt.Errorf("label of %d bytes exceeds %d", len(label), MaxLabel)
	case strings.IndexByte(label, 0) >= 0:
		return fmt.Errorf("label %q holds a NUL byte", truncate(label))
	}
	return nil
}

// UID returns the uid of the tenant, or [InvalidUID] if id is malformed.
func (id ID) UID() uint32 {
	uid, _, _, err := parseID(string(id))
	if err != nil {
		return InvalidUID
	}
	return uid
}

// Unit returns the cgroup unit of the tenant, and false if the tenant is not a cgroup
// unit (or id is malformed).
func (id ID) Unit() (string, bool) { return id.value(cgroupKey) }

// Label returns the LSM label of the tenant, and false if the tenant is not a label (or
// id is malformed).
func (id ID) Label() (string, bool) { return id.value(labelKey) }

func (id ID) value(want string) (string, bool) {
	_, key, value, err := parseID(string(id))
	if err != nil || key != want {
		return "", false
	}
	return value, true
}

// String returns id as it is.
func (id ID) String() string { return string(id) }

// truncate shortens s for error messages.
func truncate(s string) string {
	const max = 80
	if len(s) <= max {
		return s
	}
	return s[:max] + "…"
}
