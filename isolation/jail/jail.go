// Package jail runs a program confined the way Firecracker's jailer does:
// new mount, PID, network, IPC and UTS namespaces (user namespace
// optional), pivot_root into a per-VM directory that holds only the device
// nodes and files the VMM needs, rlimits, inherited descriptors closed, all
// capabilities dropped, an unprivileged uid/gid and no_new_privs.
//
// It uses re-exec. The parent (Start) prepares the directory and starts the
// current executable again in new namespaces with a marker in its
// environment. That child must call Enter first thing in main: Enter builds
// the mounts, pivots, drops privileges on one locked thread and re-executes
// the binary from a descriptor opened before pivot_root, so the program
// restarts inside the jail with a single, fully unprivileged thread and
// Enter returns true there.
package jail

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Device is a host device node to make available inside the jail at the
// same path.
type Device struct {
	Path     string // e.g. "/dev/kvm"
	Required bool   // fail when the host lacks it; otherwise skip it
}

// DefaultDevices are the nodes a VMM needs: /dev/null, /dev/zero and
// /dev/urandom always; /dev/kvm and /dev/net/tun where the host has them.
func DefaultDevices() []Device {
	return []Device{
		{Path: "/dev/null", Required: true},
		{Path: "/dev/zero", Required: true},
		{Path: "/dev/urandom", Required: true},
		{Path: "/dev/kvm"},
		{Path: "/dev/net/tun"},
	}
}

// Bind makes a host file or directory (an image, a kernel) visible inside
// the jail.
type Bind struct {
	Source   string // host path
	Target   string // path inside the jail; Source when empty
	Writable bool   // read-only unless set
}

// Rlimit is one resource limit applied inside the jail.
type Rlimit struct {
	Resource int // unix.RLIMIT_*
	Cur, Max uint64
}

// DefaultRlimits: no core dumps, a bounded descriptor table.
func DefaultRlimits() []Rlimit {
	return []Rlimit{
		{Resource: unix.RLIMIT_CORE, Cur: 0, Max: 0},
		{Resource: unix.RLIMIT_NOFILE, Cur: 4096, Max: 4096},
	}
}

// Config describes one jail.
type Config struct {
	// Dir is the jail's root on the host. It is created when missing
	// (and then removed again by Cleanup).
	Dir string
	// UID and GID the jailed program runs as. With UserNS they are the
	// host IDs that the jail's root is mapped to.
	UID, GID int
	// UserNS adds a user namespace; the program then runs as uid 0 inside
	// it, which is UID outside, with no capabilities. The jail is then
	// built by that unprivileged UID: Dir, its parents and every bind
	// source must be reachable by it, and devices are bind-mounted rather
	// than created.
	UserNS bool
	// Devices to provide; DefaultDevices when nil.
	Devices []Device
	// Binds are extra files and directories (images) to provide.
	Binds []Bind
	// Rlimits to set; DefaultRlimits when nil.
	Rlimits []Rlimit
	// Hostname inside the UTS namespace; "kvmkit" when empty.
	Hostname string
	// ExecLabel, when set, is written to /proc/thread-self/attr/exec
	// before the final exec, so the jailed program runs in that SELinux
	// context.
	ExecLabel string
	// Env is added to the jailed program's environment.
	Env []string
}

// Errors wrapped by Start and Enter.
var (
	// ErrDeviceMissing: a required device node does not exist on the host.
	ErrDeviceMissing = errors.New("jail: required device missing")
	// ErrBadConfig: the configuration is unusable.
	ErrBadConfig = errors.New("jail: bad configuration")
	// ErrSetup: the child could not build the jail (message from the child).
	ErrSetup = errors.New("jail: set-up failed in child")
)

func (c *Config) normalize() error {
	if c.Dir == "" {
		return fmt.Errorf("%w: Dir is empty", ErrBadConfig)
	}
	d, err := filepath.Abs(c.Dir)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBadConfig, err)
	}
	c.Dir = filepath.Clean(d)
	if c.Dir == "/" {
		return fmt.Errorf("%w: Dir must not be /", ErrBadConfig)
	}
	if c.UID < 0 || c.GID < 0 {
		return fmt.Errorf("%w: negative uid/gid %d/%d", ErrBadConfig, c.UID, c.GID)
	}
	if c.Devices == nil {
		c.Devices = DefaultDevices()
	}
	if c.Rlimits == nil {
		c.Rlimits = DefaultRlimits()
	}
	if c.Hostname == "" {
		c.Hostname = "kvmkit"
	}
	for i := range c.Binds {
		b := &c.Binds[i]
		if b.Target == "" {
			b.Target = b.Source
		}
		if !filepath.IsAbs(b.Source) || !filepath.IsAbs(b.Target) {
			return fmt.Errorf("%w: bind %q -> %q must use absolute paths", ErrBadConfig, b.Source, b.Target)
		}
		b.Target = filepath.Clean(b.Target)
		if b.Target == "/" || b.Target == "/proc" || strings.HasPrefix(b.Target, "/proc/") {
			return fmt.Errorf("%w: bind target %q is reserved", ErrBadConfig, b.Target)
		}
	}
	for _, d := range c.Devices {
		if !filepath.IsAbs(d.Path) {
			return fmt.Errorf("%w: device path %q is not absolute", ErrBadConfig, d.Path)
		}
	}
	return nil
}

// in returns the host path of jail path p.
func (c *Config) in(p string) string { return filepath.Join(c.Dir, p) }
