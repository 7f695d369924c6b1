package systemd

import (
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

func TestParseWatchdog(t *testing.T) {
	const self = 4242
	tests := []struct {
		usec, pid string
		want      time.Duration
		wantErr   bool
	}{
		{"", "", 0, false},
		{"", "4242", 0, false},
		{"30000000", "", 30 * time.Second, false},
		{"30000000", "4242", 30 * time.Second, false},
		{"30000000", "1", 0, false}, // another process's watchdog
		{"1", "4242", time.Microsecond, false},
		{"18446744073709551614", "", time.Duration(math.MaxInt64), false},
		{"0", "", 0, true},
		{"18446744073709551615", "", 0, true}, // USEC_INFINITY
		{"-5", "", 0, true},
		{"5s", "", 0, true},
		{" 5", "", 0, true},
		{"30000000", "0", 0, true},
		{"30000000", "-1", 0, true},
		{"30000000", "abc", 0, true},
		{"30000000", "99999999999", 0, true},
	}
	for _, tt := range tests {
		got, err := parseWatchdog(tt.usec, tt.pid, self)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("parseWatchdog(%q, %q) = %v, %v; want %v, error %v", tt.usec, tt.pid, got, err, tt.want, tt.wantErr)
		}
		if err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("parseWatchdog(%q, %q) error %v is not ErrInvalidArgument", tt.usec, tt.pid, err)
		}
	}
}

func TestParseFDStore(t *testing.T) {
	tests := []struct {
		in      string
		want    int
		wantErr bool
	}{
		{"", 0, false},
		{"0", 0, false},
		{"64", 64, false},
		{"4294967295", math.MaxUint32, false},
		{"4294967296", 0, true},
		{"-1", 0, true},
		{"many", 0, true},
		{"64 ", 0, true},
	}
	for _, tt := range tests {
		got, err := parseFDStore(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("parseFDStore(%q) = %d, %v; want %d, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestParseEnv(t *testing.T) {
	env := map[string]string{
		"NOTIFY_SOCKET": "@/org/freedesktop/systemd1/notify",
		"WATCHDOG_USEC": "20000000",
		"WATCHDOG_PID":  "77",
		"FDSTORE":       "128",
	}
	cfg, err := parseEnv(func(k string) string { return env[k] }, 77)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NotifySocket != env["NOTIFY_SOCKET"] || cfg.Watchdog != 20*time.Second || cfg.FDStoreMax != 128 {
		t.Errorf("parseEnv = %+v", cfg)
	}
	env["WATCHDOG_PID"] = "78"
	cfg, err = parseEnv(func(k string) string { return env[k] }, 77)
	if err != nil || cfg.Watchdog != 0 {
		t.Errorf("WATCHDOG_PID of another process: watchdog %v, err %v; want 0, nil", cfg.Watchdog, err)
	}
	env["NOTIFY_SOCKET"] = "vsock:2:999"
	env["FDSTORE"] = "x"
	if _, err := parseEnv(func(k string) string { return env[k] }, 77); !errors.Is(err, errdefs.ErrNotSupported) ||
		!errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("vsock socket and bad FDSTORE: %v, want both errors joined", err)
	}
}

func FuzzParseEnv(f *testing.F) {
	f.Add("/run/systemd/notify", "30000000", "1", "64")
	f.Add("@abstract", "1", "", "")
	f.Add("", "18446744073709551614", "2", "4294967295")
	f.Add("vsock:2:1", "0", "-1", "-1")
	f.Add("/"+strings.Repeat("a", 120), "+5", "01", "007")
	f.Fuzz(func(t *testing.T, notify, usec, wpid, fdstore string) {
		env := map[string]string{"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": usec, "WATCHDOG_PID": wpid, "FDSTORE": fdstore}
		cfg, err := parseEnv(func(k string) string { return env[k] }, 1)
		if cfg.Watchdog < 0 || cfg.FDStoreMax < 0 {
			t.Fatalf("negative result %+v", cfg)
		}
		if cfg.NotifySocket != "" && cfg.NotifySocket != notify {
			t.Fatalf("NotifySocket %q from %q", cfg.NotifySocket, notify)
		}
		if err == nil {
			// Whatever parses is accepted by New and round-trips through the Manager.
			m, err := New(cfg)
			if err != nil {
				t.Fatalf("New(%+v): %v", cfg, err)
			}
			if m.NotifySocket() != notify || m.FDStoreMax() != cfg.FDStoreMax || m.WatchdogInterval() != cfg.Watchdog {
				t.Fatalf("Manager does not reflect %+v", cfg)
			}
			if usec == "" && cfg.Watchdog != 0 {
				t.Fatalf("watchdog %v without WATCHDOG_USEC", cfg.Watchdog)
			}
		}
		if err != nil && !errors.Is(err, errdefs.ErrInvalidArgument) && !errors.Is(err, errdefs.ErrNotSupported) {
			t.Fatalf("unclassified error %v", err)
		}
	})
}
