package netback

import (
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func asOptionError(err error, target **OptionError) bool {
	oe, ok := err.(*OptionError)
	if ok {
		*target = oe
	}
	return ok
}

func TestDHCPRoundTrip(t *testing.T) {
	m := &dhcpMessage{op: bootRequest, htype: 1, hlen: 6, hops: 1, xid: 0xdeadbeef, secs: 3, flags: dhcpFlagBcast,
		ciaddr: netip.MustParseAddr("10.0.2.15"), yiaddr: netip.MustParseAddr("0.0.0.0"),
		siaddr: netip.MustParseAddr("10.0.2.2"), giaddr: netip.MustParseAddr("0.0.0.0"),
		options: []dhcpOption{{code: optMessageType, data: []byte{dhcpRequest}}, {code: optClientID, data: []byte{1, 2, 3}}, {code: 200, data: []byte{}}}}
	copy(m.chaddr[:], fakeGuestMAC[:])
	b, err := m.marshal()
	require.NoError(t, err)
	assert.Len(t, b, dhcpMinReplyLen)
	got, err := parseDHCP(b)
	require.NoError(t, err)
	assert.Equal(t, m, got)
	assert.Equal(t, uint8(dhcpRequest), got.messageType())
}

func TestDHCPParseErrors(t *testing.T) {
	good, err := (&dhcpMessage{op: 1, htype: 1, hlen: 6}).marshal()
	require.NoError(t, err)
	mut := func(f func([]byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	tests := map[string][]byte{
		"short":     good[:100],
		"bad magic": mut(func(b []byte) []byte { b[dhcpFixedLen] = 0; return b }),
		"hlen":      mut(func(b []byte) []byte { b[2] = 17; return b }),
		"no length": mut(func(b []byte) []byte { return append(b[:dhcpFixedLen+4], 53) }),
		"overrun":   mut(func(b []byte) []byte { return append(b[:dhcpFixedLen+4], 53, 10, 1) }),
		"many options": mut(func(b []byte) []byte {
			b = b[:dhcpFixedLen+4]
			for range 300 {
				b = append(b, 200, 0)
			}
			return b
		}),
	}
	for name, b := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := parseDHCP(b)
			require.ErrorIs(t, err, ErrDHCP)
		})
	}
	_, err = (&dhcpMessage{options: []dhcpOption{{code: 1, data: make([]byte, 256)}}}).marshal()
	require.ErrorIs(t, err, ErrDHCP)
}

func TestDHCPServerPool(t *testing.T) {
	s := newDHCPServer(netip.MustParsePrefix("10.0.2.0/24"), netip.MustParseAddr("10.0.2.2"), netip.MustParseAddr("10.0.2.3"),
		netip.MustParseAddr("10.0.2.15"), 2, time.Hour, gatewayMAC)
	a1, ok := s.lease([6]byte{1})
	require.True(t, ok)
	a2, ok := s.lease([6]byte{2})
	require.True(t, ok)
	_, ok = s.lease([6]byte{3})
	assert.False(t, ok, "pool of 2 exhausted")
	assert.Equal(t, "10.0.2.15", a1.String())
	assert.Equal(t, "10.0.2.16", a2.String())
	again, _ := s.lease([6]byte{1})
	assert.Equal(t, a1, again, "stable per MAC")
	s.release([6]byte{1})
	a3, ok := s.lease([6]byte{3})
	require.True(t, ok)
	assert.Equal(t, a1, a3, "released address reused")
}

func TestDHCPServerIgnoresJunk(t *testing.T) {
	s := newDHCPServer(netip.MustParsePrefix("10.0.2.0/24"), netip.MustParseAddr("10.0.2.2"), netip.MustParseAddr("10.0.2.3"),
		netip.MustParseAddr("10.0.2.15"), 4, time.Hour, gatewayMAC)
	reply := (&dhcpMessage{op: bootReply, htype: 1, hlen: 6, options: []dhcpOption{{code: optMessageType, data: []byte{dhcpDiscover}}}})
	b, _ := reply.marshal()
	assert.Nil(t, s.handle(udpPacket{payload: b}), "BOOTREPLY from a client is ignored")
	assert.Nil(t, s.handle(udpPacket{payload: []byte{1, 2, 3}}))
	noType, _ := (&dhcpMessage{op: bootRequest, htype: 1, hlen: 6}).marshal()
	assert.Nil(t, s.handle(udpPacket{payload: noType}), "plain BOOTP is not served")
}

func TestUDPFrameRoundTrip(t *testing.T) {
	p := udpPacket{srcMAC: fakeGuestMAC, dstMAC: gatewayMAC, srcIP: netip.MustParseAddr("10.0.2.15"), dstIP: netip.MustParseAddr("10.0.2.3"),
		srcPort: 40000, dstPort: 53, payload: []byte("hello")}
	f := buildUDPFrame(p)
	got, ok := parseUDPFrame(f)
	require.True(t, ok)
	assert.Equal(t, p, got)
	assert.Zero(t, inetChecksum(f[14:34], 0), "IPv4 header checksum verifies")
	ip := f[14:]
	assert.Zero(t, inetChecksum(ip[20:], pseudoHeaderSum([4]byte(ip[12:16]), [4]byte(ip[16:20]), ipProtoUDP, len(ip)-20)), "UDP checksum verifies")
	f[14+6] = 0x20 // more-fragments
	_, ok = parseUDPFrame(f)
	assert.False(t, ok, "fragments are not parsed")
}

func FuzzParseDHCP(f *testing.F) {
	m := &dhcpMessage{op: bootRequest, htype: 1, hlen: 6, xid: 1, options: []dhcpOption{{code: optMessageType, data: []byte{dhcpDiscover}}, addrOpt(optRequestedIP, netip.MustParseAddr("10.0.2.15"))}}
	b, _ := m.marshal()
	f.Add(b)
	f.Add(b[:dhcpFixedLen+4])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := parseDHCP(data)
		if err != nil {
			return
		}
		out, err := m.marshal()
		if err != nil {
			t.Fatalf("parsed message does not marshal: %v", err)
		}
		again, err := parseDHCP(out)
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if again.xid != m.xid || again.chaddr != m.chaddr || len(again.options) != len(m.options) {
			t.Fatal("round trip changed the message")
		}
	})
}

// FuzzDHCPServer feeds arbitrary guest frames to the DHCP server path: it
// must not panic and every reply must be a well-formed DHCP frame.
func FuzzDHCPServer(f *testing.F) {
	s := newDHCPServer(netip.MustParsePrefix("10.0.2.0/24"), netip.MustParseAddr("10.0.2.2"), netip.MustParseAddr("10.0.2.3"),
		netip.MustParseAddr("10.0.2.15"), 4, time.Hour, gatewayMAC)
	for _, typ := range []uint8{dhcpDiscover, dhcpRequest, dhcpInform, dhcpRelease} {
		m := &dhcpMessage{op: bootRequest, htype: 1, hlen: 6, xid: 9, options: []dhcpOption{{code: optMessageType, data: []byte{typ}}}}
		b, _ := m.marshal()
		f.Add(buildUDPFrame(udpPacket{srcIP: netip.IPv4Unspecified(), dstIP: netip.AddrFrom4([4]byte{255, 255, 255, 255}), srcPort: 68, dstPort: 67, payload: b}))
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		p, ok := parseUDPFrame(frame)
		if !ok {
			return
		}
		reply := s.handle(p)
		if reply == nil {
			return
		}
		rp, ok := parseUDPFrame(reply)
		if !ok || rp.srcPort != dhcpServerPort || rp.dstPort != dhcpClientPort {
			t.Fatal("reply is not a DHCP server frame")
		}
		if _, err := parseDHCP(rp.payload); err != nil {
			t.Fatalf("reply does not parse: %v", err)
		}
	})
}

// FuzzUserWriteFrame pushes arbitrary guest frames through the whole
// user-mode back end (DHCP interception and the gVisor netstack).
func FuzzUserWriteFrame(f *testing.F) {
	u, err := NewUser(UserOptions{Restrict: true, DNSUpstream: "127.0.0.1:1", Dial: loopbackOnlyDial})
	if err != nil {
		f.Fatal(err)
	}
	defer u.Close()
	f.Add(arpRequest(fakeGuestMAC, netip.MustParseAddr("10.0.2.15"), netip.MustParseAddr("10.0.2.2")))
	f.Add(icmpEcho(fakeGuestMAC, gatewayMAC, netip.MustParseAddr("10.0.2.15"), netip.MustParseAddr("10.0.2.2"), 1, 1))
	f.Add(buildUDPFrame(udpPacket{srcMAC: fakeGuestMAC, dstMAC: gatewayMAC, srcIP: netip.MustParseAddr("10.0.2.15"), dstIP: netip.MustParseAddr("10.0.2.3"), srcPort: 1000, dstPort: 9, payload: []byte("x")}))
	f.Fuzz(func(t *testing.T, frame []byte) {
		err := u.WriteFrame(frame)
		if err != nil && (len(frame) >= EthernetHeaderLen && len(frame) <= MaxFrameLen) {
			t.Fatalf("valid-length frame refused: %v", err)
		}
	})
}
