package lab

import (
	"strconv"
	"strings"
)

// markerPrefix starts every machine-readable line the L1 /init prints.
const markerPrefix = "NESTLAB-"

// MarkerKind is the kind of a marker line.
type MarkerKind string

// Marker kinds printed by the generated scripts.
const (
	MarkerBoot     MarkerKind = "BOOT"      // /init started; Value is "uptime=<s>"
	MarkerStart    MarkerKind = "START"     // payload about to run
	MarkerExit     MarkerKind = "EXIT"      // payload finished; Code is its status
	MarkerError    MarkerKind = "ERROR"     // lab setup failed; Value is the reason
	MarkerPkgStart MarkerKind = "PKG-START" // gotest: package Index starts
	MarkerPkgEnd   MarkerKind = "PKG-END"   // gotest: package Index ended with Code
	MarkerAlive    MarkerKind = "ALIVE"     // heartbeat while the payload runs; Value is "uptime=<s>"
)

// Marker is a parsed marker line.
type Marker struct {
	Kind  MarkerKind
	Value string // text after "=" or " " (may be empty)
	Code  int    // EXIT and PKG-END: the exit status
	Index int    // PKG-START and PKG-END: the package index
}

// ParseMarker parses a serial console line. It accepts
//
//	NESTLAB-BOOT uptime=1.23
//	NESTLAB-START ...
//	NESTLAB-ALIVE uptime=61.2
//	NESTLAB-EXIT=<0..255>
//	NESTLAB-ERROR=<reason>
//	NESTLAB-PKG-START=<index>
//	NESTLAB-PKG-END=<index>:<status>
//
// with surrounding whitespace (and \r) ignored. Malformed lines are not
// markers.
func ParseMarker(line string) (Marker, bool) {
	line = strings.TrimSpace(line)
	rest, ok := strings.CutPrefix(line, markerPrefix)
	if !ok {
		return Marker{}, false
	}
	end := strings.IndexAny(rest, "= ")
	kind, val := rest, ""
	if end >= 0 {
		kind, val = rest[:end], rest[end+1:]
	}
	m := Marker{Kind: MarkerKind(kind), Value: val}
	switch m.Kind {
	case MarkerBoot, MarkerStart, MarkerAlive:
		return m, true
	case MarkerError:
		if val == "" || rest[end] != '=' {
			return Marker{}, false
		}
		return m, true
	case MarkerExit:
		code, err := strconv.Atoi(val)
		if err != nil || code < 0 || code > 255 || rest[end] != '=' {
			return Marker{}, false
		}
		m.Code = code
		return m, true
	case MarkerPkgStart:
		idx, err := strconv.Atoi(val)
		if err != nil || idx < 0 || end < 0 || rest[end] != '=' {
			return Marker{}, false
		}
		m.Index = idx
		return m, true
	case MarkerPkgEnd:
		is, cs, found := strings.Cut(val, ":")
		idx, err1 := strconv.Atoi(is)
		code, err2 := strconv.Atoi(cs)
		if !found || err1 != nil || err2 != nil || idx < 0 || code < 0 || code > 255 || rest[end] != '=' {
			return Marker{}, false
		}
		m.Index, m.Code = idx, code
		return m, true
	}
	return Marker{}, false
}
