package jail

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Environment markers between the parent and the two child stages.
const (
	envConfig = "KVMKIT_JAIL_CONFIG"
	envStage2 = "KVMKIT_JAIL_STAGE2"
)

// childConfig is what the parent hands to stage 1 in envConfig.
type childConfig struct {
	Config
	Devices []Device // the ones present on the host
	Mknod   bool     // device nodes were created with mknod (else bind)
	SyncFD  int
	ErrFD   int
	KeepFDs int // fds 3..3+KeepFDs-1 stay open across the jail
}

// Cmd is a program about to run, or running, in a jail.
type Cmd struct {
	// Cmd is the underlying command. Set Stdin, Stdout, Stderr and
	// ExtraFiles (they keep descriptors 3, 4, ... inside the jail) before
	// Start; do not change Path, Args, Env or SysProcAttr.
	*exec.Cmd

	cfg     Config
	created []string // host paths Prepare created, in creation order
	syncW   *os.File
	errR    *os.File
	started bool
	pending *childConfig
}

// Command prepares cfg.Dir and returns the command that will re-execute
// the current executable with args (os.Args[1:] when nil) in the jail. The
// child must call Enter at the start of main.
func Command(cfg Config, args []string) (*Cmd, error) {
	if err := cfg.normalize(); err != nil {
		return nil, err
	}
	if args == nil {
		args = os.Args[1:]
	}
	// A dynamically linked executable needs its loader and libraries
	// inside the jail at exec time.
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("jail: find own executable: %w", err)
	}
	deps, err := ELFDeps(exe)
	if err != nil {
		return nil, err
	}
	for _, d := range deps {
		cfg.Binds = append(cfg.Binds, Bind{Source: d, Target: d})
	}
	c := &Cmd{cfg: cfg}
	cc, err := c.prepare()
	if err != nil {
		_ = c.removeCreated()
		return nil, err
	}
	c.Cmd = &exec.Cmd{
		Path: "/proc/self/exe",
		Args: append([]string{os.Args[0]}, args...),
	}
	flags := unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWNET | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setsid: false}
	if cfg.UserNS {
		flags |= unix.CLONE_NEWUSER
		c.SysProcAttr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: cfg.UID, Size: 1}}
		c.SysProcAttr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: cfg.GID, Size: 1}}
		c.SysProcAttr.GidMappingsEnableSetgroups = false
		// The clone keeps the parent's (unmapped) IDs: become the mapped
		// root so that the child has its capabilities inside the namespace.
		c.SysProcAttr.Credential = &syscall.Credential{Uid: 0, Gid: 0, NoSetGroups: true}
	}
	c.SysProcAttr.Cloneflags = uintptr(flags)
	c.pending = cc
	return c, nil
}

// prepare creates the jail directory, mount points and device nodes.
func (c *Cmd) prepare() (*childConfig, error) {
	cfg := &c.cfg
	if err := c.mkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, err
	}
	for _, d := range []string{"dev", "proc"} {
		if err := c.mkdirAll(cfg.in(d), 0o755); err != nil {
			return nil, err
		}
	}
	cc := &childConfig{Config: *cfg, Mknod: !cfg.UserNS}
	for _, d := range cfg.Devices {
		var st unix.Stat_t
		if err := unix.Stat(d.Path, &st); err != nil {
			if d.Required {
				return nil, fmt.Errorf("%w: %s: %v", ErrDeviceMissing, d.Path, err)
			}
			continue
		}
		if st.Mode&unix.S_IFMT != unix.S_IFCHR && st.Mode&unix.S_IFMT != unix.S_IFBLK {
			return nil, fmt.Errorf("%w: %s is not a device node", ErrBadConfig, d.Path)
		}
		dst := cfg.in(d.Path)
		if err := c.mkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return nil, err
		}
		if _, err := os.Lstat(dst); err == nil {
			return nil, fmt.Errorf("%w: %s already exists in the jail", ErrBadConfig, dst)
		}
		if cc.Mknod {
			// A private node owned by the jail's user, as Firecracker's
			// jailer does; the host node's permissions stay untouched.
			if err := unix.Mknod(dst, (st.Mode&unix.S_IFMT)|0o600, int(st.Rdev)); err != nil {
				return nil, fmt.Errorf("jail: mknod %s: %w", dst, err)
			}
			c.created = append(c.created, dst)
			if err := os.Chown(dst, cfg.UID, cfg.GID); err != nil {
				return nil, fmt.Errorf("jail: %w", err)
			}
		} else if err := c.touch(dst); err != nil {
			return nil, err
		}
		cc.Devices = append(cc.Devices, d)
	}
	for _, b := range cfg.Binds {
		fi, err := os.Stat(b.Source)
		if err != nil {
			return nil, fmt.Errorf("jail: bind source: %w", err)
		}
		dst := cfg.in(b.Target)
		if fi.IsDir() {
			err = c.mkdirAll(dst, 0o755)
		} else {
			if err = c.mkdirAll(filepath.Dir(dst), 0o755); err == nil {
				err = c.touch(dst)
			}
		}
		if err != nil {
			return nil, err
		}
	}
	return cc, nil
}

func (c *Cmd) mkdirAll(p string, mode os.FileMode) error {
	if fi, err := os.Stat(p); err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%w: %s exists and is not a directory", ErrBadConfig, p)
		}
		return nil
	}
	if err := c.mkdirAll(filepath.Dir(p), mode); err != nil {
		return err
	}
	if err := os.Mkdir(p, mode); err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	c.created = append(c.created, p)
	return nil
}

func (c *Cmd) touch(p string) error {
	if _, err := os.Lstat(p); err == nil {
		return nil
	}
	f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	c.created = append(c.created, p)
	return f.Close()
}

// Start starts the child, paused before it builds the jail: place it in
// cgroups and network namespaces by Pid, then call Release.
func (c *Cmd) Start() error {
	if c.started {
		return errors.New("jail: Start called twice")
	}
	c.started = true
	syncR, syncW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		syncR.Close()
		syncW.Close()
		return fmt.Errorf("jail: %w", err)
	}
	cc := c.pending
	cc.KeepFDs = len(c.ExtraFiles)
	cc.SyncFD = 3 + len(c.ExtraFiles)
	cc.ErrFD = cc.SyncFD + 1
	js, err := json.Marshal(cc)
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	c.ExtraFiles = append(slices.Clip(c.ExtraFiles), syncR, errW)
	if c.Env == nil {
		c.Env = os.Environ()
	}
	c.Env = append(filterEnv(c.Env), envConfig+"="+string(js))
	err = c.Cmd.Start()
	syncR.Close()
	errW.Close()
	c.ExtraFiles = c.ExtraFiles[:cc.KeepFDs]
	if err != nil {
		syncW.Close()
		errR.Close()
		return fmt.Errorf("jail: start child: %w", err)
	}
	c.syncW, c.errR = syncW, errR
	return nil
}

func filterEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, e := range env {
		if !strings.HasPrefix(e, envConfig+"=") && !strings.HasPrefix(e, envStage2+"=") {
			out = append(out, e)
		}
	}
	return out
}

// maxSetupError bounds the error text read back from the child.
const maxSetupError = 4096

// Release lets the started child build the jail and waits until it has
// re-executed inside it. A failure inside the child is returned wrapping
// ErrSetup (the child is then reaped).
func (c *Cmd) Release() error {
	if c.syncW == nil {
		return errors.New("jail: Release before Start")
	}
	_, werr := c.syncW.Write([]byte{1})
	c.syncW.Close()
	c.syncW = nil
	msg, _ := io.ReadAll(io.LimitReader(bufio.NewReader(c.errR), maxSetupError))
	c.errR.Close()
	c.errR = nil
	if len(msg) > 0 {
		_ = c.Cmd.Wait()
		return fmt.Errorf("%w: %s", ErrSetup, strings.TrimSpace(string(msg)))
	}
	if werr != nil {
		return fmt.Errorf("jail: release child: %w", werr)
	}
	return nil
}

// Abort kills a started child that was never released.
func (c *Cmd) Abort() {
	if c.syncW != nil {
		c.syncW.Close()
		c.syncW = nil
	}
	if c.errR != nil {
		c.errR.Close()
		c.errR = nil
	}
	if c.Process != nil {
		_ = c.Process.Kill()
		_ = c.Cmd.Wait()
	}
}

// Cleanup removes what Command created in the jail directory (mount
// points, device nodes, and the directory itself if Command created it).
// Call it after the child has exited; it refuses to remove anything while
// a mount below the jail directory is still visible.
func (c *Cmd) Cleanup() error {
	if mounts, err := MountsUnder(c.cfg.Dir); err != nil {
		return err
	} else if len(mounts) > 0 {
		return fmt.Errorf("jail: %s still has mounts %q; not removing", c.cfg.Dir, mounts)
	}
	return c.removeCreated()
}

func (c *Cmd) removeCreated() error {
	var errs []error
	for i := len(c.created) - 1; i >= 0; i-- {
		if err := os.Remove(c.created[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	c.created = nil
	return errors.Join(errs...)
}

// Dir returns the jail's root directory on the host.
func (c *Cmd) Dir() string { return c.cfg.Dir }

// MountsUnder lists the mount points in the calling process's mount
// namespace at or below dir.
func MountsUnder(dir string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("jail: %w", err)
	}
	dir = filepath.Clean(dir)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		p := f[4]
		if p == dir || strings.HasPrefix(p, dir+"/") {
			out = append(out, p)
		}
	}
	return out, nil
}
