package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// unreachable turns the gRPC error of a daemon that could not be reached at all (its
// "Unavailable: connection error: desc = …") into words: which socket, what is wrong with
// it, and what to check. Other errors are returned as they are. The exit code stays 8
// (unavailable).
func (c *cli) unreachable(err error) error {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "connection error") {
		return err
	}
	path := c.socket
	why := diagnoseSocket(path)
	return &exitStatus{code: exitUnavailable, err: fmt.Errorf(
		"cannot reach mmiobrokerd at %s: %s.\nCheck that the daemon runs (systemctl status mmiobrokerd.socket mmiobrokerd.service), that -socket or $%s names its control socket, and that you may open it (its group is the daemon's socket_group).\n(%s)",
		path, why, envSocket, st.Message())}
}

// diagnoseSocket says in words why a unix socket at path cannot be connected to.
func diagnoseSocket(path string) string {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "there is no socket there: the daemon is not running, or listens elsewhere"
	case errors.Is(err, os.ErrPermission):
		return "you may not look up that path (a directory on the way is not accessible to you)"
	case err != nil:
		return err.Error()
	case fi.Mode()&os.ModeSocket == 0:
		return "that path is not a socket"
	}
	conn, err := net.Dial("unix", path)
	switch {
	case err == nil:
		conn.Close()
		return "the socket accepts connections now but refused or dropped this one (the daemon may be restarting, or at its connection limit)"
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Sprintf("you may not connect to it (mode %v): run as a member of its group, or as root", fi.Mode().Perm())
	case errors.Is(err, syscall.ECONNREFUSED):
		return "nothing listens on it: the daemon is not running and no socket unit holds it"
	}
	return err.Error()
}
