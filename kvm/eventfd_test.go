package kvm_test

import (
	"encoding/binary"

	"golang.org/x/sys/unix"
)

func newEventFD() (int, error) { return unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK) }
func closeFD(fd int)           { unix.Close(fd) }
func readEventFD(fd int) (uint64, error) {
	var b [8]byte
	if _, err := unix.Read(fd, b[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}
