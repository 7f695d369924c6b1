package tenant

import (
	"fmt"
	"strconv"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

// Mode says how peers are grouped into tenants.
type Mode int

const (
	// ByUID makes each peer uid one tenant.
	ByUID Mode = iota + 1
	// ByCgroup makes each cgroup unit ([Unit]) one tenant; peers outside any unit are
	// grouped by uid.
	ByCgroup
	// ByLabel makes each LSM label ([PeerLabel]) one tenant; peers without a label are
	// grouped as by [ByCgroup].
	ByLabel
)

// DefaultMode is the mode of a [Resolver] whose Mode is zero.
const DefaultMode = ByCgroup

var modeNames = [...]string{ByUID: "uid", ByCgroup: "cgroup", ByLabel: "label"}

// ParseMode returns the Mode named s: "uid", "cgroup" or "label".
func ParseMode(s string) (Mode, error) {
	for m, name := range modeNames {
		if name != "" && name == s {
			return Mode(m), nil
		}
	}
	return 0, fmt.Errorf("tenant mode %q: want one of uid, cgroup, label: %w", s, errdefs.ErrInvalidArgument)
}

// String returns the name [ParseMode] accepts, or "Mode(n)" for an undefined Mode.
func (m Mode) String() string {
	if m.valid() {
		return modeNames[m]
	}
	return "Mode(" + strconv.Itoa(int(m)) + ")"
}

func (m Mode) valid() bool { return m >= ByUID && m <= ByLabel }

// MarshalText returns the mode's name, so configuration encoders write it as a string.
func (m Mode) MarshalText() ([]byte, error) {
	if !m.valid() {
		return nil, fmt.Errorf("tenant mode %d: %w", int(m), errdefs.ErrInvalidArgument)
	}
	return []byte(modeNames[m]), nil
}

// UnmarshalText sets m from its name, as [ParseMode] does.
func (m *Mode) UnmarshalText(b []byte) error {
	v, err := ParseMode(string(b))
	if err != nil {
		return err
	}
	*m = v
	return nil
}
