package netback

import (
	"encoding/binary"
	"fmt"
	"net"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestAnnounce(t *testing.T) {
	mac := net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	f, err := Announce(mac)
	require.NoError(t, err)
	require.Len(t, f, 60)
	assert.Equal(t, net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, net.HardwareAddr(f[0:6]), "broadcast destination")
	assert.Equal(t, mac, net.HardwareAddr(f[6:12]), "source MAC")
	assert.Equal(t, uint16(0x8035), binary.BigEndian.Uint16(f[12:14]))
	assert.Equal(t, uint16(1), binary.BigEndian.Uint16(f[14:16]), "htype")
	assert.Equal(t, uint16(0x0800), binary.BigEndian.Uint16(f[16:18]), "ptype")
	assert.Equal(t, []byte{6, 4}, f[18:20])
	assert.Equal(t, uint16(3), binary.BigEndian.Uint16(f[20:22]), "reverse request")
	assert.Equal(t, mac, net.HardwareAddr(f[22:28]), "sender hw")
	assert.Equal(t, []byte{0, 0, 0, 0}, f[28:32])
	assert.Equal(t, mac, net.HardwareAddr(f[32:38]), "target hw")
	assert.Equal(t, make([]byte, 60-38), f[38:], "zero padding")
}

func TestAnnounceBadMAC(t *testing.T) {
	for _, mac := range []net.HardwareAddr{nil, {1, 2, 3}, make(net.HardwareAddr, 8)} {
		_, err := Announce(mac)
		assert.Error(t, err, "mac %v", mac)
	}
}

func ExampleAnnounce() {
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	f, _ := Announce(mac)
	fmt.Printf("%d bytes, ethertype %#04x\n", len(f), binary.BigEndian.Uint16(f[12:14]))
	// Output: 60 bytes, ethertype 0x8035
}
