package netback

import (
	"encoding/binary"
	"fmt"
	"net"
)

// EtherTypeRARP is the Ethernet type of Reverse ARP frames.
const EtherTypeRARP = 0x8035

// announceLen is the minimum Ethernet frame length without FCS; the RARP
// payload is padded up to it.
const announceLen = 60

// Announce builds a broadcast RARP "reverse request" frame with mac as both
// sender and target hardware address. Sent by a guest NIC after live
// migration, it makes switches on the new host learn where mac lives now.
func Announce(mac net.HardwareAddr) ([]byte, error) {
	if len(mac) != 6 {
		return nil, fmt.Errorf("netback: announce: MAC %q is %d bytes, want 6", mac, len(mac))
	}
	f := make([]byte, announceLen)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	binary.BigEndian.PutUint16(f[12:14], EtherTypeRARP)
	p := f[14:]
	binary.BigEndian.PutUint16(p[0:2], 1)      // hardware type: Ethernet
	binary.BigEndian.PutUint16(p[2:4], 0x0800) // protocol type: IPv4
	p[4] = 6                                   // hardware address length
	p[5] = 4                                   // protocol address length
	binary.BigEndian.PutUint16(p[6:8], 3)      // opcode: reverse request
	copy(p[8:14], mac)                         // sender hardware address
	// sender protocol address p[14:18] stays 0.0.0.0
	copy(p[18:24], mac) // target hardware address
	// target protocol address p[24:28] stays 0.0.0.0
	return f, nil
}
