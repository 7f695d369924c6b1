package systemd_test

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/mmiobroker/mmiobroker/internal/systemd"
)

// With envChild set the test binary is a service started by the fake manager instead of
// a test run: see TestRestartChild.
const envChild = "MMB_SYSTEMD_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(envChild) == "restored" {
		if err := runRestoredChild(); err != nil {
			fmt.Printf("error=%v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// runRestoredChild plays a freshly started daemon: like systemd's exec, it sets
// LISTEN_PID to itself, then reads its environment with FromEnv and prints, for each
// restored fd in order, its name and contents, then sends READY=1.
func runRestoredChild() error {
	os.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
	m, err := systemd.FromEnv()
	if err != nil {
		return err
	}
	if _, ok := os.LookupEnv("LISTEN_FDS"); ok {
		return fmt.Errorf("LISTEN_FDS still set after FromEnv")
	}
	r := m.Restored()
	defer r.Close()
	fmt.Printf("managed=%v fdstore=%d\n", m.Managed(), m.FDStoreMax())
	for _, name := range r.Names() {
		f := r.Take(name)
		b, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<20))
		f.Close()
		if err != nil {
			return err
		}
		fmt.Printf("fd %s=%s\n", name, strings.TrimSpace(string(b)))
	}
	return m.Notify("READY=1")
}
