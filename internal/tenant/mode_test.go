package tenant

import (
	"errors"
	"strings"
	"testing"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

func TestParseMode(t *testing.T) {
	for _, m := range []Mode{ByUID, ByCgroup, ByLabel} {
		got, err := ParseMode(m.String())
		if err != nil || got != m {
			t.Errorf("ParseMode(%q) = %v, %v; want %v", m.String(), got, err, m)
		}
		text, err := m.MarshalText()
		if err != nil {
			t.Errorf("%v.MarshalText: %v", m, err)
		}
		var back Mode
		if err := back.UnmarshalText(text); err != nil || back != m {
			t.Errorf("UnmarshalText(%q) = %v, %v; want %v", text, back, err, m)
		}
	}
	if got := []string{ByUID.String(), ByCgroup.String(), ByLabel.String()}; strings.Join(got, ",") != "uid,cgroup,label" {
		t.Errorf("mode names = %q", got)
	}
	for _, bad := range []string{"", "UID", "Cgroup", "pid", "uid ", "Mode(1)"} {
		_, err := ParseMode(bad)
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseMode(%q) error = %v; want ErrInvalidArgument", bad, err)
			continue
		}
		for _, part := range []string{"\"" + bad + "\"", "uid", "cgroup", "label"} {
			if !strings.Contains(err.Error(), part) {
				t.Errorf("ParseMode(%q) error %q does not mention %s", bad, err, part)
			}
		}
		var m Mode = ByLabel
		if err := m.UnmarshalText([]byte(bad)); err == nil || m != ByLabel {
			t.Errorf("UnmarshalText(%q) = %v and set %v; want an error and no change", bad, err, m)
		}
	}
}

func TestModeInvalid(t *testing.T) {
	for _, m := range []Mode{0, 4, -1} {
		if _, err := m.MarshalText(); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Mode(%d).MarshalText error = %v; want ErrInvalidArgument", int(m), err)
		}
		if !strings.HasPrefix(m.String(), "Mode(") {
			t.Errorf("Mode(%d).String() = %q", int(m), m.String())
		}
	}
	if DefaultMode != ByCgroup {
		t.Errorf("DefaultMode = %v; want cgroup", DefaultMode)
	}
}
