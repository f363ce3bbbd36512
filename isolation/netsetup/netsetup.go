// Package netsetup prepares a VM's network plumbing with netlink: tap
// devices, bridges and veth pairs, moving links into a jailed VMM's
// network namespace, bringing them up, and deleting them again.
package netsetup

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// LinkError reports a failed operation on a named link.
type LinkError struct {
	Op, Link string
	Err      error
}

func (e *LinkError) Error() string { return fmt.Sprintf("netsetup: %s %s: %v", e.Op, e.Link, e.Err) }

// Unwrap returns the underlying error.
func (e *LinkError) Unwrap() error { return e.Err }

// ErrNameTooLong is wrapped when an interface name exceeds 15 bytes.
var ErrNameTooLong = errors.New("interface name longer than 15 bytes")

func checkName(name string) error {
	if name == "" || len(name) > 15 {
		return &LinkError{Op: "name", Link: name, Err: ErrNameTooLong}
	}
	return nil
}

// CreateTap creates a persistent tap device (no packet info header, with
// a virtio-net header) owned by uid/gid, so that an unprivileged VMM can
// attach to it by name. Use uid/gid -1 (or 0) to leave it to root.
func CreateTap(name string, uid, gid int) error {
	if err := checkName(name); err != nil {
		return err
	}
	tap := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: name},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
	}
	// netlink only sets an owner/group when it is non-zero.
	if uid > 0 {
		tap.Owner = uint32(uid)
	}
	if gid > 0 {
		tap.Group = uint32(gid)
	}
	if err := netlink.LinkAdd(tap); err != nil {
		return &LinkError{Op: "create tap", Link: name, Err: err}
	}
	// netlink keeps the queue fds of a created tap open; they are not
	// needed for a persistent device.
	for _, f := range tap.Fds {
		f.Close()
	}
	return nil
}

// CreateBridge creates a bridge and brings it up.
func CreateBridge(name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
	if err := netlink.LinkAdd(br); err != nil {
		return &LinkError{Op: "create bridge", Link: name, Err: err}
	}
	return SetUp(name)
}

// CreateVeth creates a veth pair host <-> peer.
func CreateVeth(host, peer string) error {
	if err := checkName(host); err != nil {
		return err
	}
	if err := checkName(peer); err != nil {
		return err
	}
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: host}, PeerName: peer}
	if err := netlink.LinkAdd(v); err != nil {
		return &LinkError{Op: "create veth", Link: host, Err: err}
	}
	return nil
}

// AttachToBridge makes link a port of bridge.
func AttachToBridge(link, bridge string) error {
	l, err := netlink.LinkByName(link)
	if err != nil {
		return &LinkError{Op: "find", Link: link, Err: err}
	}
	br, err := netlink.LinkByName(bridge)
	if err != nil {
		return &LinkError{Op: "find", Link: bridge, Err: err}
	}
	if err := netlink.LinkSetMaster(l, br); err != nil {
		return &LinkError{Op: "attach to " + bridge, Link: link, Err: err}
	}
	return nil
}

// SetUp brings link up in the caller's network namespace.
func SetUp(link string) error {
	l, err := netlink.LinkByName(link)
	if err != nil {
		return &LinkError{Op: "find", Link: link, Err: err}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return &LinkError{Op: "set up", Link: link, Err: err}
	}
	return nil
}

// MoveToNetns moves link into the network namespace of process pid (the
// jailed VMM) and brings it, and that namespace's loopback, up there.
func MoveToNetns(link string, pid int) error {
	l, err := netlink.LinkByName(link)
	if err != nil {
		return &LinkError{Op: "find", Link: link, Err: err}
	}
	if err := netlink.LinkSetNsPid(l, pid); err != nil {
		return &LinkError{Op: fmt.Sprintf("move to netns of pid %d", pid), Link: link, Err: err}
	}
	h, err := handleFor(pid)
	if err != nil {
		return &LinkError{Op: "open netns", Link: link, Err: err}
	}
	defer h.Close()
	for _, name := range []string{"lo", link} {
		nl, err := h.LinkByName(name)
		if err != nil {
			return &LinkError{Op: fmt.Sprintf("find in netns of pid %d", pid), Link: name, Err: err}
		}
		if err := h.LinkSetUp(nl); err != nil {
			return &LinkError{Op: fmt.Sprintf("set up in netns of pid %d", pid), Link: name, Err: err}
		}
	}
	return nil
}

// LinksIn lists the link names in the network namespace of pid.
func LinksIn(pid int) ([]string, error) {
	h, err := handleFor(pid)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	ls, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("netsetup: list links of pid %d: %w", pid, err)
	}
	var out []string
	for _, l := range ls {
		out = append(out, l.Attrs().Name)
	}
	return out, nil
}

func handleFor(pid int) (*netlink.Handle, error) {
	ns, err := netns.GetFromPid(pid)
	if err != nil {
		return nil, fmt.Errorf("netsetup: netns of pid %d: %w", pid, err)
	}
	defer ns.Close()
	return netlink.NewHandleAt(ns)
}

// Exists reports whether link exists in the caller's network namespace.
func Exists(link string) bool {
	_, err := netlink.LinkByName(link)
	return err == nil
}

// Delete removes link from the caller's network namespace; a link that no
// longer exists is not an error.
func Delete(link string) error {
	l, err := netlink.LinkByName(link)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return &LinkError{Op: "find", Link: link, Err: err}
	}
	if err := netlink.LinkDel(l); err != nil {
		return &LinkError{Op: "delete", Link: link, Err: err}
	}
	return nil
}
