package migration

import (
	"fmt"

	"github.com/kvmkit/kvmkit/kvm"
)

// Limits on a Config, checked when one is encoded or decoded.
const (
	MaxRegions      = 64
	MaxVCPUs        = 1024
	MaxDevices      = 256
	MaxDeviceName   = 256
	MaxCPUIDSize    = 64 << 10
	MaxExtraSize    = 256 << 10
	MaxMemoryRegion = 1 << 40 // 1 TiB per region
)

// RegionConfig is one guest RAM region: guest-physical base and size, both
// page aligned.
type RegionConfig struct {
	GPA  uint64
	Size uint64
}

// Config describes a VM well enough for a target to build an identical
// empty one: it is the first record of a migration and of a snapshot.
type Config struct {
	// VCPUs is the number of vCPUs.
	VCPUs int
	// Regions is the guest RAM layout, sorted by GPA, not overlapping.
	Regions []RegionConfig
	// CPUID is the CPUID the guest sees, encoded by the VM (opaque here).
	// The target compares it with what its host offers in Target.Prepare.
	CPUID []byte
	// Devices lists the VM's devices (names chosen by the VM, for example
	// "virtio-net@0xd0000000"); the target must build the same set.
	Devices []string
	// Extra is VM-specific configuration, opaque here.
	Extra []byte
}

// MemorySize returns the total RAM size in bytes.
func (c *Config) MemorySize() uint64 {
	var n uint64
	for _, r := range c.Regions {
		n += r.Size
	}
	return n
}

// Validate checks the limits and the memory layout.
func (c *Config) Validate() error {
	if c.VCPUs < 1 || c.VCPUs > MaxVCPUs {
		return fmt.Errorf("config: %d vCPUs, want 1..%d", c.VCPUs, MaxVCPUs)
	}
	if len(c.Regions) < 1 || len(c.Regions) > MaxRegions {
		return fmt.Errorf("config: %d memory regions, want 1..%d", len(c.Regions), MaxRegions)
	}
	for i, r := range c.Regions {
		if r.Size == 0 || r.Size%pageSize != 0 || r.GPA%pageSize != 0 {
			return fmt.Errorf("config: region %d [%#x,+%#x): empty or not page aligned", i, r.GPA, r.Size)
		}
		if r.Size > MaxMemoryRegion || r.GPA+r.Size < r.GPA {
			return fmt.Errorf("config: region %d [%#x,+%#x): too large or wraps", i, r.GPA, r.Size)
		}
		if i > 0 && c.Regions[i-1].GPA+c.Regions[i-1].Size > r.GPA {
			return fmt.Errorf("config: region %d at %#x overlaps or precedes region %d", i, r.GPA, i-1)
		}
	}
	if len(c.CPUID) > MaxCPUIDSize {
		return fmt.Errorf("config: CPUID of %d bytes above the limit of %d", len(c.CPUID), MaxCPUIDSize)
	}
	if len(c.Devices) > MaxDevices {
		return fmt.Errorf("config: %d devices above the limit of %d", len(c.Devices), MaxDevices)
	}
	for _, d := range c.Devices {
		if len(d) > MaxDeviceName {
			return fmt.Errorf("config: device name of %d bytes above the limit of %d", len(d), MaxDeviceName)
		}
	}
	if len(c.Extra) > MaxExtraSize {
		return fmt.Errorf("config: extra of %d bytes above the limit of %d", len(c.Extra), MaxExtraSize)
	}
	return nil
}

// sameLayout reports whether the regions match cfg's exactly.
func sameLayout(cfg []RegionConfig, other []RegionConfig) error {
	if len(cfg) != len(other) {
		return fmt.Errorf("%d memory regions, config has %d", len(other), len(cfg))
	}
	for i := range cfg {
		if cfg[i] != other[i] {
			return fmt.Errorf("memory region %d is [%#x,+%#x), config has [%#x,+%#x)",
				i, other[i].GPA, other[i].Size, cfg[i].GPA, cfg[i].Size)
		}
	}
	return nil
}

// MarshalBinary encodes the config (version-independent of the VM: the
// stream version covers it). It validates first.
func (c *Config) MarshalBinary() ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	e := enc{b: make([]byte, 0, 64+16*len(c.Regions)+len(c.CPUID)+len(c.Extra))}
	e.u32(uint32(c.VCPUs))
	e.u32(uint32(len(c.Regions)))
	for _, r := range c.Regions {
		e.u64(r.GPA)
		e.u64(r.Size)
	}
	e.bytes32(c.CPUID)
	e.u32(uint32(len(c.Devices)))
	for _, d := range c.Devices {
		e.u16(uint16(len(d)))
		e.b = append(e.b, d...)
	}
	e.bytes32(c.Extra)
	return e.b, nil
}

// UnmarshalBinary decodes a config written by MarshalBinary, checking every
// count and length against the limits before allocating, then validates.
func (c *Config) UnmarshalBinary(b []byte) error {
	d := dec{b: b, ctx: "config"}
	var out Config
	out.VCPUs = int(d.u32("vcpus"))
	nr := d.u32("region count")
	if d.err == nil && nr > MaxRegions {
		d.fail("%d regions above the limit of %d", nr, MaxRegions)
	}
	if d.err == nil {
		out.Regions = make([]RegionConfig, 0, nr)
	}
	for i := uint32(0); i < nr && d.err == nil; i++ {
		out.Regions = append(out.Regions, RegionConfig{GPA: d.u64("region gpa"), Size: d.u64("region size")})
	}
	out.CPUID = d.bytes32("cpuid", MaxCPUIDSize)
	nd := d.u32("device count")
	if d.err == nil && nd > MaxDevices {
		d.fail("%d devices above the limit of %d", nd, MaxDevices)
	}
	for i := uint32(0); i < nd && d.err == nil; i++ {
		n := d.u16("device name length")
		if int(n) > MaxDeviceName {
			d.fail("device name length %d above the limit of %d", n, MaxDeviceName)
			break
		}
		if p := d.take(int(n), "device name"); d.err == nil {
			out.Devices = append(out.Devices, string(p))
		}
	}
	out.Extra = d.bytes32("extra", MaxExtraSize)
	if err := d.end(); err != nil {
		return err
	}
	if err := out.Validate(); err != nil {
		return err
	}
	*c = out
	return nil
}

// layoutOf returns the layout of host regions, in their order.
func layoutOf(regions []kvm.Region) []RegionConfig {
	out := make([]RegionConfig, len(regions))
	for i, r := range regions {
		out[i] = RegionConfig{GPA: r.GPA, Size: uint64(len(r.Host))}
	}
	return out
}
