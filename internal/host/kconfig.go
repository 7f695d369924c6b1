package host

import (
	"bufio"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// kconfig is the running kernel's build configuration: every CONFIG_ symbol the config
// file mentions, with its value ("y", "m", a string or number; "n" for "is not set"). The
// zero value is an unknown config.
type kconfig struct {
	syms map[string]string // nil: no config could be read
	from string            // the file it was read from
}

// lookup returns sym's value, and whether the config is known. A symbol a known config
// does not mention does not exist in this kernel: "n".
func (k kconfig) lookup(sym string) (string, bool) {
	if k.syms == nil {
		return "", false
	}
	if v, ok := k.syms[sym]; ok {
		return v, true
	}
	return "n", true
}

// source names the file the config came from.
func (k kconfig) source() string { return k.from }

// readKconfig reads the running kernel's config from <proc>/config.gz
// (CONFIG_IKCONFIG_PROC), else <boot>/config-<release> (what Debian and most distributions
// install). It returns the zero kconfig when neither can be read.
func readKconfig(procRoot, bootDir, release string) kconfig {
	gz := filepath.Join(procRoot, "config.gz")
	if f, err := os.Open(gz); err == nil {
		defer f.Close()
		if zr, err := gzip.NewReader(f); err == nil {
			if syms, err := parseKconfig(zr); err == nil {
				return kconfig{syms: syms, from: gz}
			}
		}
	}
	if release == "" {
		return kconfig{}
	}
	path := filepath.Join(bootDir, "config-"+release)
	f, err := os.Open(path)
	if err != nil {
		return kconfig{}
	}
	defer f.Close()
	syms, err := parseKconfig(f)
	if err != nil {
		return kconfig{}
	}
	return kconfig{syms: syms, from: path}
}

// parseKconfig parses a kernel .config.
func parseKconfig(r io.Reader) (map[string]string, error) {
	syms := map[string]string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if rest, ok := strings.CutPrefix(line, "# CONFIG_"); ok {
			if sym, ok := strings.CutSuffix(rest, " is not set"); ok {
				syms["CONFIG_"+sym] = "n"
			}
			continue
		}
		if sym, val, ok := strings.Cut(line, "="); ok && strings.HasPrefix(sym, "CONFIG_") {
			syms[sym] = strings.Trim(val, `"`)
		}
	}
	return syms, sc.Err()
}

// hasSymbol reports whether the kernel symbol table at path (/proc/kallsyms: "address
// type name [module]" per line) has sym. An unreadable or empty table is an error.
func hasSymbol(path, sym string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	lines := 0
	for sc.Scan() {
		lines++
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && fields[2] == sym {
			return true, nil
		}
	}
	if err := sc.Err(); err != nil {
		return false, &os.PathError{Op: "read", Path: path, Err: err}
	}
	if lines == 0 {
		return false, &os.PathError{Op: "read", Path: path, Err: io.ErrUnexpectedEOF}
	}
	return false, nil
}
