package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/machine"
	"github.com/kvmkit/kvmkit/virtio"
	"github.com/kvmkit/kvmkit/virtio/blk"
	"github.com/kvmkit/kvmkit/virtio/console"
	"github.com/kvmkit/kvmkit/virtio/mmio"
	vnet "github.com/kvmkit/kvmkit/virtio/net"
	"github.com/kvmkit/kvmkit/virtio/netback"
	"github.com/kvmkit/kvmkit/virtio/pci"
	"github.com/kvmkit/kvmkit/virtio/rng"
)

// virtioFlags are the device flags of `vmm run`.
type virtioFlags struct {
	diskSpecs []string
	disks     []diskFlag
	nets      []string
	rng       bool
	console   string
	transport string

	args []string // kernel command-line device descriptors, set by attach
}

type diskFlag struct {
	path     string
	readOnly bool
}

func (v *virtioFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringArrayVar(&v.diskSpecs, "disk", nil, "virtio-blk disk: FILE[,ro] (repeatable)")
	fl.StringArrayVar(&v.nets, "net", nil, "virtio-net NIC: user[,hostfwd=tcp:HOST:PORT-:PORT] or tap:NAME (repeatable)")
	fl.BoolVar(&v.rng, "rng", false, "add a virtio-rng device fed by the host's getrandom")
	fl.StringVar(&v.console, "console", "serial", "guest console: serial (COM1) or virtio (hvc0)")
	fl.StringVar(&v.transport, "transport", "mmio", "virtio transport: mmio (kernel command-line devices) or pci (virtio-pci with MSI-X behind a host bridge at 0xCF8; adds pci=noacpi so Linux probes the bus)")
}

func (v *virtioFlags) validate() error {
	v.disks = v.disks[:0]
	for _, s := range v.diskSpecs {
		parts := strings.Split(s, ",")
		d := diskFlag{path: parts[0]}
		if d.path == "" {
			return fmt.Errorf("--disk %q: missing file", s)
		}
		for _, opt := range parts[1:] {
			switch opt {
			case "ro":
				d.readOnly = true
			default:
				return fmt.Errorf("--disk %q: unknown option %q (want ro)", s, opt)
			}
		}
		v.disks = append(v.disks, d)
	}
	for _, n := range v.nets {
		if _, err := parseNet(n); err != nil {
			return err
		}
	}
	if v.console != "serial" && v.console != "virtio" {
		return fmt.Errorf("--console %q: want serial or virtio", v.console)
	}
	if v.transport != "mmio" && v.transport != "pci" {
		return fmt.Errorf("--transport %q: want mmio or pci", v.transport)
	}
	return nil
}

// netSpec is a parsed --net value.
type netSpec struct {
	tap  string
	user *netback.UserOptions
}

func parseNet(s string) (netSpec, error) {
	switch {
	case strings.HasPrefix(s, "tap:"):
		name := strings.TrimPrefix(s, "tap:")
		if name == "" || len(name) > 15 {
			return netSpec{}, fmt.Errorf("--net %q: tap name must be 1..15 bytes", s)
		}
		return netSpec{tap: name}, nil
	case s == "user" || strings.HasPrefix(s, "user,"):
		o, err := netback.ParseUserOptions(s)
		if err != nil {
			return netSpec{}, fmt.Errorf("--net %q: %w", s, err)
		}
		return netSpec{user: &o}, nil
	}
	return netSpec{}, fmt.Errorf("--net %q: want user[,hostfwd=...] or tap:NAME", s)
}

// namedDevice is a virtio device and its name in the machine's device
// list and saved state.
type namedDevice struct {
	name string
	dev  virtio.Device
}

// virtioIRQs are the GSIs given to virtio-mmio devices, in order: the
// free ISA interrupts, which the MP and ACPI tables describe (COM1 has 4,
// the i8042 1 and 12, the ACPI SCI 13).
var virtioIRQs = []uint32{5, 6, 7, 9, 10, 11, 14, 15}

// attach builds the devices and registers their virtio-mmio windows.
func (v *virtioFlags) attach(env *cliEnv, m *machine.Machine, f *runFlags) error {
	v.args = nil
	var devs []namedDevice
	add := func(name string, d virtio.Device) { devs = append(devs, namedDevice{name, d}) }
	for i, d := range v.disks {
		b, err := blk.Open(d.path, blk.Options{ReadOnly: d.readOnly, ID: fmt.Sprintf("kvmkit%d", i)})
		if err != nil {
			return fmt.Errorf("--disk %s: %w", d.path, err)
		}
		m.AddFlusher(b.Sync)
		add(fmt.Sprintf("virtio-blk%d", i), b)
	}
	for i, s := range v.nets {
		spec, _ := parseNet(s)
		var be vnet.Backend
		var err error
		if spec.tap != "" {
			be, err = netback.OpenTap(netback.TapOptions{Name: spec.tap})
		} else {
			be, err = netback.NewUser(*spec.user)
		}
		if err != nil {
			return fmt.Errorf("--net %s: %w", s, err)
		}
		nd, err := vnet.New(be, vnet.Options{})
		if err != nil {
			be.Close()
			return fmt.Errorf("--net %s: %w", s, err)
		}
		m.AddAnnouncer(func() error {
			if nd.Announce() {
				return nil // the guest announces itself (VIRTIO_NET_F_GUEST_ANNOUNCE)
			}
			mac := nd.MAC()
			frame, err := netback.Announce(mac[:])
			if err != nil {
				return err
			}
			return be.WriteFrame(frame) // a RARP from the VMM
		})
		add(fmt.Sprintf("virtio-net%d", i), nd)
	}
	if v.rng {
		add("virtio-rng", rng.New(rng.Options{}))
	}
	if v.console == "virtio" {
		var in io.Reader
		if f.stdinIn || isTerminal(os.Stdin) {
			in = env.stdin
		}
		add("virtio-console", console.New(console.Options{Input: in, Output: env.stdout}))
		v.args = append(v.args, "console=hvc0")
	}
	if v.transport == "pci" {
		return v.attachPCI(m, devs)
	}
	if len(devs) > len(virtioIRQs) {
		return fmt.Errorf("%d virtio devices: at most %d on virtio-mmio (use --transport pci for more)", len(devs), len(virtioIRQs))
	}
	for i, d := range devs {
		base := uint64(machine.VirtioMMIOBase) + uint64(i)*0x1000
		irq := virtioIRQs[i]
		t := mmio.New(d.dev, m.Mem(), m.IRQ(irq), mmio.Options{})
		if err := m.AddDevice(d.name, true, base, mmio.Size, t); err != nil {
			return err
		}
		if c, ok := d.dev.(io.Closer); ok {
			m.AddCloser(c)
		}
		m.AddStateDevice(d.name, t)
		v.args = append(v.args, mmio.CmdlineArg(base, 0x1000, irq))
		wireNotify(m, d, func(q int) kvm.IOEventFD {
			match := uint64(q)
			return kvm.IOEventFD{Addr: base + mmio.RegQueueNotify, Len: 4, Datamatch: &match}
		}, t.NotifyQueue)
	}
	return nil
}

// wireNotify routes d's queue notifications through ioeventfds at the
// addresses reg gives, when useIOEventFD allows it; if KVM refuses, the
// transport's exit path keeps serving them and a warning says so.
func wireNotify(m *machine.Machine, d namedDevice, reg func(q int) kvm.IOEventFD, notify func(q int)) {
	if !useIOEventFD(d.dev) {
		return
	}
	qn, err := notifyByEventFD(m, len(d.dev.QueueMaxSizes()), reg, notify)
	if err != nil {
		slog.Warn("queue notifications take the exit path", "device", d.name, "err", err)
		return
	}
	m.AddCloser(qn)
}

// useIOEventFD says whether d's queue notifications go through ioeventfds.
// Measured in the lab (bench/virtio.sh, same run): virtio-blk 4 KiB reads
// went from 211 to 806 IOPS and sequential reads from 40 to 90 MiB/s with
// them, but virtio-net's guest-to-host TCP fell from 0.29 to 0.16 MiB/s
// (its watcher goroutines wait for a P behind the vCPU threads), so net
// keeps the exit path until that is understood.
func useIOEventFD(d virtio.Device) bool { return d.Type() != virtio.DeviceNet }

// pciBARBase is where the VMM places the first virtio-pci BAR0 (there is
// no firmware to assign them); each device gets pci.BARSize above it.
const pciBARBase = 0xE000_0000

// attachPCI puts the devices behind a PCI host bridge, one slot each, with
// MSI-X delivered by KVM_SIGNAL_MSI and INTx on the same ISA lines the
// mmio transport would use. Without a PCI root bridge in the ACPI tables
// Linux scans bus 0 itself only with ACPI IRQ routing off: pci=noacpi.
func (v *virtioFlags) attachPCI(m *machine.Machine, devs []namedDevice) error {
	if len(devs) == 0 {
		return nil
	}
	if len(devs) > 31 {
		return fmt.Errorf("%d virtio devices: at most 31 on one PCI bus", len(devs))
	}
	bridge := pci.NewHostBridge()
	if err := m.AddDevice("pci-host", false, pci.ConfigPortBase, pci.ConfigPortSize, bridge); err != nil {
		return err
	}
	for i, d := range devs {
		irq := virtioIRQs[i%len(virtioIRQs)]
		bar := pciBARBase + uint64(i)*pci.BARSize
		t, err := pci.New(d.dev, m.Mem(), pci.Options{
			Bus: m.MMIO(), BARAddr: bar,
			MSI: m.VM(), IRQ: m.IRQ(irq), IRQLine: uint8(irq),
		})
		if err != nil {
			return fmt.Errorf("%s: %w", d.name, err)
		}
		if _, err := bridge.Add(t); err != nil {
			return fmt.Errorf("%s: %w", d.name, err)
		}
		if c, ok := d.dev.(io.Closer); ok {
			m.AddCloser(c)
		}
		m.AddStateDevice(d.name+"-pci", t)
		wireNotify(m, d, func(q int) kvm.IOEventFD {
			// Linux's virtio-pci writes the 16-bit queue index.
			return kvm.IOEventFD{Addr: bar + pci.NotifyOffset + uint64(q)*pci.NotifyMultiplier, Len: 2}
		}, t.NotifyQueue)
	}
	v.args = append(v.args, "pci=noacpi")
	return nil
}

// cmdline returns the kernel command-line arguments the devices need.
func (v *virtioFlags) cmdline() string { return strings.Join(v.args, " ") }
