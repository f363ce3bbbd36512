// Command tracework replays, one thread class at a time, the system-call
// mix of a kvmkit VMM so that `strace -f` can derive the seccomp
// allow-lists in package seccomp (see ../../ALLOWLIST.md). It is a
// measurement tool, not part of the VMM.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: tracework idle|vcpu|device|control")
		os.Exit(2)
	}
	// Every class runs on a locked OS thread, like the VMM's threads.
	var wg sync.WaitGroup
	wg.Add(1)
	var err error
	go func() {
		defer wg.Done()
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		switch os.Args[1] {
		case "idle":
			err = idle()
		case "vcpu":
			err = vcpu()
		case "device":
			err = device()
		case "control":
			err = control()
		default:
			err = fmt.Errorf("unknown class %q", os.Args[1])
		}
	}()
	wg.Wait()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tracework:", err)
		os.Exit(1)
	}
}

// idle exercises only the Go runtime: goroutines, channels, timers, GC.
func idle() error {
	ch := make(chan int)
	for i := 0; i < 8; i++ {
		go func() {
			b := make([]byte, 1<<20)
			ch <- len(b)
		}()
	}
	for i := 0; i < 8; i++ {
		<-ch
	}
	runtime.GC()
	time.Sleep(20 * time.Millisecond)
	return nil
}

// vcpu mirrors a vCPU loop: ioctl on the vCPU fd (KVM_RUN; here an
// equivalent ioctl on a tty-less fd), eventfd kicks, COM1 writes to stdout,
// and signal-based kicks between threads (tgkill).
func vcpu() error {
	if err := idle(); err != nil {
		return err
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return err
	}
	defer unix.Close(efd)
	var one = []byte{1, 0, 0, 0, 0, 0, 0, 0}
	for i := 0; i < 100; i++ {
		_, _ = unix.IoctlGetInt(efd, unix.TIOCINQ) // stands in for KVM_RUN
		_, _ = unix.Write(efd, one)
		_, _ = os.Stdout.Write([]byte{})
	}
	buf := make([]byte, 8)
	_, _ = unix.Read(efd, buf)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGUSR1)
	_ = unix.Tgkill(unix.Getpid(), unix.Gettid(), unix.SIGUSR1)
	<-sigs
	signal.Stop(sigs)
	return nil
}

// device mirrors a virtio device thread: block I/O on an image file, eventfd
// notifications, epoll waits.
func device() error {
	if err := idle(); err != nil {
		return err
	}
	f, err := os.CreateTemp("", "tracework-img")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	buf := make([]byte, 4096)
	for i := int64(0); i < 16; i++ {
		if _, err := f.WriteAt(buf, i*4096); err != nil {
			return err
		}
		if _, err := f.ReadAt(buf, i*4096); err != nil {
			return err
		}
	}
	_, _ = unix.Pwritev(int(f.Fd()), [][]byte{buf, buf}, 0)
	_, _ = unix.Preadv(int(f.Fd()), [][]byte{buf, buf}, 0)
	_ = f.Sync()
	_ = unix.Fdatasync(int(f.Fd()))
	_ = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return err
	}
	defer unix.Close(efd)
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	defer unix.Close(ep)
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, efd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(efd)}); err != nil {
		return err
	}
	_, _ = unix.Write(efd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	evs := make([]unix.EpollEvent, 4)
	_, _ = unix.EpollWait(ep, evs, 10)
	_, _ = unix.Read(efd, buf[:8])
	_, _ = unix.Writev(1, [][]byte{{}, {}})
	_, _ = unix.Readv(efd, [][]byte{buf[:8]})
	return nil
}

// control mirrors VMM set-up: open images and devices, allocate memfd-backed
// guest memory, start worker threads, wait on signals and write logs.
func control() error {
	if err := idle(); err != nil {
		return err
	}
	// Guest RAM the way kvm.NewMemory builds it with Memfd: true.
	mfd, err := unix.MemfdCreate("guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return err
	}
	defer unix.Close(mfd)
	if err := unix.Ftruncate(mfd, 16<<20); err != nil {
		return err
	}
	ram, err := unix.Mmap(mfd, 0, 16<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	copy(ram, "hello")
	_ = unix.Madvise(ram, unix.MADV_DONTNEED)
	// A restore into a pre-built VM moves a snapshot's mapping onto the
	// VM's RAM (kvm.Memory.MoveFrom).
	snap, err := unix.Mmap(-1, 0, 16<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return err
	}
	if _, err := unix.MremapPtr(unsafe.Pointer(&snap[0]), uintptr(len(snap)), unsafe.Pointer(&ram[0]), uintptr(len(ram)),
		unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED); err != nil {
		return err
	}
	if err := unix.Munmap(ram); err != nil {
		return err
	}
	// machine.Pool builds VMs on a thread it renices to 19.
	built := make(chan error)
	go func() {
		runtime.LockOSThread()
		built <- unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), 19)
	}()
	if err := <-built; err != nil {
		return err
	}
	f, err := os.Open("/dev/null")
	if err != nil {
		return err
	}
	st, _ := f.Stat()
	_ = st
	f.Close()
	_, _ = os.ReadFile("/proc/self/status")
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	signal.Stop(sigs)
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		close(done)
	}()
	<-done
	fmt.Fprintln(os.Stderr, "control done")
	return nil
}
