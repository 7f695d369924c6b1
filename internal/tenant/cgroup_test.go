package tenant

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

const (
	v2File     = "0::/machine.slice/machine-qemu\\x2d3\\x2dvm1.scope/libvirt/emulator\n"
	hybridFile = "12:pids:/user.slice/user-1000.slice\n" +
		"11:memory:/user.slice/user-1000.slice/session-3.scope\n" +
		"2:cpu,cpuacct:/\n" +
		"1:name=systemd:/user.slice/user-1000.slice/session-3.scope\n" +
		"0::/user.slice/user-1000.slice/session-3.scope\n"
	v1File = "12:pids:/\n11:memory:/docker/abc\n1:name=systemd:/docker/abc\n"
)

func TestParseCgroupFile(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want string
		err  error // nil: want success
	}{
		{"v2", v2File, `/machine.slice/machine-qemu\x2d3\x2dvm1.scope/libvirt/emulator`, nil},
		{"v2 root", "0::/\n", "/", nil},
		{"v2 no trailing newline", "0::/a/b", "/a/b", nil},
		{"v2 colon in path", "0::/a:b/c::d\n", "/a:b/c::d", nil},
		{"v2 deleted", "0::/a/b (deleted)\n", "/a/b (deleted)", nil},
		{"v2 outside namespace", "0::/../../machine.slice/x.scope\n", "/../../machine.slice/x.scope", nil},
		{"hybrid", hybridFile, "/user.slice/user-1000.slice/session-3.scope", nil},
		{"hybrid v2 first", "0::/x\n1:name=systemd:/y\n", "/x", nil},
		{"v1 only", v1File, "", errdefs.ErrNotSupported},
		{"empty", "", "", errdefs.ErrInvalidArgument},
		{"newline only", "\n", "", errdefs.ErrInvalidArgument},
		{"garbage", "hello world\n", "", errdefs.ErrInvalidArgument},
		{"binary garbage", "\x00\xff\x01:", "", errdefs.ErrInvalidArgument},
		{"one colon", "0:/x\n", "", errdefs.ErrInvalidArgument},
		{"non-decimal id", "x::/a\n", "", errdefs.ErrInvalidArgument},
		{"empty id", "::/a\n", "", errdefs.ErrInvalidArgument},
		{"blank line inside", "1:cpu:/\n\n0::/a\n", "", errdefs.ErrInvalidArgument},
		{"two v2 lines", "0::/a\n0::/b\n", "", errdefs.ErrInvalidArgument},
		{"v2 with controllers", "0:cpu:/a\n", "", errdefs.ErrInvalidArgument},
		{"relative path", "0::a/b\n", "", errdefs.ErrInvalidArgument},
		{"empty path", "0::\n", "", errdefs.ErrInvalidArgument},
		{"nul in path", "0::/a\x00b\n", "", errdefs.ErrInvalidArgument},
		{"path too long", "0::/" + strings.Repeat("a", 5000) + "\n", "", errdefs.ErrInvalidArgument},
		{"file too large", strings.Repeat("1:cpu:/\n", maxCgroupFile/8+1) + "0::/\n", "", errdefs.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseCgroupFile([]byte(tt.in))
			if tt.err == nil {
				if err != nil || got != tt.want {
					t.Errorf("ParseCgroupFile(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
				}
				return
			}
			if !errors.Is(err, tt.err) {
				t.Errorf("ParseCgroupFile(%q) = %q, %v; want an error matching %v", tt.in, got, err, tt.err)
			}
		})
	}
}

func TestParseCgroupFileV1Message(t *testing.T) {
	_, err := ParseCgroupFile([]byte(v1File))
	if err == nil || !strings.Contains(err.Error(), "cgroup v1") || !strings.Contains(err.Error(), "0::") {
		t.Errorf("v1-only error %q should say the host has only cgroup v1 and no 0:: line", err)
	}
}

// fakeProc writes <root>/<pid>/cgroup for each pid and returns root.
func fakeProc(t *testing.T, files map[int32]string) string {
	t.Helper()
	root := t.TempDir()
	for pid, content := range files {
		dir := filepath.Join(root, strconv.Itoa(int(pid)))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestReadCgroupFake(t *testing.T) {
	root := fakeProc(t, map[int32]string{
		100: v2File,
		200: hybridFile,
		300: v1File,
		400: "garbage",
		500: strings.Repeat("1:cpu:/\n", maxCgroupFile/8+1),
	})
	for _, tt := range []struct {
		pid  int32
		want string
		err  error
	}{
		{100, `/machine.slice/machine-qemu\x2d3\x2dvm1.scope/libvirt/emulator`, nil},
		{200, "/user.slice/user-1000.slice/session-3.scope", nil},
		{300, "", errdefs.ErrNotSupported},
		{400, "", errdefs.ErrInvalidArgument},
		{500, "", errdefs.ErrInvalidArgument},
		{600, "", errdefs.ErrNotFound},
		{0, "", errdefs.ErrInvalidArgument},
		{-1, "", errdefs.ErrInvalidArgument},
	} {
		got, err := ReadCgroup(root, tt.pid)
		switch {
		case tt.err == nil && (err != nil || got != tt.want):
			t.Errorf("ReadCgroup(pid %d) = %q, %v; want %q", tt.pid, got, err, tt.want)
		case tt.err != nil && !errors.Is(err, tt.err):
			t.Errorf("ReadCgroup(pid %d) = %q, %v; want an error matching %v", tt.pid, got, err, tt.err)
		case err != nil && !strings.Contains(err.Error(), "pid "+strconv.Itoa(int(tt.pid))):
			t.Errorf("ReadCgroup(pid %d) error %q does not name the pid", tt.pid, err)
		}
	}
}

func TestReadCgroupMissingPID(t *testing.T) {
	_, err := ReadCgroup(t.TempDir(), 4242)
	if !errors.Is(err, unix.ENOENT) || !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("ReadCgroup of a missing pid = %v; want an error matching ENOENT and ErrNotFound", err)
	}
	if !strings.Contains(err.Error(), "pid 4242") {
		t.Errorf("error %q does not name the pid", err)
	}
}

func TestReadCgroupSelf(t *testing.T) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	want, wantErr := ParseCgroupFile(b)
	got, err := ReadCgroup("", int32(os.Getpid()))
	if errors.Is(wantErr, errdefs.ErrNotSupported) {
		if !errors.Is(err, errdefs.ErrNotSupported) {
			t.Errorf("ReadCgroup(self) = %q, %v; want ErrNotSupported as for /proc/self/cgroup", got, err)
		}
		t.Skipf("host has no cgroup v2 hierarchy: %v", wantErr)
	}
	if wantErr != nil {
		t.Fatalf("ParseCgroupFile(/proc/self/cgroup %q): %v", b, wantErr)
	}
	if err != nil {
		t.Fatalf("ReadCgroup(self): %v", err)
	}
	if got != want || !strings.HasPrefix(got, "/") {
		t.Errorf("ReadCgroup(self) = %q; want the absolute %q of /proc/self/cgroup", got, want)
	}
	t.Logf("own cgroup: %s", got)
}
