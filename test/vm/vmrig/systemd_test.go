package vmrig

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestInstallTargets(t *testing.T) {
	unit := []byte("[Unit]\nWantedBy=wrong.target\n[Service]\nExecStart=/x\n[Install]\n" +
		"WantedBy=sockets.target multi-user.target\nRequiredBy=foo.service\nAlso=bar.socket\n")
	want := []string{"sockets.target.wants", "multi-user.target.wants", "foo.service.requires"}
	if diff := cmp.Diff(want, installTargets(unit)); diff != "" {
		t.Errorf("installTargets (-want +got):\n%s", diff)
	}
	if got := installTargets([]byte("[Service]\nType=simple\n")); got != nil {
		t.Errorf("no [Install]: %v", got)
	}
}

func TestFindGuestTestPackagesSystemd(t *testing.T) {
	root := t.TempDir()
	writeFiles(t, root, map[string]string{
		"go.mod":                          "module " + ModulePath + "\n\ngo 1.26\n",
		"test/vm/systemd/a_vmsd_test.go":  "",
		"test/vm/e2e/e2e_vm_test.go":      "",
		"internal/x/x_vmsd_test.go":       "",
		"internal/x/testdata/t_vmsd_test": "",
	})
	got, err := FindGuestTestPackages(root, Systemd)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"internal/x", "test/vm/systemd"}, got); diff != "" {
		t.Errorf("systemd packages (-want +got):\n%s", diff)
	}
	got, _ = FindGuestTestPackages(root, Busybox)
	if diff := cmp.Diff([]string{"test/vm/e2e"}, got); diff != "" {
		t.Errorf("busybox packages (-want +got):\n%s", diff)
	}
	if _, err := ParseBootMode("openrc"); err == nil {
		t.Error("ParseBootMode accepted openrc")
	}
}

// TestBuildSystemdImage: the image is the base archive followed by the payload archive,
// which installs deploy/'s units (enabled by their [Install]), the rig's units and the
// test binaries; a second build comes from the cache.
func TestBuildSystemdImage(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "rootfs.cpio.zst")
	baseData := []byte("BASE ARCHIVE")
	deploy := filepath.Join(dir, "deploy")
	writeFiles(t, dir, map[string]string{
		"rootfs.cpio.zst":                 string(baseData),
		"deploy/d.service":                "[Service]\nExecStart=/usr/bin/d\n[Install]\nAlso=d.socket\n",
		"deploy/d.socket":                 "[Socket]\nListenStream=/run/d.sock\n[Install]\nWantedBy=sockets.target\n",
		"deploy/sysusers.d/d.conf":        "g d -\n",
		"deploy/tmpfiles.d/d.conf":        "d /run/d 0755 root root -\n",
		"payload/tests/systemd.test":      "TEST",
		"payload/mmiobrokerd":             "DAEMON",
		"deploy/not-a-unit.toml":          "x = 1\n",
		"deploy/sysusers.d/README":        "not installed",
		"cache/initramfs/stock-old.cpio":  "busybox image (not pruned by the systemd image)",
		"cache/initramfs/systemd-stock-x": "",
	})
	p := &Payload{Tests: []Binary{{Name: "systemd", Path: filepath.Join(dir, "payload/tests/systemd.test")}},
		Programs: []Binary{{Name: "mmiobrokerd", Path: filepath.Join(dir, "payload/mmiobrokerd")}}}
	opt := SystemdImageOptions{Kernel: KernelImage{Kernel: IOMMUFD}, Base: base, DeployDir: deploy,
		Payload: p, CacheDir: filepath.Join(dir, "cache"), Level: -1}
	img, err := BuildSystemdImage(context.Background(), opt)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(img.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, baseData) {
		t.Fatalf("image does not start with the base archive")
	}
	files := map[string]string{}
	for _, e := range readCPIO(t, b[len(baseData):]) {
		files[e.Name] = e.Data
	}
	for name, want := range map[string]string{
		"usr/bin/mmiobrokerd":                                           "DAEMON",
		"usr/lib/mmb/tests/systemd.test":                                "TEST",
		"etc/mmb/tests":                                                 "systemd\n",
		"usr/lib/systemd/system/d.service":                              "[Service]\nExecStart=/usr/bin/d\n[Install]\nAlso=d.socket\n",
		"etc/systemd/system/sockets.target.wants/d.socket":              "/usr/lib/systemd/system/d.socket",
		"usr/lib/sysusers.d/d.conf":                                     "g d -\n",
		"usr/lib/tmpfiles.d/d.conf":                                     "d /run/d 0755 root root -\n",
		"etc/systemd/system/multi-user.target.wants/mmb-rig.service":    "/etc/systemd/system/mmb-rig.service",
		"etc/systemd/system/sysinit.target.wants/mmb-vfio-bind.service": "/etc/systemd/system/mmb-vfio-bind.service",
		"etc/systemd/system/modprobe@drm.service":                       "/dev/null",
	} {
		if got, ok := files[name]; !ok || got != want {
			t.Errorf("%s = %q (present %v), want %q", name, got, ok, want)
		}
	}
	for _, name := range []string{"usr/lib/mmb/rig.sh", "usr/lib/mmb/vfio-bind.sh", "etc/systemd/system/mmb-rig.service"} {
		if files[name] == "" {
			t.Errorf("%s missing or empty", name)
		}
	}
	if _, ok := files["usr/lib/systemd/system/not-a-unit.toml"]; ok {
		t.Error("a non-unit file of deploy/ was installed")
	}
	again, err := BuildSystemdImage(context.Background(), opt)
	if err != nil || !again.Cached || again.Path != img.Path {
		t.Errorf("second build: %+v, %v; want the cached %s", again, err, img.Path)
	}
	if _, err := os.Stat(filepath.Join(dir, "cache/initramfs/stock-old.cpio")); err != nil {
		t.Errorf("the busybox image was pruned: %v", err)
	}
}
