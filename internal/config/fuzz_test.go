package config

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// anyLookup resolves every name.
type anyLookup struct{}

func (anyLookup) LookupUser(string) (uint32, error)  { return 1000, nil }
func (anyLookup) LookupGroup(string) (uint32, error) { return 1000, nil }

// FuzzDecode checks that no input makes the decoder or the validator panic, that every
// decode error is a located *Error, and that whatever Validate accepts resolves into a
// configuration the broker accepts.
func FuzzDecode(f *testing.F) {
	if text, err := os.ReadFile(filepath.Join("..", "..", "deploy", "mmiobrokerd.toml")); err == nil {
		f.Add(text)
	}
	f.Add([]byte(""))
	f.Add([]byte("[daemon]\ncontrol_socket_mode = 0o600\nsocket_group = 36\n"))
	f.Add([]byte("[limits]\nclaim_timeout = 30\n"))
	f.Add([]byte("[[device]]\naddress = \"00:03.0\"\nbars = [0, 9]\nkinds = [\"private\"]\n"))
	f.Add([]byte("device = [{address = \"0000:00:03.0\"}]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Decode("fuzz.toml", data)
		if err != nil {
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("decode error %q holds no *Error", err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("validate error %q holds no *Error", err)
			}
			return
		}
		r, err := c.Resolve(anyLookup{})
		if err != nil {
			t.Fatalf("Validate accepted, Resolve failed: %v", err)
		}
		if err := r.Broker.Validate(); err != nil {
			t.Fatalf("Validate accepted, the broker rejects: %v", err)
		}
		if len(r.Devices) != len(c.Devices) {
			t.Fatalf("%d devices resolved from %d", len(r.Devices), len(c.Devices))
		}
	})
}
