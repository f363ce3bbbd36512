// Package netback provides network back ends for a virtio-net device: each
// back end moves raw Ethernet frames between a guest NIC and some network
// (a host TAP device, or a user-mode gVisor netstack with NAT and DHCP).
package netback

import (
	"context"
	"errors"
	"fmt"
)

// Backend moves Ethernet frames between a guest NIC and a network.
type Backend interface {
	// WriteFrame sends one Ethernet frame (no virtio header) from the guest.
	WriteFrame(frame []byte) error
	// ReadFrame blocks until a frame for the guest arrives or ctx ends; copies it into buf; returns its length.
	ReadFrame(ctx context.Context, buf []byte) (int, error)
	Close() error
}

// Frame size limits shared by the back ends.
const (
	// EthernetHeaderLen is the length of an untagged Ethernet header.
	EthernetHeaderLen = 14
	// MaxFrameLen is the largest frame a back end accepts: a 64 KiB IP packet
	// plus an Ethernet header and a VLAN tag.
	MaxFrameLen = 65535 + EthernetHeaderLen + 4
)

// ErrClosed is returned by every Backend method after Close.
var ErrClosed = errors.New("netback: backend closed")

// ErrTruncated is returned (wrapped) by ReadFrame when the caller's buffer is
// shorter than the frame; the first len(buf) bytes were copied.
var ErrTruncated = errors.New("netback: frame truncated to fit buffer")

// FrameError describes a frame that a back end refused.
type FrameError struct {
	Len    int    // length of the refused frame
	Reason string // what was wrong with it
}

func (e *FrameError) Error() string {
	return fmt.Sprintf("netback: bad frame of %d bytes: %s", e.Len, e.Reason)
}

// checkFrame validates the length of a frame coming from the guest.
func checkFrame(frame []byte) error {
	switch {
	case len(frame) < EthernetHeaderLen:
		return &FrameError{Len: len(frame), Reason: "shorter than an Ethernet header"}
	case len(frame) > MaxFrameLen:
		return &FrameError{Len: len(frame), Reason: fmt.Sprintf("longer than %d bytes", MaxFrameLen)}
	}
	return nil
}

// copyOut copies frame into buf and reports truncation.
func copyOut(buf, frame []byte) (int, error) {
	n := copy(buf, frame)
	if n < len(frame) {
		return n, fmt.Errorf("%w: frame of %d bytes, buffer of %d", ErrTruncated, len(frame), len(buf))
	}
	return n, nil
}
