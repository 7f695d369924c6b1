package vmrig

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// BootMode is what runs as PID 1 in the guest.
type BootMode string

// Boot modes.
const (
	// Busybox boots the small initramfs whose /init is guest/init.sh and runs the vmtest
	// binaries (*_vm_test.go, build tag vmtest).
	Busybox BootMode = "busybox"
	// Systemd boots real systemd (Debian trixie, from setup.sh) as PID 1 with the project's
	// units from deploy/ installed, and runs the vmsystemd binaries (*_vmsd_test.go, build
	// tag vmsystemd) as a service (guest/systemd).
	Systemd BootMode = "systemd"
)

// BootModes lists every boot mode in the order the rig runs them.
var BootModes = []BootMode{Busybox, Systemd}

// ParseBootMode accepts "busybox" or "systemd".
func ParseBootMode(s string) (BootMode, error) {
	for _, m := range BootModes {
		if s == string(m) {
			return m, nil
		}
	}
	return "", fmt.Errorf("unknown boot mode %q (want busybox or systemd)", s)
}

// testSpec is how a boot mode's guest test packages are found and built.
func (b BootMode) testSpec() (suffix, tag string) {
	if b == Systemd {
		return "_vmsd_test.go", "vmsystemd"
	}
	return "_vm_test.go", "vmtest"
}

// The systemd guest's rig units and scripts (guest/systemd).
//
//go:embed guest/systemd
var systemdGuest embed.FS

// rigMasked are the units the systemd image masks on top of setup.sh's masks.
var rigMasked = []string{"modprobe@drm.service", "modprobe@efi_pstore.service", "systemd-pstore.service",
	"proc-sys-fs-binfmt_misc.automount", "systemd-journal-flush.service", "systemd-hwdb-update.service"}

// SystemdImageOptions configures BuildSystemdImage.
type SystemdImageOptions struct {
	Kernel    KernelImage
	Base      string   // the root filesystem archive setup.sh built (rootfs.cpio.zst)
	DeployDir string   // the repository's deploy/ (units, sysusers.d, tmpfiles.d)
	Payload   *Payload // programs and vmsystemd test binaries; may be nil
	CacheDir  string   // images are kept in CacheDir/initramfs
	Level     int      // zstd level of the payload archive (0 = 3); negative: uncompressed
}

// BuildSystemdImage writes the initramfs of the systemd boot mode: setup.sh's root
// filesystem archive followed by a second archive with the payload (the kernel unpacks
// both into its rootfs, the second over the first). The second archive holds:
//
//   - the programs in /usr/bin, the test binaries in /usr/lib/mmb/tests (listed in
//     /etc/mmb/tests);
//   - deploy/'s units in /usr/lib/systemd/system, enabled as `systemctl enable` would
//     (their [Install] WantedBy=/RequiredBy=), deploy/sysusers.d and deploy/tmpfiles.d in
//     /usr/lib;
//   - the rig's units (mmb-vfio-bind.service, mmb-rig.service) and their scripts in
//     /usr/lib/mmb;
//   - for a modular kernel, the VFIO modules in load order (/usr/lib/mmb/modules,
//     /etc/mmb/modules), as in the busybox image.
//
// Images are cached by the hash of the base archive and the payload archive.
func BuildSystemdImage(ctx context.Context, opt SystemdImageOptions) (*Image, error) {
	start := time.Now()
	img := &Image{}
	var arc bytes.Buffer
	w := NewCPIOWriter(&arc)
	for _, d := range []string{"etc", "etc/mmb", "etc/mmiobroker", "etc/systemd", "etc/systemd/system",
		"usr", "usr/bin", "usr/lib", "usr/lib/mmb", "usr/lib/mmb/tests", "usr/lib/mmb/modules",
		"usr/lib/systemd", "usr/lib/systemd/system", "usr/lib/sysusers.d", "usr/lib/tmpfiles.d"} {
		w.Dir(d, 0o755)
	}
	if p := opt.Payload; p != nil {
		for _, b := range p.Programs {
			if err := addFile(w, "usr/bin/"+b.Name, b.Path); err != nil {
				return nil, err
			}
		}
		for _, b := range p.Tests {
			if err := addFile(w, "usr/lib/mmb/tests/"+b.Name+".test", b.Path); err != nil {
				return nil, err
			}
			img.Tests = append(img.Tests, b.Name)
		}
	}
	w.File("etc/mmb/tests", 0o644, lines(img.Tests))

	// deploy/: the units, enabled like `systemctl enable`, and the sysusers/tmpfiles files
	units, err := filepath.Glob(filepath.Join(opt.DeployDir, "*.service"))
	if err != nil {
		return nil, err
	}
	sockets, _ := filepath.Glob(filepath.Join(opt.DeployDir, "*.socket"))
	units = append(units, sockets...)
	if len(units) == 0 {
		return nil, fmt.Errorf("systemd image: no units in %s", opt.DeployDir)
	}
	sort.Strings(units)
	wants := map[string]bool{}
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			return nil, err
		}
		name := filepath.Base(u)
		w.File("usr/lib/systemd/system/"+name, 0o644, b)
		for _, target := range installTargets(b) {
			dir := "etc/systemd/system/" + target
			if !wants[dir] {
				w.Dir(dir, 0o755)
				wants[dir] = true
			}
			w.Symlink(dir+"/"+name, "/usr/lib/systemd/system/"+name)
		}
	}
	for _, sub := range []string{"sysusers.d", "tmpfiles.d"} {
		confs, _ := filepath.Glob(filepath.Join(opt.DeployDir, sub, "*.conf"))
		for _, c := range confs {
			if err := addFileMode(w, "usr/lib/"+sub+"/"+filepath.Base(c), c, 0o644); err != nil {
				return nil, err
			}
		}
	}

	// the rig's own units and scripts
	guest := func(name string) []byte {
		b, err := systemdGuest.ReadFile("guest/systemd/" + name)
		if err != nil {
			panic(err) // embedded: cannot happen
		}
		return b
	}
	for _, s := range []string{"vfio-bind.sh", "rig.sh"} {
		w.File("usr/lib/mmb/"+s, 0o755, guest(s))
	}
	for _, u := range []string{"mmb-vfio-bind.service", "mmb-rig.service"} {
		b := guest(u)
		w.File("etc/systemd/system/"+u, 0o644, b)
		for _, target := range installTargets(b) {
			dir := "etc/systemd/system/" + target
			if !wants[dir] {
				w.Dir(dir, 0o755)
				wants[dir] = true
			}
			w.Symlink(dir+"/"+u, "/etc/systemd/system/"+u)
		}
	}
	// units that only cost boot time in the rig (no DRM, no EFI/pstore, no binfmt, the
	// journal stays in /run)
	for _, u := range rigMasked {
		w.Symlink("etc/systemd/system/"+u, "/dev/null")
	}
	w.Dir("etc/systemd/system/systemd-sysusers.service.d", 0o755)
	w.File("etc/systemd/system/systemd-sysusers.service.d/mmb-rig.conf", 0o644, guest("sysusers-needs-update.conf"))

	if img.Modules, err = addModules(ctx, w, opt.Kernel, "usr/lib/mmb/modules/"); err != nil {
		return nil, err
	}
	w.File("etc/mmb/modules", 0o644, lines(img.Modules))
	if err := w.Close(); err != nil {
		return nil, err
	}

	base, err := os.Open(opt.Base)
	if err != nil {
		return nil, fmt.Errorf("systemd root filesystem: %w: %s", err, setupHint)
	}
	defer base.Close()
	h := sha256.New()
	if _, err := io.Copy(h, base); err != nil {
		return nil, err
	}
	h.Write(arc.Bytes())
	img.Hash = hex.EncodeToString(h.Sum(nil))
	dir := filepath.Join(opt.CacheDir, "initramfs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	prefix := "systemd-" + string(opt.Kernel.Kernel)
	img.Path = filepath.Join(dir, fmt.Sprintf("%s-%s.cpio.zst", prefix, img.Hash[:16]))
	if st, err := os.Stat(img.Path); err == nil {
		img.Cached, img.Size, img.Took = true, st.Size(), time.Since(start)
		now := time.Now()
		os.Chtimes(img.Path, now, now)
		return img, nil
	}
	tmp, err := os.CreateTemp(dir, ".initramfs-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	if _, err := base.Seek(0, io.SeekStart); err != nil {
		tmp.Close()
		return nil, err
	}
	// The kernel unpacks concatenated archives, each compressed on its own.
	_, err = io.Copy(tmp, base)
	if err == nil {
		err = compress(ctx, tmp, arc.Bytes(), opt.Level)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	if err := os.Rename(tmp.Name(), img.Path); err != nil {
		return nil, err
	}
	if st, err := os.Stat(img.Path); err == nil {
		img.Size = st.Size()
	}
	pruneImages(dir, prefix, 3)
	img.Took = time.Since(start)
	return img, nil
}

// compress writes data to w, zstd-compressed at level (0 = 3), or as it is if level < 0.
func compress(ctx context.Context, w io.Writer, data []byte, level int) error {
	if level < 0 {
		_, err := w.Write(data)
		return err
	}
	if level == 0 {
		level = 3
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "zstd", "-q", "-T0", fmt.Sprintf("-%d", level), "-c")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(data), w, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("initramfs: zstd: %w: %s (install zstd: %s)", err, strings.TrimSpace(stderr.String()), setupHint)
	}
	return nil
}

// installTargets returns the "<target>.wants" and "<target>.requires" directories the
// [Install] section of a unit file asks `systemctl enable` to link it into.
func installTargets(unit []byte) []string {
	var dirs []string
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(unit))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "[") {
			section = line
			continue
		}
		if section != "[Install]" {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		suffix := map[string]string{"WantedBy": ".wants", "RequiredBy": ".requires", "UpheldBy": ".upholds"}[strings.TrimSpace(k)]
		if suffix == "" {
			continue
		}
		for _, t := range strings.Fields(v) {
			dirs = append(dirs, path.Clean(t)+suffix)
		}
	}
	return dirs
}

func addFileMode(w *CPIOWriter, name, src string, perm os.FileMode) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return w.File(name, perm, b)
}
