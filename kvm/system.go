package kvm

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DefaultDevice is the usual path of the KVM device.
const DefaultDevice = "/dev/kvm"

// APIVersion is the only KVM API version kvmkit speaks.
const APIVersion = 12

// System is an open /dev/kvm: the handle for system-wide queries and for
// creating VMs.
type System struct {
	fd       int
	mmapSize int

	msrOnce sync.Once
	msrs    []uint32
	msrErr  error
}

// Open opens the KVM device at path (DefaultDevice when empty) and checks
// the API version.
func Open(path string) (*System, error) {
	if path == "" {
		path = DefaultDevice
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO) {
			return nil, fmt.Errorf("open %s: %w: %v", path, ErrNoKVM, err)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	s := &System{fd: fd}
	v, err := s.APIVersion()
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	if v != APIVersion {
		unix.Close(fd)
		return nil, fmt.Errorf("KVM API version %d, want %d", v, APIVersion)
	}
	n, err := ioctlVal(fd, kvmGetVCPUMmapSize, 0, "KVM_GET_VCPU_MMAP_SIZE")
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	s.mmapSize = int(n)
	return s, nil
}

// Available reports whether the KVM device at DefaultDevice can be opened,
// and if not, why (a one-line reason suitable for t.Skip).
func Available() (bool, string) {
	s, err := Open("")
	if err != nil {
		return false, err.Error()
	}
	s.Close()
	return true, ""
}

// FD returns the file descriptor of /dev/kvm.
func (s *System) FD() int { return s.fd }

// Close closes /dev/kvm. VMs created from it stay valid.
func (s *System) Close() error {
	return closeFD(&s.fd)
}

// APIVersion issues KVM_GET_API_VERSION.
func (s *System) APIVersion() (int, error) {
	r, err := ioctlVal(s.fd, kvmGetAPIVersion, 0, "KVM_GET_API_VERSION")
	return int(r), err
}

// CheckExtension issues KVM_CHECK_EXTENSION: 0 means unsupported, a
// positive value is capability-specific.
func (s *System) CheckExtension(c Cap) (int, error) {
	r, err := ioctlVal(s.fd, kvmCheckExtension, uintptr(c), "KVM_CHECK_EXTENSION")
	return int(r), err
}

// VCPUMmapSize is the size of a vCPU's kvm_run mapping.
func (s *System) VCPUMmapSize() int { return s.mmapSize }

// maxCPUIDEntries bounds the supported-CPUID buffer.
const maxCPUIDEntries = 256

// SupportedCPUID issues KVM_GET_SUPPORTED_CPUID.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	return getCPUID(s.fd, kvmGetSupportedCPUID, "KVM_GET_SUPPORTED_CPUID")
}

func getCPUID(fd int, req uintptr, op string) ([]CPUIDEntry, error) {
	type cpuid2 struct {
		Nent    uint32
		_       uint32
		Entries [maxCPUIDEntries]CPUIDEntry
	}
	var c cpuid2
	c.Nent = maxCPUIDEntries
	if _, err := ioctlRetry(fd, req, unsafe.Pointer(&c), op); err != nil {
		return nil, err
	}
	n := min(int(c.Nent), maxCPUIDEntries)
	out := make([]CPUIDEntry, n)
	copy(out, c.Entries[:n])
	return out, nil
}

// maxMSRIndices bounds the MSR index list.
const maxMSRIndices = 1024

// MSRIndexList issues KVM_GET_MSR_INDEX_LIST.
func (s *System) MSRIndexList() ([]uint32, error) {
	return getMSRList(s.fd, kvmGetMSRIndexList, "KVM_GET_MSR_INDEX_LIST")
}

// MSRFeatureIndexList issues KVM_GET_MSR_FEATURE_INDEX_LIST.
func (s *System) MSRFeatureIndexList() ([]uint32, error) {
	return getMSRList(s.fd, kvmGetMSRFeatureList, "KVM_GET_MSR_FEATURE_INDEX_LIST")
}

func getMSRList(fd int, req uintptr, op string) ([]uint32, error) {
	type msrList struct {
		N       uint32
		Indices [maxMSRIndices]uint32
	}
	var l msrList
	l.N = maxMSRIndices
	if _, err := ioctlRetry(fd, req, unsafe.Pointer(&l), op); err != nil {
		return nil, err
	}
	n := min(int(l.N), maxMSRIndices)
	out := make([]uint32, n)
	copy(out, l.Indices[:n])
	return out, nil
}

// cachedMSRIndexList returns the MSR index list, fetched once.
func (s *System) cachedMSRIndexList() ([]uint32, error) {
	s.msrOnce.Do(func() { s.msrs, s.msrErr = s.MSRIndexList() })
	return s.msrs, s.msrErr
}

// VMOptions configure CreateVM.
type VMOptions struct {
	// Type is the machine type argument of KVM_CREATE_VM (0 on x86).
	Type uintptr
}

// CreateVM issues KVM_CREATE_VM.
func (s *System) CreateVM(opts VMOptions) (*VM, error) {
	r, err := ioctlValRetry(s.fd, kvmCreateVM, opts.Type, "KVM_CREATE_VM")
	if err != nil {
		return nil, err
	}
	vm := &VM{fd: int(r), sys: s, slots: map[uint32]*memSlot{}}
	return vm, nil
}
