package migration_test

import (
	"context"
	"fmt"
	"net"
	"os"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/migrationtest"
)

// Live-migrate a running VM to a target over a connection. Here both ends
// are fake VMs in one process; with real VMs the source would run Migrate
// on a dialled net.Conn and the target Receive on an accepted one.
func ExampleMigrate() {
	src, _ := migrationtest.NewSource(migrationtest.Options{Regions: []kvm.RegionSpec{{Size: 4 << 20}}, DirtyRate: 5000})
	defer src.Stop()
	tgt := migrationtest.NewTarget(migrationtest.Options{})
	defer tgt.Stop()

	srcConn, tgtConn := net.Pipe()
	received := make(chan error, 1)
	go func() {
		_, err := migration.Receive(context.Background(), tgtConn, tgt, migration.ReceiveOptions{Logger: quiet()})
		tgtConn.Close()
		received <- err
	}()
	stats, err := migration.Migrate(context.Background(), src, srcConn, migration.Options{Logger: quiet()})
	srcConn.Close()
	if err != nil {
		// The source still runs the guest.
		fmt.Println("migration failed:", err)
		return
	}
	fmt.Println("target:", <-received)
	fmt.Println("target runs:", tgt.Status().Running(), "source paused:", src.Status().Paused)
	fmt.Println("every page sent:", stats.PagesSent+stats.ZeroPages+stats.HolePages >= stats.MemoryBytes/kvm.PageSize)
	// Output:
	// target: <nil>
	// target runs: true source paused: true
	// every page sent: true
}

// Save a snapshot, load it and restore it into a new VM. The restored VM's
// memory is a private mapping of the snapshot's memory file, read lazily.
func ExampleSaveSnapshot() {
	src, _ := migrationtest.NewSource(migrationtest.Options{Regions: []kvm.RegionSpec{{Size: 4 << 20}}})
	defer src.Stop()
	dir, _ := os.MkdirTemp("", "snapshot")
	defer os.RemoveAll(dir)

	info, err := migration.SaveSnapshot(context.Background(), src, dir, migration.SnapshotOptions{Logger: quiet()})
	if err != nil {
		fmt.Println(err)
		return
	}
	snap, err := migration.LoadSnapshot(dir) // checks magic, version, checksums, sizes
	if err != nil {
		fmt.Println(err)
		return
	}
	tgt := migrationtest.NewTarget(migrationtest.Options{})
	defer tgt.Stop()
	st, err := migration.Restore(context.Background(), snap, tgt)
	fmt.Println(info.Kind, snap.Info.ID == info.ID, err, st.Lazy, tgt.Status().Running())
	// Output: full true <nil> true true
}
