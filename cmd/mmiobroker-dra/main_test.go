package main

import (
	"strings"
	"testing"
)

// TestRunRefusesBadArguments: bad flags are refused before anything starts; without a
// cluster (no in-cluster service account) the plugin does not start either.
func TestRunRefusesBadArguments(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-partition", "0000:3b:00.0/2"}, "want BDF/BAR=COUNT"},
		{[]string{"-partition", "0000:3b:00.0/7=2"}, "want 0-5"},
		{[]string{"-log-level", "loud"}, "-log-level"},
		{[]string{"-no-such-flag"}, "not defined"},
		{[]string{"extra"}, "unexpected arguments"},
	} {
		if err := run(c.args); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("run(%q) = %v, want an error containing %q", c.args, err, c.want)
		}
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	if err := run([]string{"-node-name", "n"}); err == nil || !strings.Contains(err.Error(), "kubernetes client") {
		t.Errorf("run outside a cluster = %v, want the in-cluster configuration's error", err)
	}
}
