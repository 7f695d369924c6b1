package docs

import (
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/client"
	"github.com/mmiobroker/mmiobroker/internal/broker/brokertest"
	"github.com/mmiobroker/mmiobroker/internal/daemon/daemontest"
	"github.com/mmiobroker/mmiobroker/internal/fdpass"
)

// includeRE is the marker of a code block that shows a repository file in full: the line
// `<!-- include PATH -->` (PATH relative to the Markdown file) right before the fence.
var includeRE = regexp.MustCompile(`^<!-- include (\S+) -->$`)

// TestIncludedFilesMatch: a code block under an include marker is the file it names, byte
// for byte, so that code a document shows is the code that is built and tested.
func TestIncludedFilesMatch(t *testing.T) {
	included := map[string]bool{}
	for _, f := range markdownFiles(t) {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(string(data), "\n")
		for i := 0; i < len(lines); i++ {
			m := includeRE.FindStringSubmatch(lines[i])
			if m == nil {
				continue
			}
			src := filepath.Join(filepath.Dir(f), m[1])
			if rel, err := filepath.Rel(root, src); err == nil {
				included[filepath.ToSlash(rel)] = true
			}
			if i+1 == len(lines) || !strings.HasPrefix(lines[i+1], "```") {
				t.Errorf("%s:%d: include marker of %s is not followed by a code fence", f, i+1, m[1])
				continue
			}
			end := i + 2
			for end < len(lines) && !strings.HasPrefix(lines[end], "```") {
				end++
			}
			if end == len(lines) {
				t.Errorf("%s:%d: the code block of %s is never closed", f, i+2, m[1])
				break
			}
			want, err := os.ReadFile(src)
			if err != nil {
				t.Errorf("%s:%d: include %s: %v", f, i+1, m[1], err)
				continue
			}
			if got := strings.Join(lines[i+2:end], "\n") + "\n"; got != string(want) {
				t.Errorf("%s:%d: the code block differs from %s at its line %d: copy the file into the block",
					f, i+3, m[1], firstDiff(got, string(want)))
			}
			i = end
		}
	}
	if !included["examples/c/mmb-claim.c"] {
		t.Errorf("no document includes examples/c/mmb-claim.c (docs/claim-protocol.md §10 should); included: %v", included)
	}
}

// firstDiff returns the number of the first line where a and b differ.
func firstDiff(a, b string) int {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := range min(len(al), len(bl)) {
		if al[i] != bl[i] {
			return i + 1
		}
	}
	return min(len(al), len(bl)) + 1
}

// TestClaimProtocolExamples: the hexdumps of docs/claim-protocol.md §9 are what
// internal/fdpass encodes for the messages the text describes, and the example lease id
// and token have the shape of the ones the daemon hands out.
func TestClaimProtocolExamples(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(root, "docs/claim-protocol.md"))
	if err != nil {
		t.Fatal(err)
	}
	sec := string(data)
	if i := strings.Index(sec, "\n## 9. Examples\n"); i >= 0 {
		sec = sec[i+1:]
		if j := strings.Index(sec[1:], "\n## "); j >= 0 {
			sec = sec[:j+1]
		}
	} else {
		t.Fatal(`docs/claim-protocol.md has no "## 9. Examples" section`)
	}
	m := regexp.MustCompile("Lease id `([^`]+)`, token `([^`]+)`").FindStringSubmatch(sec)
	if m == nil {
		t.Fatal("§9 does not name its example lease id and token (Lease id `…`, token `…`)")
	}
	id, token := m[1], m[2]
	checkRealShaped(t, id, token)

	encode := func(b []byte, err error) []byte {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	want := [][]byte{
		encode(fdpass.EncodeRequest(fdpass.Request{LeaseID: id, Token: token})),
		encode(fdpass.EncodeReply(fdpass.Reply{Code: fdpass.CodeOK, LeaseID: id, Generation: 2, Size: 0x10000,
			Inode: 0x1c3f, BDF: "0000:00:03.0", BAR: 0})),
		encode(fdpass.EncodeReply(fdpass.Reply{Code: fdpass.CodeBadToken, LeaseID: id, Message: "claim token does not match"})),
	}
	// The code blocks without a language, each with the paragraph before it.
	type block struct{ caption, text string }
	var blocks []block
	lines := strings.Split(sec, "\n")
	for i := 0; i < len(lines); i++ {
		if lines[i] != "```" {
			continue
		}
		k := i - 1
		for k > 0 && lines[k] == "" {
			k--
		}
		first := k
		for first > 0 && lines[first-1] != "" {
			first--
		}
		caption := strings.Join(lines[first:k+1], " ")
		end := i + 1
		for end < len(lines) && lines[end] != "```" {
			end++
		}
		blocks = append(blocks, block{caption, strings.Join(lines[i+1:min(end, len(lines))], "\n") + "\n"})
		i = end
	}
	if len(blocks) != len(want) {
		t.Fatalf("§9 has %d hexdumps, want %d (request, success reply, error reply)", len(blocks), len(want))
	}
	for i, b := range blocks {
		if dump := hex.Dump(want[i]); b.text != dump {
			t.Errorf("hexdump %d (after %q) is not what internal/fdpass encodes:\n%s\nwant\n%s", i+1, b.caption, b.text, dump)
		}
		if n := fmt.Sprintf("%d bytes", len(want[i])); !strings.Contains(b.caption, n) {
			t.Errorf("hexdump %d: its caption %q does not say %s", i+1, b.caption, n)
		}
	}
}

// hexRE matches lower-case hex digits, the alphabet of the daemon's lease ids and tokens.
var hexRE = regexp.MustCompile(`^[0-9a-f]+$`)

// checkRealShaped compares the example id and token with a lease the daemon (on a fake
// device) allocates: same length, both hex.
func checkRealShaped(t *testing.T, id, token string) {
	t.Helper()
	const bdf = "0000:00:03.0"
	d := daemontest.Start(t, fmt.Sprintf("[[device]]\naddress = %q\nallow_uids = [%d]\n", bdf, os.Getuid()),
		brokertest.NewDevice(bdf))
	c, err := client.Dial(d.Control, client.WithClaimSocket(d.Claim))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := c.API().AllocateLease(ctx, &brokerv1.AllocateLeaseRequest{Bdf: bdf, Bar: 0,
		Ranges: []*brokerv1.Range{{Offset: 0, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	realID, realToken := resp.GetLease().GetId(), resp.GetClaimToken()
	if len(id) != len(realID) || !hexRE.MatchString(id) || !hexRE.MatchString(realID) {
		t.Errorf("example lease id %q; the daemon's look like %q (%d hex digits)", id, realID, len(realID))
	}
	if len(token) != len(realToken) || !hexRE.MatchString(token) || !hexRE.MatchString(realToken) {
		t.Errorf("example token %q; the daemon's look like %q (%d hex digits)", token, realToken, len(realToken))
	}
}
