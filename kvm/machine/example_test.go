package machine_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/kvmkit/kvmkit/kvm/guests"
	"github.com/kvmkit/kvmkit/kvm/machine"
)

// Keep two VMs of one shape built ahead of need: each machine of that shape
// takes one and only adds its devices, and the pool builds a replacement
// in the background at the lowest CPU priority. (It needs /dev/kvm, so it
// is compiled but not run by go test.)
func ExamplePool() {
	shape := machine.Config{MemSize: 64 << 20, CPUs: 1}
	pool, err := machine.NewPool(shape, machine.PoolOptions{Size: 2})
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := pool.Wait(ctx, 2); err != nil { // a standby host waits once, at start
		log.Fatal(err)
	}

	cfg := shape
	cfg.Pool = pool
	m, err := machine.New(cfg) // no VM creation here
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	img, mode, _ := guests.Get(guests.Exit42)
	mm, _ := machine.ParseMode(mode.String())
	if err := m.LoadFlat(img, mm); err != nil {
		log.Fatal(err)
	}
	res, err := m.Run(ctx)
	fmt.Println(res.ExitCode, err, m.FromShell(), pool.Stats().Taken)
}
