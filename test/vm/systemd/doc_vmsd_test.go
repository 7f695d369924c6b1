//go:build vmsystemd

// Package systemd holds the rig's guest tests for boot mode "systemd": they run inside the
// VM under real systemd (PID 1), where deploy/'s units are installed and enabled as a
// package would install them, and check the units as systemd runs them: verify and
// security analysis, socket activation, restart, crash recovery, stop and re-activation.
//
// Built with `go test -c -tags vmsystemd` by test/vm/vmrig and run by mmb-rig.service;
// see test/vm/README.md.
package systemd
