package netback

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

var fakeGuestMAC = [6]byte{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}

// loopbackOnlyDial keeps tests from ever reaching beyond this machine.
func loopbackOnlyDial(ctx context.Context, network, address string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(address)
	if err != nil || !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("test dialer refuses %s %s", network, address)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, address)
}

func newTestUser(t testing.TB, opts UserOptions) *User {
	t.Helper()
	if opts.Dial == nil {
		opts.Dial = loopbackOnlyDial
	}
	if opts.DNSUpstream == "" {
		opts.DNSUpstream = "127.0.0.1:1" // never used unless a test sets it
	}
	u, err := NewUser(opts)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, u.Close()) })
	return u
}

func dhcpClientFrame(t testing.TB, typ uint8, xid uint32, opts ...dhcpOption) []byte {
	t.Helper()
	m := &dhcpMessage{op: bootRequest, htype: 1, hlen: 6, xid: xid}
	copy(m.chaddr[:], fakeGuestMAC[:])
	m.options = append([]dhcpOption{{code: optMessageType, data: []byte{typ}}}, opts...)
	payload, err := m.marshal()
	require.NoError(t, err)
	return buildUDPFrame(udpPacket{
		srcMAC: fakeGuestMAC, dstMAC: [6]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff},
		srcIP: netip.IPv4Unspecified(), dstIP: netip.AddrFrom4([4]byte{255, 255, 255, 255}),
		srcPort: dhcpClientPort, dstPort: dhcpServerPort, payload: payload,
	})
}

// dhcpExchange sends one client message and returns the server's reply.
func dhcpExchange(t testing.TB, b Backend, frame []byte, xid uint32) (*dhcpMessage, udpPacket) {
	t.Helper()
	require.NoError(t, b.WriteFrame(frame))
	var pkt udpPacket
	raw := readUntil(t, b, func(f []byte) bool {
		p, ok := parseUDPFrame(f)
		if !ok || p.dstPort != dhcpClientPort {
			return false
		}
		m, err := parseDHCP(p.payload)
		pkt = p
		return err == nil && m.xid == xid
	})
	p, ok := parseUDPFrame(raw)
	require.True(t, ok)
	m, err := parseDHCP(p.payload)
	require.NoError(t, err)
	return m, pkt
}

// dhcpLease runs DISCOVER/OFFER/REQUEST/ACK and returns the ACK.
func dhcpLease(t testing.TB, b Backend) *dhcpMessage {
	t.Helper()
	offer, _ := dhcpExchange(t, b, dhcpClientFrame(t, dhcpDiscover, 0x1111), 0x1111)
	require.Equal(t, uint8(dhcpOffer), offer.messageType())
	sid, ok := offer.optionAddr(optServerID)
	require.True(t, ok)
	ack, _ := dhcpExchange(t, b, dhcpClientFrame(t, dhcpRequest, 0x2222,
		addrOpt(optRequestedIP, offer.yiaddr), addrOpt(optServerID, sid)), 0x2222)
	require.Equal(t, uint8(dhcpAck), ack.messageType())
	return ack
}

func TestUserDHCP(t *testing.T) {
	u := newTestUser(t, UserOptions{})
	offer, pkt := dhcpExchange(t, u, dhcpClientFrame(t, dhcpDiscover, 42), 42)
	assert.Equal(t, uint8(bootReply), offer.op)
	assert.Equal(t, netip.MustParseAddr("10.0.2.15"), offer.yiaddr)
	assert.Equal(t, fakeGuestMAC[:], offer.chaddr[:6])
	assert.Equal(t, gatewayMAC, pkt.srcMAC)
	assert.Equal(t, netip.MustParseAddr("10.0.2.2"), pkt.srcIP)
	for code, want := range map[uint8]string{optServerID: "10.0.2.2", optRouter: "10.0.2.2", optDNS: "10.0.2.3", optSubnetMask: "255.255.255.0"} {
		got, ok := offer.optionAddr(code)
		require.True(t, ok, "option %d", code)
		assert.Equal(t, want, got.String(), "option %d", code)
	}

	// Wrong requested address: NAK.
	nak, _ := dhcpExchange(t, u, dhcpClientFrame(t, dhcpRequest, 43,
		addrOpt(optRequestedIP, netip.MustParseAddr("10.0.2.99"))), 43)
	assert.Equal(t, uint8(dhcpNak), nak.messageType())

	ack := dhcpLease(t, u)
	assert.Equal(t, netip.MustParseAddr("10.0.2.15"), ack.yiaddr)
	lt, ok := ack.option(optLeaseTime)
	require.True(t, ok)
	assert.Len(t, lt, 4)
	got, ok := u.Lease(fakeGuestMAC[:])
	require.True(t, ok)
	assert.Equal(t, "10.0.2.15", got.String())
	assert.GreaterOrEqual(t, u.Stats().DHCPReplies, uint64(4))

	// A request naming another server releases the offer silently.
	require.NoError(t, u.WriteFrame(dhcpClientFrame(t, dhcpRequest, 44,
		addrOpt(optRequestedIP, netip.MustParseAddr("10.0.2.15")), addrOpt(optServerID, netip.MustParseAddr("10.0.2.200")))))
	_, ok = u.Lease(fakeGuestMAC[:])
	assert.False(t, ok)
}

// fakeGuest is a second gVisor netstack playing the guest OS.
type fakeGuest struct {
	s  *stack.Stack
	ch *channel.Endpoint
}

func newFakeGuest(t testing.TB, b Backend, addr, gw netip.Addr) *fakeGuest {
	t.Helper()
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	ch := channel.New(256, 1500+EthernetHeaderLen, tcpip.LinkAddress(fakeGuestMAC[:]))
	require.Nil(t, s.CreateNIC(1, ethernet.New(ch)))
	require.Nil(t, s.AddProtocolAddress(1, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4(addr.As4()), PrefixLen: 24},
	}, stack.AddressProperties{}))
	sub := tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4(addr.As4()), PrefixLen: 24}.Subnet()
	s.SetRouteTable([]tcpip.Route{
		{Destination: sub, NIC: 1},
		{Destination: header.IPv4EmptySubnet, Gateway: tcpip.AddrFrom4(gw.As4()), NIC: 1},
	})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // guest NIC transmit -> backend
		defer wg.Done()
		for {
			pkt := ch.ReadContext(ctx)
			if pkt == nil {
				return
			}
			v := pkt.ToView()
			_ = b.WriteFrame(v.AsSlice())
			v.Release()
			pkt.DecRef()
		}
	}()
	go func() { // backend -> guest NIC receive
		defer wg.Done()
		buf := make([]byte, MaxFrameLen)
		for {
			n, err := b.ReadFrame(ctx, buf)
			if err != nil {
				return
			}
			pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(append([]byte(nil), buf[:n]...))})
			ch.InjectInbound(0, pkt)
			pkt.DecRef()
		}
	}()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		s.Close()
		ch.Close()
		s.Wait()
	})
	return &fakeGuest{s: s, ch: ch}
}

func guestFromLease(t testing.TB, u *User) *fakeGuest {
	t.Helper()
	ack := dhcpLease(t, u)
	gw, ok := ack.optionAddr(optRouter)
	require.True(t, ok)
	return newFakeGuest(t, u, ack.yiaddr, gw)
}

func echoServer(t testing.TB, network string) string {
	t.Helper()
	switch network {
	case "tcp":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					_, _ = io.Copy(c, c)
				}()
			}
		}()
		return ln.Addr().String()
	default:
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		require.NoError(t, err)
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = pc.WriteTo(append([]byte("echo:"), buf[:n]...), from)
			}
		}()
		return pc.LocalAddr().String()
	}
}

func portOf(t testing.TB, addr string) uint16 {
	ap, err := netip.ParseAddrPort(addr)
	require.NoError(t, err)
	return ap.Port()
}

func TestUserTCPNATToHostLoopback(t *testing.T) {
	u := newTestUser(t, UserOptions{})
	g := guestFromLease(t, u)
	port := portOf(t, echoServer(t, "tcp"))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := gonet.DialContextTCP(ctx, g.s, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{10, 0, 2, 2}), Port: port}, ipv4.ProtocolNumber)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	msg := make([]byte, 100_000) // several windows' worth
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	go func() { _, _ = c.Write(msg) }()
	got := make([]byte, len(msg))
	_, err = io.ReadFull(c, got)
	require.NoError(t, err)
	assert.Equal(t, msg, got)
	assert.Equal(t, uint64(1), u.Stats().TCPFlows)
}

func TestUserTCPRefused(t *testing.T) {
	u := newTestUser(t, UserOptions{Restrict: true})
	g := guestFromLease(t, u)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Restricted: an outside address is refused without any host dial.
	_, err := gonet.DialContextTCP(ctx, g.s, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{192, 0, 2, 1}), Port: 80}, ipv4.ProtocolNumber)
	require.Error(t, err)
	// A closed host port is refused too (dial fails, guest gets RST).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closedPort := portOf(t, ln.Addr().String())
	ln.Close()
	_, err = gonet.DialContextTCP(ctx, g.s, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{10, 0, 2, 2}), Port: closedPort}, ipv4.ProtocolNumber)
	require.Error(t, err)
	assert.Equal(t, uint64(2), u.Stats().Refused)
	require.NoError(t, ctx.Err(), "refusals are prompt, not timeouts")
}

func TestUserUDPNATAndDNS(t *testing.T) {
	dnsAddr := echoServer(t, "udp") // stands in for the host resolver
	u := newTestUser(t, UserOptions{DNSUpstream: dnsAddr})
	g := guestFromLease(t, u)
	udpPort := portOf(t, echoServer(t, "udp"))

	for _, tc := range []struct {
		name string
		dst  tcpip.FullAddress
	}{
		{"nat to host loopback", tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{10, 0, 2, 2}), Port: udpPort}},
		{"dns relay", tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{10, 0, 2, 3}), Port: 53}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := gonet.DialUDP(g.s, nil, &tc.dst, ipv4.ProtocolNumber)
			require.NoError(t, err)
			defer c.Close()
			buf := make([]byte, 2048)
			// UDP may lose the first datagram while ARP resolves: retry a few times.
			for attempt := range 5 {
				_, err = c.Write([]byte("query"))
				require.NoError(t, err)
				require.NoError(t, c.SetReadDeadline(time.Now().Add(2*time.Second)))
				n, err := c.Read(buf)
				if err == nil {
					assert.Equal(t, "echo:query", string(buf[:n]))
					return
				}
				t.Logf("attempt %d: %v", attempt, err)
			}
			t.Fatal("no UDP reply")
		})
	}
}

func TestUserHostForwardTCP(t *testing.T) {
	opts, err := ParseUserOptions("user,hostfwd=tcp:127.0.0.1:0-:22")
	require.NoError(t, err)
	u := newTestUser(t, opts)
	g := guestFromLease(t, u)

	ln, err := gonet.ListenTCP(g.s, tcpip.FullAddress{NIC: 1, Port: 22}, ipv4.ProtocolNumber)
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = c.Write([]byte("SSH-2.0-fakeguest\r\n"))
		_, _ = io.Copy(c, c)
	}()

	addrs := u.HostForwardAddrs()
	require.Len(t, addrs, 1)
	hc, err := net.DialTimeout("tcp", addrs[0].String(), 5*time.Second)
	require.NoError(t, err)
	defer hc.Close()
	require.NoError(t, hc.SetDeadline(time.Now().Add(10*time.Second)))
	banner := make([]byte, len("SSH-2.0-fakeguest\r\n"))
	_, err = io.ReadFull(hc, banner)
	require.NoError(t, err)
	assert.Equal(t, "SSH-2.0-fakeguest\r\n", string(banner))
	_, err = hc.Write([]byte("ping"))
	require.NoError(t, err)
	got := make([]byte, 4)
	_, err = io.ReadFull(hc, got)
	require.NoError(t, err)
	assert.Equal(t, "ping", string(got))
}

func TestUserHostForwardUDP(t *testing.T) {
	u := newTestUser(t, UserOptions{HostForwards: []HostForward{{Proto: "udp", GuestPort: 5353}}})
	g := guestFromLease(t, u)
	pc, err := gonet.DialUDP(g.s, &tcpip.FullAddress{NIC: 1, Port: 5353}, nil, ipv4.ProtocolNumber)
	require.NoError(t, err)
	defer pc.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(append([]byte("guest:"), buf[:n]...), from)
		}
	}()
	hc, err := net.Dial("udp", u.HostForwardAddrs()[0].String())
	require.NoError(t, err)
	defer hc.Close()
	buf := make([]byte, 2048)
	for range 5 {
		_, err = hc.Write([]byte("hi"))
		require.NoError(t, err)
		require.NoError(t, hc.SetReadDeadline(time.Now().Add(2*time.Second)))
		n, err := hc.Read(buf)
		if err == nil {
			assert.Equal(t, "guest:hi", string(buf[:n]))
			return
		}
	}
	t.Fatal("no reply through UDP host forward")
}

func TestUserPingGatewayARP(t *testing.T) {
	u := newTestUser(t, UserOptions{})
	guest := netip.MustParseAddr("10.0.2.15")
	gw := netip.MustParseAddr("10.0.2.2")
	require.NoError(t, u.WriteFrame(arpRequest(fakeGuestMAC, guest, gw)))
	reply := readUntil(t, u, func(f []byte) bool {
		return len(f) >= 42 && f[12] == 0x08 && f[13] == 0x06 && f[21] == 2
	})
	assert.Equal(t, gatewayMAC[:], reply[22:28])
	require.NoError(t, u.WriteFrame(icmpEcho(fakeGuestMAC, gatewayMAC, guest, gw, 7, 1)))
	echo := readUntil(t, u, func(f []byte) bool {
		return len(f) >= 42 && f[12] == 0x08 && f[13] == 0x00 && f[14+9] == ipProtoICMP && f[34] == 0
	})
	assert.Equal(t, gw.As4(), [4]byte(echo[26:30]))
}

func TestUserCloseAndErrors(t *testing.T) {
	u, err := NewUser(UserOptions{Dial: loopbackOnlyDial, DNSUpstream: "127.0.0.1:1", HostForwards: []HostForward{{Proto: "tcp", GuestPort: 80}}})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() {
		_, err := u.ReadFrame(context.Background(), make([]byte, 100))
		done <- err
	}()
	require.NoError(t, u.Close())
	require.NoError(t, u.Close())
	select {
	case err := <-done:
		require.ErrorIs(t, err, ErrClosed)
	case <-time.After(5 * time.Second):
		t.Fatal("reader not woken by Close")
	}
	require.ErrorIs(t, u.WriteFrame(make([]byte, 60)), ErrClosed)

	_, err = NewUser(UserOptions{Network: netip.MustParsePrefix("10.0.0.0/30")})
	var oe *OptionError
	require.ErrorAs(t, err, &oe)

	// A busy host port fails NewUser with a clear error.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	_, err = NewUser(UserOptions{HostForwards: []HostForward{{Proto: "tcp", HostAddr: netip.MustParseAddr("127.0.0.1"), HostPort: portOf(t, ln.Addr().String()), GuestPort: 22}}})
	var ue *UserError
	require.ErrorAs(t, err, &ue)
	assert.Contains(t, ue.Op, "hostfwd")
}

func TestUserReadHonoursContext(t *testing.T) {
	u := newTestUser(t, UserOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := u.ReadFrame(ctx, make([]byte, 100))
	require.True(t, errors.Is(err, context.DeadlineExceeded))
	var fe *FrameError
	require.ErrorAs(t, u.WriteFrame(make([]byte, 5)), &fe)
}

func TestUpstreamFromResolvConf(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := dir + "/resolv.conf"
		require.NoError(t, writeFile(p, s))
		return p
	}
	assert.Equal(t, "192.0.2.53:53", upstreamFromResolvConf(write("# c\nsearch x\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")))
	assert.Equal(t, "127.0.0.53:53", upstreamFromResolvConf(write("nameserver 127.0.0.53\n")))
	assert.Equal(t, "[::1]:53", upstreamFromResolvConf(write("nameserver ::1\n")))
	assert.Equal(t, defaultDNSUpstreams, upstreamFromResolvConf(write("nameserver bogus\n")))
	assert.Equal(t, defaultDNSUpstreams, upstreamFromResolvConf(dir+"/missing"))
}

func ExampleNewUser() {
	opts, err := ParseUserOptions("user,hostfwd=tcp:127.0.0.1:0-:22")
	if err != nil {
		fmt.Println(err)
		return
	}
	u, err := NewUser(opts)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer u.Close()
	fmt.Println(opts.Gateway, opts.DNS, opts.GuestAddr, len(u.HostForwardAddrs()))
	// Output: 10.0.2.2 10.0.2.3 10.0.2.15 1
}

func writeFile(path, s string) error {
	return os.WriteFile(path, []byte(s), 0o644)
}

// BenchmarkUserTCPNAT measures guest-to-host TCP throughput through the NAT
// (guest netstack -> frames -> User netstack -> host socket).
func BenchmarkUserTCPNAT(b *testing.B) {
	u := newTestUser(b, UserOptions{})
	g := guestFromLease(b, u)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	defer ln.Close()
	received := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			received <- 0
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		received <- n
	}()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := gonet.DialContextTCP(ctx, g.s, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{10, 0, 2, 2}), Port: portOf(b, ln.Addr().String())}, ipv4.ProtocolNumber)
	require.NoError(b, err)
	chunk := make([]byte, 64<<10)
	b.SetBytes(int64(len(chunk)))
	for b.Loop() {
		if _, err := c.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	c.Close()
	select {
	case n := <-received:
		require.Equal(b, int64(b.N)*int64(len(chunk)), n)
		st := u.Stats()
		b.ReportMetric(float64(st.RxDropped), "rx-dropped")
		b.ReportMetric(float64(st.FramesIn)/float64(b.N), "frames-in/op")
	case <-time.After(30 * time.Second):
		b.Fatal("sink did not finish")
	}
}
