package netback

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"
)

// DHCP message constants (RFC 2131, RFC 2132).
const (
	dhcpServerPort = 67
	dhcpClientPort = 68
	dhcpFixedLen   = 236
	dhcpMagic      = 0x63825363
	bootRequest    = 1
	bootReply      = 2
	dhcpFlagBcast  = 0x8000

	optPad          = 0
	optSubnetMask   = 1
	optRouter       = 3
	optDNS          = 6
	optRequestedIP  = 50
	optLeaseTime    = 51
	optMessageType  = 53
	optServerID     = 54
	optRenewalTime  = 58
	optRebindTime   = 59
	optClientID     = 61
	optEnd          = 255
	dhcpDiscover    = 1
	dhcpOffer       = 2
	dhcpRequest     = 3
	dhcpDecline     = 4
	dhcpAck         = 5
	dhcpNak         = 6
	dhcpRelease     = 7
	dhcpInform      = 8
	maxDHCPOptions  = 255
	dhcpMinReplyLen = 300 // BOOTP minimum; some clients insist on it
)

// ErrDHCP is wrapped by every DHCP decoding error.
var ErrDHCP = errors.New("netback: malformed DHCP message")

// dhcpOption is one TLV option.
type dhcpOption struct {
	code uint8
	data []byte
}

// dhcpMessage is a decoded DHCP/BOOTP message.
type dhcpMessage struct {
	op, htype, hlen, hops  uint8
	xid                    uint32
	secs, flags            uint16
	ciaddr, yiaddr, siaddr netip.Addr
	giaddr                 netip.Addr
	chaddr                 [16]byte
	options                []dhcpOption
}

func dhcpErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrDHCP, fmt.Sprintf(format, args...))
}

// parseDHCP decodes a DHCP message from a UDP payload.
func parseDHCP(b []byte) (*dhcpMessage, error) {
	if len(b) < dhcpFixedLen+4 {
		return nil, dhcpErr("%d bytes, need at least %d", len(b), dhcpFixedLen+4)
	}
	if m := binary.BigEndian.Uint32(b[dhcpFixedLen:]); m != dhcpMagic {
		return nil, dhcpErr("magic cookie %#08x", m)
	}
	m := &dhcpMessage{
		op: b[0], htype: b[1], hlen: b[2], hops: b[3],
		xid:    binary.BigEndian.Uint32(b[4:8]),
		secs:   binary.BigEndian.Uint16(b[8:10]),
		flags:  binary.BigEndian.Uint16(b[10:12]),
		ciaddr: netip.AddrFrom4([4]byte(b[12:16])),
		yiaddr: netip.AddrFrom4([4]byte(b[16:20])),
		siaddr: netip.AddrFrom4([4]byte(b[20:24])),
		giaddr: netip.AddrFrom4([4]byte(b[24:28])),
	}
	copy(m.chaddr[:], b[28:44])
	if m.hlen > 16 {
		return nil, dhcpErr("hardware address length %d", m.hlen)
	}
	opts := b[dhcpFixedLen+4:]
	for len(opts) > 0 {
		code := opts[0]
		if code == optEnd {
			return m, nil
		}
		if code == optPad {
			opts = opts[1:]
			continue
		}
		if len(opts) < 2 {
			return nil, dhcpErr("option %d has no length", code)
		}
		n := int(opts[1])
		if len(opts) < 2+n {
			return nil, dhcpErr("option %d claims %d bytes, %d left", code, n, len(opts)-2)
		}
		if len(m.options) >= maxDHCPOptions {
			return nil, dhcpErr("more than %d options", maxDHCPOptions)
		}
		m.options = append(m.options, dhcpOption{code: code, data: opts[2 : 2+n]})
		opts = opts[2+n:]
	}
	// A missing end option is tolerated: many clients pad instead.
	return m, nil
}

// option returns the first option with code, if present.
func (m *dhcpMessage) option(code uint8) ([]byte, bool) {
	for _, o := range m.options {
		if o.code == code {
			return o.data, true
		}
	}
	return nil, false
}

// messageType returns option 53, or 0 for plain BOOTP.
func (m *dhcpMessage) messageType() uint8 {
	if d, ok := m.option(optMessageType); ok && len(d) == 1 {
		return d[0]
	}
	return 0
}

// optionAddr returns a 4-byte address option.
func (m *dhcpMessage) optionAddr(code uint8) (netip.Addr, bool) {
	if d, ok := m.option(code); ok && len(d) == 4 {
		return netip.AddrFrom4([4]byte(d)), true
	}
	return netip.Addr{}, false
}

func put4(b []byte, a netip.Addr) {
	if a.Is4() {
		v := a.As4()
		copy(b, v[:])
	}
}

// marshal encodes the message, padding to the BOOTP minimum size.
func (m *dhcpMessage) marshal() ([]byte, error) {
	n := dhcpFixedLen + 4 + 1
	for _, o := range m.options {
		if len(o.data) > 255 {
			return nil, dhcpErr("option %d has %d bytes, max 255", o.code, len(o.data))
		}
		n += 2 + len(o.data)
	}
	b := make([]byte, max(n, dhcpMinReplyLen))
	b[0], b[1], b[2], b[3] = m.op, m.htype, m.hlen, m.hops
	binary.BigEndian.PutUint32(b[4:8], m.xid)
	binary.BigEndian.PutUint16(b[8:10], m.secs)
	binary.BigEndian.PutUint16(b[10:12], m.flags)
	put4(b[12:16], m.ciaddr)
	put4(b[16:20], m.yiaddr)
	put4(b[20:24], m.siaddr)
	put4(b[24:28], m.giaddr)
	copy(b[28:44], m.chaddr[:])
	binary.BigEndian.PutUint32(b[dhcpFixedLen:], dhcpMagic)
	p := b[dhcpFixedLen+4:]
	for _, o := range m.options {
		p[0], p[1] = o.code, byte(len(o.data))
		copy(p[2:], o.data)
		p = p[2+len(o.data):]
	}
	p[0] = optEnd
	return b, nil
}

func addrOpt(code uint8, a netip.Addr) dhcpOption {
	v := a.As4()
	return dhcpOption{code: code, data: v[:]}
}

func u32Opt(code uint8, v uint32) dhcpOption {
	d := make([]byte, 4)
	binary.BigEndian.PutUint32(d, v)
	return dhcpOption{code: code, data: d}
}

// dhcpServer hands out addresses from a small pool, one per client MAC.
type dhcpServer struct {
	server    netip.Addr // gateway, also the server identifier
	dns       netip.Addr
	mask      netip.Addr
	start     netip.Addr
	poolSize  int
	leaseTime time.Duration
	serverMAC [6]byte

	mu     sync.Mutex
	leases map[[6]byte]netip.Addr
}

func newDHCPServer(prefix netip.Prefix, server, dns, start netip.Addr, poolSize int, lease time.Duration, serverMAC [6]byte) *dhcpServer {
	bits := prefix.Bits()
	var m [4]byte
	binary.BigEndian.PutUint32(m[:], ^uint32(0)<<(32-bits))
	return &dhcpServer{
		server: server, dns: dns, mask: netip.AddrFrom4(m), start: start,
		poolSize: poolSize, leaseTime: lease, serverMAC: serverMAC,
		leases: make(map[[6]byte]netip.Addr),
	}
}

// lease returns the address for mac, allocating one if needed.
func (s *dhcpServer) lease(mac [6]byte) (netip.Addr, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if a, ok := s.leases[mac]; ok {
		return a, true
	}
	used := make(map[netip.Addr]bool, len(s.leases))
	for _, a := range s.leases {
		used[a] = true
	}
	a := s.start
	for range s.poolSize {
		if !used[a] {
			s.leases[mac] = a
			return a, true
		}
		a = a.Next()
	}
	return netip.Addr{}, false
}

func (s *dhcpServer) leased(mac [6]byte) (netip.Addr, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	a, ok := s.leases[mac]
	return a, ok
}

func (s *dhcpServer) release(mac [6]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.leases, mac)
}

// handle processes one client message and returns the reply frame, or nil
// when there is nothing to answer.
func (s *dhcpServer) handle(pkt udpPacket) []byte {
	req, err := parseDHCP(pkt.payload)
	if err != nil || req.op != bootRequest || req.htype != 1 || req.hlen != 6 {
		return nil
	}
	mac := [6]byte(req.chaddr[:6])
	reply := &dhcpMessage{
		op: bootReply, htype: 1, hlen: 6, xid: req.xid, flags: req.flags,
		giaddr: req.giaddr, chaddr: req.chaddr, siaddr: s.server,
	}
	var typ uint8
	switch req.messageType() {
	case dhcpDiscover:
		a, ok := s.lease(mac)
		if !ok {
			return nil // pool exhausted: stay silent like a busy server
		}
		typ, reply.yiaddr = dhcpOffer, a
	case dhcpRequest:
		if id, ok := req.optionAddr(optServerID); ok && id != s.server {
			s.release(mac) // the client chose another server
			return nil
		}
		want, ok := req.optionAddr(optRequestedIP)
		if !ok {
			want = req.ciaddr // renewing
		}
		a, ok := s.lease(mac)
		if !ok || want != a {
			typ = dhcpNak
			break
		}
		typ, reply.yiaddr = dhcpAck, a
	case dhcpInform:
		typ, reply.ciaddr = dhcpAck, req.ciaddr
	case dhcpRelease, dhcpDecline:
		s.release(mac)
		return nil
	default:
		return nil
	}
	reply.options = append(reply.options, dhcpOption{code: optMessageType, data: []byte{typ}}, addrOpt(optServerID, s.server))
	if typ != dhcpNak {
		secs := uint32(s.leaseTime / time.Second)
		reply.options = append(reply.options,
			addrOpt(optSubnetMask, s.mask),
			addrOpt(optRouter, s.server),
			addrOpt(optDNS, s.dns))
		if typ != dhcpAck || req.messageType() != dhcpInform {
			reply.options = append(reply.options,
				u32Opt(optLeaseTime, secs),
				u32Opt(optRenewalTime, secs/2),
				u32Opt(optRebindTime, secs/8*7))
		}
	}
	payload, err := reply.marshal()
	if err != nil {
		return nil
	}
	out := udpPacket{
		srcMAC: s.serverMAC, dstMAC: mac,
		srcIP: s.server, dstIP: reply.yiaddr,
		srcPort: dhcpServerPort, dstPort: dhcpClientPort,
		payload: payload,
	}
	switch {
	case typ == dhcpNak || req.flags&dhcpFlagBcast != 0 || !reply.yiaddr.IsValid() || reply.yiaddr.IsUnspecified():
		out.dstMAC = [6]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
		out.dstIP = netip.AddrFrom4([4]byte{255, 255, 255, 255})
		if req.messageType() == dhcpInform && req.ciaddr.IsValid() && !req.ciaddr.IsUnspecified() {
			out.dstMAC, out.dstIP = mac, req.ciaddr
		}
	}
	return buildUDPFrame(out)
}
