package dra

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"k8s.io/apimachinery/pkg/types"
	cdispec "tags.cncf.io/container-device-interface/specs-go"
)

// CDIKind is the CDI vendor/class of the driver's devices.
const CDIKind = DriverName + "/bar"

// Environment variables of the CDI devices (docs/kubernetes.md, "What the container gets").
const (
	// EnvClaimSocket is the claim socket's path in the container (every device sets it, to
	// the same value).
	EnvClaimSocket = "MMIO_CLAIM_SOCKET"
	// EnvLeaseID and EnvClaimToken, followed by "_" and the device's [EnvSuffix], are the
	// lease id and claim token of one device; without a suffix they are set only by a claim
	// that has exactly one device of this driver.
	EnvLeaseID    = "MMIO_LEASE_ID"
	EnvClaimToken = "MMIO_CLAIM_TOKEN"
	// EnvBDF, EnvBAR, EnvOffset, EnvSize and EnvRequest, followed by "_" and the suffix,
	// describe the device's range and the claim's request it was allocated for.
	EnvBDF     = "MMIO_BDF"
	EnvBAR     = "MMIO_BAR"
	EnvOffset  = "MMIO_OFFSET"
	EnvSize    = "MMIO_SIZE"
	EnvRequest = "MMIO_REQUEST"
)

// Annotations of the CDI spec and its devices: the plugin's only state of its own.
const (
	annotClaim   = DriverName + "/claim"      // namespace/name of the ResourceClaim
	annotPod     = DriverName + "/pod-uid"    // the pod the leases are delegated to
	annotLeaseID = DriverName + "/lease-id"   // per device: its lease
	annotRequest = DriverName + "/request"    // per device: the claim's request
	annotDevice  = DriverName + "/dra-device" // per device: the DRA device name
)

// EnvSuffix is the suffix of a DRA device's environment variables: its name in upper
// case with "_" for "-" (0000-3b-00-0-bar2 → 0000_3B_00_0_BAR2).
func EnvSuffix(device string) string {
	return strings.ToUpper(strings.ReplaceAll(device, "-", "_"))
}

// CDISpecPath is the CDI spec file of a claim in dir.
func CDISpecPath(dir string, claimUID types.UID) string {
	return filepath.Join(dir, DriverName+"-"+string(claimUID)+".json")
}

// CDIDeviceID is the fully qualified CDI device name of a DRA device prepared for a claim.
func CDIDeviceID(claimUID types.UID, device string) string {
	return CDIKind + "=" + cdiDeviceName(claimUID, device)
}

func cdiDeviceName(claimUID types.UID, device string) string { return string(claimUID) + "-" + device }

// preparedDevice is one device of a prepared claim with its lease.
type preparedDevice struct {
	Request string
	Target  target
	LeaseID string
	Token   string
}

// claimSockets are where the claim socket is: on the host (the CDI mount's source) and in
// the container, and the group that may connect to it (0: none to add).
type claimSockets struct {
	Host, Container string
	GID             uint32
}

// socketGroup is the group owning the claim socket if group members may connect to it
// (mode g+w), which the containers then get as a supplementary group (a VMM such as
// KubeVirt's runs as an unprivileged uid); 0 if none or root's.
func socketGroup(path string) (uint32, error) {
	st, err := os.Stat(path)
	if err != nil {
		return 0, fmt.Errorf("claim socket: %w", err)
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || st.Mode().Perm()&0o020 == 0 {
		return 0, nil
	}
	return sys.Gid, nil
}

// buildSpec is the CDI spec of a prepared claim.
func buildSpec(claimUID types.UID, claimRef, podUID string, devs []preparedDevice, sock claimSockets) (*cdispec.Spec, error) {
	spec := &cdispec.Spec{
		Kind:        CDIKind,
		Annotations: map[string]string{annotClaim: claimRef, annotPod: podUID},
	}
	for _, p := range devs {
		sfx := "_" + EnvSuffix(p.Target.Name)
		env := []string{
			EnvClaimSocket + "=" + sock.Container,
			EnvLeaseID + sfx + "=" + p.LeaseID,
			EnvBDF + sfx + "=" + p.Target.BDF,
			EnvBAR + sfx + "=" + strconv.Itoa(p.Target.BAR),
			EnvOffset + sfx + "=" + strconv.FormatUint(p.Target.Offset, 10),
			EnvSize + sfx + "=" + strconv.FormatUint(p.Target.Length, 10),
			EnvRequest + sfx + "=" + p.Request,
		}
		// A lease the pod has claimed already has no token left to give.
		if p.Token != "" {
			env = append(env, EnvClaimToken+sfx+"="+p.Token)
		}
		if len(devs) == 1 {
			env = append(env, EnvLeaseID+"="+p.LeaseID)
			if p.Token != "" {
				env = append(env, EnvClaimToken+"="+p.Token)
			}
		}
		var gids []uint32
		if sock.GID != 0 {
			gids = []uint32{sock.GID}
		}
		spec.Devices = append(spec.Devices, cdispec.Device{
			Name: cdiDeviceName(claimUID, p.Target.Name),
			Annotations: map[string]string{
				annotLeaseID: p.LeaseID, annotRequest: p.Request, annotDevice: p.Target.Name,
			},
			ContainerEdits: cdispec.ContainerEdits{
				Env: env,
				Mounts: []*cdispec.Mount{{
					HostPath: sock.Host, ContainerPath: sock.Container,
					Options: []string{"bind", "ro", "nosuid", "nodev", "noexec"},
				}},
				AdditionalGIDs: gids,
			},
		})
	}
	v, err := cdispec.MinimumRequiredVersion(spec)
	if err != nil {
		return nil, fmt.Errorf("cdi spec version: %w", err)
	}
	spec.Version = v
	return spec, nil
}

// specTokens returns the claim token each lease of a spec carries, by lease id. A spec
// that is not one of ours yields nothing.
func specTokens(spec *cdispec.Spec) map[string]string {
	out := map[string]string{}
	if spec == nil || spec.Kind != CDIKind {
		return out
	}
	for _, d := range spec.Devices {
		id := d.Annotations[annotLeaseID]
		dev := d.Annotations[annotDevice]
		if id == "" || dev == "" {
			continue
		}
		prefix := EnvClaimToken + "_" + EnvSuffix(dev) + "="
		for _, e := range d.ContainerEdits.Env {
			if tok, ok := strings.CutPrefix(e, prefix); ok && tok != "" {
				out[id] = tok
			}
		}
	}
	return out
}

// readSpec reads a CDI spec file; a missing file is (nil, nil).
func readSpec(path string) (*cdispec.Spec, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read cdi spec: %w", err)
	}
	var spec cdispec.Spec
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		return nil, fmt.Errorf("cdi spec %s: %w", path, err)
	}
	return &spec, nil
}

// writeSpec writes a CDI spec file atomically (a temporary file in the same directory,
// synced, renamed over the old one), readable by root only: it holds claim tokens.
func writeSpec(path string, spec *cdispec.Spec) (err error) {
	b, err := json.MarshalIndent(spec, "", "  ")
	if err != nil {
		return fmt.Errorf("encode cdi spec: %w", err)
	}
	dir := filepath.Dir(path)
	// The dot prefix and the extension keep runtimes' CDI scanners (*.json, *.yaml) off it.
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("write cdi spec: %w", err)
	}
	defer func() {
		if err != nil {
			os.Remove(f.Name())
		}
	}()
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("write cdi spec: %w", err)
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("write cdi spec: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write cdi spec: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write cdi spec: %w", err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("write cdi spec: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// removeSpec deletes a claim's CDI spec file; a missing file is no error.
func removeSpec(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove cdi spec: %w", err)
	}
	return nil
}
