package netback

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseUserOptions(t *testing.T) {
	a := netip.MustParseAddr
	tests := []struct {
		in      string
		want    UserOptions
		wantErr string
	}{
		{in: "user", want: UserOptions{Network: netip.MustParsePrefix("10.0.2.0/24"), Gateway: a("10.0.2.2"), DNS: a("10.0.2.3"), GuestAddr: a("10.0.2.15"), MTU: 1500, MaxConnections: defaultMaxConns}},
		{in: "user,hostfwd=tcp:127.0.0.1:8022-:22", want: UserOptions{
			Network: netip.MustParsePrefix("10.0.2.0/24"), Gateway: a("10.0.2.2"), DNS: a("10.0.2.3"), GuestAddr: a("10.0.2.15"), MTU: 1500, MaxConnections: defaultMaxConns,
			HostForwards: []HostForward{{Proto: "tcp", HostAddr: a("127.0.0.1"), HostPort: 8022, GuestPort: 22}}}},
		{in: "user,net=192.168.76.0/24,restrict=on,mtu=9000,hostfwd=udp::5353-192.168.76.9:53,hostfwd=:0.0.0.0:80-:8080", want: UserOptions{
			Network: netip.MustParsePrefix("192.168.76.0/24"), Gateway: a("192.168.76.2"), DNS: a("192.168.76.3"), GuestAddr: a("192.168.76.15"),
			Restrict: true, MTU: 9000, MaxConnections: defaultMaxConns,
			HostForwards: []HostForward{
				{Proto: "udp", HostPort: 5353, GuestAddr: a("192.168.76.9"), GuestPort: 53},
				{Proto: "tcp", HostAddr: a("0.0.0.0"), HostPort: 80, GuestPort: 8080},
			}}},
		{in: "user,net=10.1.0.0/16,host=10.1.0.1,dns=10.1.0.53,dhcpstart=10.1.1.1", want: UserOptions{
			Network: netip.MustParsePrefix("10.1.0.0/16"), Gateway: a("10.1.0.1"), DNS: a("10.1.0.53"), GuestAddr: a("10.1.1.1"), MTU: 1500, MaxConnections: defaultMaxConns}},
		{in: "", wantErr: `must start with "user"`},
		{in: "tap,hostfwd=tcp::1-:2", wantErr: `must start with "user"`},
		{in: "user,bogus=1", wantErr: "unknown option"},
		{in: "user,hostfwd", wantErr: "expected key=value"},
		{in: "user,hostfwd=sctp::1-:2", wantErr: `protocol "sctp"`},
		{in: "user,hostfwd=tcp::1:2", wantErr: `missing "-"`},
		{in: "user,hostfwd=tcp::99999-:2", wantErr: "host part: port"},
		{in: "user,hostfwd=tcp::1-:0", wantErr: "guest part: port 0"},
		{in: "user,hostfwd=tcp:nothost:1-:2", wantErr: "address"},
		{in: "user,hostfwd=tcp::1-::1:2", wantErr: "guest part"},
		{in: "user,hostfwd=tcp::1-10.9.9.9:2", wantErr: "outside"},
		{in: "user,net=10.0.0.0/30", wantErr: "between /8 and /29"},
		{in: "user,net=fd00::/64", wantErr: "IPv4"},
		{in: "user,host=10.0.3.2", wantErr: "not a host address"},
		{in: "user,dns=10.0.2.2", wantErr: "must differ"},
		{in: "user,mtu=100", wantErr: "between 576"},
		{in: "user,mtu=x", wantErr: "invalid syntax"},
		{in: "user,restrict=maybe", wantErr: "on or off"},
		{in: "user,mtu=1500,mtu=1500", wantErr: "given twice"},
		{in: "user,host=::1", wantErr: "not an IPv4"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseUserOptions(tc.in)
			if tc.wantErr != "" {
				require.Error(t, err)
				var oe *OptionError
				require.ErrorAs(t, err, &oe)
				assert.Contains(t, err.Error(), tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestParseUserOptionsLimits(t *testing.T) {
	s := "user" + strings.Repeat(",hostfwd=tcp::1-:2", maxHostForwards+1)
	_, err := ParseUserOptions(s)
	require.Error(t, err)
}

func TestHostForwardStringRoundTrip(t *testing.T) {
	for _, s := range []string{"tcp:127.0.0.1:8022-:22", "udp::53-10.0.2.15:53", "tcp::0-:1"} {
		f, err := parseHostForward(s)
		require.NoError(t, err)
		assert.Equal(t, s, f.String())
	}
}

func ExampleParseUserOptions() {
	o, err := ParseUserOptions("user,hostfwd=tcp:127.0.0.1:8022-:22")
	fmt.Println(err, o.Network, o.HostForwards[0].HostPort, o.HostForwards[0].GuestPort)
	_, err = ParseUserOptions("user,hostfwd=tcp:127.0.0.1:8022")
	fmt.Println(err)
	// Output:
	// <nil> 10.0.2.0/24 8022 22
	// netback: user option hostfwd="tcp:127.0.0.1:8022": missing "-" between host and guest parts
}

func FuzzParseUserOptions(f *testing.F) {
	for _, s := range []string{"user", "user,hostfwd=tcp:127.0.0.1:8022-:22", "user,net=10.1.0.0/16,dns=10.1.0.3,restrict=on,mtu=9000",
		"user,hostfwd=udp::5353-10.0.2.15:53", "user,,", "user,hostfwd=tcp::-:"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		o, err := ParseUserOptions(s)
		if err != nil {
			var oe *OptionError
			if !asOptionError(err, &oe) {
				t.Fatalf("error %v is not an *OptionError", err)
			}
			return
		}
		// Every accepted configuration is internally consistent.
		if !o.Network.Contains(o.Gateway) || !o.Network.Contains(o.DNS) || !o.Network.Contains(o.GuestAddr) {
			t.Fatalf("addresses outside network: %+v", o)
		}
		if len(o.HostForwards) > maxHostForwards {
			t.Fatalf("%d forwards", len(o.HostForwards))
		}
		for _, fw := range o.HostForwards {
			again, err := parseHostForward(fw.String())
			if err != nil || again != fw {
				t.Fatalf("forward %v does not round-trip: %v %v", fw, again, err)
			}
		}
	})
}
