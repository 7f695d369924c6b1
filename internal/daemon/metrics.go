package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/mmiobroker/mmiobroker/internal/config"
	"github.com/mmiobroker/mmiobroker/internal/metrics"
	"github.com/mmiobroker/mmiobroker/internal/server"
)

// Limits of the metrics HTTP server: a scrape is one small GET.
const (
	metricsReadTimeout  = 5 * time.Second
	metricsWriteTimeout = 30 * time.Second
	metricsIdleTimeout  = time.Minute
	metricsStopTimeout  = 2 * time.Second
)

// metricsServer serves the daemon's metrics (GET /metrics, internal/metrics) over HTTP on
// the metrics socket and the optional loopback address ([metrics] in the configuration).
type metricsServer struct {
	srv *http.Server
	ls  []net.Listener
	log *slog.Logger
}

// listenMetrics listens where ml says. The metrics socket is created by the daemon (no
// socket unit passes it) and, like the daemon's other sockets, replaces a stale socket
// file and refuses a live one.
func listenMetrics(ml config.MetricsListen, m *metrics.Metrics, log *slog.Logger) (*metricsServer, error) {
	s := &metricsServer{log: log}
	if ml.Socket != "" {
		l, err := listen(ml.Socket, ml.SocketMode, ml.SocketGID, server.Listen)
		if errors.Is(err, os.ErrPermission) && ml.SocketGID >= 0 {
			err = fmt.Errorf("%w (without CAP_CHOWN, as under the shipped unit, the daemon can give the socket only to a group it is a member of: add SupplementaryGroups= for it; docs/operations.md, \"Metrics\")", err)
		}
		if err != nil {
			return nil, fmt.Errorf("metrics socket: %w", err)
		}
		s.ls = append(s.ls, l)
	}
	if ml.Listen != "" {
		l, err := net.Listen("tcp", ml.Listen)
		if err != nil {
			s.close()
			return nil, fmt.Errorf("metrics listen address: %w (the shipped unit has no IP network: docs/operations.md, \"Metrics\", has the drop-in a loopback address needs)", err)
		}
		s.ls = append(s.ls, l)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	s.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: metricsReadTimeout,
		ReadTimeout:       metricsReadTimeout,
		WriteTimeout:      metricsWriteTimeout,
		IdleTimeout:       metricsIdleTimeout,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	return s, nil
}

// serve serves every listener in g until stop. A listener that fails is logged; the
// daemon goes on without it (metrics are not worth stopping the broker for).
func (s *metricsServer) serve(g *errgroup.Group) {
	for _, l := range s.ls {
		s.log.Info("serving metrics", "addr", l.Addr().String())
		g.Go(func() error {
			if err := s.srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("metrics server stopped", "addr", l.Addr().String(), "err", err)
			}
			return nil
		})
	}
}

// stop stops serving: scrapes in progress get metricsStopTimeout to finish.
func (s *metricsServer) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), metricsStopTimeout)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		s.srv.Close()
	}
	s.close()
}

// close closes the listeners (the metrics socket file is removed with its listener).
// Listeners already closed by stop are left alone.
func (s *metricsServer) close() {
	for _, l := range s.ls {
		l.Close()
	}
}
