package config

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/mmiobroker/mmiobroker/internal/errdefs"
)

func TestMetricsDefaults(t *testing.T) {
	r, err := mustDecode(t, "").Resolve(testLookup)
	if err != nil {
		t.Fatal(err)
	}
	want := MetricsListen{Socket: "/run/mmiobroker/metrics.sock", SocketMode: 0o660, SocketGID: -1}
	if diff := cmp.Diff(want, r.Metrics); diff != "" {
		t.Errorf("default metrics (-want +got):\n%s", diff)
	}
}

func TestMetricsResolve(t *testing.T) {
	tests := []struct {
		name, text string
		want       MetricsListen
	}{
		{"beside a moved control socket", "[daemon]\ncontrol_socket = \"/tmp/mb/c.sock\"\n",
			MetricsListen{Socket: "/tmp/mb/metrics.sock", SocketMode: 0o660, SocketGID: -1}},
		{"relative name", "[metrics]\nsocket = \"m/x.sock\"\n",
			MetricsListen{Socket: "/run/mmiobroker/m/x.sock", SocketMode: 0o660, SocketGID: -1}},
		{"absolute, group by name, mode", "[metrics]\nsocket = \"/run/m.sock\"\nsocket_mode = \"0640\"\nsocket_group = \"mmiobroker\"\n",
			MetricsListen{Socket: "/run/m.sock", SocketMode: 0o640, SocketGID: 991}},
		{"no socket, loopback address", "[metrics]\nsocket = \"\"\nlisten = \"127.0.0.1:9464\"\n",
			MetricsListen{SocketMode: 0o660, SocketGID: -1, Listen: "127.0.0.1:9464"}},
		{"IPv6 loopback", "[metrics]\nlisten = \"[::1]:9464\"\n",
			MetricsListen{Socket: "/run/mmiobroker/metrics.sock", SocketMode: 0o660, SocketGID: -1, Listen: "[::1]:9464"}},
		{"IPv4-mapped loopback, any port", "[metrics]\nlisten = \"[::ffff:127.0.0.2]:0\"\n",
			MetricsListen{Socket: "/run/mmiobroker/metrics.sock", SocketMode: 0o660, SocketGID: -1, Listen: "[::ffff:127.0.0.2]:0"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := mustDecode(t, tt.text).Resolve(testLookup)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, r.Metrics); diff != "" {
				t.Errorf("metrics (-want +got):\n%s", diff)
			}
		})
	}
}

func TestMetricsInvalid(t *testing.T) {
	tests := []struct{ text, want string }{
		{"[metrics]\nlisten = \"0.0.0.0:9464\"\n", `test.toml:2: metrics.listen: "0.0.0.0:9464" is not a loopback address`},
		{"[metrics]\nlisten = \"192.0.2.1:9464\"\n", "is not a loopback address"},
		{"[metrics]\nlisten = \"[::]:9464\"\n", "is not a loopback address"},
		{"[metrics]\nlisten = \"localhost:9464\"\n", `"localhost" is not an IP address`},
		{"[metrics]\nlisten = \"127.0.0.1\"\n", "is not host:port"},
		{"[metrics]\nlisten = \"127.0.0.1:http\"\n", "is not a number"},
		{"[metrics]\nsocket = \"control.sock\"\n", "is also the control or claim socket"},
		{"[metrics]\nsocket = \"/run/mmiobroker/fd.sock\"\n", "is also the control or claim socket"},
		{"[metrics]\nsocket = \"/run/mmiobroker/\"\n", "names a directory"},
		{"[daemon]\ncontrol_socket = \"c.sock\"\n", "metrics.socket: \"metrics.sock\" is relative to the directory of daemon.control_socket"},
		{"[metrics]\nsocket_mode = 0o1777\n", "metrics.socket_mode: mode"},
		{"[metrics]\nsocket_group = \"a b\"\n", "metrics.socket_group"},
		{"[metrics]\nsocket_group = \"nosuchgroup\"\n", `metrics.socket_group: group "nosuchgroup"`},
		{"[metrics]\nport = 9464\n", `unknown key "metrics.port"`},
	}
	for _, tt := range tests {
		c, err := Decode("test.toml", []byte(tt.text))
		if err == nil {
			_, err = c.Resolve(testLookup)
		}
		if err == nil || !strings.Contains(err.Error(), tt.want) || !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%q: %v, want an invalid argument containing %q", tt.text, err, tt.want)
		}
	}
}
