package bench

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// childEnvKey makes the test binary run this tool's modes instead of the tests: the
// orchestration tests start it as their daemon and client processes. Its value "fail"
// makes client processes fail at once, to test that the run fails with their reason.
const childEnvKey = "MMIOBROKER_BENCH_CHILD"

func TestMain(m *testing.M) {
	switch os.Getenv(childEnvKey) {
	case "":
		goleak.VerifyTestMain(m)
	case "fail":
		if len(os.Args) > 1 && os.Args[1] == "client" {
			fmt.Fprintln(os.Stderr, "client failing on purpose")
			os.Exit(1)
		}
		fallthrough
	default:
		os.Exit(Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
	}
}
