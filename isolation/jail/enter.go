package jail

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Enter must be the first thing main does in a program that uses Command.
//
// In a normal run it returns false. In the set-up stage of a jailed child
// it builds the jail and re-executes the program inside it; it never
// returns there (on failure it reports to the parent and exits with status
// 125). In the re-executed program it returns true: the process is now
// confined and should carry on with its real work.
func Enter() bool {
	if os.Getenv(envStage2) != "" {
		_ = os.Unsetenv(envStage2)
		return true
	}
	js := os.Getenv(envConfig)
	if js == "" {
		return false
	}
	runtime.LockOSThread() // credentials are dropped on this thread only
	var cc childConfig
	if err := json.Unmarshal([]byte(js), &cc); err != nil {
		fmt.Fprintf(os.Stderr, "jail: bad %s: %v\n", envConfig, err)
		os.Exit(125)
	}
	err := stage1(&cc)
	// Only reached on failure: tell the parent why.
	msg := []byte(err.Error())
	_, _ = unix.Write(cc.ErrFD, msg)
	os.Exit(125)
	return false
}

// step wraps an error with the set-up step that failed.
func step(what string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", what, err)
}

// stage1 builds the jail and execs; it returns only an error.
func stage1(cc *childConfig) error {
	_ = os.Unsetenv(envConfig)
	// Wait for the parent to finish cgroup and network placement.
	var b [1]byte
	if n, err := unix.Read(cc.SyncFD, b[:]); n != 1 {
		return step("wait for parent", fmt.Errorf("pipe closed (%v)", err))
	}
	_ = unix.Close(cc.SyncFD)
	if err := unix.Sethostname([]byte(cc.Hostname)); err != nil {
		return step("sethostname", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return step("make mounts private", err)
	}
	dir := cc.Dir
	if err := unix.Mount(dir, dir, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return step("bind jail dir", err)
	}
	if !cc.Mknod {
		for _, d := range cc.Devices {
			if err := unix.Mount(d.Path, cc.in(d.Path), "", unix.MS_BIND, ""); err != nil {
				return step("bind "+d.Path, err)
			}
		}
	}
	for _, bd := range cc.Binds {
		dst := cc.in(bd.Target)
		if err := unix.Mount(bd.Source, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return step("bind "+bd.Source, err)
		}
		flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV)
		if !bd.Writable {
			flags |= unix.MS_RDONLY
		}
		if err := unix.Mount("", dst, "", flags, ""); err != nil {
			return step("remount "+bd.Target, err)
		}
	}
	exe, err := unix.Open("/proc/self/exe", unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return step("open own executable", err)
	}
	if err := unix.Mount("proc", cc.in("/proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return step("mount /proc", err)
	}
	if err := pivot(dir); err != nil {
		return err
	}
	for _, r := range cc.Rlimits {
		if err := unix.Setrlimit(r.Resource, &unix.Rlimit{Cur: r.Cur, Max: r.Max}); err != nil {
			return step("setrlimit "+strconv.Itoa(r.Resource), err)
		}
	}
	if err := closeInherited(cc, exe); err != nil {
		return err
	}
	if cc.ExecLabel != "" {
		if err := os.WriteFile("/proc/thread-self/attr/exec", []byte(cc.ExecLabel), 0); err != nil {
			return step("set SELinux exec label "+cc.ExecLabel, err)
		}
	}
	if err := dropPrivileges(cc); err != nil {
		return err
	}
	env := append(os.Environ(), envStage2+"=1")
	env = append(env, cc.Env...)
	// Exec through /proc/self/fd: the binary is outside the new root, but
	// the descriptor opened before pivot_root still reaches it.
	return step("exec", syscall.Exec("/proc/self/fd/"+strconv.Itoa(exe), os.Args, env))
}

// pivot makes dir the root and detaches the old one.
func pivot(dir string) error {
	if err := unix.Chdir(dir); err != nil {
		return step("chdir jail", err)
	}
	// pivot_root(".", ".") stacks the old root on top of the new one;
	// unmounting "." then removes the old root without needing a put_old
	// directory inside the jail.
	if err := unix.PivotRoot(".", "."); err != nil {
		if err != unix.EINVAL {
			return step("pivot_root", err)
		}
		// The host root is an initramfs (rootfs), which pivot_root cannot
		// move. Fall back as container runtimes do: move the jail onto /
		// and chroot into it; the mount namespace still hides the host's
		// other mounts, and the caller drops CAP_SYS_CHROOT afterwards.
		if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
			return step("move jail onto / (rootfs fallback)", err)
		}
		if err := unix.Chroot("."); err != nil {
			return step("chroot (rootfs fallback)", err)
		}
		return step("chdir /", unix.Chdir("/"))
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return step("unmount old root", err)
	}
	return step("chdir /", unix.Chdir("/"))
}

// closeInherited marks every descriptor but stdio, the caller's kept ones
// and exe close-on-exec, so nothing else crosses into the jailed program.
func closeInherited(cc *childConfig, exe int) error {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return step("list fds", err)
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 || (fd < 3+cc.KeepFDs) || fd == exe {
			continue
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil && err != unix.EBADF {
			return step("close-on-exec fd "+e.Name(), err)
		}
	}
	return nil
}

// dropPrivileges switches this thread to the jail's uid/gid with no
// capabilities and no_new_privs. Raw per-thread system calls are used on
// purpose: the exec that follows replaces the whole process with this
// thread, so the other threads' credentials do not matter.
func dropPrivileges(cc *childConfig) error {
	uid, gid := cc.UID, cc.GID
	if cc.UserNS {
		uid, gid = 0, 0 // mapped to cc.UID/cc.GID outside
	} else if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, 0, 0, 0); e != 0 {
		return step("setgroups", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(gid), uintptr(gid), uintptr(gid)); e != 0 {
		return step("setresgid "+strconv.Itoa(gid), e)
	}
	last, err := lastCap()
	if err != nil {
		return err
	}
	for c := 0; c <= last; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil && err != unix.EINVAL {
			return step("drop capability "+strconv.Itoa(c)+" from bounding set", err)
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && err != unix.EINVAL {
		return step("clear ambient capabilities", err)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(uid), uintptr(uid), uintptr(uid)); e != 0 {
		return step("setresuid "+strconv.Itoa(uid), e)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return step("capset", err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return step("no_new_privs", err)
	}
	// A credential change clears the parent-death signal: set it again.
	return step("pdeathsig", unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0))
}

func lastCap() (int, error) {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return 0, step("read cap_last_cap", err)
	}
	n, err := strconv.Atoi(string(trimNL(b)))
	return n, step("parse cap_last_cap", err)
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
