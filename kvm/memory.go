package kvm

import (
	"errors"
	"fmt"
	"sort"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PageSize is the guest page size used for dirty tracking and migration.
const PageSize = 4096

// ErrOutOfBounds is wrapped by every error returned for a guest-physical
// range that is not entirely backed by guest RAM.
var ErrOutOfBounds = errors.New("guest address out of bounds")

// AddressError reports a guest-physical range that is not backed by RAM.
type AddressError struct {
	GPA uint64 // first guest-physical address of the access
	Len uint64 // length of the access in bytes
}

func (e *AddressError) Error() string {
	return fmt.Sprintf("guest range [%#x, +%#x) is not guest RAM", e.GPA, e.Len)
}

// Unwrap makes errors.Is(err, ErrOutOfBounds) true.
func (e *AddressError) Unwrap() error { return ErrOutOfBounds }

// GuestMemory is the view of guest RAM that devices, loaders and migration
// use. Addresses are guest-physical; every access is bounds checked and an
// access outside RAM returns an error wrapping ErrOutOfBounds, never panics.
type GuestMemory interface {
	// ReadAt copies len(p) bytes starting at guest-physical address gpa.
	ReadAt(p []byte, gpa int64) (int, error)
	// WriteAt copies p into guest memory at guest-physical address gpa.
	WriteAt(p []byte, gpa int64) (int, error)
	// Slice returns the host view of [gpa, gpa+n). The range must lie in one
	// region. The slice aliases guest memory: writes are visible to the guest.
	Slice(gpa, n uint64) ([]byte, error)
}

// RegionSpec describes one guest RAM region to allocate.
type RegionSpec struct {
	GPA  uint64 // guest-physical base, page aligned
	Size uint64 // size in bytes, page aligned
}

// Region is one contiguous range of guest RAM backed by a host mapping.
type Region struct {
	GPA  uint64 // guest-physical base
	Host []byte // host mapping, len == size
	// FD is the memfd backing the region, or -1 for anonymous memory.
	FD int
}

// End returns the first guest-physical address past the region.
func (r *Region) End() uint64 { return r.GPA + uint64(len(r.Host)) }

// MemoryOptions control how guest RAM is allocated.
type MemoryOptions struct {
	// Memfd backs each region with a memfd so that it can be shared with
	// another process, saved, or mapped again; otherwise anonymous memory.
	Memfd bool
	// Name labels memfds (visible in /proc/PID/maps).
	Name string
}

// Memory owns the host mappings of a guest's RAM. It implements GuestMemory.
// Regions are sorted by guest-physical address and never overlap.
type Memory struct {
	regions []Region
}

var _ GuestMemory = (*Memory)(nil)

// NewMemory allocates guest RAM for the given regions.
func NewMemory(specs []RegionSpec, opts MemoryOptions) (*Memory, error) {
	m := &Memory{}
	for _, s := range specs {
		if s.Size == 0 || s.Size%PageSize != 0 || s.GPA%PageSize != 0 {
			m.Close()
			return nil, fmt.Errorf("memory region at %#x size %#x: not page aligned or empty", s.GPA, s.Size)
		}
		r := Region{GPA: s.GPA, FD: -1}
		var err error
		if opts.Memfd {
			name := opts.Name
			if name == "" {
				name = "kvmkit-guest-ram"
			}
			r.FD, err = unix.MemfdCreate(name, unix.MFD_CLOEXEC)
			if err != nil {
				m.Close()
				return nil, fmt.Errorf("memfd_create: %w", err)
			}
			if err = unix.Ftruncate(r.FD, int64(s.Size)); err != nil {
				unix.Close(r.FD)
				m.Close()
				return nil, fmt.Errorf("ftruncate memfd to %d: %w", s.Size, err)
			}
			r.Host, err = unix.Mmap(r.FD, 0, int(s.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		} else {
			r.Host, err = unix.Mmap(-1, 0, int(s.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		}
		if err != nil {
			if r.FD >= 0 {
				unix.Close(r.FD)
			}
			m.Close()
			return nil, fmt.Errorf("mmap guest memory (%d bytes): %w", s.Size, err)
		}
		if err := m.add(r); err != nil {
			unmapRegion(r)
			m.Close()
			return nil, err
		}
	}
	return m, nil
}

// NewMemoryFromRegions wraps existing host mappings (for example a snapshot
// file mapped privately). Memory takes ownership: Close unmaps them.
func NewMemoryFromRegions(regions []Region) (*Memory, error) {
	m := &Memory{}
	for _, r := range regions {
		if err := m.add(r); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *Memory) add(r Region) error {
	for i := range m.regions {
		o := &m.regions[i]
		if r.GPA < o.End() && o.GPA < r.End() {
			return fmt.Errorf("memory region [%#x,%#x) overlaps [%#x,%#x)", r.GPA, r.End(), o.GPA, o.End())
		}
	}
	m.regions = append(m.regions, r)
	sort.Slice(m.regions, func(i, j int) bool { return m.regions[i].GPA < m.regions[j].GPA })
	return nil
}

// SingleRegion allocates size bytes of RAM at guest-physical 0.
func SingleRegion(size uint64, opts MemoryOptions) (*Memory, error) {
	return NewMemory([]RegionSpec{{GPA: 0, Size: size}}, opts)
}

// Regions returns the regions, sorted by guest-physical address. The slice
// must not be modified.
func (m *Memory) Regions() []Region { return m.regions }

// Size returns the total RAM size in bytes.
func (m *Memory) Size() uint64 {
	var n uint64
	for i := range m.regions {
		n += uint64(len(m.regions[i].Host))
	}
	return n
}

// region returns the region holding gpa, or nil.
func (m *Memory) region(gpa uint64) *Region {
	// Few regions: a linear scan beats a binary search in practice.
	for i := range m.regions {
		r := &m.regions[i]
		if gpa >= r.GPA && gpa < r.End() {
			return r
		}
	}
	return nil
}

// Slice returns the host view of [gpa, gpa+n), which must lie in one region.
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	r := m.region(gpa)
	if r == nil || n > r.End()-gpa {
		return nil, &AddressError{GPA: gpa, Len: n}
	}
	off := gpa - r.GPA
	return r.Host[off : off+n : off+n], nil
}

// ReadAt implements GuestMemory. A range spanning adjacent regions is allowed.
func (m *Memory) ReadAt(p []byte, gpa int64) (int, error) {
	return m.copy(p, gpa, false)
}

// WriteAt implements GuestMemory. A range spanning adjacent regions is allowed.
func (m *Memory) WriteAt(p []byte, gpa int64) (int, error) {
	return m.copy(p, gpa, true)
}

func (m *Memory) copy(p []byte, gpa int64, write bool) (int, error) {
	if gpa < 0 {
		return 0, &AddressError{GPA: uint64(gpa), Len: uint64(len(p))}
	}
	addr := uint64(gpa)
	if addr+uint64(len(p)) < addr {
		return 0, &AddressError{GPA: addr, Len: uint64(len(p))}
	}
	done := 0
	for done < len(p) {
		r := m.region(addr)
		if r == nil {
			return done, &AddressError{GPA: uint64(gpa), Len: uint64(len(p))}
		}
		off := addr - r.GPA
		var n int
		if write {
			n = copy(r.Host[off:], p[done:])
		} else {
			n = copy(p[done:], r.Host[off:])
		}
		done += n
		addr += uint64(n)
	}
	return done, nil
}

// MoveFrom makes src's pages the contents of m without copying them: each
// of src's host mappings is moved (mremap) onto the host range of m's region
// with the same guest-physical address and size. m's host addresses do not
// change, so KVM memory slots registered on them see src's pages from then
// on (KVM follows changes to a slot's host mapping through its MMU
// notifiers). m's old pages and memfds are released, m takes over src's
// memfds, and src is left empty. The layouts must be equal; call it while
// no vCPU runs. kvm/machine uses it to run a snapshot's lazily mapped file
// in a VM built ahead of need.
//
// On an error naming a region after the first, the earlier regions have
// moved already: close both.
func (m *Memory) MoveFrom(src *Memory) error {
	if len(src.regions) != len(m.regions) {
		return fmt.Errorf("move memory: %d regions into %d", len(src.regions), len(m.regions))
	}
	for i := range m.regions {
		d, s := &m.regions[i], &src.regions[i]
		if d.GPA != s.GPA || len(d.Host) != len(s.Host) {
			return fmt.Errorf("move memory: region %d is [%#x,+%#x), the source's [%#x,+%#x)", i, d.GPA, len(d.Host), s.GPA, len(s.Host))
		}
	}
	for i := range m.regions {
		d, s := &m.regions[i], &src.regions[i]
		if len(d.Host) == 0 {
			continue
		}
		old := unsafe.Pointer(&s.Host[0])
		if _, err := unix.MremapPtr(old, uintptr(len(s.Host)), unsafe.Pointer(&d.Host[0]), uintptr(len(d.Host)),
			unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED); err != nil {
			return fmt.Errorf("move memory: region %d at %#x: mremap: %w", i, d.GPA, err)
		}
		if d.FD >= 0 {
			unix.Close(d.FD)
		}
		d.FD, s.FD = s.FD, -1
		forgetMapping(s.Host)
		s.Host = nil
	}
	src.regions = nil
	return nil
}

// forgetMapping drops x/sys/unix's record of a mapping that mremap moved
// away (its Munmap refuses addresses it did not map, and keeps a record
// per mapping): it maps a placeholder where the mapping was, unless
// something else has been mapped there meanwhile, and unmaps it through
// unix.Munmap. When the place is taken the record is left, which costs a
// few bytes and nothing else.
func forgetMapping(b []byte) {
	p, err := unix.MmapPtr(-1, 0, unsafe.Pointer(&b[0]), uintptr(len(b)), unix.PROT_NONE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE|unix.MAP_FIXED_NOREPLACE)
	if err != nil {
		return
	}
	if p != unsafe.Pointer(&b[0]) { // a kernel older than 4.17 ignores NOREPLACE's meaning
		_ = unix.MunmapPtr(p, uintptr(len(b)))
		return
	}
	_ = unix.Munmap(b)
}

// Close unmaps all regions and closes their memfds.
func (m *Memory) Close() error {
	var first error
	for _, r := range m.regions {
		if err := unmapRegion(r); err != nil && first == nil {
			first = err
		}
	}
	m.regions = nil
	return first
}

func unmapRegion(r Region) error {
	var err error
	if r.Host != nil {
		err = unix.Munmap(r.Host)
	}
	if r.FD >= 0 {
		unix.Close(r.FD)
	}
	return err
}
