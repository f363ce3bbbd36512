package seccomp

import (
	"fmt"

	"github.com/elastic/go-seccomp-bpf/arch"
)

// SyscallName returns the amd64 name of system call number nr, or
// "syscall_<nr>" when the number is unknown. The table is the generated
// x86_64 table shipped with go-seccomp-bpf (Linux 6.15).
func SyscallName(nr int) string {
	if n, ok := arch.X86_64.SyscallNumbers[nr]; ok {
		return n
	}
	return fmt.Sprintf("syscall_%d", nr)
}

// SyscallNumber returns the amd64 number of the named system call.
func SyscallNumber(name string) (int, bool) {
	nr, ok := arch.X86_64.SyscallNames[name]
	return nr, ok
}
