package dra

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails on leaked goroutines; klog's flush daemon lives as long as the process.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"))
}
