package lab

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

// monitorSample reads the L1 CPU registers twice, a second apart, from the
// QEMU human monitor on a unix socket and returns the lines that say where
// the CPU is (RIP with the kernel symbol when systemMap resolves it, CS,
// control registers, EFER), then the local APIC state. Two samples tell a CPU spinning in one place
// from one that moves. It never blocks for more than a few seconds: a
// monitor that does not answer (QEMU itself stuck) is reported as such.
func monitorSample(socket, systemMap string) []string {
	if socket == "" {
		return nil
	}
	syms := loadSystemMap(systemMap)
	var out []string
	for i := range 2 {
		if i > 0 {
			time.Sleep(time.Second)
		}
		text, err := monitorCommand(socket, "info registers", 5*time.Second)
		if err != nil {
			out = append(out, fmt.Sprintf("sample %d: QEMU monitor: %v", i+1, err))
			continue
		}
		out = append(out, fmt.Sprintf("sample %d:", i+1))
		for _, l := range strings.Split(text, "\n") {
			l = strings.TrimRight(l, "\r ")
			switch {
			case strings.HasPrefix(l, "RIP="):
				if sym := syms.lookup(l); sym != "" {
					l += "  <" + sym + ">"
				}
				out = append(out, "  "+l)
			case strings.HasPrefix(l, "CS ="), strings.HasPrefix(l, "CR0="), strings.HasPrefix(l, "EFER="), strings.HasPrefix(l, "RAX="):
				out = append(out, "  "+l)
			}
		}
	}
	// The local APIC (QEMU's model): a timer that never fires or an
	// in-service bit never cleared leaves a halted L1 asleep for good.
	if text, err := monitorCommand(socket, "info lapic", 5*time.Second); err != nil {
		out = append(out, fmt.Sprintf("lapic: QEMU monitor: %v", err))
	} else {
		out = append(out, "lapic:")
		for _, l := range strings.Split(text, "\n") {
			if l = strings.TrimRight(l, "\r "); l != "" {
				out = append(out, "  "+l)
			}
		}
	}
	return out
}

// monitorCommand sends one command to the QEMU human monitor and returns
// its output (up to the next prompt).
func monitorCommand(socket, cmd string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("unix", socket, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return "", err
	}
	r := bufio.NewReader(c)
	const prompt = "(qemu) "
	if _, err := readUntil(r, prompt); err != nil {
		return "", fmt.Errorf("no prompt: %w", err)
	}
	if _, err := fmt.Fprintf(c, "%s\n", cmd); err != nil {
		return "", err
	}
	text, err := readUntil(r, prompt)
	if err != nil {
		return text, fmt.Errorf("%q: %w", cmd, err)
	}
	// The monitor echoes the command first, with line-editing escapes.
	if _, rest, ok := strings.Cut(text, "\n"); ok {
		text = rest
	}
	return text, nil
}

// readUntil reads until s has been read (at most 1 MiB) and returns what
// came before it.
func readUntil(r *bufio.Reader, s string) (string, error) {
	var b strings.Builder
	for b.Len() < 1<<20 {
		c, err := r.ReadByte()
		if err != nil {
			return b.String(), err
		}
		b.WriteByte(c)
		if strings.HasSuffix(b.String(), s) {
			return strings.TrimSuffix(b.String(), s), nil
		}
	}
	return b.String(), fmt.Errorf("no %q within 1 MiB", s)
}

// symbolTable maps kernel text addresses to names (from System.map; L1
// boots with nokaslr so the addresses hold).
type symbolTable struct {
	addr []uint64
	name []string
}

func loadSystemMap(p string) *symbolTable {
	t := &symbolTable{}
	data, err := os.ReadFile(p)
	if err != nil {
		return t
	}
	for _, l := range strings.Split(string(data), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 || (f[1] != "T" && f[1] != "t") {
			continue
		}
		a, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil {
			continue
		}
		t.addr = append(t.addr, a)
		t.name = append(t.name, f[2])
	}
	idx := make([]int, len(t.addr))
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(a, b int) bool { return t.addr[idx[a]] < t.addr[idx[b]] })
	addr, name := make([]uint64, len(idx)), make([]string, len(idx))
	for i, j := range idx {
		addr[i], name[i] = t.addr[j], t.name[j]
	}
	t.addr, t.name = addr, name
	return t
}

// lookup resolves the RIP in a monitor "RIP=<hex> ..." line to
// symbol+offset, or "" when it is not kernel text.
func (t *symbolTable) lookup(ripLine string) string {
	f := strings.Fields(strings.TrimPrefix(ripLine, "RIP="))
	if len(f) == 0 || len(t.addr) == 0 {
		return ""
	}
	rip, err := strconv.ParseUint(f[0], 16, 64)
	if err != nil || rip < t.addr[0] {
		return ""
	}
	i := sort.Search(len(t.addr), func(i int) bool { return t.addr[i] > rip }) - 1
	if rip-t.addr[i] > 1<<20 {
		return ""
	}
	return fmt.Sprintf("%s+%#x", t.name[i], rip-t.addr[i])
}
