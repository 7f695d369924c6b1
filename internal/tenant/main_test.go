package tenant

import (
	"io"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// childEnv makes the test binary a child that lives until its stdin closes.
const childEnv = "TENANT_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}
