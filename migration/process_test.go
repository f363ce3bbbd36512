package migration_test

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/migrationtest"
)

const childEnv = "KVMKIT_MIGRATION_TARGET_CHILD"

// TestHelperTargetProcess is the target side of TestMigrateBetweenProcesses,
// run in a child process: it listens on loopback, receives one VM, lets
// its guest run and check itself, and prints the result.
func TestHelperTargetProcess(t *testing.T) {
	if os.Getenv(childEnv) != "1" {
		t.Skip("helper process for TestMigrateBetweenProcesses")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	fmt.Printf("LISTEN %s\n", ln.Addr())
	c, err := ln.Accept()
	require.NoError(t, err)
	tgt := migrationtest.NewTarget(migrationtest.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := migration.Receive(ctx, c, tgt, migration.ReceiveOptions{Logger: quiet()})
	c.Close()
	if err != nil {
		fmt.Printf("RESULT fail %v\n", err)
		return
	}
	if err := tgt.WaitWrites(ctx, 1000); err != nil {
		fmt.Printf("RESULT fail %v\n", err)
		return
	}
	if err := tgt.Err(); err != nil {
		fmt.Printf("RESULT fail guest self-check: %v\n", err)
		return
	}
	h := tgt.ResumeHash()
	fmt.Printf("RESULT ok hash=%s pages=%d confirmed=%v downtime=%v\n", hex.EncodeToString(h[:]), st.PagesReceived+st.ZeroPages, st.Confirmed, st.Downtime)
	tgt.Stop()
}

type child struct {
	cmd  *exec.Cmd
	out  *bufio.Scanner
	addr string
}

func startChild(t *testing.T) *child {
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperTargetProcess$", "-test.v")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	c := &child{cmd: cmd, out: bufio.NewScanner(stdout)}
	for c.out.Scan() {
		if a, ok := strings.CutPrefix(c.out.Text(), "LISTEN "); ok {
			c.addr = a
			return c
		}
	}
	t.Fatal("child did not start listening")
	return nil
}

func (c *child) result() string {
	for c.out.Scan() {
		if r, ok := strings.CutPrefix(c.out.Text(), "RESULT "); ok {
			return r
		}
	}
	return "no result (child died)"
}

func TestMigrateBetweenProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	for i := 0; i < 4; i++ {
		src, err := migrationtest.NewSource(migrationtest.Options{
			Regions: []kvm.RegionSpec{{GPA: 0, Size: 8 << 20}, {GPA: 1 << 32, Size: 8 << 20}}, DirtyRate: 20000,
		})
		require.NoError(t, err)
		ch := startChild(t)
		conn, err := net.Dial("tcp", ch.addr)
		require.NoError(t, err)
		require.NoError(t, src.WaitWrites(context.Background(), 200))
		st, err := migration.Migrate(context.Background(), src, conn, migration.Options{Logger: quiet()})
		conn.Close()
		require.NoError(t, err)
		res := ch.result()
		require.True(t, strings.HasPrefix(res, "ok "), res)
		h := src.MemoryHash()
		assert.Contains(t, res, "hash="+hex.EncodeToString(h[:]), "target memory == source memory at switch-over")
		assert.Contains(t, res, fmt.Sprintf("pages=%d ", st.PagesSent+st.ZeroPages))
		assert.Contains(t, res, "confirmed=true")
		assert.True(t, src.Status().Paused)
		require.NoError(t, ch.cmd.Wait())
		t.Logf("run %d: downtime %v (target %v), total %v, rounds %d", i, st.Downtime, st.TargetDowntime, st.Total, st.Rounds)
		src.Stop()
	}
}

func TestMigrateTargetProcessKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	// The target process dies at each progress report in turn: after the
	// full pass, in the dirty rounds, at switch-over.
	for kill := 1; kill <= 3; kill++ {
		src, err := migrationtest.NewSource(migrationtest.Options{Regions: []kvm.RegionSpec{{Size: 8 << 20}}, WorkingSetPages: 256, DirtyRate: 40000})
		require.NoError(t, err)
		ch := startChild(t)
		conn, err := net.Dial("tcp", ch.addr)
		require.NoError(t, err)
		reports := 0
		_, err = migration.Migrate(context.Background(), src, conn, migration.Options{
			Logger: quiet(), MaxBandwidth: 64 << 20, DowntimeBudget: 2 * time.Millisecond, MaxRounds: 5,
			Progress: func(migration.Progress) {
				if reports++; reports == kill {
					_ = ch.cmd.Process.Kill()
				}
			},
		})
		conn.Close()
		require.Error(t, err, "kill at report %d", kill)
		t.Logf("killed at report %d: %v", kill, err)
		requireRunning(t, src)
		src.Stop()
	}
}
