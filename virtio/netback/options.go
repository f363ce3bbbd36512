package netback

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// OptionError reports an invalid user-networking option string.
type OptionError struct {
	Option string // option name, e.g. "hostfwd"
	Value  string // offending value
	Reason string
}

func (e *OptionError) Error() string {
	if e.Option == "" {
		return fmt.Sprintf("netback: user options %q: %s", e.Value, e.Reason)
	}
	return fmt.Sprintf("netback: user option %s=%q: %s", e.Option, e.Value, e.Reason)
}

// HostForward forwards connections made to a host address into the guest.
type HostForward struct {
	// Proto is "tcp" or "udp".
	Proto string
	// HostAddr is the host address to listen on; zero means 127.0.0.1.
	HostAddr netip.Addr
	// HostPort is the host port (0 picks a free one; see User.HostForwardAddrs).
	HostPort uint16
	// GuestAddr is the guest address; zero means the first DHCP address.
	GuestAddr netip.Addr
	// GuestPort is the guest port.
	GuestPort uint16
}

// String renders f in the option syntax accepted by ParseUserOptions.
func (f HostForward) String() string {
	h, g := "", ""
	if f.HostAddr.IsValid() {
		h = f.HostAddr.String()
	}
	if f.GuestAddr.IsValid() {
		g = f.GuestAddr.String()
	}
	return fmt.Sprintf("%s:%s:%d-%s:%d", f.Proto, h, f.HostPort, g, f.GuestPort)
}

// maxHostForwards bounds how many forwards one option string may declare.
const maxHostForwards = 256

// ParseUserOptions parses a QEMU-style user networking specification:
//
//	user[,net=10.0.2.0/24][,host=10.0.2.2][,dns=10.0.2.3][,dhcpstart=10.0.2.15]
//	    [,restrict=on|off][,mtu=1500][,hostfwd=tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT]...
//
// Omitted addresses are derived from net as QEMU does (.2, .3, .15).
func ParseUserOptions(s string) (UserOptions, error) {
	var o UserOptions
	parts := strings.Split(s, ",")
	if parts[0] != "user" {
		return o, &OptionError{Value: s, Reason: `must start with "user"`}
	}
	if len(parts) > maxHostForwards+16 {
		return o, &OptionError{Value: s[:min(len(s), 64)], Reason: fmt.Sprintf("more than %d options", maxHostForwards+16)}
	}
	seen := map[string]bool{}
	for _, p := range parts[1:] {
		key, val, ok := strings.Cut(p, "=")
		if !ok {
			return o, &OptionError{Option: p, Reason: "expected key=value"}
		}
		if key != "hostfwd" {
			if seen[key] {
				return o, &OptionError{Option: key, Value: val, Reason: "given twice"}
			}
			seen[key] = true
		}
		var err error
		switch key {
		case "net":
			o.Network, err = netip.ParsePrefix(val)
			if err == nil && (!o.Network.Addr().Is4() || o.Network.Bits() < 8 || o.Network.Bits() > 29) {
				return o, &OptionError{Option: key, Value: val, Reason: "need an IPv4 prefix between /8 and /29"}
			}
			o.Network = o.Network.Masked()
		case "host":
			o.Gateway, err = parseIPv4(val)
		case "dns":
			o.DNS, err = parseIPv4(val)
		case "dhcpstart":
			o.GuestAddr, err = parseIPv4(val)
		case "restrict":
			switch val {
			case "on", "yes", "y":
				o.Restrict = true
			case "off", "no", "n":
				o.Restrict = false
			default:
				return o, &OptionError{Option: key, Value: val, Reason: "want on or off"}
			}
		case "mtu":
			var n uint64
			n, err = strconv.ParseUint(val, 10, 32)
			if err == nil && (n < 576 || n > 65520) {
				return o, &OptionError{Option: key, Value: val, Reason: "must be between 576 and 65520"}
			}
			o.MTU = int(n)
		case "hostfwd":
			if len(o.HostForwards) >= maxHostForwards {
				return o, &OptionError{Option: key, Value: val, Reason: fmt.Sprintf("more than %d forwards", maxHostForwards)}
			}
			var f HostForward
			f, err = parseHostForward(val)
			if err == nil {
				o.HostForwards = append(o.HostForwards, f)
			}
		default:
			return o, &OptionError{Option: key, Value: val, Reason: "unknown option"}
		}
		if err != nil {
			if oe, ok := err.(*OptionError); ok {
				return o, oe
			}
			return o, &OptionError{Option: key, Value: val, Reason: err.Error()}
		}
	}
	if err := o.fillDefaults(); err != nil {
		return o, err
	}
	return o, nil
}

func parseIPv4(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return a, err
	}
	if !a.Is4() {
		return netip.Addr{}, fmt.Errorf("not an IPv4 address")
	}
	return a, nil
}

// parseHostForward parses tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT.
func parseHostForward(s string) (HostForward, error) {
	var f HostForward
	bad := func(reason string) (HostForward, error) {
		return HostForward{}, &OptionError{Option: "hostfwd", Value: s, Reason: reason}
	}
	proto, rest, ok := strings.Cut(s, ":")
	if !ok {
		return bad("want tcp|udp:[hostaddr]:hostport-[guestaddr]:guestport")
	}
	switch proto {
	case "", "tcp":
		f.Proto = "tcp"
	case "udp":
		f.Proto = "udp"
	default:
		return bad(fmt.Sprintf("protocol %q is not tcp or udp", proto))
	}
	host, guest, ok := strings.Cut(rest, "-")
	if !ok {
		return bad(`missing "-" between host and guest parts`)
	}
	var err error
	if f.HostAddr, f.HostPort, err = parseAddrPort(host, true); err != nil {
		return bad("host part: " + err.Error())
	}
	if f.GuestAddr, f.GuestPort, err = parseAddrPort(guest, false); err != nil {
		return bad("guest part: " + err.Error())
	}
	return f, nil
}

// parseAddrPort parses [ADDR]:PORT with an optional IPv4 address.
func parseAddrPort(s string, zeroPortOK bool) (netip.Addr, uint16, error) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return netip.Addr{}, 0, fmt.Errorf("%q: want [addr]:port", s)
	}
	var a netip.Addr
	if i > 0 {
		var err error
		if a, err = parseIPv4(s[:i]); err != nil {
			return netip.Addr{}, 0, fmt.Errorf("address %q: %v", s[:i], err)
		}
	}
	p, err := strconv.ParseUint(s[i+1:], 10, 16)
	if err != nil {
		return netip.Addr{}, 0, fmt.Errorf("port %q is not a number in 0-65535", s[i+1:])
	}
	if p == 0 && !zeroPortOK {
		return netip.Addr{}, 0, fmt.Errorf("port 0")
	}
	return a, uint16(p), nil
}
