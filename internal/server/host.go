package server

import (
	"context"
	"fmt"
	"math"

	"google.golang.org/protobuf/types/known/durationpb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/host"
)

// HostFunc reports what the host offers (internal/host, with the daemon's devices and
// limits), for GetHost. It is called once per GetHost, by any caller: it must be cheap or
// cache what is not.
type HostFunc func(ctx context.Context) (host.Report, error)

// GetHost implements brokerv1.BrokerServer. Any caller may ask.
func (s *service) GetHost(ctx context.Context, _ *brokerv1.GetHostRequest) (*brokerv1.GetHostResponse, error) {
	if _, _, err := s.caller(ctx); err != nil {
		return nil, err
	}
	if s.host == nil {
		return nil, fmt.Errorf("this daemon has no host report: %w", errdefs.ErrNotSupported)
	}
	r, err := s.host(ctx)
	if err != nil {
		return nil, fmt.Errorf("host report: %w", err)
	}
	return &brokerv1.GetHostResponse{Host: hostToProto(r)}, nil
}

// hostToProto converts a host report.
func hostToProto(r host.Report) *brokerv1.Host {
	h := &brokerv1.Host{KernelRelease: r.KernelRelease}
	for _, p := range r.Probes {
		h.Probes = append(h.Probes, &brokerv1.Probe{Name: p.Name, Ok: p.OK, Value: p.Value, Reason: p.Reason})
	}
	for _, t := range r.VMTypes {
		h.VmTypes = append(h.VmTypes, &brokerv1.VmType{Name: t.String(), Type: uint32(t)})
	}
	for _, t := range r.TSMs {
		h.Tsms = append(h.Tsms, &brokerv1.Tsm{Name: t.Name, Parent: t.Parent, Driver: t.Driver,
			ConnectedDevices: t.Connected, BoundDevices: t.Bound})
	}
	l := r.Limits
	h.Limits = &brokerv1.Limits{
		MaxLeases:               count(l.MaxLeases),
		MaxLeasesPerHolder:      count(l.MaxLeasesPerHolder),
		MaxRangesPerLease:       count(l.MaxRangesPerLease),
		ClaimTimeout:            durationpb.New(l.ClaimTimeout),
		RevokeWithin:            durationpb.New(l.RevokeWithin),
		TenantCycleInterval:     durationpb.New(l.TenantCycleInterval),
		TenantCycleBudget:       count(l.TenantCycleBudget),
		MinTtl:                  durationpb.New(l.MinTTL),
		MaxConnections:          count(l.MaxConnections),
		MaxConnectionsPerTenant: count(l.MaxConnectionsPerTenant),
		MaxConcurrentClaims:     count(l.MaxConcurrentClaims),
		FdLimit:                 l.FDLimit,
		FdBudget:                l.FDBudget,
		TenantsBy:               l.TenantsBy,
	}
	return h
}

// count converts a limit, clamped to uint32.
func count(n int) uint32 {
	return uint32(min(max(n, 0), math.MaxUint32))
}
