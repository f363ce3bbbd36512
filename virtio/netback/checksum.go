package netback

import "encoding/binary"

// inetChecksum returns the Internet checksum (RFC 1071) of b, folded and
// complemented, continuing from the partial sum initial.
func inetChecksum(b []byte, initial uint32) uint16 {
	sum := initial
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// pseudoHeaderSum returns the partial sum of the IPv4 pseudo-header used by
// UDP and TCP checksums.
func pseudoHeaderSum(src, dst [4]byte, proto uint8, length int) uint32 {
	sum := uint32(binary.BigEndian.Uint16(src[0:2])) + uint32(binary.BigEndian.Uint16(src[2:4]))
	sum += uint32(binary.BigEndian.Uint16(dst[0:2])) + uint32(binary.BigEndian.Uint16(dst[2:4]))
	return sum + uint32(proto) + uint32(length)
}
