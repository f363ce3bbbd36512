package netback

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Defaults for user-mode networking, matching QEMU's slirp.
var (
	defaultUserNet = netip.MustParsePrefix("10.0.2.0/24")
	// gatewayMAC is the MAC address of the virtual router seen by the guest.
	gatewayMAC = [6]byte{0x52, 0x55, 0x0a, 0x00, 0x02, 0x02}
)

// Limits of the user-mode back end.
const (
	defaultUserMTU      = 1500
	defaultRxQueue      = 512
	defaultMaxConns     = 1024
	defaultDialTimeout  = 10 * time.Second
	defaultUDPIdle      = 60 * time.Second
	dnsUDPIdle          = 10 * time.Second
	dhcpPoolSize        = 16
	defaultLeaseTime    = 24 * time.Hour
	maxUDPDatagram      = 65535
	maxHostUDPSessions  = 256
	nicID               = tcpip.NICID(1)
	defaultResolvConf   = "/etc/resolv.conf"
	defaultDNSUpstreams = "127.0.0.1:53"
)

// DialFunc opens a host-side connection for NAT; it matches net.Dialer.DialContext.
type DialFunc func(ctx context.Context, network, address string) (net.Conn, error)

// UserOptions configures user-mode networking. Zero fields take QEMU's
// defaults; ParseUserOptions builds one from an option string.
type UserOptions struct {
	// Network is the virtual subnet (default 10.0.2.0/24).
	Network netip.Prefix
	// Gateway is the router and DHCP server address (default .2). Guest
	// connections to it reach the host's loopback (127.0.0.1).
	Gateway netip.Addr
	// DNS is the virtual DNS server (default .3); UDP and TCP port 53 to it
	// are relayed to DNSUpstream.
	DNS netip.Addr
	// GuestAddr is the first address handed out by DHCP (default .15).
	GuestAddr netip.Addr
	// Restrict refuses guest connections except to Gateway and DNS.
	Restrict bool
	// MTU is the guest-facing IP MTU (default 1500).
	MTU int
	// HostForwards are host listeners relayed into the guest.
	HostForwards []HostForward
	// DNSUpstream is the host resolver "ip:port"; by default the first
	// nameserver of ResolvConf.
	DNSUpstream string
	// ResolvConf is read for DNSUpstream (default /etc/resolv.conf).
	ResolvConf string
	// Dial opens host connections (default net.Dialer.DialContext).
	Dial DialFunc
	// MaxConnections bounds concurrent NAT and forwarded flows (default 1024).
	MaxConnections int
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

func (o *UserOptions) fillDefaults() error {
	bad := func(opt string, v any, reason string) error {
		return &OptionError{Option: opt, Value: fmt.Sprint(v), Reason: reason}
	}
	if !o.Network.IsValid() {
		o.Network = defaultUserNet
	}
	if !o.Network.Addr().Is4() || o.Network.Bits() < 8 || o.Network.Bits() > 29 {
		return bad("net", o.Network, "need an IPv4 prefix between /8 and /29")
	}
	o.Network = o.Network.Masked()
	nth := func(n uint32) netip.Addr {
		b := o.Network.Addr().As4()
		v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) + n
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	if !o.Gateway.IsValid() {
		o.Gateway = nth(2)
	}
	if !o.DNS.IsValid() {
		o.DNS = nth(3)
	}
	if !o.GuestAddr.IsValid() {
		o.GuestAddr = nth(15)
	}
	for _, c := range []struct {
		name string
		a    netip.Addr
	}{{"host", o.Gateway}, {"dns", o.DNS}, {"dhcpstart", o.GuestAddr}} {
		if !o.Network.Contains(c.a) || c.a == o.Network.Addr() || c.a == nth(1<<(32-o.Network.Bits())-1) {
			return bad(c.name, c.a, "not a host address in "+o.Network.String())
		}
	}
	if o.Gateway == o.DNS || o.Gateway == o.GuestAddr || o.DNS == o.GuestAddr {
		return bad("host", o.Gateway, "host, dns and dhcpstart must differ")
	}
	if o.MTU == 0 {
		o.MTU = defaultUserMTU
	}
	if o.MTU < 576 || o.MTU > 65520 {
		return bad("mtu", o.MTU, "must be between 576 and 65520")
	}
	for _, f := range o.HostForwards {
		if f.Proto != "tcp" && f.Proto != "udp" {
			return bad("hostfwd", f, "protocol must be tcp or udp")
		}
		if f.GuestPort == 0 {
			return bad("hostfwd", f, "guest port 0")
		}
		if f.GuestAddr.IsValid() && !o.Network.Contains(f.GuestAddr) {
			return bad("hostfwd", f, "guest address outside "+o.Network.String())
		}
	}
	if o.MaxConnections <= 0 {
		o.MaxConnections = defaultMaxConns
	}
	return nil
}

// UserStats counts the user back end's activity.
type UserStats struct {
	FramesIn, FramesOut uint64 // guest to netstack, netstack to guest
	RxDropped           uint64 // frames for the guest dropped on a full queue
	DHCPReplies         uint64
	TCPFlows, UDPFlows  uint64 // NAT flows opened
	Refused             uint64 // NAT flows refused (policy, dial error, limit)
}

// User is a Backend implementing QEMU-style user-mode networking on a gVisor
// netstack: a virtual router with DHCP, DNS relay, NAT of guest TCP/UDP to
// host sockets, and host port forwards into the guest.
type User struct {
	opts  UserOptions
	log   *slog.Logger
	stack *stack.Stack
	link  *channel.Endpoint
	dhcp  *dhcpServer
	rx    chan []byte
	dial  DialFunc
	dns   string

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed atomic.Bool
	flows  atomic.Int64

	mu        sync.Mutex
	closers   map[io.Closer]struct{}
	fwdAddrs  []net.Addr
	closeOnce sync.Once

	framesIn, framesOut, rxDropped, dhcpReplies atomic.Uint64
	tcpFlows, udpFlows, refused                 atomic.Uint64
}

var _ Backend = (*User)(nil)

// NewUser starts user-mode networking. Host forwards start listening before
// it returns.
func NewUser(opts UserOptions) (*User, error) {
	if err := opts.fillDefaults(); err != nil {
		return nil, err
	}
	u := &User{
		opts:    opts,
		log:     opts.Logger,
		rx:      make(chan []byte, defaultRxQueue),
		dial:    opts.Dial,
		closers: make(map[io.Closer]struct{}),
	}
	if u.log == nil {
		u.log = slog.Default()
	}
	if u.dial == nil {
		u.dial = (&net.Dialer{}).DialContext
	}
	u.dns = opts.DNSUpstream
	if u.dns == "" {
		path := opts.ResolvConf
		if path == "" {
			path = defaultResolvConf
		}
		u.dns = upstreamFromResolvConf(path)
	}
	u.dhcp = newDHCPServer(opts.Network, opts.Gateway, opts.DNS, opts.GuestAddr, dhcpPoolSize, defaultLeaseTime, gatewayMAC)
	u.ctx, u.cancel = context.WithCancel(context.Background())
	if err := u.startStack(); err != nil {
		u.cancel()
		return nil, err
	}
	u.spawn(u.pumpToGuest)
	for _, f := range opts.HostForwards {
		if err := u.startHostForward(f); err != nil {
			u.Close()
			return nil, err
		}
	}
	return u, nil
}

// UserError reports a failure inside the user-mode stack.
type UserError struct {
	Op  string
	Err error
}

func (e *UserError) Error() string { return fmt.Sprintf("netback: user: %s: %v", e.Op, e.Err) }

func (e *UserError) Unwrap() error { return e.Err }

func tcpipErr(op string, err tcpip.Error) error {
	return &UserError{Op: op, Err: errors.New(err.String())}
}

func (u *User) startStack() error {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4},
	})
	u.stack = s
	u.link = channel.New(defaultRxQueue, uint32(u.opts.MTU+EthernetHeaderLen), tcpip.LinkAddress(gatewayMAC[:]))
	if err := s.CreateNIC(nicID, ethernet.New(u.link)); err != nil {
		return tcpipErr("create NIC", err)
	}
	for _, a := range []netip.Addr{u.opts.Gateway, u.opts.DNS} {
		pa := tcpip.ProtocolAddress{
			Protocol:          ipv4.ProtocolNumber,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4(a.As4()), PrefixLen: u.opts.Network.Bits()},
		}
		if err := s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return tcpipErr("add address "+a.String(), err)
		}
	}
	// Accept packets for any destination (NAT) and answer from it.
	if err := s.SetPromiscuousMode(nicID, true); err != nil {
		return tcpipErr("promiscuous mode", err)
	}
	if err := s.SetSpoofing(nicID, true); err != nil {
		return tcpipErr("spoofing", err)
	}
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: nicID}})
	tf := tcp.NewForwarder(s, 0, 256, u.handleTCP)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, tf.HandlePacket)
	uf := udp.NewForwarder(s, u.handleUDP)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, uf.HandlePacket)
	return nil
}

// upstreamFromResolvConf returns the first nameserver as ip:53.
func upstreamFromResolvConf(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return defaultDNSUpstreams
	}
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 1<<20))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "nameserver" {
			if a, err := netip.ParseAddr(fields[1]); err == nil {
				return netip.AddrPortFrom(a.WithZone(""), 53).String()
			}
		}
	}
	return defaultDNSUpstreams
}

// WriteFrame delivers one frame from the guest to the virtual network.
func (u *User) WriteFrame(frame []byte) error {
	if u.closed.Load() {
		return ErrClosed
	}
	if err := checkFrame(frame); err != nil {
		return err
	}
	u.framesIn.Add(1)
	if p, ok := parseUDPFrame(frame); ok && p.dstPort == dhcpServerPort && p.srcPort == dhcpClientPort {
		if reply := u.dhcp.handle(p); reply != nil {
			u.dhcpReplies.Add(1)
			u.enqueue(reply)
		}
		return nil
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		Payload: buffer.MakeWithData(append([]byte(nil), frame...)),
	})
	u.link.InjectInbound(0, pkt) // the ethernet layer reads the real type
	pkt.DecRef()
	return nil
}

func (u *User) enqueue(frame []byte) {
	select {
	case u.rx <- frame:
	default:
		u.rxDropped.Add(1)
	}
}

// pumpToGuest moves frames emitted by the netstack into the rx queue.
func (u *User) pumpToGuest() {
	for {
		pkt := u.link.ReadContext(u.ctx)
		if pkt == nil {
			return
		}
		v := pkt.ToView()
		frame := append([]byte(nil), v.AsSlice()...)
		v.Release()
		pkt.DecRef()
		u.enqueue(frame)
	}
}

// ReadFrame blocks until a frame for the guest is available or ctx ends.
func (u *User) ReadFrame(ctx context.Context, buf []byte) (int, error) {
	if u.closed.Load() {
		return 0, ErrClosed
	}
	select {
	case f := <-u.rx:
		u.framesOut.Add(1)
		return copyOut(buf, f)
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-u.ctx.Done():
		return 0, ErrClosed
	}
}

// Stats returns a snapshot of the counters.
func (u *User) Stats() UserStats {
	return UserStats{
		FramesIn: u.framesIn.Load(), FramesOut: u.framesOut.Load(),
		RxDropped: u.rxDropped.Load(), DHCPReplies: u.dhcpReplies.Load(),
		TCPFlows: u.tcpFlows.Load(), UDPFlows: u.udpFlows.Load(), Refused: u.refused.Load(),
	}
}

// HostForwardAddrs returns the bound host addresses of the host forwards,
// in the order they were given (useful with port 0).
func (u *User) HostForwardAddrs() []net.Addr {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]net.Addr(nil), u.fwdAddrs...)
}

// Lease returns the address DHCP gave to mac, if any.
func (u *User) Lease(mac net.HardwareAddr) (netip.Addr, bool) {
	if len(mac) != 6 {
		return netip.Addr{}, false
	}
	return u.dhcp.leased([6]byte(mac))
}

// Close stops the stack, all listeners and all relayed connections.
func (u *User) Close() error {
	u.closeOnce.Do(func() {
		u.mu.Lock()
		u.closed.Store(true) // under mu: spawn cannot Add after Wait starts
		u.mu.Unlock()
		u.cancel()
		u.mu.Lock()
		cs := make([]io.Closer, 0, len(u.closers))
		for c := range u.closers {
			cs = append(cs, c)
		}
		u.mu.Unlock()
		for _, c := range cs {
			_ = c.Close()
		}
		u.stack.Close()
		u.link.Close()
		u.wg.Wait()
		u.stack.Wait()
	})
	return nil
}

// spawn runs fn in a goroutine that Close waits for; it returns false
// without running fn once the back end is closing.
func (u *User) spawn(fn func()) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed.Load() {
		return false
	}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		fn()
	}()
	return true
}

// track registers c to be closed by Close; it returns false (and closes c)
// if the back end is already closing.
func (u *User) track(c io.Closer) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed.Load() {
		_ = c.Close()
		return false
	}
	u.closers[c] = struct{}{}
	return true
}

func (u *User) untrack(c io.Closer) {
	u.mu.Lock()
	delete(u.closers, c)
	u.mu.Unlock()
	_ = c.Close()
}

// acquireFlow reserves a slot under MaxConnections.
func (u *User) acquireFlow() bool {
	if u.flows.Add(1) > int64(u.opts.MaxConnections) {
		u.flows.Add(-1)
		return false
	}
	return true
}

func (u *User) releaseFlow() { u.flows.Add(-1) }

// translate maps a guest destination to a host address, or reports that the
// flow is refused.
func (u *User) translate(dst netip.AddrPort) (string, bool) {
	a := dst.Addr()
	switch {
	case a == u.opts.Gateway:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), dst.Port()).String(), true
	case a == u.opts.DNS:
		if dst.Port() == 53 && u.dns != "" {
			return u.dns, true
		}
		return "", false
	case u.opts.Restrict, u.opts.Network.Contains(a), !a.IsGlobalUnicast():
		return "", false
	}
	return dst.String(), true
}

func addrPortOf(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip, port)
}

func (u *User) handleTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst := addrPortOf(id.LocalAddress, id.LocalPort)
	target, ok := u.translate(dst)
	if !ok || !u.acquireFlow() {
		u.refused.Add(1)
		r.Complete(true)
		return
	}
	ctx, cancel := context.WithTimeout(u.ctx, defaultDialTimeout)
	hc, err := u.dial(ctx, "tcp", target)
	cancel()
	if err != nil {
		u.log.Debug("netback: user: tcp dial failed", "dst", dst, "target", target, "err", err)
		u.refused.Add(1)
		u.releaseFlow()
		r.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		u.refused.Add(1)
		u.releaseFlow()
		hc.Close()
		r.Complete(true)
		return
	}
	r.Complete(false)
	u.tcpFlows.Add(1)
	gc := gonet.NewTCPConn(&wq, ep)
	if !u.spawn(func() {
		defer u.releaseFlow()
		u.proxy(gc, hc)
	}) {
		u.releaseFlow()
		gc.Close()
		hc.Close()
	}
}

// halfCloser is a connection that can shut down its write side.
type halfCloser interface {
	CloseWrite() error
}

// proxy copies both ways until both directions finish, then closes both.
func (u *User) proxy(a, b net.Conn) {
	if !u.track(a) {
		b.Close()
		return
	}
	if !u.track(b) {
		u.untrack(a)
		return
	}
	defer u.untrack(a)
	defer u.untrack(b)
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if hc, ok := dst.(halfCloser); ok {
			_ = hc.CloseWrite()
		} else {
			_ = dst.Close()
		}
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
}

func (u *User) handleUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	dst := addrPortOf(id.LocalAddress, id.LocalPort)
	if !dst.Addr().Is4() || dst.Addr() == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return false
	}
	target, ok := u.translate(dst)
	if !ok || !u.acquireFlow() {
		u.refused.Add(1)
		return false
	}
	hc, err := u.dial(u.ctx, "udp", target)
	if err != nil {
		u.refused.Add(1)
		u.releaseFlow()
		return false
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		u.refused.Add(1)
		u.releaseFlow()
		hc.Close()
		return true
	}
	u.udpFlows.Add(1)
	gc := gonet.NewUDPConn(&wq, ep)
	idle := defaultUDPIdle
	if dst.Addr() == u.opts.DNS {
		idle = dnsUDPIdle
	}
	if !u.spawn(func() {
		defer u.releaseFlow()
		u.relayUDP(gc, hc, idle)
	}) {
		u.releaseFlow()
		gc.Close()
		hc.Close()
	}
	return true
}

// relayUDP copies datagrams both ways until neither side has sent anything
// for idle, or either side fails.
func (u *User) relayUDP(a, b net.Conn, idle time.Duration) {
	if !u.track(a) {
		b.Close()
		return
	}
	if !u.track(b) {
		u.untrack(a)
		return
	}
	defer u.untrack(a)
	defer u.untrack(b)
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var wg sync.WaitGroup
	cp := func(dst, src net.Conn) {
		defer wg.Done()
		defer dst.Close()
		defer src.Close()
		buf := make([]byte, maxUDPDatagram)
		for {
			_ = src.SetReadDeadline(time.Unix(0, last.Load()).Add(idle))
			n, err := src.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() && time.Since(time.Unix(0, last.Load())) < idle {
					continue // the other direction kept the flow alive
				}
				return
			}
			last.Store(time.Now().UnixNano())
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
}

// guestTarget resolves the guest address of a host forward.
func (u *User) guestTarget(f HostForward) tcpip.FullAddress {
	g := f.GuestAddr
	if !g.IsValid() {
		g = u.opts.GuestAddr
	}
	return tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(g.As4()), Port: f.GuestPort}
}

func (u *User) startHostForward(f HostForward) error {
	h := f.HostAddr
	if !h.IsValid() {
		h = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	addr := netip.AddrPortFrom(h, f.HostPort).String()
	switch f.Proto {
	case "tcp":
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return &UserError{Op: "hostfwd " + f.String(), Err: err}
		}
		if !u.track(ln) {
			return ErrClosed
		}
		u.mu.Lock()
		u.fwdAddrs = append(u.fwdAddrs, ln.Addr())
		u.mu.Unlock()
		u.spawn(func() { u.acceptTCP(ln, f) })
	case "udp":
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return &UserError{Op: "hostfwd " + f.String(), Err: err}
		}
		if !u.track(pc) {
			return ErrClosed
		}
		u.mu.Lock()
		u.fwdAddrs = append(u.fwdAddrs, pc.LocalAddr())
		u.mu.Unlock()
		u.spawn(func() { u.serveUDPForward(pc, f) })
	default:
		return &OptionError{Option: "hostfwd", Value: f.String(), Reason: "protocol must be tcp or udp"}
	}
	return nil
}

func (u *User) acceptTCP(ln net.Listener, f HostForward) {
	for {
		hc, err := ln.Accept()
		if err != nil {
			if u.ctx.Err() == nil {
				u.log.Warn("netback: user: hostfwd accept failed", "fwd", f.String(), "err", err)
			}
			return
		}
		if !u.acquireFlow() {
			u.refused.Add(1)
			hc.Close()
			continue
		}
		ok := u.spawn(func() {
			defer u.releaseFlow()
			ctx, cancel := context.WithTimeout(u.ctx, defaultDialTimeout)
			gc, err := gonet.DialContextTCP(ctx, u.stack, u.guestTarget(f), ipv4.ProtocolNumber)
			cancel()
			if err != nil {
				u.log.Debug("netback: user: hostfwd dial into guest failed", "fwd", f.String(), "err", err)
				u.refused.Add(1)
				hc.Close()
				return
			}
			u.tcpFlows.Add(1)
			u.proxy(hc, gc)
		})
		if !ok {
			u.releaseFlow()
			hc.Close()
			return
		}
	}
}

// serveUDPForward relays datagrams from host clients to the guest, one
// guest-side socket per host client address.
func (u *User) serveUDPForward(pc net.PacketConn, f HostForward) {
	var mu sync.Mutex
	sessions := make(map[string]net.Conn)
	buf := make([]byte, maxUDPDatagram)
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range sessions {
			c.Close()
		}
	}()
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		key := from.String()
		mu.Lock()
		gc, ok := sessions[key]
		if !ok {
			if len(sessions) >= maxHostUDPSessions {
				mu.Unlock()
				u.refused.Add(1)
				continue
			}
			raddr := u.guestTarget(f)
			c, err := gonet.DialUDP(u.stack, nil, &raddr, ipv4.ProtocolNumber)
			if err != nil {
				mu.Unlock()
				u.refused.Add(1)
				continue
			}
			gc = c
			sessions[key] = gc
			u.udpFlows.Add(1)
			u.spawn(func() {
				rbuf := make([]byte, maxUDPDatagram)
				for {
					_ = gc.SetReadDeadline(time.Now().Add(defaultUDPIdle))
					n, err := gc.Read(rbuf)
					if err != nil {
						break
					}
					if _, err := pc.WriteTo(rbuf[:n], from); err != nil {
						break
					}
				}
				mu.Lock()
				delete(sessions, key)
				mu.Unlock()
				gc.Close()
			})
		}
		mu.Unlock()
		_, _ = gc.Write(buf[:n])
	}
}
