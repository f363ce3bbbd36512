// Package cgroup confines one VM in its own control group: CPU quota and
// weight, memory limit, pids limit and I/O limits. It detects whether the
// host offers the needed controllers on cgroup v2 and uses v1 hierarchies
// otherwise, creates the VM's group beneath the calling process's own
// group, moves the VMM (all its threads) in, and removes the group again.
package cgroup

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Version is the cgroup interface in use.
type Version int

const (
	// V1 uses one hierarchy per controller (cpu, memory, pids, blkio).
	V1 Version = 1
	// V2 uses the unified hierarchy.
	V2 Version = 2
)

// String returns "v1" or "v2".
func (v Version) String() string { return "v" + strconv.Itoa(int(v)) }

// IOLimit throttles one block device. Zero fields are unlimited.
type IOLimit struct {
	Major, Minor uint32
	ReadBPS      uint64 // bytes per second
	WriteBPS     uint64
	ReadIOPS     uint64 // operations per second
	WriteIOPS    uint64
}

// Limits are the resource limits of one VM. Zero values mean unlimited or
// kernel default.
type Limits struct {
	// CPUQuota is the CPU time allowed per period as a fraction of one
	// CPU: 0.5 is half a CPU, 2 is two CPUs.
	CPUQuota float64
	// CPUPeriod is the quota period; 100ms when zero.
	CPUPeriod time.Duration
	// CPUWeight is the relative CPU weight, 1..10000 (cgroup v2 scale;
	// converted to cpu.shares on v1). 0 keeps the default (100).
	CPUWeight uint64
	// MemoryMax is the memory limit in bytes (RAM, and RAM+swap where the
	// kernel accounts swap).
	MemoryMax int64
	// PidsMax caps the number of tasks (threads count).
	PidsMax int64
	// IOWeight is the relative I/O weight, 1..10000 (v2) or 10..1000 (v1).
	IOWeight uint64
	// IO throttles individual block devices.
	IO []IOLimit
}

// Validate reports a limit outside its range.
func (l Limits) Validate() error {
	switch {
	case l.CPUQuota < 0:
		return &LimitError{Name: "cpu quota", Value: fmt.Sprint(l.CPUQuota), Why: "must not be negative"}
	case l.CPUPeriod < 0 || (l.CPUPeriod != 0 && (l.CPUPeriod < time.Millisecond || l.CPUPeriod > time.Second)):
		return &LimitError{Name: "cpu period", Value: l.CPUPeriod.String(), Why: "must be 1ms..1s"}
	case l.CPUWeight > 10000:
		return &LimitError{Name: "cpu weight", Value: fmt.Sprint(l.CPUWeight), Why: "must be 1..10000"}
	case l.MemoryMax < 0:
		return &LimitError{Name: "memory limit", Value: fmt.Sprint(l.MemoryMax), Why: "must not be negative"}
	case l.PidsMax < 0:
		return &LimitError{Name: "pids limit", Value: fmt.Sprint(l.PidsMax), Why: "must not be negative"}
	case l.IOWeight > 10000:
		return &LimitError{Name: "io weight", Value: fmt.Sprint(l.IOWeight), Why: "must be 1..10000"}
	}
	if q := l.quotaMicros(); l.CPUQuota > 0 && q < 1000 {
		return &LimitError{Name: "cpu quota", Value: fmt.Sprint(l.CPUQuota), Why: "gives less than 1ms per period"}
	}
	return nil
}

func (l Limits) period() time.Duration {
	if l.CPUPeriod == 0 {
		return 100 * time.Millisecond
	}
	return l.CPUPeriod
}

func (l Limits) quotaMicros() int64 {
	return int64(l.CPUQuota * float64(l.period().Microseconds()))
}

// controllers returns the controllers l needs; cpu, memory and pids are
// always used so that the VM is accounted even without limits.
func (l Limits) controllers() []string {
	c := []string{"cpu", "memory", "pids"}
	if l.IOWeight != 0 || len(l.IO) > 0 {
		c = append(c, "io")
	}
	return c
}

// LimitError reports an invalid limit.
type LimitError struct {
	Name, Value, Why string
}

func (e *LimitError) Error() string {
	return fmt.Sprintf("cgroup: %s %s %s", e.Name, e.Value, e.Why)
}

// ErrUnavailable is wrapped when neither cgroup v2 nor v1 offers a needed
// controller.
var ErrUnavailable = errors.New("cgroup controller unavailable")

// Options locate the cgroup file systems. Zero values select the real
// host files; tests point them at fakes.
type Options struct {
	// Mountinfo is the path of the mount table; /proc/self/mountinfo.
	Mountinfo string
	// SelfCgroup is the path of the process's membership list;
	// /proc/self/cgroup.
	SelfCgroup string
	// Prefix is prepended to every mount point found in Mountinfo; empty
	// on a real host.
	Prefix string
}

// System is the detected cgroup layout of the host.
type System struct {
	// Version is the interface New will use.
	Version Version
	// Unified is the directory of the calling process's own v2 group, ""
	// when v2 is not mounted.
	Unified string
	// V1 maps a v1 controller name to the directory of the calling
	// process's own group in that hierarchy.
	V1 map[string]string
	// V2Controllers lists the controllers available to v2 children.
	V2Controllers []string
}

type mount struct {
	root, point, fstype, superOpts string
}

// parseMountinfo returns the cgroup and cgroup2 mounts in a mountinfo
// table.
func parseMountinfo(r io.Reader) ([]mount, error) {
	var out []mount
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := -1
		for i, x := range f {
			if x == "-" && i >= 6 {
				sep = i
				break
			}
		}
		if sep < 0 || len(f) < sep+4 {
			continue
		}
		fstype := f[sep+1]
		if fstype != "cgroup" && fstype != "cgroup2" {
			continue
		}
		out = append(out, mount{root: unescape(f[3]), point: unescape(f[4]), fstype: fstype, superOpts: f[sep+3]})
	}
	return out, sc.Err()
}

// unescape undoes mountinfo's octal escapes (\040 for space, ...).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// parseSelfCgroup maps each v1 controller (and "" for v2) to the
// process's group path from /proc/self/cgroup.
func parseSelfCgroup(r io.Reader) (map[string]string, error) {
	out := map[string]string{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "" {
			out[""] = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			out[c] = parts[2]
		}
	}
	return out, sc.Err()
}

// v1Name maps a v2 controller name to its v1 name.
func v1Name(c string) string {
	if c == "io" {
		return "blkio"
	}
	return c
}

// Detect reads the mount table and the process's memberships and decides
// between v2 (when every controller in need is enabled there) and v1.
func Detect(opts Options, need Limits) (*System, error) {
	if opts.Mountinfo == "" {
		opts.Mountinfo = "/proc/self/mountinfo"
	}
	if opts.SelfCgroup == "" {
		opts.SelfCgroup = "/proc/self/cgroup"
	}
	mf, err := os.Open(opts.Mountinfo)
	if err != nil {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	defer mf.Close()
	mounts, err := parseMountinfo(mf)
	if err != nil {
		return nil, fmt.Errorf("cgroup: parse %s: %w", opts.Mountinfo, err)
	}
	sf, err := os.Open(opts.SelfCgroup)
	if err != nil {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	defer sf.Close()
	self, err := parseSelfCgroup(sf)
	if err != nil {
		return nil, fmt.Errorf("cgroup: parse %s: %w", opts.SelfCgroup, err)
	}
	sys := &System{V1: map[string]string{}}
	for _, m := range mounts {
		switch m.fstype {
		case "cgroup2":
			if sys.Unified == "" {
				sys.Unified = groupDir(opts.Prefix, m, self[""])
			}
		case "cgroup":
			for _, o := range strings.Split(m.superOpts, ",") {
				if p, ok := self[o]; ok {
					if _, dup := sys.V1[o]; !dup {
						sys.V1[o] = groupDir(opts.Prefix, m, p)
					}
				}
			}
		}
	}
	if sys.Unified != "" {
		if b, err := os.ReadFile(filepath.Join(sys.Unified, "cgroup.controllers")); err == nil {
			sys.V2Controllers = strings.Fields(string(b))
		}
	}
	needed := need.controllers()
	if containsAll(sys.V2Controllers, needed) {
		sys.Version = V2
		return sys, nil
	}
	var missing []string
	for _, c := range needed {
		if _, ok := sys.V1[v1Name(c)]; !ok {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("cgroup: %w: %s enabled neither on cgroup v2 (has %q) nor mounted as v1",
			ErrUnavailable, strings.Join(missing, ", "), sys.V2Controllers)
	}
	sys.Version = V1
	return sys, nil
}

// groupDir turns a group path from /proc/self/cgroup into a directory under
// mount m.
func groupDir(prefix string, m mount, group string) string {
	rel := group
	if m.root != "/" {
		rel = strings.TrimPrefix(group, m.root)
	}
	return filepath.Join(prefix, m.point, rel)
}

func containsAll(have, want []string) bool {
	set := map[string]bool{}
	for _, h := range have {
		set[h] = true
	}
	for _, w := range want {
		if !set[w] {
			return false
		}
	}
	return true
}

// Cgroup is one VM's control group (one directory per v1 hierarchy, or one
// v2 directory).
type Cgroup struct {
	version Version
	name    string
	dirs    map[string]string // controller ("" for v2) -> directory
}

// ErrBadName is wrapped when a group name is empty or not a single path
// element.
var ErrBadName = errors.New("cgroup: bad group name")

// New creates group name beneath the calling process's own group and
// applies l. On error nothing is left behind.
func (s *System) New(name string, l Limits) (*Cgroup, error) {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return nil, fmt.Errorf("%w %q", ErrBadName, name)
	}
	if err := l.Validate(); err != nil {
		return nil, err
	}
	cg := &Cgroup{version: s.Version, name: name, dirs: map[string]string{}}
	var err error
	if s.Version == V2 {
		err = cg.createV2(s, l)
	} else {
		err = cg.createV1(s, l)
	}
	if err != nil {
		_ = cg.removeDirs()
		return nil, err
	}
	return cg, nil
}

func (cg *Cgroup) createV2(s *System, l Limits) error {
	var enable []string
	for _, c := range l.controllers() {
		enable = append(enable, "+"+c)
	}
	if err := writeFile(s.Unified, "cgroup.subtree_control", strings.Join(enable, " ")); err != nil {
		return err
	}
	dir := filepath.Join(s.Unified, cg.name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return fmt.Errorf("cgroup: %w", err)
	}
	cg.dirs[""] = dir
	if l.CPUQuota > 0 {
		if err := writeFile(dir, "cpu.max", fmt.Sprintf("%d %d", l.quotaMicros(), l.period().Microseconds())); err != nil {
			return err
		}
	}
	if l.CPUWeight > 0 {
		if err := writeFile(dir, "cpu.weight", strconv.FormatUint(l.CPUWeight, 10)); err != nil {
			return err
		}
	}
	if l.MemoryMax > 0 {
		if err := writeFile(dir, "memory.max", strconv.FormatInt(l.MemoryMax, 10)); err != nil {
			return err
		}
		if err := writeFile(dir, "memory.swap.max", "0"); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if l.PidsMax > 0 {
		if err := writeFile(dir, "pids.max", strconv.FormatInt(l.PidsMax, 10)); err != nil {
			return err
		}
	}
	if l.IOWeight > 0 {
		if err := writeFile(dir, "io.weight", strconv.FormatUint(l.IOWeight, 10)); err != nil {
			return err
		}
	}
	for _, io := range l.IO {
		line := fmt.Sprintf("%d:%d", io.Major, io.Minor)
		for _, kv := range []struct {
			k string
			v uint64
		}{{"rbps", io.ReadBPS}, {"wbps", io.WriteBPS}, {"riops", io.ReadIOPS}, {"wiops", io.WriteIOPS}} {
			if kv.v > 0 {
				line += fmt.Sprintf(" %s=%d", kv.k, kv.v)
			}
		}
		if err := writeFile(dir, "io.max", line); err != nil {
			return err
		}
	}
	return nil
}

// SharesFromWeight converts a v2 cpu.weight (1..10000) to v1 cpu.shares
// (2..262144), the mapping container runtimes use.
func SharesFromWeight(w uint64) uint64 {
	if w == 0 {
		return 1024
	}
	return 2 + (w-1)*262142/9999
}

func (cg *Cgroup) createV1(s *System, l Limits) error {
	for _, c := range l.controllers() {
		ctl := v1Name(c)
		dir := filepath.Join(s.V1[ctl], cg.name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			return fmt.Errorf("cgroup: %w", err)
		}
		cg.dirs[ctl] = dir
	}
	return writeLimitsV1(cg, l)
}

// writeLimitsV1 writes l into the v1 control files of cg's directories.
func writeLimitsV1(cg *Cgroup, l Limits) error {
	if d, ok := cg.dirs["cpu"]; ok {
		if l.CPUQuota > 0 {
			if err := writeFile(d, "cpu.cfs_period_us", strconv.FormatInt(l.period().Microseconds(), 10)); err != nil {
				return err
			}
			if err := writeFile(d, "cpu.cfs_quota_us", strconv.FormatInt(l.quotaMicros(), 10)); err != nil {
				return err
			}
		}
		if l.CPUWeight > 0 {
			if err := writeFile(d, "cpu.shares", strconv.FormatUint(SharesFromWeight(l.CPUWeight), 10)); err != nil {
				return err
			}
		}
	}
	if d, ok := cg.dirs["memory"]; ok && l.MemoryMax > 0 {
		if err := writeFile(d, "memory.limit_in_bytes", strconv.FormatInt(l.MemoryMax, 10)); err != nil {
			return err
		}
		// Without this the VM would swap instead of hitting the limit.
		if err := writeFile(d, "memory.memsw.limit_in_bytes", strconv.FormatInt(l.MemoryMax, 10)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if d, ok := cg.dirs["pids"]; ok && l.PidsMax > 0 {
		if err := writeFile(d, "pids.max", strconv.FormatInt(l.PidsMax, 10)); err != nil {
			return err
		}
	}
	if d, ok := cg.dirs["blkio"]; ok {
		if l.IOWeight > 0 {
			w := min(max(l.IOWeight/10, 10), 1000)
			if err := writeFile(d, "blkio.weight", strconv.FormatUint(w, 10)); err != nil {
				return err
			}
		}
		for _, io := range l.IO {
			for _, kv := range []struct {
				f string
				v uint64
			}{{"read_bps_device", io.ReadBPS}, {"write_bps_device", io.WriteBPS}, {"read_iops_device", io.ReadIOPS}, {"write_iops_device", io.WriteIOPS}} {
				if kv.v > 0 {
					if err := writeFile(d, "blkio.throttle."+kv.f, fmt.Sprintf("%d:%d %d", io.Major, io.Minor, kv.v)); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

// FileError reports a cgroup control file that could not be written.
type FileError struct {
	Path, Value string
	Err         error
}

func (e *FileError) Error() string {
	return fmt.Sprintf("cgroup: write %q to %s: %v", e.Value, e.Path, e.Err)
}

// Unwrap returns the underlying error.
func (e *FileError) Unwrap() error { return e.Err }

func writeFile(dir, file, val string) error {
	p := filepath.Join(dir, file)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return &FileError{Path: p, Value: val, Err: err}
	}
	_, err = f.WriteString(val)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return &FileError{Path: p, Value: val, Err: err}
	}
	return nil
}

// Version returns the cgroup interface the group lives on.
func (cg *Cgroup) Version() Version { return cg.version }

// Dirs returns the group's directories, sorted.
func (cg *Cgroup) Dirs() []string {
	out := make([]string, 0, len(cg.dirs))
	for _, d := range cg.dirs {
		out = append(out, d)
	}
	sort.Strings(out)
	return out
}

// AddProcess moves process pid, with all its threads, into the group.
func (cg *Cgroup) AddProcess(pid int) error {
	for _, d := range cg.Dirs() {
		if err := writeFile(d, "cgroup.procs", strconv.Itoa(pid)); err != nil {
			return err
		}
	}
	return nil
}

// AddThread moves one thread into the group (v1 "tasks"; on v2 the thread's
// whole process moves, as v2 keeps a domain group's threads together).
func (cg *Cgroup) AddThread(tid int) error {
	file := "tasks"
	if cg.version == V2 {
		file = "cgroup.procs"
	}
	for _, d := range cg.Dirs() {
		if err := writeFile(d, file, strconv.Itoa(tid)); err != nil {
			return err
		}
	}
	return nil
}

// Procs returns the PIDs in the group (from its memory or unified
// directory).
func (cg *Cgroup) Procs() ([]int, error) {
	d := cg.dirs[""]
	if d == "" {
		d = cg.dirs["memory"]
	}
	b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if p, err := strconv.Atoi(f); err == nil {
			pids = append(pids, p)
		}
	}
	return pids, nil
}

// OOMKills returns how many times the kernel's OOM killer fired inside the
// group because of its memory limit.
func (cg *Cgroup) OOMKills() (uint64, error) {
	var p string
	if d, ok := cg.dirs[""]; ok {
		p = filepath.Join(d, "memory.events")
	} else {
		p = filepath.Join(cg.dirs["memory"], "memory.oom_control")
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, fmt.Errorf("cgroup: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == "oom_kill" {
			return strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, nil
}

// Remove deletes the group. The group must be empty; Remove retries while
// the kernel still holds exiting tasks, until ctx ends.
func (cg *Cgroup) Remove(ctx context.Context) error {
	for {
		err := cg.removeDirs()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cgroup: remove %s: %w (last error: %v)", cg.name, ctx.Err(), err)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (cg *Cgroup) removeDirs() error {
	var errs []error
	for k, d := range cg.dirs {
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		delete(cg.dirs, k)
	}
	return errors.Join(errs...)
}
