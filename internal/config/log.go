package config

import (
	"io"
	"log/slog"
)

// Logger returns a logger writing to w in d's format (text or json) at d's level. An
// unknown level means info, an unknown format text; [Config.Validate] rejects both.
func (d Daemon) Logger(w io.Writer) *slog.Logger {
	var level slog.Level
	switch d.LogLevel {
	case "debug":
		level = slog.LevelDebug
	case "warn":
		level = slog.LevelWarn
	case "error":
		level = slog.LevelError
	}
	opts := &slog.HandlerOptions{Level: level}
	if d.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
