package migration

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kvmkit/kvmkit/kvm"
)

// Snapshot file names inside a snapshot directory.
const (
	StateFile  = "state"
	MemoryFile = "memory"
)

// SnapshotID identifies a snapshot; a diff snapshot names its parent's.
type SnapshotID [16]byte

func (id SnapshotID) String() string { return hex.EncodeToString(id[:]) }

// SnapshotKind says whether a snapshot holds all of memory or a diff.
type SnapshotKind uint32

// Snapshot kinds.
const (
	FullSnapshot SnapshotKind = 1
	DiffSnapshot SnapshotKind = 2
)

func (k SnapshotKind) String() string {
	switch k {
	case FullSnapshot:
		return "full"
	case DiffSnapshot:
		return "diff"
	}
	return fmt.Sprintf("SnapshotKind(%d)", uint32(k))
}

// SnapshotInfo is the SnapshotInfo record of a snapshot's state file.
type SnapshotInfo struct {
	Kind    SnapshotKind
	ID      SnapshotID
	Parent  SnapshotID // diff only: the snapshot it applies on
	Created time.Time
	// MemorySize is the memory file's size in bytes.
	MemorySize uint64
	// MemoryCRC is the CRC32C of the memory file's contents (holes read as
	// zeros); checked by VerifyMemory, not at load (that would read it all).
	MemoryCRC uint32
	// RegionOffsets (full only) is where each region starts in the memory
	// file: regions are concatenated in order, so offset i is the sum of
	// the sizes before it.
	RegionOffsets []uint64
	// Pages (diff only) is the number of pages in the memory file.
	Pages uint64
}

func (si *SnapshotInfo) marshal() []byte {
	e := enc{}
	e.u32(uint32(si.Kind))
	e.b = append(e.b, si.ID[:]...)
	e.b = append(e.b, si.Parent[:]...)
	e.u64(uint64(si.Created.UnixNano()))
	e.u64(si.MemorySize)
	e.u32(si.MemoryCRC)
	e.u32(uint32(len(si.RegionOffsets)))
	for _, o := range si.RegionOffsets {
		e.u64(o)
	}
	e.u64(si.Pages)
	return e.b
}

func (si *SnapshotInfo) unmarshal(b []byte) error {
	d := dec{b: b, ctx: "snapshot info"}
	si.Kind = SnapshotKind(d.u32("kind"))
	copy(si.ID[:], d.take(16, "id"))
	copy(si.Parent[:], d.take(16, "parent"))
	si.Created = time.Unix(0, int64(d.u64("created")))
	si.MemorySize = d.u64("memory size")
	si.MemoryCRC = d.u32("memory crc")
	n := d.u32("region count")
	if d.err == nil && n > MaxRegions {
		d.fail("%d regions above the limit of %d", n, MaxRegions)
	}
	for i := uint32(0); i < n && d.err == nil; i++ {
		si.RegionOffsets = append(si.RegionOffsets, d.u64("region offset"))
	}
	si.Pages = d.u64("pages")
	if err := d.end(); err != nil {
		return err
	}
	if si.Kind != FullSnapshot && si.Kind != DiffSnapshot {
		return fmt.Errorf("snapshot info: unknown kind %d", uint32(si.Kind))
	}
	return nil
}

// SnapshotOptions tune SaveSnapshot and SaveDiffSnapshot.
type SnapshotOptions struct {
	// LeavePaused leaves the VM paused after saving (for example to stop
	// it); by default it resumes. On failure it always resumes.
	LeavePaused bool
	// TrackDirty (SaveSnapshot) starts dirty logging while paused so that
	// SaveDiffSnapshot can later save only the pages written since.
	TrackDirty bool
	// NoSync skips fsync of the files (tests, scratch snapshots).
	NoSync bool
	// Logger; default slog.Default().
	Logger *slog.Logger
}

// SaveSnapshot pauses src, writes a full snapshot (state and memory files,
// see the package documentation) into dir, which must not already hold
// one, and resumes src unless opts.LeavePaused. The state file is written
// last, through a rename: a snapshot interrupted midway has none and does
// not load. Disks are flushed while paused.
func SaveSnapshot(ctx context.Context, src Source, dir string, opts SnapshotOptions) (SnapshotInfo, error) {
	si := SnapshotInfo{Kind: FullSnapshot}
	err := saveSnapshot(ctx, src, dir, opts, &si, func(cfg *Config, regions []kvm.Region, f *os.File) ([]byte, error) {
		if opts.TrackDirty {
			if err := src.StartDirtyLog(); err != nil {
				return nil, fmt.Errorf("start dirty log: %w", err)
			}
			// Whatever the log held before belongs to no snapshot.
			for i, r := range regions {
				if err := src.DirtyBitmap(i, make([]uint64, BitmapWords(uint64(len(r.Host))))); err != nil {
					return nil, fmt.Errorf("dirty bitmap of region %d: %w", i, err)
				}
			}
		}
		var off uint64
		for _, r := range regions {
			si.RegionOffsets = append(si.RegionOffsets, off)
			if err := writeSparse(ctx, f, int64(off), r.Host); err != nil {
				return nil, err
			}
			si.MemoryCRC = crc32.Update(si.MemoryCRC, castagnoli, r.Host)
			off += uint64(len(r.Host))
		}
		si.MemorySize = off
		return nil, f.Truncate(int64(off))
	})
	return si, err
}

// SaveDiffSnapshot pauses src and writes into dir only the pages dirtied
// since the snapshot in parentDir was taken (the dirty log must run since
// then: SaveSnapshot with TrackDirty, or a previous SaveDiffSnapshot, and
// no Migrate in between). The diff's memory file holds those pages packed
// in bitmap order, its state file the bitmap. Load it with
// LoadSnapshotChain(base, diff...). If it fails after harvesting the dirty
// log, the next snapshot must be a full one.
func SaveDiffSnapshot(ctx context.Context, src Source, dir, parentDir string, opts SnapshotOptions) (SnapshotInfo, error) {
	parent, err := LoadSnapshot(parentDir)
	if err != nil {
		return SnapshotInfo{}, &PhaseError{Phase: PhaseSave, Err: fmt.Errorf("parent: %w", err)}
	}
	si := SnapshotInfo{Kind: DiffSnapshot, Parent: parent.Info.ID}
	err = saveSnapshot(ctx, src, dir, opts, &si, func(cfg *Config, regions []kvm.Region, f *os.File) ([]byte, error) {
		if err := sameLayout(parent.Config.Regions, cfg.Regions); err != nil {
			return nil, fmt.Errorf("VM memory differs from the parent snapshot's: %w", err)
		}
		var bitmap []uint64
		for i, r := range regions {
			bm := make([]uint64, BitmapWords(uint64(len(r.Host))))
			if err := src.DirtyBitmap(i, bm); err != nil {
				return nil, fmt.Errorf("dirty bitmap of region %d: %w", i, err)
			}
			bitmap = append(bitmap, bm...)
		}
		bw := bufio.NewWriterSize(f, ioBufferSize)
		h := crc32.New(castagnoli)
		w := io.MultiWriter(bw, h)
		words := 0
		for _, r := range regions {
			n := BitmapWords(uint64(len(r.Host)))
			err := forEachSet(bitmap[words:words+n], func(p uint64) error {
				if p >= uint64(len(r.Host))/pageSize {
					return fmt.Errorf("dirty bitmap names page %d beyond region at %#x", p, r.GPA)
				}
				si.Pages++
				_, err := w.Write(r.Host[p*pageSize : (p+1)*pageSize])
				return err
			})
			if err != nil {
				return nil, err
			}
			words += n
			if err := ctx.Err(); err != nil {
				return nil, err
			}
		}
		if err := bw.Flush(); err != nil {
			return nil, err
		}
		si.MemoryCRC = h.Sum32()
		si.MemorySize = si.Pages * pageSize
		e := enc{b: make([]byte, 0, 8*len(bitmap))}
		for _, w := range bitmap {
			e.u64(w)
		}
		return e.b, nil
	})
	return si, err
}

// saveSnapshot is the common part: pause, flush, write memory (through
// writeMem, which may return a PageBitmap payload), state, resume.
func saveSnapshot(ctx context.Context, src Source, dir string, opts SnapshotOptions, si *SnapshotInfo,
	writeMem func(*Config, []kvm.Region, *os.File) ([]byte, error)) (err error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	fail := func(e error) error { return &PhaseError{Phase: PhaseSave, Err: fmt.Errorf("snapshot %s: %w", dir, e)} }
	cfg := src.Config()
	regions := src.Memory()
	if err := cfg.Validate(); err != nil {
		return fail(err)
	}
	if err := sameLayout(cfg.Regions, layoutOf(regions)); err != nil {
		return fail(fmt.Errorf("source memory does not match its config: %w", err))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fail(err)
	}
	statePath := filepath.Join(dir, StateFile)
	if _, err := os.Lstat(statePath); err == nil {
		return fail(fmt.Errorf("already holds a snapshot: %w", os.ErrExist))
	}
	if _, err := rand.Read(si.ID[:]); err != nil {
		return fail(err)
	}
	si.Created = time.Now()

	t0 := time.Now()
	if err := src.Pause(ctx); err != nil {
		if rerr := src.Resume(); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return fail(fmt.Errorf("pause: %w", err))
	}
	defer func() {
		if err != nil || !opts.LeavePaused {
			if rerr := src.Resume(); rerr != nil {
				err = errors.Join(err, fail(fmt.Errorf("resume: %w", rerr)))
			}
		}
	}()
	if err := src.Flush(); err != nil {
		return fail(fmt.Errorf("flush disks: %w", err))
	}
	mf, err := os.OpenFile(filepath.Join(dir, MemoryFile), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fail(err)
	}
	bitmap, err := writeMem(&cfg, regions, mf)
	if err == nil && !opts.NoSync {
		err = mf.Sync()
	}
	if cerr := mf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fail(fmt.Errorf("memory file: %w", err))
	}
	state, err := src.SaveState()
	if err != nil {
		return fail(fmt.Errorf("save state: %w", err))
	}
	if len(state) > MaxStateSize {
		return fail(fmt.Errorf("VM state of %d bytes above the limit of %d", len(state), MaxStateSize))
	}
	if err := writeStateFile(dir, si, &cfg, bitmap, state, !opts.NoSync); err != nil {
		return fail(err)
	}
	log.Info("snapshot saved", "dir", dir, "kind", si.Kind, "id", si.ID, "memory_bytes", si.MemorySize, "paused", time.Since(t0))
	return nil
}

// writeSparse writes data at off, skipping zero pages (left as holes).
func writeSparse(ctx context.Context, f *os.File, off int64, data []byte) error {
	run := -1 // start of the current run of non-zero pages
	flushRun := func(end int) error {
		if run < 0 {
			return nil
		}
		_, err := f.WriteAt(data[run:end], off+int64(run))
		run = -1
		return err
	}
	for p := 0; p < len(data); p += pageSize {
		if p%(64<<20) == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		if IsZeroPage(data[p : p+pageSize]) {
			if err := flushRun(p); err != nil {
				return err
			}
		} else if run < 0 {
			run = p
		} else if p-run >= 8<<20 {
			if err := flushRun(p); err != nil {
				return err
			}
			run = p
		}
	}
	return flushRun(len(data))
}

func writeStateFile(dir string, si *SnapshotInfo, cfg *Config, bitmap, state []byte, sync bool) error {
	cb, err := cfg.MarshalBinary()
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, StateFile+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 64<<10)
	rw := &recordWriter{w: bw}
	err = writeHeader(bw, kindSnapshot)
	if err == nil {
		err = rw.write(RecSnapshotInfo, si.marshal())
	}
	if err == nil {
		err = rw.write(RecConfig, cb)
	}
	if err == nil && si.Kind == DiffSnapshot {
		err = rw.write(RecPageBitmap, bitmap)
	}
	if err == nil {
		err = rw.write(RecState, state)
	}
	if err == nil {
		err = rw.write(RecComplete)
	}
	if err == nil {
		err = bw.Flush()
	}
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, StateFile))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("state file: %w", err)
	}
	if sync {
		if d, err := os.Open(dir); err == nil {
			_ = d.Sync()
			d.Close()
		}
	}
	return nil
}

// layer is one snapshot directory of a chain.
type layer struct {
	dir    string
	info   SnapshotInfo
	bitmap []uint64 // diff only, regions concatenated
}

// Snapshot is a loaded, validated snapshot (or chain: a full snapshot and
// diffs on top). Its memory is not read until MapMemory.
type Snapshot struct {
	// Info is the top layer's SnapshotInfo.
	Info SnapshotInfo
	// Config is the VM configuration.
	Config Config
	// State is the VM state to pass to Target.LoadState.
	State  []byte
	layers []layer
}

// LoadSnapshot reads and validates the snapshot in dir: magic, version,
// record checksums and order, config, and that the memory file has the
// size the state file says. A diff snapshot loaded alone has its Config and
// State, but MapMemory needs LoadSnapshotChain.
func LoadSnapshot(dir string) (*Snapshot, error) {
	l, cfg, state, err := loadLayer(dir)
	if err != nil {
		return nil, err
	}
	return &Snapshot{Info: l.info, Config: cfg, State: state, layers: []layer{l}}, nil
}

// LoadSnapshotChain loads a full snapshot and the diff snapshots taken
// after it, in order: each diff's parent must be the previous one and the
// memory layouts must match. Config and State are the last one's.
func LoadSnapshotChain(dirs ...string) (*Snapshot, error) {
	if len(dirs) == 0 {
		return nil, errors.New("snapshot chain: no directories")
	}
	var s *Snapshot
	for i, dir := range dirs {
		l, cfg, state, err := loadLayer(dir)
		if err != nil {
			return nil, err
		}
		if i == 0 {
			if l.info.Kind != FullSnapshot {
				return nil, fmt.Errorf("snapshot %s: a chain starts with a full snapshot, this is a %v", dir, l.info.Kind)
			}
			s = &Snapshot{}
		} else {
			prev := s.layers[i-1].info.ID
			if l.info.Kind != DiffSnapshot || l.info.Parent != prev {
				return nil, fmt.Errorf("snapshot %s: %v snapshot with parent %v does not apply on %v", dir, l.info.Kind, l.info.Parent, prev)
			}
			if err := sameLayout(s.Config.Regions, cfg.Regions); err != nil {
				return nil, fmt.Errorf("snapshot %s: memory layout differs from its parent: %w", dir, err)
			}
		}
		s.Info, s.Config, s.State = l.info, cfg, state
		s.layers = append(s.layers, l)
	}
	return s, nil
}

func loadLayer(dir string) (l layer, cfg Config, state []byte, err error) {
	wrap := func(e error) error { return fmt.Errorf("snapshot %s: %w", dir, e) }
	f, err := os.Open(filepath.Join(dir, StateFile))
	if err != nil {
		return l, cfg, nil, wrap(err)
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 64<<10)
	if err := readHeader(br, kindSnapshot); err != nil {
		return l, cfg, nil, wrap(err)
	}
	rr := &recordReader{r: br, off: headerSize}
	expect := func(want RecordType) ([]byte, error) {
		off := rr.off
		t, p, err := rr.next()
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("state file truncated before the %v record: %w", want, io.ErrUnexpectedEOF)
		}
		if err != nil {
			return nil, err
		}
		if t != want {
			return nil, &ProtocolError{Record: t, Offset: off, Msg: fmt.Sprintf("expected %v", want)}
		}
		return p, nil
	}
	l.dir = dir
	p, err := expect(RecSnapshotInfo)
	if err == nil {
		err = l.info.unmarshal(p)
	}
	if err == nil {
		p, err = expect(RecConfig)
	}
	if err == nil {
		err = cfg.UnmarshalBinary(p)
	}
	if err == nil && l.info.Kind == DiffSnapshot {
		p, err = expect(RecPageBitmap)
		if err == nil {
			l.bitmap, err = decodeBitmap(p, &cfg, l.info.Pages)
		}
	}
	if err == nil {
		p, err = expect(RecState)
		state = append([]byte(nil), p...)
	}
	if err == nil {
		_, err = expect(RecComplete)
	}
	if err == nil {
		if t, _, e := rr.next(); !errors.Is(e, io.EOF) {
			err = &ProtocolError{Record: t, Offset: rr.off, Msg: "data after Complete"}
		}
	}
	if err == nil {
		err = checkLayout(&l.info, &cfg)
	}
	if err == nil {
		var st os.FileInfo
		st, err = os.Stat(filepath.Join(dir, MemoryFile))
		if err == nil && uint64(st.Size()) != l.info.MemorySize {
			err = fmt.Errorf("memory file is %d bytes, the state file says %d (truncated or foreign)", st.Size(), l.info.MemorySize)
		}
	}
	if err != nil {
		return l, cfg, nil, wrap(err)
	}
	return l, cfg, state, nil
}

// checkLayout checks the memory file layout against the config.
func checkLayout(si *SnapshotInfo, cfg *Config) error {
	switch si.Kind {
	case FullSnapshot:
		if len(si.RegionOffsets) != len(cfg.Regions) {
			return fmt.Errorf("snapshot info has %d region offsets for %d regions", len(si.RegionOffsets), len(cfg.Regions))
		}
		var off uint64
		for i, r := range cfg.Regions {
			if si.RegionOffsets[i] != off {
				return fmt.Errorf("region %d at memory file offset %d, expected %d", i, si.RegionOffsets[i], off)
			}
			off += r.Size
		}
		if si.MemorySize != off {
			return fmt.Errorf("memory file size %d, regions total %d", si.MemorySize, off)
		}
	case DiffSnapshot:
		if si.MemorySize != si.Pages*pageSize {
			return fmt.Errorf("diff memory size %d for %d pages", si.MemorySize, si.Pages)
		}
	}
	return nil
}

// decodeBitmap checks a PageBitmap payload against the config: one bitmap
// per region, concatenated, no bit past a region's end, pages bits set.
func decodeBitmap(p []byte, cfg *Config, pages uint64) ([]uint64, error) {
	words := 0
	for _, r := range cfg.Regions {
		words += BitmapWords(r.Size)
	}
	if len(p) != 8*words {
		return nil, fmt.Errorf("page bitmap of %d bytes, the regions need %d", len(p), 8*words)
	}
	bm := make([]uint64, words)
	for i := range bm {
		bm[i] = binary.LittleEndian.Uint64(p[8*i:])
	}
	w := 0
	for i, r := range cfg.Regions {
		n := BitmapWords(r.Size)
		if extra := r.Size / pageSize % 64; extra != 0 && bm[w+n-1]>>extra != 0 {
			return nil, fmt.Errorf("page bitmap marks pages past the end of region %d", i)
		}
		w += n
	}
	if got := countBits(bm); got != pages {
		return nil, fmt.Errorf("page bitmap has %d pages, the snapshot info says %d", got, pages)
	}
	return bm, nil
}

// MapMemory maps the snapshot's memory for a VM: each region is a private
// (copy-on-write) mapping of the full snapshot's memory file, so nothing is
// read until the guest touches it and the guest's writes never reach the
// file; the pages of any diff layers are then read in over it. The caller
// owns the regions (kvm.NewMemoryFromRegions(...).Close() unmaps them);
// their FD is -1.
func (s *Snapshot) MapMemory() ([]kvm.Region, error) {
	if len(s.layers) == 0 || s.layers[0].info.Kind != FullSnapshot {
		return nil, ErrNeedsBase
	}
	base := s.layers[0]
	f, err := os.Open(filepath.Join(base.dir, MemoryFile))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	regions := make([]kvm.Region, 0, len(s.Config.Regions))
	unmap := func() {
		for _, r := range regions {
			_ = unix.Munmap(r.Host)
		}
	}
	for i, rc := range s.Config.Regions {
		host, err := unix.Mmap(int(f.Fd()), int64(base.info.RegionOffsets[i]), int(rc.Size),
			unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_NORESERVE)
		if err != nil {
			unmap()
			return nil, fmt.Errorf("snapshot %s: mmap region %d: %w", base.dir, i, err)
		}
		regions = append(regions, kvm.Region{GPA: rc.GPA, Host: host, FD: -1})
	}
	for _, l := range s.layers[1:] {
		if err := applyDiff(l, regions); err != nil {
			unmap()
			return nil, err
		}
	}
	return regions, nil
}

// applyDiff reads a diff layer's pages into regions, one read per run of
// consecutive pages.
func applyDiff(l layer, regions []kvm.Region) error {
	f, err := os.Open(filepath.Join(l.dir, MemoryFile))
	if err != nil {
		return err
	}
	defer f.Close()
	var fileOff int64
	w := 0
	for i, r := range regions {
		n := BitmapWords(uint64(len(r.Host)))
		bm := l.bitmap[w : w+n]
		w += n
		runStart, runLen := uint64(0), uint64(0)
		read := func() error {
			if runLen == 0 {
				return nil
			}
			dst := r.Host[runStart*pageSize : (runStart+runLen)*pageSize]
			if _, err := f.ReadAt(dst, fileOff); err != nil {
				return fmt.Errorf("snapshot %s: region %d: %w", l.dir, i, err)
			}
			fileOff += int64(len(dst))
			runLen = 0
			return nil
		}
		err := forEachSet(bm, func(p uint64) error {
			if runLen > 0 && p == runStart+runLen && runLen < 2048 {
				runLen++
				return nil
			}
			if err := read(); err != nil {
				return err
			}
			runStart, runLen = p, 1
			return nil
		})
		if err == nil {
			err = read()
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// VerifyMemory reads every layer's memory file and checks its CRC32C: the
// full check that loading skips to stay lazy.
func (s *Snapshot) VerifyMemory() error {
	for _, l := range s.layers {
		f, err := os.Open(filepath.Join(l.dir, MemoryFile))
		if err != nil {
			return err
		}
		h := crc32.New(castagnoli)
		_, err = io.Copy(h, bufio.NewReaderSize(f, ioBufferSize))
		f.Close()
		if err != nil {
			return fmt.Errorf("snapshot %s: memory file: %w", l.dir, err)
		}
		if h.Sum32() != l.info.MemoryCRC {
			return fmt.Errorf("snapshot %s: memory file: %w", l.dir, &ChecksumError{Part: "memory file"})
		}
	}
	return nil
}

// RestoreStats describes a Restore.
type RestoreStats struct {
	// Lazy reports that the target adopted the private mappings
	// (MemoryAdopter) instead of copying the memory.
	Lazy bool
	// Prepare is mapping (or allocating and copying) memory; Load is
	// LoadState; Resume is Target.Resume; Total is all of Restore.
	Prepare, Load, Resume, Total time.Duration
	// AnnounceErr is Target.Announce's error, if any.
	AnnounceErr error
}

// Restore builds a VM from snap through tgt and resumes it. A target that
// implements MemoryAdopter gets the lazy private mappings of MapMemory (so
// resuming costs no memory copy); any other gets Prepare'd RAM filled by
// reading the memory files. On failure tgt.Abort is called.
func Restore(ctx context.Context, snap *Snapshot, tgt Target) (RestoreStats, error) {
	var st RestoreStats
	t0 := time.Now()
	fail := func(err error) (RestoreStats, error) {
		tgt.Abort()
		st.Total = time.Since(t0)
		return st, &PhaseError{Phase: PhaseRestore, Err: err}
	}
	if ad, ok := tgt.(MemoryAdopter); ok {
		regions, err := snap.MapMemory()
		if err != nil {
			return fail(err)
		}
		if err := ad.PrepareWithMemory(snap.Config, regions); err != nil {
			for _, r := range regions {
				_ = unix.Munmap(r.Host)
			}
			return fail(fmt.Errorf("prepare target VM: %w", err))
		}
		st.Lazy = true
	} else {
		regions, err := tgt.Prepare(snap.Config)
		if err != nil {
			return fail(fmt.Errorf("prepare target VM: %w", err))
		}
		if err := sameLayout(snap.Config.Regions, layoutOf(regions)); err != nil {
			return fail(fmt.Errorf("target memory does not match the config: %w", err))
		}
		if err := snap.copyMemory(ctx, regions); err != nil {
			return fail(err)
		}
	}
	t1 := time.Now()
	st.Prepare = t1.Sub(t0)
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	if err := tgt.LoadState(snap.State); err != nil {
		return fail(fmt.Errorf("load state: %w", err))
	}
	t2 := time.Now()
	st.Load = t2.Sub(t1)
	if err := tgt.Resume(); err != nil {
		return fail(fmt.Errorf("resume: %w", err))
	}
	st.Resume = time.Since(t2)
	st.Total = time.Since(t0)
	st.AnnounceErr = tgt.Announce()
	return st, nil
}

// copyMemory reads the snapshot's memory into regions (eager restore).
func (s *Snapshot) copyMemory(ctx context.Context, regions []kvm.Region) error {
	if len(s.layers) == 0 || s.layers[0].info.Kind != FullSnapshot {
		return ErrNeedsBase
	}
	base := s.layers[0]
	f, err := os.Open(filepath.Join(base.dir, MemoryFile))
	if err != nil {
		return err
	}
	defer f.Close()
	for i, r := range regions {
		off := int64(base.info.RegionOffsets[i])
		for p := 0; p < len(r.Host); p += 64 << 20 {
			if err := ctx.Err(); err != nil {
				return err
			}
			end := min(p+64<<20, len(r.Host))
			if _, err := f.ReadAt(r.Host[p:end], off+int64(p)); err != nil {
				return fmt.Errorf("snapshot %s: region %d: %w", base.dir, i, err)
			}
		}
	}
	for _, l := range s.layers[1:] {
		if err := applyDiff(l, regions); err != nil {
			return err
		}
	}
	return nil
}
