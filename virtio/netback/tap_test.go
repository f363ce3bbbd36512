package netback

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// newTestNetNS creates a fresh, empty network namespace and returns a path
// that names it while the test runs. All TAP traffic stays inside it.
func newTestNetNS(t *testing.T) (string, *netlink.Handle) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces and TAP devices")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
	type result struct {
		ns  netns.NsHandle
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer orig.Close()
		ns, err := netns.New()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		if err := netns.Set(orig); err != nil {
			ch <- result{err: err} // thread stays locked and is discarded
			return
		}
		runtime.UnlockOSThread()
		ch <- result{ns: ns}
	}()
	r := <-ch
	if r.err != nil {
		t.Skipf("cannot create a network namespace: %v", r.err)
	}
	h, err := netlink.NewHandleAt(r.ns)
	require.NoError(t, err)
	t.Cleanup(func() {
		h.Close()
		r.ns.Close()
	})
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(r.ns)), h
}

var guestMAC = [6]byte{0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc}

func arpRequest(srcMAC [6]byte, srcIP, targetIP netip.Addr) []byte {
	f := make([]byte, 42)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], srcMAC[:])
	binary.BigEndian.PutUint16(f[12:14], etherTypeARP)
	a := f[14:]
	binary.BigEndian.PutUint16(a[0:2], 1)
	binary.BigEndian.PutUint16(a[2:4], etherTypeIPv4)
	a[4], a[5] = 6, 4
	binary.BigEndian.PutUint16(a[6:8], 1) // request
	copy(a[8:14], srcMAC[:])
	s, d := srcIP.As4(), targetIP.As4()
	copy(a[14:18], s[:])
	copy(a[24:28], d[:])
	return f
}

func icmpEcho(srcMAC, dstMAC [6]byte, src, dst netip.Addr, id, seq uint16) []byte {
	payload := []byte("kvmkit-ping")
	total := ipv4HeaderLen + 8 + len(payload)
	f := make([]byte, EthernetHeaderLen+total)
	copy(f[0:6], dstMAC[:])
	copy(f[6:12], srcMAC[:])
	binary.BigEndian.PutUint16(f[12:14], etherTypeIPv4)
	ip := f[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:4], uint16(total))
	ip[8] = 64
	ip[9] = ipProtoICMP
	s, d := src.As4(), dst.As4()
	copy(ip[12:16], s[:])
	copy(ip[16:20], d[:])
	binary.BigEndian.PutUint16(ip[10:12], inetChecksum(ip[:20], 0))
	ic := ip[20:]
	ic[0] = 8 // echo request
	binary.BigEndian.PutUint16(ic[4:6], id)
	binary.BigEndian.PutUint16(ic[6:8], seq)
	copy(ic[8:], payload)
	binary.BigEndian.PutUint16(ic[2:4], inetChecksum(ic, 0))
	return f
}

// readUntil reads frames from b until match accepts one, for at most 200
// frames or 5 seconds.
func readUntil(t testing.TB, b Backend, match func([]byte) bool) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	buf := make([]byte, MaxFrameLen)
	for range 200 {
		n, err := b.ReadFrame(ctx, buf)
		require.NoError(t, err)
		if match(buf[:n]) {
			return append([]byte(nil), buf[:n]...)
		}
	}
	t.Fatal("no matching frame in 200 frames")
	return nil
}

func TestTapARPAndPing(t *testing.T) {
	nsPath, h := newTestNetNS(t)
	host := netip.MustParseAddr("10.99.0.1")
	guest := netip.MustParseAddr("10.99.0.2")
	tap, err := OpenTap(TapOptions{Name: "kvmtap0", MTU: 1400, Address: "10.99.0.1/24", NetNSPath: nsPath})
	require.NoError(t, err)
	defer tap.Close()
	assert.Equal(t, "kvmtap0", tap.Name())

	link, err := h.LinkByName("kvmtap0")
	require.NoError(t, err)
	assert.Equal(t, 1400, link.Attrs().MTU)
	hostMACSlice, err := tap.HardwareAddr()
	require.NoError(t, err)
	hostMAC := [6]byte(hostMACSlice)

	require.NoError(t, tap.WriteFrame(arpRequest(guestMAC, guest, host)))
	reply := readUntil(t, tap, func(f []byte) bool {
		return len(f) >= 42 && binary.BigEndian.Uint16(f[12:14]) == etherTypeARP &&
			binary.BigEndian.Uint16(f[20:22]) == 2 && netip.AddrFrom4([4]byte(f[28:32])) == host
	})
	assert.Equal(t, guestMAC[:], reply[0:6], "reply addressed to the guest")
	assert.Equal(t, hostMAC[:], reply[22:28], "kernel answers with the TAP's MAC")

	require.NoError(t, tap.WriteFrame(icmpEcho(guestMAC, hostMAC, guest, host, 0x1234, 1)))
	echo := readUntil(t, tap, func(f []byte) bool {
		return len(f) >= 42 && binary.BigEndian.Uint16(f[12:14]) == etherTypeIPv4 &&
			f[14+9] == ipProtoICMP && f[34] == 0 && binary.BigEndian.Uint16(f[38:40]) == 0x1234
	})
	assert.Equal(t, host.As4(), [4]byte(echo[26:30]), "reply from the host address")
	assert.Equal(t, uint16(1), binary.BigEndian.Uint16(echo[40:42]))

	require.NoError(t, tap.Close())
	_, err = h.LinkByName("kvmtap0")
	var nf netlink.LinkNotFoundError
	assert.ErrorAs(t, err, &nf, "non-persistent TAP disappears on Close")
	assert.ErrorIs(t, tap.WriteFrame(make([]byte, 60)), ErrClosed)
	_, err = tap.ReadFrame(context.Background(), make([]byte, 100))
	assert.ErrorIs(t, err, ErrClosed)
}

func TestTapReadHonoursContext(t *testing.T) {
	nsPath, _ := newTestNetNS(t)
	// Down: the kernel sends nothing, so only ctx can end the read.
	tap, err := OpenTap(TapOptions{Name: "kvmtapctx", NoUp: true, NetNSPath: nsPath})
	require.NoError(t, err)
	defer tap.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = tap.ReadFrame(ctx, make([]byte, 2048))
	require.ErrorIs(t, err, context.DeadlineExceeded)

	ctx2, cancel2 := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := tap.ReadFrame(ctx2, make([]byte, 2048))
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	cancel2()
	select {
	case err := <-done:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(5 * time.Second):
		t.Fatal("ReadFrame ignored cancellation")
	}

	// Close wakes a blocked reader too.
	go func() {
		_, err := tap.ReadFrame(context.Background(), make([]byte, 2048))
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	require.NoError(t, tap.Close())
	select {
	case err := <-done:
		require.ErrorIs(t, err, ErrClosed)
	case <-time.After(5 * time.Second):
		t.Fatal("ReadFrame not woken by Close")
	}
}

func TestTapBridgeAndAttach(t *testing.T) {
	nsPath, h := newTestNetNS(t)
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "kvmbr0"}}
	require.NoError(t, h.LinkAdd(br))
	brLink, err := h.LinkByName("kvmbr0")
	require.NoError(t, err)

	// A persistent TAP made beforehand is attached to, not recreated.
	// (netlink's Tuntap LinkAdd opens /dev/net/tun in the caller's namespace,
	// so the device is made here by hand inside the test namespace.)
	require.NoError(t, inNetNS(nsPath, func() error {
		fd, _, err := openTunFd("kvmtap1")
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1)
	}))
	pre, err := h.LinkByName("kvmtap1")
	require.NoError(t, err)
	t.Cleanup(func() { _ = h.LinkDel(pre) })
	tap, err := OpenTap(TapOptions{Name: "kvmtap1", Bridge: "kvmbr0", NetNSPath: nsPath})
	require.NoError(t, err)
	link, err := h.LinkByName("kvmtap1")
	require.NoError(t, err)
	assert.Equal(t, brLink.Attrs().Index, link.Attrs().MasterIndex)
	assert.Equal(t, pre.Attrs().Index, link.Attrs().Index, "same device")
	require.NoError(t, tap.Close())
	require.NoError(t, h.LinkDel(link))
	require.NoError(t, h.LinkDel(brLink))
}

func TestTapErrors(t *testing.T) {
	_, err := OpenTap(TapOptions{Name: "a-name-that-is-too-long"})
	var te *TapError
	require.ErrorAs(t, err, &te)
	assert.Contains(t, te.Error(), "longer than")

	nsPath, _ := newTestNetNS(t)
	_, err = OpenTap(TapOptions{Name: "kvmtap2", Bridge: "nosuchbr", NetNSPath: nsPath})
	require.ErrorAs(t, err, &te)
	assert.Contains(t, te.Op, "nosuchbr")
	_, err = OpenTap(TapOptions{Name: "kvmtap3", Address: "not-an-ip", NetNSPath: nsPath})
	require.ErrorAs(t, err, &te)
	_, err = OpenTap(TapOptions{NetNSPath: "/nonexistent/ns"})
	require.ErrorAs(t, err, &te)
	assert.True(t, errors.Is(err, os.ErrNotExist) || err != nil)

	tap, err := OpenTap(TapOptions{NetNSPath: nsPath, NoUp: true})
	require.NoError(t, err)
	defer tap.Close()
	assert.NotEmpty(t, tap.Name(), "kernel picks a name")
	var fe *FrameError
	require.ErrorAs(t, tap.WriteFrame(make([]byte, 10)), &fe)
	_, err = net.ParseMAC("00:00:00:00:00:00")
	require.NoError(t, err)
}
