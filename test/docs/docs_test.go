// Package docs checks the repository's Markdown documentation: every relative link points
// at a file (and heading) that exists, code fences are balanced, docs/api.md documents
// exactly the methods of the proto's Broker service, a code block that shows a repository
// file (an include marker) is that file, and the claim protocol's example messages are what
// internal/fdpass encodes. The docs are part of the interface; these checks keep them from
// drifting silently.
package docs

import (
	"bufio"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode"
)

// root is the repository root, relative to this package.
const root = "../.."

// markdownFiles returns every .md file of the repository outside .git, bin and caches.
func markdownFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "bin" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, ".md") {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 5 {
		t.Fatalf("found only %d Markdown files under %s: %v", len(files), root, files)
	}
	return files
}

// anchor is GitHub's anchor of a heading: lower case, punctuation dropped, spaces to
// hyphens.
func anchor(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(strings.TrimSpace(heading)) {
		switch {
		case unicode.IsLetter(r) || unicode.IsDigit(r) || r == '-' || r == '_':
			b.WriteRune(r)
		case r == ' ':
			b.WriteRune('-')
		}
	}
	return b.String()
}

// parsed is what the checks need of one Markdown file.
type parsed struct {
	anchors map[string]bool
	links   []link
	fence   int // line of an unclosed code fence, 0 if balanced
}

type link struct {
	line   int
	target string
}

var (
	linkRE    = regexp.MustCompile(`\]\(([^)\s]+)\)`)
	headingRE = regexp.MustCompile(`^#{1,6}\s+(.*)$`)
	codeRE    = regexp.MustCompile("`[^`]*`")
)

func parse(t *testing.T, path string) parsed {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := parsed{anchors: map[string]bool{}}
	inFence := false
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			inFence = !inFence
			if inFence {
				p.fence = n
			} else {
				p.fence = 0
			}
			continue
		}
		if inFence {
			continue
		}
		if m := headingRE.FindStringSubmatch(line); m != nil {
			p.anchors[anchor(strings.ReplaceAll(m[1], "`", ""))] = true
		}
		for _, m := range linkRE.FindAllStringSubmatch(codeRE.ReplaceAllString(line, ""), -1) {
			p.links = append(p.links, link{n, m[1]})
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if !inFence {
		p.fence = 0
	}
	return p
}

// TestLinksAndFences: relative links resolve to existing files and headings; every code
// fence is closed.
func TestLinksAndFences(t *testing.T) {
	files := markdownFiles(t)
	docs := map[string]parsed{}
	for _, f := range files {
		docs[filepath.Clean(f)] = parse(t, f)
	}
	for f, p := range docs {
		if p.fence != 0 {
			t.Errorf("%s:%d: code fence never closed", f, p.fence)
		}
		for _, l := range p.links {
			target := l.target
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue // external: not checked offline
			}
			file, frag, _ := strings.Cut(target, "#")
			dest := f
			if file != "" {
				dest = filepath.Clean(filepath.Join(filepath.Dir(f), file))
				if _, err := os.Stat(dest); err != nil {
					t.Errorf("%s:%d: link %q: %v", f, l.line, target, err)
					continue
				}
			}
			if frag == "" {
				continue
			}
			d, ok := docs[dest]
			if !ok {
				continue // an anchor into a non-Markdown file (a proto): not checked
			}
			if !d.anchors[frag] {
				t.Errorf("%s:%d: link %q: no heading with anchor #%s in %s", f, l.line, target, frag, dest)
			}
		}
	}
}

// TestAPIDocListsEveryMethod: docs/api.md has a section for every rpc of the Broker service
// and none for a method that does not exist.
func TestAPIDocListsEveryMethod(t *testing.T) {
	proto, err := os.ReadFile(filepath.Join(root, "api/proto/mmiobroker/v1/broker.proto"))
	if err != nil {
		t.Fatal(err)
	}
	var rpcs []string
	for _, m := range regexp.MustCompile(`(?m)^\s*rpc\s+(\w+)\s*\(`).FindAllStringSubmatch(string(proto), -1) {
		rpcs = append(rpcs, m[1])
	}
	api, err := os.ReadFile(filepath.Join(root, "docs/api.md"))
	if err != nil {
		t.Fatal(err)
	}
	// The method sections are the ### headings of "## 4. Methods".
	methods := string(api)
	if i := strings.Index(methods, "\n## 4. Methods"); i >= 0 {
		methods = methods[i+1:]
		if j := strings.Index(methods[1:], "\n## "); j >= 0 {
			methods = methods[:j+1]
		}
	} else {
		t.Fatal(`docs/api.md has no "## 4. Methods" section`)
	}
	var documented []string
	for _, m := range regexp.MustCompile(`(?m)^### (.+)$`).FindAllStringSubmatch(methods, -1) {
		name := strings.TrimSpace(regexp.MustCompile(`\(.*\)`).ReplaceAllString(m[1], ""))
		for _, n := range strings.Split(name, ",") {
			n = strings.TrimSpace(n)
			if n != "" && unicode.IsUpper(rune(n[0])) && !strings.Contains(n, " ") {
				documented = append(documented, n)
			}
		}
	}
	if len(rpcs) < 10 {
		t.Fatalf("found only %d rpcs in the proto: %v", len(rpcs), rpcs)
	}
	for _, r := range rpcs {
		if !slices.Contains(documented, r) {
			t.Errorf("rpc %s has no section (### %s) in docs/api.md", r, r)
		}
	}
	for _, d := range documented {
		if d != "Objects" && !slices.Contains(rpcs, d) {
			t.Errorf("docs/api.md has a section for %s, which is not an rpc of the Broker service", d)
		}
	}
}

// TestCitedDocsExist: every Markdown file that source, proto, script or unit comments
// cite (docs/api.md, test/vm/README.md, …) exists in the repository.
func TestCitedDocsExist(t *testing.T) {
	cite := regexp.MustCompile(`(?:^|[\s("'\x60])((?:[A-Za-z0-9_.-]+/)*[A-Za-z0-9_-]+\.md)\b`)
	exts := []string{".go", ".proto", ".sh", ".toml", ".service", ".socket", ".c", ".h"}
	checked := 0
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "bin" || d.Name() == "gen") {
			return filepath.SkipDir
		}
		if d.IsDir() || !slices.Contains(exts, filepath.Ext(path)) {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for n, line := range strings.Split(string(data), "\n") {
			for _, m := range cite.FindAllStringSubmatch(line, -1) {
				name := m[1]
				candidates := []string{filepath.Join(root, name), filepath.Join(root, "docs", name), filepath.Join(filepath.Dir(path), name)}
				found := false
				for _, c := range candidates {
					if _, err := os.Stat(c); err == nil {
						found = true
						break
					}
				}
				checked++
				if !found {
					t.Errorf("%s:%d cites %s, which is not in the repository", path, n+1, name)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 20 {
		t.Fatalf("only %d citations found: the scan is broken", checked)
	}
}
