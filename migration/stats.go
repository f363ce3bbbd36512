package migration

import "time"

// RoundStats describes one memory pass: round 0 is the full pass, the last
// entry of a successful migration (Final) is the pass made while paused.
type RoundStats struct {
	Round     int
	Final     bool
	Pages     uint64        // pages sent with data
	ZeroPages uint64        // pages sent as zero markers
	Bytes     uint64        // bytes written to the connection in this pass
	Duration  time.Duration // scan + send + the target's RoundAck
	Bandwidth float64       // Bytes / Duration, bytes per second
	// DirtyRate is the rate at which the guest dirtied pages while the
	// previous pass ran (pages harvested at this pass's start divided by the
	// previous pass's duration), pages per second. 0 for the full pass.
	DirtyRate float64
	Throttle  float64 // throttle in force during the pass
}

// Stats describes a migration, as measured on the source.
type Stats struct {
	// Downtime is measured on the source's monotonic clock from just before
	// Source.Pause is called to the receipt of the target's Ack, which the
	// target sends right after its Resume returned. It over-estimates the
	// guest's real pause by the Ack's one-way network latency.
	Downtime time.Duration
	// TargetDowntime is measured on the target's clock from the receipt of
	// the Paused record (sent right after Source.Pause returned) to the end
	// of Target.Resume: the switch-over work seen from the target. It
	// under-estimates by the pause time and the Paused record's latency.
	TargetDowntime time.Duration
	// ResumeTime is the target's LoadState + Resume duration.
	ResumeTime time.Duration
	// PauseTime is how long Source.Pause took.
	PauseTime time.Duration
	// FinalPassTime is the final dirty-log harvest and pass made while
	// paused; SaveStateTime is Source.Flush plus Source.SaveState. With
	// PauseTime they split SentTime.
	FinalPassTime, SaveStateTime time.Duration
	// SentTime is from just before Source.Pause to the last byte of the
	// state handed to the connection: the source-side part of Downtime,
	// without the target's load and resume. It is what QEMU reports as
	// "downtime" for a pre-copy migration without a return path, so
	// compare that number with this one, and Downtime with nothing less.
	SentTime time.Duration
	// EstimatedDowntime is the transfer time predicted when deciding to
	// switch over (remaining dirty data at the measured bandwidth).
	EstimatedDowntime time.Duration
	// Total is from the call of Migrate to its return.
	Total time.Duration
	// Rounds counts memory passes: the full pass, the dirty rounds and the
	// final pass made while paused.
	Rounds int
	// BytesSent is every byte written to the connection.
	BytesSent uint64
	// PagesSent counts pages sent with data, ZeroPages pages sent as
	// zero markers (8 bytes instead of 4104), over all passes.
	PagesSent, ZeroPages uint64
	// HolePages counts pages the full pass skipped without reading them:
	// holes of a memfd-backed region (never written, so zero on both
	// sides).
	HolePages uint64
	// FinalPages counts pages (data and zero) sent while paused.
	FinalPages uint64
	// StateBytes is the size of the saved VM state.
	StateBytes int
	// MemoryBytes is the guest RAM size.
	MemoryBytes uint64
	// Throttle is the highest throttle applied (0 if auto-converge never
	// kicked in).
	Throttle float64
	// Converged reports that the switch-over happened because the estimate
	// fitted the downtime budget.
	Converged bool
	// PerRound has one entry per memory pass.
	PerRound []RoundStats
}

// Summary is the flat, JSON-friendly digest of Stats that the vmm CLI
// prints.
type Summary struct {
	DowntimeMs       float64 `json:"downtime_ms"`
	TargetDowntimeMs float64 `json:"target_downtime_ms"`
	ResumeMs         float64 `json:"resume_ms"`
	SentMs           float64 `json:"sent_ms"`
	PauseMs          float64 `json:"pause_ms"`
	FinalPassMs      float64 `json:"final_pass_ms"`
	SaveStateMs      float64 `json:"save_state_ms"`
	TotalMs          float64 `json:"total_ms"`
	Rounds           int     `json:"rounds"`
	BytesSent        uint64  `json:"bytes_sent"`
	PagesSent        uint64  `json:"pages_sent"`
	ZeroPages        uint64  `json:"zero_pages"`
	HolePages        uint64  `json:"hole_pages"`
	MemoryBytes      uint64  `json:"memory_bytes"`
	Throttle         float64 `json:"max_throttle"`
}

// Summary returns the digest of s.
func (s Stats) Summary() Summary {
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	return Summary{
		DowntimeMs: ms(s.Downtime), TargetDowntimeMs: ms(s.TargetDowntime), ResumeMs: ms(s.ResumeTime), SentMs: ms(s.SentTime),
		PauseMs: ms(s.PauseTime), FinalPassMs: ms(s.FinalPassTime), SaveStateMs: ms(s.SaveStateTime),
		TotalMs: ms(s.Total), Rounds: s.Rounds, BytesSent: s.BytesSent, PagesSent: s.PagesSent,
		ZeroPages: s.ZeroPages, HolePages: s.HolePages, MemoryBytes: s.MemoryBytes, Throttle: s.Throttle,
	}
}

// Progress is reported to Options.Progress after each memory pass and every
// 64 MiB of the full pass.
type Progress struct {
	Phase      Phase
	Round      int
	Elapsed    time.Duration
	BytesSent  uint64
	PagesSent  uint64 // data and zero pages, all passes
	TotalPages uint64 // guest RAM in pages
	// DirtyPages is the dirty set found at the last harvest: what is left.
	DirtyPages uint64
	DirtyRate  float64 // pages per second, last round
	Bandwidth  float64 // bytes per second, estimate used for convergence
	Throttle   float64
}

// ReceiveStats describes a migration as measured on the target.
type ReceiveStats struct {
	// Downtime is from the receipt of the Paused record to the end of
	// Target.Resume (the source's Stats.TargetDowntime).
	Downtime time.Duration
	// ResumeTime is LoadState + Resume.
	ResumeTime time.Duration
	// Total is from the call of Receive to the Ack.
	Total         time.Duration
	Rounds        int
	BytesReceived uint64
	PagesReceived uint64 // data pages
	ZeroPages     uint64
	StateBytes    int
	// Confirmed reports that the source's Done record arrived: the source
	// knows the target owns the VM. False means the Ack may have been lost
	// in flight (the source would then have resumed too); the caller should
	// alert.
	Confirmed bool
	// AnnounceErr is the error of Target.Announce, if any.
	AnnounceErr error
}
