package vswitch

import (
	"bytes"
	"testing"

	"github.com/kvmkit/kvmkit/virtio/ratelimit"
)

// FuzzSwitchFrame feeds arbitrary guest frames into a port and checks that
// the switch neither panics nor alters what it forwards.
func FuzzSwitchFrame(f *testing.F) {
	f.Add(frame(broadcast, macN(1), 1, 60))
	f.Add(frame(macN(2), macN(1), 1, 1514))
	f.Add([]byte{})
	f.Add(make([]byte, 14))
	f.Add(frame(macN(1), broadcast, 1, 60))
	f.Fuzz(func(t *testing.T, data []byte) {
		s := New(Options{Clock: ratelimit.NewManualClock(epoch), MaxMACs: 8})
		defer s.Close()
		a, _ := s.AddPort("a", LinkOptions{})
		b, _ := s.AddPort("b", LinkOptions{})
		c, _ := s.AddPort("c", LinkOptions{})
		err := a.WriteFrame(data)
		got := append(drain(t, b), drain(t, c)...)
		st := a.Stats()
		if st.IngressFrames != 1 {
			t.Fatalf("ingress frames %d", st.IngressFrames)
		}
		if err != nil {
			if len(got) != 0 || st.DroppedInvalid != 1 {
				t.Fatalf("refused frame was forwarded (%d) or not counted (%d)", len(got), st.DroppedInvalid)
			}
			return
		}
		if bytes.Equal(data[0:6], data[6:12]) {
			// Destination is the sender's own (just learned) MAC: not reflected.
			if len(got) != 0 {
				t.Fatalf("frame to own MAC reflected to %d ports", len(got))
			}
			return
		}
		if len(got) == 0 || len(got) > 2 {
			t.Fatalf("valid frame reached %d ports", len(got))
		}
		for _, g := range got {
			if !bytes.Equal(g, data) {
				t.Fatal("forwarded frame differs from input")
			}
		}
	})
}
