package devices_test

import (
	"fmt"
	"os"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/devices"
)

// A COM1 UART on the port-I/O bus: the guest's console output reaches the
// sink, and Input types into the guest.
func ExampleUART() {
	bus := kvm.NewBus()
	com1, err := devices.NewUART(devices.UARTConfig{Name: "COM1", Out: os.Stdout})
	if err != nil {
		panic(err)
	}
	defer com1.Close()
	if err := bus.Register(devices.COM1Base, devices.UARTSize, com1); err != nil {
		panic(err)
	}

	// What a vCPU's port-I/O exits would do for "outb('h', 0x3f8)" etc.
	for _, c := range []byte("hello\n") {
		bus.Write(devices.COM1Base, []byte{c})
	}
	if err := com1.Flush(); err != nil {
		panic(err)
	}

	com1.Input([]byte("y"))
	lsr, rbr := make([]byte, 1), make([]byte, 1)
	bus.Read(devices.COM1Base+5, lsr)
	bus.Read(devices.COM1Base, rbr)
	fmt.Printf("LSR %#02x, received %q\n", lsr[0], rbr[0])
	// Output:
	// hello
	// LSR 0x61, received 'y'
}

// An exit port that turns the guest's "outb(code, 0xf4)" into the VM's
// exit status.
func ExampleExitPort() {
	bus := kvm.NewBus()
	exit := devices.NewExitPort(func(code uint8) {
		fmt.Println("guest exited with code", code)
	})
	if err := bus.Register(devices.ExitPortBase, 1, exit); err != nil {
		panic(err)
	}
	bus.Write(devices.ExitPortBase, []byte{3})
	code, _ := exit.Code()
	fmt.Println("recorded", code)
	// Output:
	// guest exited with code 3
	// recorded 3
}

// A console watcher between the UART and the terminal reports a panic.
func ExampleConsoleWatcher() {
	w, err := devices.NewConsoleWatcher(devices.ConsoleConfig{
		Lines:   10,
		OnMatch: func(m devices.ConsoleMatch) { fmt.Println("crash:", m.Line) },
	})
	if err != nil {
		panic(err)
	}
	fmt.Fprint(w, "[ 1.0] Kernel pan")
	fmt.Fprint(w, "ic - not syncing: VFS: Unable to mount root fs\n")
	// Output:
	// crash: [ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs
}
