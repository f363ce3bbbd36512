package lab

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestParseMarker(t *testing.T) {
	tests := []struct {
		line string
		want Marker
		ok   bool
	}{
		{"NESTLAB-EXIT=0", Marker{Kind: MarkerExit, Value: "0"}, true},
		{"NESTLAB-EXIT=42\r", Marker{Kind: MarkerExit, Value: "42", Code: 42}, true},
		{"  NESTLAB-EXIT=255  ", Marker{Kind: MarkerExit, Value: "255", Code: 255}, true},
		{"NESTLAB-EXIT=256", Marker{}, false},
		{"NESTLAB-EXIT=-1", Marker{}, false},
		{"NESTLAB-EXIT=", Marker{}, false},
		{"NESTLAB-EXIT", Marker{}, false},
		{"NESTLAB-EXIT 3", Marker{}, false},
		{"NESTLAB-EXIT=x", Marker{}, false},
		{"NESTLAB-BOOT uptime=2.01", Marker{Kind: MarkerBoot, Value: "uptime=2.01"}, true},
		{"NESTLAB-START uptime=3", Marker{Kind: MarkerStart, Value: "uptime=3"}, true},
		{"NESTLAB-ERROR=insmod-kvm-amd", Marker{Kind: MarkerError, Value: "insmod-kvm-amd"}, true},
		{"NESTLAB-ERROR=", Marker{}, false},
		{"NESTLAB-PKG-START=3", Marker{Kind: MarkerPkgStart, Value: "3", Index: 3}, true},
		{"NESTLAB-PKG-START=a", Marker{}, false},
		{"NESTLAB-PKG-END=2:1", Marker{Kind: MarkerPkgEnd, Value: "2:1", Index: 2, Code: 1}, true},
		{"NESTLAB-PKG-END=2", Marker{}, false},
		{"NESTLAB-PKG-END=2:999", Marker{}, false},
		{"NESTLAB-BOGUS=1", Marker{}, false},
		{"echo NESTLAB-EXIT=0", Marker{}, false},
		{"", Marker{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.line, func(t *testing.T) {
			got, ok := ParseMarker(tt.line)
			assert.Equal(t, tt.ok, ok)
			assert.Equal(t, tt.want, got)
		})
	}
}

// FuzzParseMarker: console lines are guest-controlled; parsing must never
// panic and accepted markers must be in range.
func FuzzParseMarker(f *testing.F) {
	for _, s := range []string{"NESTLAB-EXIT=1", "NESTLAB-PKG-END=1:2", "NESTLAB-ERROR=x", "NESTLAB-", "NESTLAB-EXIT", "NESTLAB-PKG-END=:"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, ok := ParseMarker(s)
		if !ok {
			return
		}
		if m.Code < 0 || m.Code > 255 || m.Index < 0 {
			t.Fatalf("out of range marker %+v from %q", m, s)
		}
	})
}
