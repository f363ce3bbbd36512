package virtio

// DeviceType is a virtio device ID (virtio 1.2 section 5).
type DeviceType uint32

// Device types implemented by kvmkit.
const (
	DeviceNet     DeviceType = 1
	DeviceBlock   DeviceType = 2
	DeviceConsole DeviceType = 3
	DeviceEntropy DeviceType = 4
)

// String names the device type.
func (t DeviceType) String() string {
	switch t {
	case DeviceNet:
		return "net"
	case DeviceBlock:
		return "block"
	case DeviceConsole:
		return "console"
	case DeviceEntropy:
		return "entropy"
	}
	return "unknown"
}

// Device status bits (virtio 1.2 section 2.1).
const (
	StatusAcknowledge      uint32 = 1
	StatusDriver           uint32 = 2
	StatusDriverOK         uint32 = 4
	StatusFeaturesOK       uint32 = 8
	StatusDeviceNeedsReset uint32 = 64
	StatusFailed           uint32 = 128
)

// Reserved (device-independent) feature bits (virtio 1.2 section 6).
const (
	FeatureIndirectDesc   uint64 = 1 << 28 // VIRTIO_F_INDIRECT_DESC
	FeatureEventIdx       uint64 = 1 << 29 // VIRTIO_F_EVENT_IDX
	FeatureVersion1       uint64 = 1 << 32 // VIRTIO_F_VERSION_1
	FeatureAccessPlatform uint64 = 1 << 33 // VIRTIO_F_ACCESS_PLATFORM
	FeatureRingPacked     uint64 = 1 << 34 // VIRTIO_F_RING_PACKED
)

// TransportFeatures are the feature bits every kvmkit transport offers on top
// of a device's own: modern interface, indirect descriptors and event index.
const TransportFeatures = FeatureVersion1 | FeatureIndirectDesc | FeatureEventIdx

// Split virtqueue descriptor flags (virtio 1.2 section 2.7.5).
const (
	DescFlagNext     uint16 = 1
	DescFlagWrite    uint16 = 2
	DescFlagIndirect uint16 = 4
)

// Ring flags.
const (
	AvailFlagNoInterrupt uint16 = 1 // VIRTQ_AVAIL_F_NO_INTERRUPT
	UsedFlagNoNotify     uint16 = 1 // VIRTQ_USED_F_NO_NOTIFY
)

// Limits applied to guest-controlled ring values.
const (
	// MaxQueueSize is the largest split queue size (virtio 1.2: 32768).
	MaxQueueSize = 32768
	// MaxIndirectEntries caps the descriptors in one indirect table.
	MaxIndirectEntries = 1024
)
