package netback

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TapOptions configures a TAP back end.
type TapOptions struct {
	// Name is the interface name (at most 15 bytes). An existing TAP device
	// of that name is attached to; otherwise one is created. Empty lets the
	// kernel pick a tapN name.
	Name string
	// MTU sets the interface MTU when positive.
	MTU int
	// Bridge, when set, makes the TAP a port of this existing bridge.
	Bridge string
	// Address, when set, is assigned to the interface ("10.0.0.1/24").
	Address string
	// NoUp leaves the interface down (by default it is brought up).
	NoUp bool
	// NetNSPath, when set, creates and configures the TAP inside the network
	// namespace at this path (e.g. /var/run/netns/x or /proc/PID/ns/net).
	NetNSPath string
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// TapError reports a failed step while setting up a TAP device.
type TapError struct {
	Name string // interface name
	Op   string // what failed
	Err  error
}

func (e *TapError) Error() string {
	return fmt.Sprintf("netback: tap %q: %s: %v", e.Name, e.Op, e.Err)
}

func (e *TapError) Unwrap() error { return e.Err }

// Tap is a Backend on a Linux TAP device (/dev/net/tun with IFF_TAP|IFF_NO_PI,
// no virtio-net header). Frames are read through Go's netpoller, so ReadFrame
// honours ctx without a dedicated thread.
type Tap struct {
	name   string
	nsPath string
	file   *os.File
	log    *slog.Logger

	closed atomic.Bool

	readMu  sync.Mutex // serialises readers: the deadline is per file
	scratch []byte     // guarded by readMu; detects truncation for short buffers
}

var _ Backend = (*Tap)(nil)

// OpenTap creates (or attaches to) and configures a TAP device.
func OpenTap(opts TapOptions) (*Tap, error) {
	if len(opts.Name) >= unix.IFNAMSIZ {
		return nil, &TapError{Name: opts.Name, Op: "check name", Err: fmt.Errorf("longer than %d bytes", unix.IFNAMSIZ-1)}
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	var (
		fd   int
		name string
		nlh  *netlink.Handle
	)
	err := inNetNS(opts.NetNSPath, func() error {
		var err error
		fd, name, err = openTunFd(opts.Name)
		if err != nil {
			return err
		}
		nlh, err = netlink.NewHandle()
		if err != nil {
			unix.Close(fd)
			return &TapError{Name: name, Op: "open netlink", Err: err}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	defer nlh.Close()
	// os.NewFile sees O_NONBLOCK and registers the fd with the netpoller.
	t := &Tap{name: name, nsPath: opts.NetNSPath, file: os.NewFile(uintptr(fd), "/dev/net/tun:"+name), log: log}
	if err := t.configure(nlh, opts); err != nil {
		t.file.Close()
		return nil, err
	}
	log.Debug("netback: tap ready", "name", name, "netns", opts.NetNSPath)
	return t, nil
}

// inNetNS runs fn on a locked OS thread switched into the namespace at
// path (or the current one when path is empty). A thread whose namespace
// could not be restored is left locked so the runtime discards it.
func inNetNS(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- &TapError{Op: "get current netns", Err: err}
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- &TapError{Op: "open netns " + path, Err: err}
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- &TapError{Op: "enter netns " + path, Err: err}
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, &TapError{Op: "restore netns", Err: err})
			return // thread stays locked and dies with the goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

func openTunFd(name string) (int, string, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, name, &TapError{Name: name, Op: "open /dev/net/tun", Err: err}
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, name, &TapError{Name: name, Op: "build ifreq", Err: err}
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, name, &TapError{Name: name, Op: "TUNSETIFF", Err: err}
	}
	return fd, ifr.Name(), nil
}

func (t *Tap) configure(h *netlink.Handle, opts TapOptions) error {
	link, err := h.LinkByName(t.name)
	if err != nil {
		return &TapError{Name: t.name, Op: "find link", Err: err}
	}
	if opts.MTU > 0 {
		if err := h.LinkSetMTU(link, opts.MTU); err != nil {
			return &TapError{Name: t.name, Op: fmt.Sprintf("set MTU %d", opts.MTU), Err: err}
		}
	}
	if opts.Bridge != "" {
		br, err := h.LinkByName(opts.Bridge)
		if err != nil {
			return &TapError{Name: t.name, Op: "find bridge " + opts.Bridge, Err: err}
		}
		if err := h.LinkSetMaster(link, br); err != nil {
			return &TapError{Name: t.name, Op: "attach to bridge " + opts.Bridge, Err: err}
		}
	}
	if opts.Address != "" {
		addr, err := netlink.ParseAddr(opts.Address)
		if err != nil {
			return &TapError{Name: t.name, Op: "parse address " + opts.Address, Err: err}
		}
		if err := h.AddrReplace(link, addr); err != nil {
			return &TapError{Name: t.name, Op: "add address " + opts.Address, Err: err}
		}
	}
	if !opts.NoUp {
		if err := h.LinkSetUp(link); err != nil {
			return &TapError{Name: t.name, Op: "bring up", Err: err}
		}
	}
	return nil
}

// Name returns the interface name chosen by the kernel.
func (t *Tap) Name() string { return t.name }

// WriteFrame hands one Ethernet frame to the host kernel as if received on
// the TAP interface.
func (t *Tap) WriteFrame(frame []byte) error {
	if t.closed.Load() {
		return ErrClosed
	}
	if err := checkFrame(frame); err != nil {
		return err
	}
	_, err := t.file.Write(frame)
	if t.closed.Load() {
		return ErrClosed
	}
	if err != nil {
		return &TapError{Name: t.name, Op: "write", Err: err}
	}
	return nil
}

// ReadFrame blocks until the host kernel transmits a frame on the TAP
// interface or ctx ends.
func (t *Tap) ReadFrame(ctx context.Context, buf []byte) (int, error) {
	if t.closed.Load() {
		return 0, ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	t.readMu.Lock()
	defer t.readMu.Unlock()
	dl, _ := ctx.Deadline()
	if err := t.file.SetReadDeadline(dl); err != nil {
		if t.closed.Load() {
			return 0, ErrClosed
		}
		return 0, &TapError{Name: t.name, Op: "set read deadline", Err: err}
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		_ = t.file.SetReadDeadline(time.Unix(1, 0))
	})
	n, err := t.read(buf)
	if !stop() {
		<-fired // never leave a late deadline for the next reader
	}
	if err != nil && !errors.Is(err, ErrTruncated) {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// Only ctx sets deadlines; the poller may fire a hair before
			// ctx's own timer marks it done.
			if cerr := ctx.Err(); cerr != nil {
				return 0, cerr
			}
			return 0, context.DeadlineExceeded
		}
		if t.closed.Load() {
			return 0, ErrClosed
		}
		return 0, &TapError{Name: t.name, Op: "read", Err: err}
	}
	return n, err
}

// read reads one frame; a frame longer than buf is reported as truncated.
func (t *Tap) read(buf []byte) (int, error) {
	if len(buf) >= MaxFrameLen {
		return t.file.Read(buf)
	}
	// The kernel silently truncates; read into scratch space to detect it.
	if t.scratch == nil {
		t.scratch = make([]byte, MaxFrameLen)
	}
	n, err := t.file.Read(t.scratch)
	if err != nil {
		return 0, err
	}
	return copyOut(buf, t.scratch[:n])
}

// Close closes the TAP file descriptor. A non-persistent TAP created by
// OpenTap disappears from the host with it.
func (t *Tap) Close() error {
	if t.closed.Swap(true) {
		return nil
	}
	err := t.file.Close()
	if errors.Is(err, os.ErrClosed) {
		return nil
	}
	return err
}

// HardwareAddr returns the MAC address of the host side of the TAP; a guest
// NIC should use a different one.
func (t *Tap) HardwareAddr() (net.HardwareAddr, error) {
	var mac net.HardwareAddr
	err := inNetNS(t.nsPath, func() error {
		ifc, err := net.InterfaceByName(t.name)
		if err != nil {
			return &TapError{Name: t.name, Op: "look up interface", Err: err}
		}
		mac = ifc.HardwareAddr
		return nil
	})
	return mac, err
}
