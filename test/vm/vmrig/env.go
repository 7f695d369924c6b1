package vmrig

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Kernel names one of the rig's guest kernels.
type Kernel string

// The guest kernels test/vm/setup.sh prepares.
const (
	// Stock is Debian's own kernel and modules as shipped: VFIO group/container, no iommufd.
	Stock Kernel = "stock"
	// IOMMUFD is the same source built with test/vm/kernel/iommufd.config: iommufd and the
	// VFIO device cdev, everything built in.
	IOMMUFD Kernel = "iommufd"
)

// Kernels lists every guest kernel in the order the rig boots them.
var Kernels = []Kernel{Stock, IOMMUFD}

// ParseKernel accepts "stock" or "iommufd".
func ParseKernel(s string) (Kernel, error) {
	for _, k := range Kernels {
		if s == string(k) {
			return k, nil
		}
	}
	return "", fmt.Errorf("unknown guest kernel %q (want stock or iommufd)", s)
}

// setupHint tells the reader how to create what is missing.
const setupHint = "run test/vm/setup.sh (make setup) to prepare the rig"

// Env is what test/vm/setup.sh recorded in $CACHE/rig.env.
type Env struct {
	Path          string // the rig.env file read
	KVer          string // Debian kernel ABI name, e.g. 7.2.13+deb14-amd64
	KSrcVer       string // linux-source-7.2 package version, e.g. 7.2.13-1
	StockKernel   string // vmlinuz of the stock kernel
	StockModules  string // /lib/modules/$KVER tree of the stock kernel (with modules.dep)
	IOMMUFDKernel string // bzImage of the iommufd kernel
	Busybox       string // a statically linked busybox
	// The systemd boot mode's Debian root filesystem: the tree and its initramfs archive.
	SystemdRootfs    string
	SystemdInitramfs string
	// UAPIInclude is the include directory of the kernel source's uapi headers (make
	// headers), which test/uapi compiles its layout program against.
	UAPIInclude string
}

// CacheDir returns the rig's cache directory: $MMIOBROKER_VM_CACHE, else
// ${XDG_CACHE_HOME:-$HOME/.cache}/mmiobroker/vm, as in test/vm/setup.sh.
func CacheDir() (string, error) {
	if d := os.Getenv("MMIOBROKER_VM_CACHE"); d != "" {
		return d, nil
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("rig cache directory: %w", err)
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "mmiobroker", "vm"), nil
}

// LoadEnv reads rig.env from the cache directory.
func LoadEnv() (Env, error) {
	dir, err := CacheDir()
	if err != nil {
		return Env{}, err
	}
	return LoadEnvFile(filepath.Join(dir, "rig.env"))
}

// LoadEnvFile reads a rig.env file.
func LoadEnvFile(path string) (Env, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Env{}, fmt.Errorf("rig environment %s is missing: %s: %w", path, setupHint, err)
	}
	if err != nil {
		return Env{}, fmt.Errorf("rig environment: %w", err)
	}
	defer f.Close()
	vars, err := ParseEnv(f)
	if err != nil {
		return Env{}, fmt.Errorf("rig environment %s: %w", path, err)
	}
	return Env{
		Path:          path,
		KVer:          vars["KVER"],
		KSrcVer:       vars["KSRCVER"],
		StockKernel:   vars["STOCK_KERNEL"],
		StockModules:  vars["STOCK_MODULES"],
		IOMMUFDKernel: vars["IOMMUFD_KERNEL"],
		Busybox:       vars["BUSYBOX"],

		SystemdRootfs:    vars["SYSTEMD_ROOTFS"],
		SystemdInitramfs: vars["SYSTEMD_INITRAMFS"],
		UAPIInclude:      vars["UAPI_INCLUDE"],
	}, nil
}

// ParseEnv parses shell-style KEY=VALUE lines: blank lines and # comments are skipped,
// one level of matching single or double quotes around the value is removed.
func ParseEnv(r io.Reader) (map[string]string, error) {
	vars := map[string]string{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		line = strings.TrimPrefix(line, "export ")
		k, v, ok := strings.Cut(line, "=")
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return nil, fmt.Errorf("line %d: want KEY=VALUE, got %q", n, line)
		}
		if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
			v = v[1 : len(v)-1]
		}
		vars[k] = v
	}
	return vars, sc.Err()
}

// KernelImage is one bootable guest kernel and what its initramfs needs.
type KernelImage struct {
	Kernel  Kernel
	Image   string // vmlinuz / bzImage
	Modules string // modules tree to load VFIO from ("" for the built-in iommufd kernel)
	Version string
}

// Kernel returns the files of guest kernel k, checking that they exist.
func (e Env) Kernel(k Kernel) (KernelImage, error) {
	var ki KernelImage
	switch k {
	case Stock:
		ki = KernelImage{Kernel: k, Image: e.StockKernel, Modules: e.StockModules, Version: e.KVer}
		if ki.Modules == "" {
			return ki, fmt.Errorf("stock kernel: STOCK_MODULES not set in %s: %s", e.Path, setupHint)
		}
		if _, err := os.Stat(filepath.Join(ki.Modules, "modules.dep")); err != nil {
			return ki, fmt.Errorf("stock kernel: %w: %s", err, setupHint)
		}
	case IOMMUFD:
		ki = KernelImage{Kernel: k, Image: e.IOMMUFDKernel, Version: e.KSrcVer + " + iommufd.config"}
	default:
		return ki, fmt.Errorf("unknown guest kernel %q", k)
	}
	if ki.Image == "" {
		return ki, fmt.Errorf("%s kernel: not built yet (no %s_KERNEL in %s): %s",
			k, strings.ToUpper(string(k)), e.Path, setupHint)
	}
	if _, err := os.Stat(ki.Image); err != nil {
		return ki, fmt.Errorf("%s kernel: %w: %s", k, err, setupHint)
	}
	return ki, nil
}

// BusyboxPath returns the static busybox to put into the guest, checking it exists.
func (e Env) BusyboxPath() (string, error) {
	p := e.Busybox
	if p == "" {
		p = "/bin/busybox"
	}
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("busybox: %w (install busybox-static: %s)", err, setupHint)
	}
	return p, nil
}

// SystemdBase returns the systemd boot mode's root filesystem archive, checking it exists.
func (e Env) SystemdBase() (string, error) {
	if e.SystemdInitramfs == "" {
		return "", fmt.Errorf("systemd boot mode: no SYSTEMD_INITRAMFS in %s: %s", e.Path, setupHint)
	}
	if _, err := os.Stat(e.SystemdInitramfs); err != nil {
		return "", fmt.Errorf("systemd boot mode: %w: %s", err, setupHint)
	}
	return e.SystemdInitramfs, nil
}

// UAPIHeaders returns the include directory of the kernel source's uapi headers,
// checking that it holds linux/vfio.h.
func (e Env) UAPIHeaders() (string, error) {
	if e.UAPIInclude == "" {
		return "", fmt.Errorf("uapi headers: no UAPI_INCLUDE in %s: %s", e.Path, setupHint)
	}
	if _, err := os.Stat(filepath.Join(e.UAPIInclude, "linux", "vfio.h")); err != nil {
		return "", fmt.Errorf("uapi headers: %w: %s", err, setupHint)
	}
	return e.UAPIInclude, nil
}
