// Package metrics is mmiobrokerd's Prometheus metrics: a private registry (never the
// global one) with the Go runtime and process collectors, the broker's counters and
// histograms fed by its [broker.Observer] hook, the claim results the daemon's claim
// adapter reports, the gRPC server metrics of go-grpc-middleware's providers/prometheus
// (interceptors), and a scrape-time collector that reads the broker's, the control
// server's and the claim server's counts when scraped.
//
// Every name of this package starts with mmiobroker_ and follows the Prometheus naming
// rules (promlint): counters end in _total, durations are in seconds. The gRPC metrics
// keep their standard grpc_server_* names, and the runtime collectors their go_* and
// process_* names (process_open_fds against process_max_fds is the daemon's fd use against
// RLIMIT_NOFILE).
//
// The metrics hold no fd and start no goroutine: the daemon serves [Metrics.Handler]
// (internal/daemon; docs/operations.md, "Metrics").
package metrics
