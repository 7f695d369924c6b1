// Package uevent receives the kernel's kobject uevents (NETLINK_KOBJECT_UEVENT) and parses
// them: how the broker learns that a PCI device was removed, unbound from vfio-pci, bound
// to another driver, or came back bound to vfio-pci.
//
// # The socket
//
// [Listen] opens an AF_NETLINK/SOCK_DGRAM socket of protocol NETLINK_KOBJECT_UEVENT
// (SOCK_CLOEXEC|SOCK_NONBLOCK), joins multicast group 1 (the kernel's events; group 2
// carries udevd's re-broadcasts in libudev's own format, which this package does not
// want), and asks for a large receive buffer: SO_RCVBUFFORCE where the process has
// CAP_NET_ADMIN, SO_RCVBUF (capped by net.core.rmem_max) otherwise. It accepts only
// datagrams whose sender port id (nl_pid) is 0, i.e. the kernel: any local process may
// send to the group, none can send as port 0. The [Listener] owns the socket; the socket
// is an *os.File served by the runtime poller and read through syscall.RawConn, so a
// waiting [Listener.Next] parks its goroutine, not an OS thread, and a context cancels it
// through a read deadline.
//
// The socket is written with golang.org/x/sys/unix rather than
// github.com/vishvananda/netlink: its nl.Subscribe(NETLINK_KOBJECT_UEVENT, 1) does open
// the right socket, but its Receive parses every datagram with
// syscall.ParseNetlinkMessage, i.e. as nlmsghdr-framed netlink messages, and a uevent is
// no such thing (it is "ACTION@DEVPATH\0" followed by KEY=VALUE\0 pairs), so Receive
// fails or yields garbage. What would remain of the library is socket(2) and bind(2);
// it would still not read through the runtime poller, nor report ENOBUFS as its own
// condition, nor filter on the sender. The socket code here is about a hundred lines, and
// it keeps the dependency out of the module.
//
// # Losing events
//
// The kernel drops uevents when the socket's receive buffer is full and reports it with
// ENOBUFS on the next receive. [Listener.Next] then returns an error matching
// [ErrOverflow]: events were lost, and the caller must resynchronise from sysfs (the
// state of each device it cares about). The listener stays usable, but the kernel keeps
// dropping new events for it until the events already queued have been read (the
// socket stays "congested" until its queue is empty), so keep calling Next, and
// resynchronise again on every further ErrOverflow.
//
// # Parsing
//
// [Parse] is our own, bounded parser of the kernel's format: messages larger than
// [MaxMessageSize], with more than [MaxKeys] variables, without the variables the kernel
// always sends (ACTION, DEVPATH, SUBSYSTEM, SEQNUM), with a header that disagrees with
// them, or in libudev's format are rejected with an error matching [ErrMalformed]. It
// never panics (it is fuzzed).
package uevent
