package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// TestUsageErrors covers the command line checks that come before the rig is opened.
func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // in the error or on stderr
		code int    // exit status for exitError results, 0 otherwise
	}{
		{nil, "usage: rig run|bench|demo|shell", 2},
		{[]string{"-kernel", "stock"}, "usage: rig run|bench|demo|shell", 2},
		{[]string{"boot"}, "usage: rig run|bench|demo|shell", 2},
		{[]string{"run", "-kernel", "rt"}, `unknown guest kernel "rt"`, 0},
		{[]string{"run", "-topology", "star"}, `unknown -topology "star"`, 0},
		{[]string{"run", "extra"}, "unexpected arguments", 0},
		{[]string{"run", "-nosuchflag"}, "flag provided but not defined", 2},
		{[]string{"bench", "-mode", "systemd"}, "bench: only -mode busybox", 0},
	} {
		var stdout, stderr bytes.Buffer
		err := run(tc.args, &stdout, &stderr)
		if err == nil {
			t.Errorf("rig %q: no error", tc.args)
			continue
		}
		var ex exitError
		gotCode := 0
		if errors.As(err, &ex) {
			gotCode = int(ex)
		}
		if gotCode != tc.code || !strings.Contains(err.Error()+stderr.String(), tc.want) {
			t.Errorf("rig %q: err %v (code %d), stderr %q; want code %d and %q", tc.args, err, gotCode, stderr.String(), tc.code, tc.want)
		}
	}
}
