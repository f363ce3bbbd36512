package netback

import (
	"encoding/binary"
	"net/netip"
)

// Ethernet and IP constants used by the frame helpers.
const (
	etherTypeIPv4 = 0x0800
	etherTypeARP  = 0x0806
	ipProtoICMP   = 1
	ipProtoUDP    = 17
	ipv4HeaderLen = 20
	udpHeaderLen  = 8
)

// udpPacket is a parsed IPv4/UDP frame. Slices alias the frame.
type udpPacket struct {
	srcMAC, dstMAC [6]byte
	srcIP, dstIP   netip.Addr
	srcPort        uint16
	dstPort        uint16
	payload        []byte
}

// parseUDPFrame decodes an untagged Ethernet/IPv4/UDP frame. It returns false
// for anything else, including fragments and malformed lengths.
func parseUDPFrame(frame []byte) (udpPacket, bool) {
	var p udpPacket
	if len(frame) < EthernetHeaderLen+ipv4HeaderLen+udpHeaderLen {
		return p, false
	}
	if binary.BigEndian.Uint16(frame[12:14]) != etherTypeIPv4 {
		return p, false
	}
	copy(p.dstMAC[:], frame[0:6])
	copy(p.srcMAC[:], frame[6:12])
	ip := frame[EthernetHeaderLen:]
	if ip[0]>>4 != 4 {
		return p, false
	}
	ihl := int(ip[0]&0xf) * 4
	total := int(binary.BigEndian.Uint16(ip[2:4]))
	if ihl < ipv4HeaderLen || total < ihl+udpHeaderLen || total > len(ip) {
		return p, false
	}
	if ip[9] != ipProtoUDP {
		return p, false
	}
	if fo := binary.BigEndian.Uint16(ip[6:8]); fo&0x3fff != 0 { // MF flag or offset
		return p, false
	}
	p.srcIP = netip.AddrFrom4([4]byte(ip[12:16]))
	p.dstIP = netip.AddrFrom4([4]byte(ip[16:20]))
	udp := ip[ihl:total]
	ulen := int(binary.BigEndian.Uint16(udp[4:6]))
	if ulen < udpHeaderLen || ulen > len(udp) {
		return p, false
	}
	p.srcPort = binary.BigEndian.Uint16(udp[0:2])
	p.dstPort = binary.BigEndian.Uint16(udp[2:4])
	p.payload = udp[udpHeaderLen:ulen]
	return p, true
}

// buildUDPFrame returns an Ethernet/IPv4/UDP frame with valid checksums.
func buildUDPFrame(p udpPacket) []byte {
	ulen := udpHeaderLen + len(p.payload)
	total := ipv4HeaderLen + ulen
	f := make([]byte, EthernetHeaderLen+total)
	copy(f[0:6], p.dstMAC[:])
	copy(f[6:12], p.srcMAC[:])
	binary.BigEndian.PutUint16(f[12:14], etherTypeIPv4)
	ip := f[EthernetHeaderLen:]
	src, dst := p.srcIP.As4(), p.dstIP.As4()
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:4], uint16(total))
	ip[8] = 64 // TTL
	ip[9] = ipProtoUDP
	copy(ip[12:16], src[:])
	copy(ip[16:20], dst[:])
	binary.BigEndian.PutUint16(ip[10:12], inetChecksum(ip[:ipv4HeaderLen], 0))
	udp := ip[ipv4HeaderLen:]
	binary.BigEndian.PutUint16(udp[0:2], p.srcPort)
	binary.BigEndian.PutUint16(udp[2:4], p.dstPort)
	binary.BigEndian.PutUint16(udp[4:6], uint16(ulen))
	copy(udp[udpHeaderLen:], p.payload)
	cs := inetChecksum(udp, pseudoHeaderSum(src, dst, ipProtoUDP, ulen))
	if cs == 0 {
		cs = 0xffff
	}
	binary.BigEndian.PutUint16(udp[6:8], cs)
	return f
}
