package netsetup

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func requireNet(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for netlink changes")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
}

func name(p string) string { return fmt.Sprintf("%s%d", p, os.Getpid()%100000) }

func TestTapBridgeLifecycle(t *testing.T) {
	requireNet(t)
	tap, br := name("kt"), name("kb")
	t.Cleanup(func() { _ = Delete(tap); _ = Delete(br) })
	require.NoError(t, CreateTap(tap, 1000, 1000))
	require.NoError(t, CreateBridge(br))
	require.NoError(t, AttachToBridge(tap, br))
	require.NoError(t, SetUp(tap))
	owner, err := os.ReadFile("/sys/class/net/" + tap + "/owner")
	require.NoError(t, err)
	assert.Equal(t, "1000\n", string(owner))
	master, err := os.Readlink("/sys/class/net/" + tap + "/master")
	require.NoError(t, err)
	assert.Contains(t, master, br)
	require.NoError(t, Delete(tap))
	require.NoError(t, Delete(br))
	assert.False(t, Exists(tap))
	assert.False(t, Exists(br))
	assert.NoError(t, Delete(tap), "deleting a missing link is fine")
}

func TestMoveTapIntoNetns(t *testing.T) {
	requireNet(t)
	tap := name("kn")
	t.Cleanup(func() { _ = Delete(tap) })
	cmd := exec.Command("sleep", "30")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	require.NoError(t, CreateTap(tap, -1, -1))
	require.NoError(t, MoveToNetns(tap, cmd.Process.Pid))
	assert.False(t, Exists(tap), "moved out of the host namespace")
	links, err := LinksIn(cmd.Process.Pid)
	require.NoError(t, err)
	assert.ElementsMatch(t, []string{"lo", tap}, links)
	up, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/dev", cmd.Process.Pid))
	require.NoError(t, err)
	assert.Contains(t, string(up), tap)
	// When the namespace dies the tap goes with it: nothing left behind.
	require.NoError(t, cmd.Process.Kill())
	_ = cmd.Wait()
	assert.Eventually(t, func() bool { return !Exists(tap) }, 2e9, 1e7)
}

func TestNameChecks(t *testing.T) {
	assert.ErrorIs(t, CreateTap("a-name-that-is-too-long", 0, 0), ErrNameTooLong)
	assert.ErrorIs(t, CreateVeth("ok", ""), ErrNameTooLong)
}
