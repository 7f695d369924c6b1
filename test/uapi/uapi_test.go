// Package uapi checks linux-7.2.txt, the kernel facts the Go mirrors of internal/vfio,
// internal/iommufd and internal/kvm are tested against, with the Linux 7.2 source's own
// uapi headers: it builds testdata/layout.c against the headers test/vm/setup.sh
// installs, runs it, and compares the output with the file.
//
// The test runs when the rig has the headers; MMIOBROKER_VM=1 (make test-vm) turns a
// missing rig piece into a failure. After a kernel source update, or a change to
// testdata/layout.c, regenerate the file with
//
//	test/vm/setup.sh && MMIOBROKER_VM=1 go test ./test/uapi -update
//
// and run the layout tests (go test ./internal/vfio ./internal/iommufd ./internal/kvm).
package uapi

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/mmiobroker/mmiobroker/test/vm/vmrig"
)

var update = flag.Bool("update", false, "rewrite linux-7.2.txt with layout.c's output")

// truth is the committed output of layout.c.
const truth = "linux-7.2.txt"

// need skips t for a missing rig piece, or fails it under MMIOBROKER_VM=1.
func need(t *testing.T, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if os.Getenv("MMIOBROKER_VM") == "1" {
		t.Fatal(err)
	}
	t.Skipf("%v (MMIOBROKER_VM=1 makes this a failure)", err)
}

func TestLayoutFile(t *testing.T) {
	env, err := vmrig.LoadEnv()
	need(t, err)
	include, err := env.UAPIHeaders()
	need(t, err)
	gcc, err := exec.LookPath("gcc")
	need(t, err)

	bin := filepath.Join(t.TempDir(), "layout")
	build := exec.Command(gcc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I", include, "-o", bin, filepath.Join("testdata", "layout.c"))
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", build.Args, err, out)
	}
	var stderr bytes.Buffer
	run := exec.Command(bin)
	run.Stderr = &stderr
	got, err := run.Output()
	if err != nil {
		t.Fatalf("layout: %v\n%s", err, stderr.Bytes())
	}

	if *update {
		if err := os.WriteFile(truth, got, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s from the headers in %s", truth, include)
		return
	}
	want, err := os.ReadFile(truth)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(want), string(got)); diff != "" {
		t.Errorf("%s differs from what layout.c prints from the headers in %s (-file +headers):\n%s\n"+
			"If the headers are right, regenerate it: MMIOBROKER_VM=1 go test ./test/uapi -update; "+
			"then run go test ./internal/vfio ./internal/iommufd ./internal/kvm and fix the Go mirrors they report.",
			truth, include, diff)
	}
}
