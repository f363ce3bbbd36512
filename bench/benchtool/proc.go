package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// memSample is what one read of /proc/PID/smaps tells.
type memSample struct {
	RSSKiB   uint64 // resident set, all mappings
	GuestKiB uint64 // resident in the mappings taken for guest RAM
	GuestVMA int    // how many mappings were taken for guest RAM
}

// guestSlack is how much larger than the guest RAM size a mapping may be
// and still count as guest RAM (QEMU adds alignment and a guard page).
const guestSlack = 16 << 20

// parseSmaps sums the Rss of every mapping in a /proc/PID/smaps text, and
// separately of those whose size is within [ram, ram+guestSlack]: the
// guest RAM mapping of a VMM with ram bytes of RAM in one block (both
// kvmkit and QEMU map it that way for RAM below the 3 GiB hole). ram 0
// takes no mapping as guest RAM.
func parseSmaps(r io.Reader, ram uint64) (memSample, error) {
	var s memSample
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxLine)
	inGuest := false
	for sc.Scan() {
		line := sc.Text()
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if start, end, ok := parseRange(f[0]); ok && !strings.HasSuffix(f[0], ":") {
			size := end - start
			inGuest = ram > 0 && size >= ram && size <= ram+guestSlack
			if inGuest {
				s.GuestVMA++
			}
			continue
		}
		if f[0] != "Rss:" || len(f) < 2 {
			continue
		}
		kib, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return s, fmt.Errorf("smaps: bad Rss line %q", clip(line))
		}
		s.RSSKiB += kib
		if inGuest {
			s.GuestKiB += kib
		}
	}
	return s, sc.Err()
}

// parseRange parses "start-end" in hex.
func parseRange(s string) (start, end uint64, ok bool) {
	a, b, found := strings.Cut(s, "-")
	if !found {
		return 0, 0, false
	}
	start, err1 := strconv.ParseUint(a, 16, 64)
	end, err2 := strconv.ParseUint(b, 16, 64)
	if err1 != nil || err2 != nil || end < start {
		return 0, 0, false
	}
	return start, end, true
}

// parseSize parses a byte count with an optional K, M or G suffix (powers
// of 1024).
func parseSize(s string) (uint64, error) {
	mult := uint64(1)
	t := strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B")
	switch {
	case strings.HasSuffix(t, "K"):
		mult, t = 1<<10, t[:len(t)-1]
	case strings.HasSuffix(t, "M"):
		mult, t = 1<<20, t[:len(t)-1]
	case strings.HasSuffix(t, "G"):
		mult, t = 1<<30, t[:len(t)-1]
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil || n > (1<<63)/mult {
		return 0, fmt.Errorf("bad size %q (want N, NK, NM or NG)", s)
	}
	return n * mult, nil
}

// runResult is the ROW printed by `benchtool run`.
type runResult struct {
	MarkerMs    float64 `json:"marker_ms"`          // start to first line containing the marker (-1: never)
	ExitMs      float64 `json:"exit_ms"`            // start to process exit
	PeakRSSMiB  float64 `json:"peak_rss_MiB"`       // getrusage ru_maxrss
	OverheadMiB float64 `json:"rss_beyond_ram_MiB"` // max over samples of RSS minus guest RAM RSS
	GuestMiB    float64 `json:"guest_rss_MiB"`      // guest RAM resident at that sample
	Samples     int     `json:"samples"`
	ExitCode    int     `json:"exit_code"`
	TimedOut    bool    `json:"timed_out,omitempty"`
	Terminated  bool    `json:"terminated,omitempty"`    // -kill-after ended it
	GuestRAM    string  `json:"guest_ram_vma,omitempty"` // "found" or "not found"
}

// lineWatcher copies a process's output to a log and records when a line
// first contains the marker.
type lineWatcher struct {
	mu     sync.Mutex
	marker []byte
	start  time.Time
	at     time.Duration // 0: not seen
	log    io.Writer
	seen   chan struct{}
}

func (w *lineWatcher) consume(r io.Reader) {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			w.mu.Lock()
			if w.at == 0 && len(w.marker) > 0 && bytes.Contains(line, w.marker) {
				w.at = time.Since(w.start)
				close(w.seen)
			}
			if w.log != nil {
				_, _ = w.log.Write(line)
			}
			w.mu.Unlock()
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}

func cmdRun(ctx context.Context, fs *flag.FlagSet, args []string, stdout, stderr io.Writer) error {
	label := fs.String("label", "", "row label")
	marker := fs.String("marker", "", "console string whose first appearance is timed")
	ramFlag := fs.String("ram", "0", "guest RAM size (e.g. 256M): a mapping of this size is guest RAM")
	timeout := fs.Duration("timeout", 5*time.Minute, "kill the process after this long")
	logPath := fs.String("log", "", "file receiving the process's stdout and stderr (default: discarded)")
	poll := fs.Duration("poll", 10*time.Millisecond, "/proc/PID/smaps sampling interval")
	killAfter := fs.Duration("kill-after", 0, "SIGTERM (then SIGKILL 5s later) the process this long after the marker appeared; 0 waits for its exit")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	argv := fs.Args()
	if *label == "" || len(argv) == 0 {
		return fmt.Errorf("%w: run: need -label and a command after --", errUsage)
	}
	ram, err := parseSize(*ramFlag)
	if err != nil {
		return fmt.Errorf("%w: run: -ram: %v", errUsage, err)
	}
	var logw io.Writer = io.Discard
	if *logPath != "" {
		f, err := os.Create(*logPath)
		if err != nil {
			return err
		}
		defer f.Close()
		logw = f
	}
	res, err := measure(ctx, argv, *marker, ram, *timeout, *poll, *killAfter, logw)
	if err != nil {
		return err
	}
	js, err := json.Marshal(res)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "ROW %s %s\n", *label, js)
	return err
}

// measure runs argv, watching its output for marker and sampling its
// memory every poll until it exits (or timeout passes: then it is killed;
// or, if killAfter > 0, killAfter after the marker: then it is terminated).
func measure(ctx context.Context, argv []string, marker string, ram uint64, timeout, poll, killAfter time.Duration, logw io.Writer) (runResult, error) {
	var res runResult
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	pr, pw, err := os.Pipe()
	if err != nil {
		return res, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = pw, pw
	w := &lineWatcher{marker: []byte(marker), log: logw, seen: make(chan struct{})}
	w.start = time.Now()
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		return res, fmt.Errorf("run: %w", err)
	}
	pw.Close()
	consumed := make(chan struct{})
	go func() { w.consume(pr); close(consumed) }()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	smaps := fmt.Sprintf("/proc/%d/smaps", cmd.Process.Pid)
	tick := time.NewTicker(poll)
	defer tick.Stop()
	var waitErr error
	seen := w.seen
	var term, kill <-chan time.Time
loop:
	for {
		select {
		case waitErr = <-exited:
			break loop
		case <-ctx.Done():
			res.TimedOut = ctx.Err() == context.DeadlineExceeded
			_ = cmd.Process.Kill()
			waitErr = <-exited
			break loop
		case <-seen:
			seen = nil
			if killAfter > 0 {
				term = time.After(killAfter)
			}
		case <-term:
			term = nil
			res.Terminated = true
			_ = cmd.Process.Signal(syscall.SIGTERM)
			kill = time.After(5 * time.Second)
		case <-kill:
			kill = nil
			_ = cmd.Process.Kill()
		case <-tick.C:
			f, err := os.Open(smaps)
			if err != nil {
				continue // exiting
			}
			s, err := parseSmaps(f, ram)
			f.Close()
			if err != nil || s.RSSKiB == 0 {
				continue
			}
			res.Samples++
			if s.GuestVMA > 0 {
				res.GuestRAM = "found"
			}
			if over := float64(s.RSSKiB-s.GuestKiB) / 1024; over > res.OverheadMiB {
				res.OverheadMiB = over
				res.GuestMiB = float64(s.GuestKiB) / 1024
			}
		}
	}
	exitAt := time.Since(w.start)
	res.ExitMs = ms(exitAt)
	<-consumed
	pr.Close()
	w.mu.Lock()
	res.MarkerMs = -1
	if w.at > 0 {
		// The reader may take the marker line from the pipe only after
		// the exit was seen; the process wrote it before exiting.
		res.MarkerMs = ms(min(w.at, exitAt))
	}
	w.mu.Unlock()
	if ram > 0 && res.GuestRAM == "" {
		res.GuestRAM = "not found"
	}
	res.ExitCode = -1
	if st := cmd.ProcessState; st != nil {
		res.ExitCode = st.ExitCode()
		if ru, ok := st.SysUsage().(*syscall.Rusage); ok {
			res.PeakRSSMiB = float64(ru.Maxrss) / 1024
		}
	}
	var ee *exec.ExitError
	if waitErr != nil && !errors.As(waitErr, &ee) {
		return res, fmt.Errorf("run: %w", waitErr)
	}
	return res, nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func cmdWaitFor(ctx context.Context, fs *flag.FlagSet, args []string) error {
	file := fs.String("file", "", "file to watch")
	str := fs.String("string", "", "string to wait for")
	timeout := fs.Duration("timeout", 2*time.Minute, "give up after this long")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *file == "" || *str == "" {
		return fmt.Errorf("%w: waitfor: need -file and -string", errUsage)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if ok, err := fileContains(*file, []byte(*str)); err != nil {
			return err
		} else if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waitfor: %q not in %s within %v", *str, *file, *timeout)
		case <-tick.C:
		}
	}
}

// fileContains reports whether the first 16 MiB of path contain s (a
// missing file does not).
func fileContains(path string, s []byte) (bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 16<<20))
	if err != nil {
		return false, err
	}
	return bytes.Contains(b, s), nil
}
