package devices

import (
	"bytes"
	"sync"

	"github.com/kvmkit/kvmkit/kvm"
)

// recIRQ records every level an interrupt line is driven to.
type recIRQ struct {
	mu     sync.Mutex
	levels []bool
}

func (r *recIRQ) SetLevel(high bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.levels = append(r.levels, high)
	return nil
}

func (r *recIRQ) high() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.levels) > 0 && r.levels[len(r.levels)-1]
}

// take returns and forgets the recorded transitions.
func (r *recIRQ) take() []bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.levels
	r.levels = nil
	return l
}

// syncBuffer is a bytes.Buffer safe for the flusher goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// port wraps a device with byte-sized in/out helpers.
type port struct{ d kvm.Device }

func (p port) in(off uint64) uint8 {
	var b [1]byte
	p.d.Read(off, b[:])
	return b[0]
}

func (p port) out(off uint64, v uint8) { p.d.Write(off, []byte{v}) }
