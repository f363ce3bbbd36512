// Package vswitch is an in-process learning Ethernet switch: it connects many
// virtual NICs (each port is a netback.Backend) and shapes every port's link
// with latency, loss and bandwidth, so that multi-VM networks can be built and
// tested inside one process.
package vswitch

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/kvmkit/kvmkit/virtio/ratelimit"
)

// Defaults used when Options fields are zero.
const (
	DefaultAgingTime       = 300 * time.Second
	DefaultQueueLen        = 256
	DefaultMaxMACs         = 4096
	DefaultMaxShapingDelay = time.Second
)

// Errors returned by the switch.
var (
	// ErrPortExists is returned by AddPort for a name already in use.
	ErrPortExists = errors.New("vswitch: port name already in use")
	// ErrSwitchClosed is returned by AddPort after Close.
	ErrSwitchClosed = errors.New("vswitch: switch closed")
)

// OptionError reports an invalid link option.
type OptionError struct {
	Field  string
	Reason string
}

func (e *OptionError) Error() string {
	return fmt.Sprintf("vswitch: link option %s: %s", e.Field, e.Reason)
}

// Options configures a Switch. The zero value is usable.
type Options struct {
	// AgingTime is how long a learned MAC stays valid without traffic.
	AgingTime time.Duration
	// QueueLen is the default number of frames buffered per port toward its
	// VM; frames arriving at a full queue are dropped and counted.
	QueueLen int
	// MaxMACs bounds the learning table; when full, new addresses are not
	// learned (their frames are flooded) until entries age out.
	MaxMACs int
	// MaxShapingDelay bounds how far bandwidth shaping may push a frame into
	// the future; frames beyond it are dropped as overflow.
	MaxShapingDelay time.Duration
	// Clock defaults to the system clock; tests inject ratelimit.ManualClock.
	Clock ratelimit.Clock
	// Rand returns uniform values in [0,1) for loss decisions; it is called
	// under a lock. It defaults to a randomly seeded PCG generator.
	Rand func() float64
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// LinkOptions shapes the link between a port and its VM. Each direction of
// the link (VM to switch and switch to VM) gets the latency, loss and
// bandwidth independently.
type LinkOptions struct {
	// Latency delays every frame by this much in each direction.
	Latency time.Duration
	// Loss is the probability in [0,1] that a frame is dropped, per direction.
	Loss float64
	// Bandwidth limits each direction to this many bytes per second; 0 means
	// unlimited.
	Bandwidth int64
	// QueueLen overrides Options.QueueLen for this port when positive.
	QueueLen int
}

func (o LinkOptions) validate() error {
	switch {
	case o.Latency < 0:
		return &OptionError{Field: "latency", Reason: fmt.Sprintf("negative (%v)", o.Latency)}
	case !(o.Loss >= 0 && o.Loss <= 1):
		return &OptionError{Field: "loss", Reason: fmt.Sprintf("%v is outside [0,1]", o.Loss)}
	case o.Bandwidth < 0:
		return &OptionError{Field: "bandwidth", Reason: fmt.Sprintf("negative (%d)", o.Bandwidth)}
	case o.QueueLen < 0:
		return &OptionError{Field: "queue", Reason: fmt.Sprintf("negative (%d)", o.QueueLen)}
	}
	return nil
}

type mac [6]byte

func (m mac) multicast() bool { return m[0]&1 != 0 }

type macEntry struct {
	port *Port
	seen time.Time
}

// Switch is a learning L2 switch. It is safe for concurrent use.
type Switch struct {
	opts Options
	log  *slog.Logger

	randMu sync.Mutex
	rand   func() float64

	mu     sync.RWMutex
	ports  []*Port
	names  map[string]*Port
	macs   map[mac]macEntry
	closed bool
}

// New returns an empty switch.
func New(opts Options) *Switch {
	if opts.AgingTime <= 0 {
		opts.AgingTime = DefaultAgingTime
	}
	if opts.QueueLen <= 0 {
		opts.QueueLen = DefaultQueueLen
	}
	if opts.MaxMACs <= 0 {
		opts.MaxMACs = DefaultMaxMACs
	}
	if opts.MaxShapingDelay <= 0 {
		opts.MaxShapingDelay = DefaultMaxShapingDelay
	}
	if opts.Clock == nil {
		opts.Clock = ratelimit.SystemClock{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	r := opts.Rand
	if r == nil {
		r = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())).Float64
	}
	return &Switch{
		opts:  opts,
		log:   opts.Logger,
		rand:  r,
		names: make(map[string]*Port),
		macs:  make(map[mac]macEntry),
	}
}

// AddPort creates a port named name whose link is shaped by link.
func (s *Switch) AddPort(name string, link LinkOptions) (*Port, error) {
	if err := link.validate(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrSwitchClosed
	}
	if _, ok := s.names[name]; ok {
		return nil, fmt.Errorf("%w: %q", ErrPortExists, name)
	}
	p := &Port{
		sw:     s,
		name:   name,
		link:   link,
		notify: make(chan struct{}, 1),
		done:   make(chan struct{}),
	}
	s.ports = append(s.ports, p)
	s.names[name] = p
	s.log.Debug("vswitch: port added", "port", name)
	return p, nil
}

// Port returns the port called name, or nil.
func (s *Switch) Port(name string) *Port {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.names[name]
}

// Ports returns the names of all ports in creation order.
func (s *Switch) Ports() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]string, len(s.ports))
	for i, p := range s.ports {
		out[i] = p.name
	}
	return out
}

// Lookup returns the name of the port where addr was last seen, if the
// entry has not aged out.
func (s *Switch) Lookup(addr [6]byte) (string, bool) {
	now := s.opts.Clock.Now()
	s.mu.RLock()
	defer s.mu.RUnlock()
	e, ok := s.macs[addr]
	if !ok || now.Sub(e.seen) > s.opts.AgingTime {
		return "", false
	}
	return e.port.name, true
}

// Close closes every port.
func (s *Switch) Close() error {
	s.mu.Lock()
	s.closed = true
	ports := append([]*Port(nil), s.ports...)
	s.mu.Unlock()
	for _, p := range ports {
		_ = p.Close()
	}
	return nil
}

func (s *Switch) lose(p float64) bool {
	switch {
	case p <= 0:
		return false
	case p >= 1:
		return true
	}
	s.randMu.Lock()
	defer s.randMu.Unlock()
	return s.rand() < p
}

// learn records that src was seen on p.
func (s *Switch) learn(src mac, p *Port, now time.Time) {
	refresh := s.opts.AgingTime / 16
	s.mu.RLock()
	e, ok := s.macs[src]
	s.mu.RUnlock()
	if ok && e.port == p && now.Sub(e.seen) < refresh {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if p.closed.Load() {
		return
	}
	if _, ok := s.macs[src]; !ok && len(s.macs) >= s.opts.MaxMACs {
		for m, e := range s.macs {
			if now.Sub(e.seen) > s.opts.AgingTime {
				delete(s.macs, m)
			}
		}
		if len(s.macs) >= s.opts.MaxMACs {
			return
		}
	}
	s.macs[src] = macEntry{port: p, seen: now}
}

// forward delivers a frame that entered on from and arrives at the switch
// at time arrival.
func (s *Switch) forward(from *Port, frame []byte, arrival, now time.Time) {
	var dst mac
	copy(dst[:], frame[0:6])
	s.mu.RLock()
	defer s.mu.RUnlock()
	if !dst.multicast() {
		if e, ok := s.macs[dst]; ok && now.Sub(e.seen) <= s.opts.AgingTime {
			if e.port != from {
				e.port.deliver(frame, arrival, now)
			}
			return
		}
	}
	from.stats.flooded.Add(1)
	for _, p := range s.ports {
		if p != from {
			p.deliver(frame, arrival, now)
		}
	}
}

func (s *Switch) remove(p *Port) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, q := range s.ports {
		if q == p {
			s.ports = append(s.ports[:i], s.ports[i+1:]...)
			break
		}
	}
	delete(s.names, p.name)
	for m, e := range s.macs {
		if e.port == p {
			delete(s.macs, m)
		}
	}
}
