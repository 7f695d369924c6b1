package vmrig

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	_ "embed"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// The guest's /init and the demo script it runs in demo mode.
var (
	//go:embed guest/init.sh
	initScript []byte
	//go:embed guest/demo.sh
	demoScript []byte
)

// ImageOptions configures BuildImage.
type ImageOptions struct {
	Kernel   KernelImage
	Busybox  string   // static busybox
	Payload  *Payload // may be nil: an image with only busybox and the init
	CacheDir string   // images are kept in CacheDir/initramfs
	Level    int      // zstd level (0 = 3); negative: no compression (boots ~0.8 s faster under TCG)
}

// Image is a built (or cached) initramfs.
type Image struct {
	Path    string
	Hash    string   // sha256 of the uncompressed archive
	Cached  bool     // reused from the cache
	Tests   []string // test binaries, in the order the guest runs them
	Modules []string // modules the guest loads, in order
	Size    int64    // compressed size
	Took    time.Duration
}

// BuildImage writes the guest initramfs for opt.Kernel: busybox, /init, the demo script,
// the payload, and for a modular kernel the VFIO modules in load order. Images are cached
// by the SHA-256 of their content, so an unchanged payload costs no compression.
func BuildImage(ctx context.Context, opt ImageOptions) (*Image, error) {
	start := time.Now()
	if err := checkStatic(opt.Busybox); err != nil {
		return nil, err
	}
	img := &Image{}
	var arc bytes.Buffer
	w := NewCPIOWriter(&arc)
	for _, d := range []string{"bin", "dev", "etc", "etc/mmb", "lib", "lib/modules", "proc", "root",
		"run", "sys", "tests", "tmp"} {
		perm := os.FileMode(0o755)
		if d == "tmp" {
			perm = 0o777
		}
		w.Dir(d, perm)
	}
	w.CharDev("dev/console", 0o600, 5, 1)
	w.File("init", 0o755, initScript)
	w.File("etc/mmb/demo.sh", 0o755, demoScript)
	if err := addFile(w, "bin/busybox", opt.Busybox); err != nil {
		return nil, err
	}
	if p := opt.Payload; p != nil {
		for _, b := range p.Programs {
			if b.Name == SwapDaemon {
				continue // for the systemd guest tests only
			}
			if err := addFile(w, "bin/"+b.Name, b.Path); err != nil {
				return nil, err
			}
		}
		for _, b := range p.Tests {
			if err := addFile(w, "tests/"+b.Name+".test", b.Path); err != nil {
				return nil, err
			}
			img.Tests = append(img.Tests, b.Name)
		}
	}
	w.File("etc/mmb/tests", 0o644, lines(img.Tests))
	mods, err := addModules(ctx, w, opt.Kernel, "lib/modules/")
	if err != nil {
		return nil, err
	}
	img.Modules = mods
	w.File("etc/mmb/modules", 0o644, lines(img.Modules))
	if err := w.Close(); err != nil {
		return nil, err
	}

	sum := sha256.Sum256(arc.Bytes())
	img.Hash = hex.EncodeToString(sum[:])
	dir := filepath.Join(opt.CacheDir, "initramfs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	ext := ".cpio.zst"
	if opt.Level < 0 {
		ext = ".cpio"
	}
	img.Path = filepath.Join(dir, fmt.Sprintf("%s-%s%s", opt.Kernel.Kernel, img.Hash[:16], ext))
	if st, err := os.Stat(img.Path); err == nil {
		img.Cached, img.Size, img.Took = true, st.Size(), time.Since(start)
		now := time.Now()
		os.Chtimes(img.Path, now, now) // keep it the newest for pruning
		return img, nil
	}
	tmp, err := os.CreateTemp(dir, ".initramfs-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	if opt.Level < 0 {
		_, err = tmp.Write(arc.Bytes())
	} else {
		level := opt.Level
		if level == 0 {
			level = 3
		}
		var stderr bytes.Buffer
		cmd := exec.CommandContext(ctx, "zstd", "-q", "-T0", fmt.Sprintf("-%d", level), "-c")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = &arc, tmp, &stderr
		if err = cmd.Run(); err != nil {
			err = fmt.Errorf("initramfs: zstd: %w: %s (install zstd: %s)", err, strings.TrimSpace(stderr.String()), setupHint)
		}
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
	pruneImages(dir, string(opt.Kernel.Kernel), 3)
	img.Took = time.Since(start)
	return img, nil
}

func addFile(w *CPIOWriter, name, src string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return w.File(name, 0o755, b)
}

func lines(l []string) []byte {
	if len(l) == 0 {
		return nil
	}
	return []byte(strings.Join(l, "\n") + "\n")
}

// checkStatic fails unless path is an ELF executable without a program interpreter, which
// the guest (no libc) needs.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("busybox %s: %w (install busybox-static: %s)", path, err, setupHint)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("busybox %s is dynamically linked; install busybox-static (%s)", path, setupHint)
		}
	}
	return nil
}

// pruneImages keeps the newest keep images of kernel k in dir.
func pruneImages(dir, k string, keep int) {
	m, _ := filepath.Glob(filepath.Join(dir, k+"-*.cpio*"))
	type ent struct {
		p string
		t time.Time
	}
	var es []ent
	for _, p := range m {
		if st, err := os.Stat(p); err == nil {
			es = append(es, ent{p, st.ModTime()})
		}
	}
	sort.Slice(es, func(i, j int) bool { return es[i].t.After(es[j].t) })
	for i := keep; i < len(es); i++ {
		os.Remove(es[i].p)
	}
}

// addModules writes the kernel's VFIO modules (when it is modular) under dir in w and
// returns their names in load order.
func addModules(ctx context.Context, w *CPIOWriter, k KernelImage, dir string) ([]string, error) {
	if k.Modules == "" {
		return nil, nil
	}
	db, err := LoadModuleDB(k.Modules)
	if err != nil {
		return nil, err
	}
	order, err := db.LoadOrder(RequiredModules, OptionalModules)
	if err != nil {
		return nil, fmt.Errorf("%s kernel modules: %w", k.Kernel, err)
	}
	for _, m := range order {
		b, err := db.ReadModule(ctx, m)
		if err != nil {
			return nil, err
		}
		w.File(dir+m+".ko", 0o644, b)
	}
	return order, nil
}
