package server

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
	"github.com/mmiobroker/mmiobroker/internal/broker"
	"github.com/mmiobroker/mmiobroker/internal/errdefs"
	"github.com/mmiobroker/mmiobroker/internal/holders"
)

// ScanHolders implements brokerv1.BrokerServer.
func (s *service) ScanHolders(ctx context.Context, req *brokerv1.ScanHoldersRequest) (*brokerv1.ScanHoldersResponse, error) {
	id, admin, err := s.caller(ctx)
	if err != nil {
		return nil, err
	}
	var leaseID string
	if req.GetLeaseId() != "" {
		if leaseID, err = parseLeaseID(req.GetLeaseId()); err != nil {
			return nil, err
		}
	}
	r, err := s.scanHolders(leaseID, actor(id, admin))
	if err != nil {
		return nil, err
	}
	resp := &brokerv1.ScanHoldersResponse{
		ScanTime:              timestamppb.New(r.Time),
		ScanDuration:          durationpb.New(r.Duration),
		ProcessesScanned:      uint32(r.Scanned),
		ProcessesInaccessible: uint32(r.Inaccessible),
		Truncated:             r.Truncated,
	}
	for _, l := range r.Leases {
		resp.Leases = append(resp.Leases, &brokerv1.LeaseHolders{
			Lease: leaseToProto(l.Lease), Holders: fdHoldersToProto(l.Holders), Outlasting: l.Outlasting})
	}
	if leaseID == "" {
		for _, u := range r.Unaccounted {
			resp.Unaccounted = append(resp.Unaccounted, &brokerv1.DmabufRef{Pid: uint32(u.PID), Comm: u.Comm, Uid: u.UID,
				Fd: int32(u.FD), Inode: u.Info.Inode, Name: u.Info.Name, Size: u.Info.Size})
		}
	}
	return resp, nil
}

// scanHolders scans /proc and reports the holders of lease id ("": every lease by may
// see). Unaccounted dma-bufs are reported to admins only.
func (s *service) scanHolders(id string, by broker.Actor) (holders.Report, error) {
	if s.holders == nil {
		return holders.Report{}, fmt.Errorf("this daemon does not scan for holders: %w", errdefs.ErrNotSupported)
	}
	list := func() ([]broker.Lease, error) { return s.b.ListAs(broker.Filter{}, by) }
	if id != "" {
		// Check before scanning: an unknown or foreign lease costs no scan.
		if _, err := s.b.GetAs(id, by); err != nil {
			return holders.Report{}, err
		}
		list = func() ([]broker.Lease, error) {
			l, err := s.b.GetAs(id, by)
			if err != nil {
				return nil, err
			}
			return []broker.Lease{l}, nil
		}
	}
	r, err := s.holders.Report(list, by.Admin && id == "")
	if err != nil {
		return holders.Report{}, fmt.Errorf("scan for dma-buf holders: %w", err)
	}
	return r, nil
}

// fdHoldersToProto converts a lease's holders.
func fdHoldersToProto(hs []holders.Holder) []*brokerv1.FdHolder {
	out := make([]*brokerv1.FdHolder, 0, len(hs))
	for _, h := range hs {
		out = append(out, &brokerv1.FdHolder{Pid: uint32(h.PID), Comm: h.Comm, Uid: h.UID, Fd: int32(h.FD),
			Inode: h.Inode, Role: holderRoleToProto(h.Role), CurrentGeneration: h.Current})
	}
	return out
}

func holderRoleToProto(r holders.Role) brokerv1.HolderRole {
	switch r {
	case holders.RoleHolder:
		return brokerv1.HolderRole_HOLDER_ROLE_HOLDER
	case holders.RolePassedOn:
		return brokerv1.HolderRole_HOLDER_ROLE_PASSED_ON
	case holders.RoleDaemon:
		return brokerv1.HolderRole_HOLDER_ROLE_DAEMON
	case holders.RoleFDStore:
		return brokerv1.HolderRole_HOLDER_ROLE_FD_STORE
	}
	return brokerv1.HolderRole_HOLDER_ROLE_UNSPECIFIED
}
