package dra

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/dynamic-resource-allocation/resourceclaim"
	cdispec "tags.cncf.io/container-device-interface/specs-go"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

// LeaseConfig is the driver's opaque device configuration (a DeviceClass's or a claim's
// spec.devices.config[].opaque with driver mmio.mmiobroker.dev), decoded strictly.
type LeaseConfig struct {
	// APIVersion must be [LeaseConfigAPIVersion].
	APIVersion string `json:"apiVersion"`
	// Kind must be "LeaseConfig".
	Kind string `json:"kind"`
	// LeaseKind is "shared" (the default) or "private".
	LeaseKind string `json:"leaseKind,omitempty"`
}

// LeaseConfigAPIVersion is the apiVersion of [LeaseConfig].
const LeaseConfigAPIVersion = DriverName + "/v1alpha1"

// uidPattern is what a claim or pod uid may be: it names files and labels.
var uidPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9-]{0,62}$`)

// want is a device a claim needs, with the lease it gets.
type want struct {
	result resourceapi.DeviceRequestAllocationResult
	target target
	kind   brokerv1.LeaseKind
	lease  *brokerv1.Lease // a reused or new lease
	token  string
	fresh  bool // allocated by this call
}

// PrepareResourceClaims implements [kubeletplugin.DRAPlugin]: for every device of this
// driver that a claim was allocated, a lease delegated to the pod the claim is reserved
// for, and one CDI spec per claim that gives the pod's containers the claim socket and
// the leases' ids and claim tokens. It is idempotent: the leases of a claim are found by
// its uid label and kept if the claim's CDI spec has their tokens (see the package
// doc). A claim that fails leaves no new lease and no new CDI spec behind.
func (d *Driver) PrepareResourceClaims(ctx context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	out := make(map[types.UID]kubeletplugin.PrepareResult, len(claims))
	for _, c := range claims {
		devs, err := d.prepare(ctx, c)
		if err != nil {
			d.log.Error("prepare claim", "claim", c.Namespace+"/"+c.Name, "claim_uid", string(c.UID), "err", err)
			err = fmt.Errorf("%s: claim %s/%s: %w", DriverName, c.Namespace, c.Name, err)
		}
		out[c.UID] = kubeletplugin.PrepareResult{Devices: devs, Err: err}
	}
	return out, nil
}

// UnprepareResourceClaims implements [kubeletplugin.DRAPlugin]: every live lease with
// the claim's uid label is released and the claim's CDI spec removed. A claim without
// leases or spec (never prepared, or unprepared before) succeeds.
func (d *Driver) UnprepareResourceClaims(ctx context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	out := make(map[types.UID]error, len(claims))
	for _, c := range claims {
		err := d.unprepare(ctx, c.UID)
		if err != nil {
			d.log.Error("unprepare claim", "claim", c.Namespace+"/"+c.Name, "claim_uid", string(c.UID), "err", err)
			err = fmt.Errorf("%s: claim %s/%s: %w", DriverName, c.Namespace, c.Name, err)
		}
		out[c.UID] = err
	}
	return out, nil
}

func (d *Driver) unprepare(ctx context.Context, uid types.UID) error {
	if !uidPattern.MatchString(string(uid)) {
		return fmt.Errorf("claim uid %q: not a uid", uid)
	}
	leases, err := d.claimLeases(ctx, uid)
	if err != nil {
		return err
	}
	var errs []error
	for _, l := range leases {
		if err := d.release(ctx, l.GetId()); err != nil {
			errs = append(errs, err)
		} else {
			d.log.Info("released lease", "lease_id", l.GetId(), "claim_uid", string(uid), "bdf", l.GetBdf(), "bar", l.GetBar())
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...) // keep the spec: the kubelet retries
	}
	return removeSpec(CDISpecPath(d.opt.CDIDir, uid))
}

// release ends a lease; one that has ended meanwhile or is gone counts as released.
func (d *Driver) release(ctx context.Context, id string) error {
	cctx, cancel := callCtx(ctx)
	defer cancel()
	_, err := d.broker.Release(cctx, id)
	switch status.Code(err) {
	case codes.OK, codes.NotFound, codes.FailedPrecondition:
		return nil
	}
	return fmt.Errorf("release lease %s: %w", id, err)
}

// claimLeases lists the live leases labelled with a claim's uid.
func (d *Driver) claimLeases(ctx context.Context, uid types.UID) ([]*brokerv1.Lease, error) {
	var out []*brokerv1.Lease
	req := &brokerv1.ListLeasesRequest{LiveOnly: true, Labels: map[string]string{claimUIDLabel: string(uid)}}
	for {
		cctx, cancel := callCtx(ctx)
		resp, err := d.broker.API().ListLeases(cctx, req)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("list leases of claim uid %s: %w", uid, err)
		}
		out = append(out, resp.GetLeases()...)
		if resp.GetNextPageToken() == "" || len(out) > maxLeasesListedPerClaim {
			return out, nil
		}
		req.PageToken = resp.GetNextPageToken()
	}
}

// claimPod is the one pod a claim is reserved for.
func claimPod(c *resourceapi.ResourceClaim) (uid, name string, err error) {
	var pods []resourceapi.ResourceClaimConsumerReference
	for _, r := range c.Status.ReservedFor {
		if r.APIGroup == "" && r.Resource == "pods" {
			pods = append(pods, r)
		}
	}
	if len(pods) != 1 {
		return "", "", fmt.Errorf("reserved for %d pods: a brokered BAR is leased to exactly one pod's VMM (do not share the claim)", len(pods))
	}
	if !uidPattern.MatchString(string(pods[0].UID)) {
		return "", "", fmt.Errorf("pod uid %q: not a uid", pods[0].UID)
	}
	return string(pods[0].UID), pods[0].Name, nil
}

// leaseKind decodes the driver's opaque configuration that applies to each result
// (class configuration first, then the claim's, later ones winning), as lease kinds.
func leaseKind(configs []resourceapi.DeviceAllocationConfiguration, request string) (brokerv1.LeaseKind, error) {
	kind := brokerv1.LeaseKind_LEASE_KIND_SHARED
	for _, src := range []resourceapi.AllocationConfigSource{resourceapi.AllocationConfigSourceClass, resourceapi.AllocationConfigSourceClaim} {
		for _, c := range configs {
			if c.Source != src || c.Opaque == nil || c.Opaque.Driver != DriverName {
				continue
			}
			if len(c.Requests) > 0 && !slices.Contains(c.Requests, request) && !slices.Contains(c.Requests, resourceclaim.BaseRequestRef(request)) {
				continue
			}
			var lc LeaseConfig
			dec := json.NewDecoder(bytes.NewReader(c.Opaque.Parameters.Raw))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&lc); err != nil {
				return 0, fmt.Errorf("opaque config of %s: %w", DriverName, err)
			}
			if lc.APIVersion != LeaseConfigAPIVersion || lc.Kind != "LeaseConfig" {
				return 0, fmt.Errorf("opaque config of %s: apiVersion %q kind %q, want %s LeaseConfig", DriverName, lc.APIVersion, lc.Kind, LeaseConfigAPIVersion)
			}
			switch lc.LeaseKind {
			case "", "shared":
				kind = brokerv1.LeaseKind_LEASE_KIND_SHARED
			case "private":
				kind = brokerv1.LeaseKind_LEASE_KIND_PRIVATE
			default:
				return 0, fmt.Errorf("opaque config of %s: leaseKind %q, want shared or private", DriverName, lc.LeaseKind)
			}
		}
	}
	return kind, nil
}

// wants resolves a claim's allocated devices of this driver to BAR ranges.
func (d *Driver) wants(ctx context.Context, c *resourceapi.ResourceClaim) ([]*want, error) {
	var out []*want
	devices := map[string]*brokerv1.Device{}
	alloc := c.Status.Allocation
	for _, r := range alloc.Devices.Results {
		if r.Driver != DriverName {
			continue
		}
		if r.AdminAccess != nil && *r.AdminAccess {
			return nil, fmt.Errorf("device %s: admin access is not supported (a brokered BAR is leased to one pod)", r.Device)
		}
		if r.Pool != d.opt.NodeName {
			return nil, fmt.Errorf("device %s of pool %q: this node's pool is %q", r.Device, r.Pool, d.opt.NodeName)
		}
		bdf, bar, part, count, err := parseDeviceName(r.Device)
		if err != nil {
			return nil, err
		}
		dev := devices[bdf]
		if dev == nil {
			cctx, cancel := callCtx(ctx)
			resp, err := d.broker.API().GetDevice(cctx, &brokerv1.GetDeviceRequest{Bdf: bdf})
			cancel()
			if err != nil {
				return nil, fmt.Errorf("device %s: %w", r.Device, err)
			}
			dev = resp.GetDevice()
			devices[bdf] = dev
		}
		var t *target
		ts, _ := targets(dev, []Partition{{BDF: bdf, BAR: bar, Count: count}})
		for i := range ts {
			if ts[i].Name == r.Device {
				t = &ts[i]
			}
		}
		if t == nil || t.Partition != part {
			return nil, fmt.Errorf("device %s: BAR %d of %s is not leasable as %d range(s)", r.Device, bar, bdf, count)
		}
		kind, err := leaseKind(alloc.Devices.Config, r.Request)
		if err != nil {
			return nil, err
		}
		out = append(out, &want{result: r, target: *t, kind: kind})
	}
	return out, nil
}

// matches reports whether lease l is the one w needs for the pod.
func (w *want) matches(l *brokerv1.Lease, podUID string) bool {
	rs := l.GetRanges()
	return l.GetLabels()[deviceLabel] == w.result.Device && l.GetLabels()[requestLabel] == w.result.Request &&
		l.GetClaimant().GetPodUid() == podUID && l.GetBdf() == w.target.BDF && int(l.GetBar()) == w.target.BAR &&
		len(rs) == 1 && rs[0].GetOffset() == w.target.Offset && rs[0].GetLength() == w.target.Length &&
		l.GetKind() == w.kind
}

func (d *Driver) prepare(ctx context.Context, c *resourceapi.ResourceClaim) ([]kubeletplugin.Device, error) {
	if !uidPattern.MatchString(string(c.UID)) {
		return nil, fmt.Errorf("claim uid %q: not a uid", c.UID)
	}
	if c.Status.Allocation == nil {
		return nil, errors.New("not allocated")
	}
	ws, err := d.wants(ctx, c)
	if err != nil || len(ws) == 0 {
		return nil, err
	}
	podUID, podName, err := claimPod(c)
	if err != nil {
		return nil, err
	}
	path := CDISpecPath(d.opt.CDIDir, c.UID)
	spec, err := readSpec(path)
	if err != nil {
		d.log.Warn("unreadable CDI spec: its leases are allocated again", "path", path, "err", err)
	}
	tokens := specTokens(spec)
	existing, err := d.claimLeases(ctx, c.UID)
	if err != nil {
		return nil, err
	}
	// Keep the leases the spec has tokens for, and those the pod has claimed already
	// (their tokens are spent: the spec is rewritten without them, and the running
	// VMM keeps its fd). Release the others: unclaimed leases whose tokens are lost
	// (allocated by a prepare that failed before its spec was written, or the spec was
	// deleted) and leases for a pod or device the claim no longer names.
	for _, l := range existing {
		kept := false
		claimed := l.GetState() == brokerv1.LeaseState_LEASE_STATE_ACTIVE
		for _, w := range ws {
			if w.lease == nil && (tokens[l.GetId()] != "" || claimed) && w.matches(l, podUID) {
				w.lease, w.token, kept = l, tokens[l.GetId()], true
				break
			}
		}
		if !kept {
			if err := d.release(ctx, l.GetId()); err != nil {
				return nil, err
			}
			d.log.Info("released stale lease", "lease_id", l.GetId(), "claim_uid", string(c.UID))
		}
	}
	undo := func(cause error) error {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), releaseOnFailureTimeout)
		defer cancel()
		var errs []error
		for _, w := range ws {
			if w.fresh {
				if err := d.release(rctx, w.lease.GetId()); err != nil {
					errs = append(errs, err)
				}
			}
		}
		if len(errs) > 0 {
			return fmt.Errorf("%w (and releasing its new leases failed: %w)", cause, errors.Join(errs...))
		}
		return cause
	}
	claimRef := c.Namespace + "/" + c.Name
	vmName := c.Namespace + "/" + podName
	if len(vmName) > maxVMNameBytes {
		vmName = vmName[:maxVMNameBytes]
	}
	hostSock := d.opt.ClaimSocketHost
	for _, w := range ws {
		if w.lease != nil {
			continue
		}
		cctx, cancel := callCtx(ctx)
		resp, err := d.broker.API().AllocateLease(cctx, &brokerv1.AllocateLeaseRequest{
			Bdf: w.target.BDF, Bar: uint32(w.target.BAR), Kind: w.kind, VmName: vmName,
			Ranges:   []*brokerv1.Range{{Offset: w.target.Offset, Length: w.target.Length}},
			Claimant: &brokerv1.Claimant{PodUid: podUID},
			Labels: map[string]string{
				claimUIDLabel: string(c.UID), requestLabel: w.result.Request, deviceLabel: w.result.Device, claimLabel: claimRef,
			},
		})
		cancel()
		if err != nil {
			return nil, undo(fmt.Errorf("allocate a lease of device %s (%s BAR %d [%#x,+%#x)): %w",
				w.result.Device, w.target.BDF, w.target.BAR, w.target.Offset, w.target.Length, err))
		}
		w.lease, w.token, w.fresh = resp.GetLease(), resp.GetClaimToken(), true
		if hostSock == "" {
			hostSock = resp.GetClaimSocket()
		}
		d.log.Info("allocated delegated lease", "lease_id", w.lease.GetId(), "claim_uid", string(c.UID),
			"pod_uid", podUID, "bdf", w.target.BDF, "bar", w.target.BAR, "device", w.result.Device)
	}
	if hostSock == "" {
		// Every lease was reused: the spec being rewritten has the socket, or an earlier
		// allocation of this process reported it.
		hostSock = specClaimSocket(spec)
	}
	d.mu.Lock()
	if hostSock == "" {
		hostSock = d.claimSocket
	} else {
		d.claimSocket = hostSock
	}
	d.mu.Unlock()
	if hostSock == "" {
		return nil, undo(errors.New("the daemon's claim socket is unknown (set the claim socket's host path)"))
	}
	var prepared []preparedDevice
	var result []kubeletplugin.Device
	for _, w := range ws {
		prepared = append(prepared, preparedDevice{Request: w.result.Request, Target: w.target, LeaseID: w.lease.GetId(), Token: w.token})
		result = append(result, kubeletplugin.Device{
			Requests: []string{w.result.Request}, PoolName: w.result.Pool, DeviceName: w.result.Device,
			CDIDeviceIDs: []string{CDIDeviceID(c.UID, w.result.Device)},
		})
	}
	gid, err := socketGroup(hostSock)
	if err != nil {
		// The plugin sees the host's socket directory at the same path (the DaemonSet
		// mounts it); without it the containers get no group for the socket.
		d.log.Warn("the claim socket's group is unknown: containers get none", "path", hostSock, "err", err)
	}
	newSpec, err := buildSpec(c.UID, claimRef, podUID, prepared, claimSockets{Host: hostSock, Container: d.opt.ClaimSocketContainer, GID: gid})
	if err != nil {
		return nil, undo(err)
	}
	if err := writeSpec(path, newSpec); err != nil {
		return nil, undo(err)
	}
	return result, nil
}

// specClaimSocket is the host path of the claim socket a spec mounts.
func specClaimSocket(spec *cdispec.Spec) string {
	if spec == nil {
		return ""
	}
	for _, d := range spec.Devices {
		for _, m := range d.ContainerEdits.Mounts {
			if m != nil && m.HostPath != "" {
				return m.HostPath
			}
		}
	}
	return ""
}
