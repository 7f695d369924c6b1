package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	brokerv1 "github.com/mmiobroker/mmiobroker/api/gen/mmiobroker/v1"
)

// protoJSON is how messages are printed with -json: the proto3 JSON mapping with the
// .proto field names and every field present.
var protoJSON = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}

// marshalCompact returns m as single-line JSON. protojson's whitespace is deliberately
// unstable, so it is normalized.
func marshalCompact(m proto.Message) ([]byte, error) {
	b, err := protoJSON.Marshal(m)
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// writeJSON writes v (a proto message or a value for encoding/json) as one indented JSON
// document.
func writeJSON(w io.Writer, v any) error {
	var b []byte
	var err error
	if m, ok := v.(proto.Message); ok {
		b, err = marshalCompact(m)
	} else {
		b, err = json.Marshal(v)
	}
	if err != nil {
		return err
	}
	var out bytes.Buffer
	if err := json.Indent(&out, b, "", "  "); err != nil {
		return err
	}
	out.WriteByte('\n')
	_, err = w.Write(out.Bytes())
	return err
}

// jsonMessage marshals a proto message inside a value for encoding/json.
type jsonMessage struct{ m proto.Message }

// MarshalJSON implements json.Marshaler.
func (j jsonMessage) MarshalJSON() ([]byte, error) { return marshalCompact(j.m) }

// writeJSONLine writes m as one line of JSON.
func writeJSONLine(w io.Writer, m proto.Message) error {
	b, err := marshalCompact(m)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// enumName returns an enum value's name without its type prefix, in lower case:
// LEASE_STATE_ACTIVE -> "active".
func enumName(e protoreflect.Enum, prefix string) string {
	d := e.Descriptor().Values().ByNumber(e.Number())
	if d == nil {
		return strconv.Itoa(int(e.Number()))
	}
	return strings.ToLower(strings.TrimPrefix(string(d.Name()), prefix))
}

func kindName(k brokerv1.LeaseKind) string   { return enumName(k, "LEASE_KIND_") }
func stateName(s brokerv1.LeaseState) string { return enumName(s, "LEASE_STATE_") }
func reasonName(r brokerv1.EndReason) string { return enumName(r, "END_REASON_") }
func eventName(t brokerv1.EventType) string  { return enumName(t, "EVENT_TYPE_") }
func modeName(m brokerv1.AccessMode) string {
	if m == brokerv1.AccessMode_ACCESS_MODE_UNSPECIFIED {
		return "-"
	}
	return enumName(m, "ACCESS_MODE_")
}

// sizeString formats a byte count with the largest binary unit that divides it exactly:
// "256B", "4KiB", "1MiB", "16GiB".
func sizeString(n uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB"}
	i := 0
	for n != 0 && n%1024 == 0 && i < len(units)-1 {
		n /= 1024
		i++
	}
	return strconv.FormatUint(n, 10) + units[i]
}

// timeString formats a timestamp in UTC, RFC 3339; "-" if unset.
func timeString(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().UTC().Format(time.RFC3339)
}

// ttlString formats a lease's time to live ("1h0m0s"); "-" if it has none.
func ttlString(l *brokerv1.Lease) string {
	if l.GetTtl() == nil {
		return "-"
	}
	return l.GetTtl().AsDuration().String()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func tsmSummary(t *brokerv1.TsmState) string {
	switch {
	case !t.GetPresent():
		return "-"
	case t.GetBound() != "":
		return "bound"
	case t.GetConnect() != "":
		return "connected"
	}
	return "present"
}

func statusSummary(d *brokerv1.Device) string {
	switch {
	case d.GetUsable() && d.GetSuspended():
		return "suspended"
	case d.GetUsable():
		return "usable"
	}
	return "unusable: " + dash(d.GetError())
}

// writeDevices writes the devices table.
func writeDevices(w io.Writer, devs []*brokerv1.Device) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "BDF\tID\tCLASS\tDRIVER\tGROUP\tMODE\tDMA-BUF\tTSM\tLEASES\tERRORS\tSTATUS")
	for _, d := range devs {
		fmt.Fprintf(tw, "%s\t%04x:%04x\t%06x\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n",
			d.GetBdf(), d.GetVendorId(), d.GetDeviceId(), d.GetClassCode(), dash(d.GetDriver()),
			groupString(d.GetIommuGroup()), modeName(d.GetAccessMode()), yesNo(d.GetDmaBufSupported()),
			tsmSummary(d.GetTsm()), d.GetLiveLeases(), d.GetErrorCount(), statusSummary(d))
	}
	return tw.Flush()
}

func groupString(g int32) string {
	if g < 0 {
		return "-"
	}
	return strconv.Itoa(int(g))
}

// writeDevice writes one device in detail.
func writeDevice(w io.Writer, d *brokerv1.Device) error {
	tw := tabwriter.NewWriter(w, 0, 8, 1, ' ', 0)
	dmabuf := "supported"
	if !d.GetDmaBufSupported() {
		dmabuf = "not supported: " + dash(d.GetDmaBufUnsupportedReason())
	}
	tsm := "not present"
	if t := d.GetTsm(); t.GetPresent() {
		tsm = fmt.Sprintf("connect=%s bound=%s", dash(t.GetConnect()), dash(t.GetBound()))
	}
	p := d.GetPolicy()
	bars := "every memory BAR"
	if len(p.GetAllowedBars()) > 0 {
		bars = joinInts(p.GetAllowedBars())
	}
	var kinds []string
	for _, k := range p.GetAllowedKinds() {
		kinds = append(kinds, kindName(k))
	}
	who := "admins only"
	if len(p.GetAllowedUids())+len(p.GetAllowedGids()) > 0 {
		who = fmt.Sprintf("admins, uids [%s], gids [%s]", joinInts(p.GetAllowedUids()), joinInts(p.GetAllowedGids()))
	}
	rows := [][2]string{
		{"Device", d.GetBdf()},
		{"Vendor:device", fmt.Sprintf("%04x:%04x", d.GetVendorId(), d.GetDeviceId())},
		{"Class", fmt.Sprintf("%06x", d.GetClassCode())},
		{"Driver", dash(d.GetDriver())},
		{"IOMMU group", groupString(d.GetIommuGroup())},
		{"Access mode", modeName(d.GetAccessMode())},
		{"dma-buf export", dmabuf},
		{"TSM", tsm},
		{"Status", statusSummary(d)},
		{"Suspended", yesNo(d.GetSuspended())},
		{"Errors (AER)", strconv.FormatUint(d.GetErrorCount(), 10)},
		{"Live leases", strconv.Itoa(int(d.GetLiveLeases()))},
		{"Ended-live leases", strconv.Itoa(int(d.GetEndedLiveLeases()))},
		{"Next cycle", timeString(d.GetCycleTime())},
		{"Last tenant cycle", timeString(d.GetLastTenantCycleTime())},
		{"Leasable BARs", bars},
		{"Lease kinds", strings.Join(kinds, ", ")},
		{"Unattested private", yesNo(p.GetAllowUnattestedPrivate())},
		{"Who may lease", who},
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "%s:\t%s\n", r[0], r[1])
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w, "BARs:")
	tw = tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "  INDEX\tTYPE\tSIZE\tBYTES")
	for _, b := range d.GetBars() {
		fmt.Fprintf(tw, "  %d\t%s\t%s\t%#x\n", b.GetIndex(), barType(b), sizeString(b.GetSize()), b.GetSize())
	}
	return tw.Flush()
}

func barType(b *brokerv1.Bar) string {
	if !b.GetMem() {
		return "io"
	}
	t := "mem32"
	if b.GetAddr64() {
		t = "mem64"
	}
	if b.GetPrefetch() {
		t += ",prefetch"
	}
	return t
}

func joinInts[T ~uint32 | ~int32 | ~int](xs []T) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.FormatInt(int64(x), 10)
	}
	return strings.Join(s, ",")
}

// writeLeases writes the leases table.
func writeLeases(w io.Writer, leases []*brokerv1.Lease) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tBDF\tBAR\tKIND\tSTATE\tGEN\tSIZE\tUID\tPID\tVM\tCREATED\tEXPIRES\tREVOKE-BY\tEND\tFD\tTENANT")
	for _, l := range leases {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%d\t%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			l.GetId(), l.GetBdf(), l.GetBar(), leaseKind(l), stateName(l.GetState()),
			l.GetGeneration(), sizeString(l.GetSize()), l.GetHolder().GetUid(), l.GetHolder().GetPid(),
			dash(l.GetVmName()), timeString(l.GetCreateTime()), timeString(l.GetExpireTime()),
			timeString(l.GetRevokeDeadline()), endString(l), fdString(l), dash(l.GetHolder().GetTenant()))
	}
	return tw.Flush()
}

func leaseKind(l *brokerv1.Lease) string {
	k := kindName(l.GetKind())
	if l.GetUnattested() {
		k += ",unattested"
	}
	return k
}

func endString(l *brokerv1.Lease) string {
	if l.GetEndReason() == brokerv1.EndReason_END_REASON_UNSPECIFIED {
		return "-"
	}
	return reasonName(l.GetEndReason())
}

// fdString says whether an ended lease's dma-buf is dead: "dead", or "live until T" for an
// ended-but-live lease (its tenant ended it after the fd was claimed; the fd works until
// its device's next cycle, at the latest T); "-" for a live lease.
func fdString(l *brokerv1.Lease) string {
	switch {
	case l.GetRevokeDue() != nil:
		return "live until " + timeString(l.GetRevokeDue())
	case l.GetFdDead():
		return "dead"
	}
	return "-"
}

// rangesString formats ranges as "[0x0,+0x10000) [0x20000,+0x1000)".
func rangesString(rs []*brokerv1.Range) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = fmt.Sprintf("[%#x,+%#x)", r.GetOffset(), r.GetLength())
	}
	return strings.Join(s, " ")
}

// writeEventLine writes one event as a line of key=value pairs.
func writeEventLine(w io.Writer, e *brokerv1.Event) error {
	l := e.GetLease()
	var b strings.Builder
	if e.GetType() == brokerv1.EventType_EVENT_TYPE_DEVICE_CHANGED { // about no lease
		fmt.Fprintf(&b, "seq=%d time=%s type=%s bdf=%s", e.GetSeq(), timeString(e.GetTime()), eventName(e.GetType()), e.GetBdf())
		if by := e.GetCausedBy(); by != "" {
			fmt.Fprintf(&b, " caused_by=%s", logfmtValue(by))
		}
		b.WriteByte('\n')
		_, err := io.WriteString(w, b.String())
		return err
	}
	fmt.Fprintf(&b, "seq=%d time=%s type=%s lease=%s bdf=%s bar=%d generation=%d state=%s uid=%d pid=%d",
		e.GetSeq(), timeString(e.GetTime()), eventName(e.GetType()), l.GetId(), l.GetBdf(), l.GetBar(),
		l.GetGeneration(), stateName(l.GetState()), l.GetHolder().GetUid(), l.GetHolder().GetPid())
	if tenant := l.GetHolder().GetTenant(); tenant != "" {
		fmt.Fprintf(&b, " tenant=%s", logfmtValue(tenant))
	}
	if vm := l.GetVmName(); vm != "" {
		fmt.Fprintf(&b, " vm=%s", logfmtValue(vm))
	}
	if l.GetTtl() != nil {
		fmt.Fprintf(&b, " ttl=%s", ttlString(l))
	}
	if t := l.GetExpireTime(); t != nil {
		fmt.Fprintf(&b, " expires=%s", timeString(t))
	}
	if t := l.GetRevokeDeadline(); t != nil {
		fmt.Fprintf(&b, " revoke_deadline=%s", timeString(t))
	}
	if l.GetEndReason() != brokerv1.EndReason_END_REASON_UNSPECIFIED {
		fmt.Fprintf(&b, " end_reason=%s ended_by=%s", reasonName(l.GetEndReason()), logfmtValue(l.GetEndedBy()))
	}
	if t := l.GetRevokeDue(); t != nil {
		fmt.Fprintf(&b, " revoke_due=%s", timeString(t))
	}
	if l.GetFdDead() {
		b.WriteString(" fd_dead=true")
	}
	if by := e.GetCausedBy(); by != "" {
		fmt.Fprintf(&b, " caused_by=%s", logfmtValue(by))
	}
	b.WriteByte('\n')
	_, err := io.WriteString(w, b.String())
	return err
}

// logfmtValue quotes s if it is empty or holds spaces, quotes, '=' or non-printable
// characters.
func logfmtValue(s string) string {
	if s == "" || strings.ContainsAny(s, " \t\"=\\") || strings.IndexFunc(s, func(r rune) bool { return !strconv.IsPrint(r) }) >= 0 {
		return strconv.Quote(s)
	}
	return s
}

// leaseSummary describes a lease in one line.
func leaseSummary(l *brokerv1.Lease) string {
	return fmt.Sprintf("%s bar %d %s, holder uid %d pid %d, generation %d",
		l.GetBdf(), l.GetBar(), rangesString(l.GetRanges()), l.GetHolder().GetUid(), l.GetHolder().GetPid(), l.GetGeneration())
}
