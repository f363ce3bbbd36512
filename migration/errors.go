package migration

import (
	"errors"
	"fmt"
)

// Phase names a step of a migration, a receive or a snapshot, for errors and
// progress reports.
type Phase string

// Phases of the source side ([Migrate]).
const (
	PhaseHandshake  Phase = "handshake"    // headers, config, target's Ready
	PhaseFullPass   Phase = "full-pass"    // first copy of all memory
	PhaseIterate    Phase = "dirty-rounds" // rounds of pages dirtied since the last one
	PhaseSwitchover Phase = "switch-over"  // source paused: last pages, state, Complete
	PhaseAck        Phase = "await-ack"    // waiting for the target to resume
	PhaseDone       Phase = "done"         // migrated: the target owns the VM
)

// Phases of the target side ([Receive]) and of snapshots.
const (
	PhaseMemory  Phase = "receive-memory" // pages and rounds until Complete
	PhaseLoad    Phase = "load-state"     // Target.LoadState
	PhaseResume  Phase = "resume"         // Target.Resume and the Ack
	PhaseSave    Phase = "save-snapshot"  // writing a snapshot
	PhaseRestore Phase = "restore"        // loading and resuming a snapshot
)

// PhaseError is returned by [Migrate], [Receive] and the snapshot functions:
// the phase that failed and why. Returned from Migrate it also means the
// source VM was resumed and still owns the guest.
type PhaseError struct {
	Phase Phase
	Err   error
}

func (e *PhaseError) Error() string { return fmt.Sprintf("migration %s: %v", e.Phase, e.Err) }

// Unwrap returns the cause.
func (e *PhaseError) Unwrap() error { return e.Err }

// ErrBadMagic is returned for a stream or snapshot that does not start with
// the kvmkit migration magic (not a migration stream at all).
var ErrBadMagic = errors.New("not a kvmkit migration stream (bad magic)")

// ErrNotConverging is returned by [Migrate] under [GiveUp] when the guest
// dirties memory faster than it can be sent within the round and byte caps.
var ErrNotConverging = errors.New("migration does not converge: guest dirties memory faster than it can be sent")

// ErrNeedsBase is returned when mapping the memory of a diff snapshot loaded
// on its own: load it with [LoadSnapshotChain] after its base.
var ErrNeedsBase = errors.New("diff snapshot: memory needs its base snapshot (use LoadSnapshotChain)")

// VersionError reports a stream or snapshot written in a format version this
// build does not read.
type VersionError struct {
	Got, Want uint32
}

func (e *VersionError) Error() string {
	return fmt.Sprintf("migration format version %d is not supported (this build speaks version %d)", e.Got, e.Want)
}

// KindError reports a stream of the wrong kind, e.g. a snapshot state file
// fed to Receive.
type KindError struct {
	Got, Want uint32
}

func (e *KindError) Error() string {
	return fmt.Sprintf("stream kind %s, expected %s", kindName(e.Got), kindName(e.Want))
}

// ChecksumError reports a record whose CRC32C does not match: the stream was
// corrupted in transit or on disk.
type ChecksumError struct {
	Record RecordType // record type (unreliable when Part is "header")
	Part   string     // "stream header", "record header" or "payload"
	Offset int64      // byte offset of the record in the stream
}

func (e *ChecksumError) Error() string {
	if e.Part == "payload" {
		return fmt.Sprintf("record %v at offset %d: payload checksum mismatch (corrupted)", e.Record, e.Offset)
	}
	return fmt.Sprintf("%s at offset %d: checksum mismatch (corrupted)", e.Part, e.Offset)
}

// LimitError reports a length or count read from a stream that exceeds its
// cap; nothing of that size was allocated.
type LimitError struct {
	What     string
	Got, Max uint64
}

func (e *LimitError) Error() string {
	return fmt.Sprintf("%s is %d, above the limit of %d", e.What, e.Got, e.Max)
}

// ProtocolError reports a well-formed record that makes no sense where it
// is: unknown type, wrong order, bad payload.
type ProtocolError struct {
	Record RecordType
	Offset int64
	Msg    string
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("record %v at offset %d: %s", e.Record, e.Offset, e.Msg)
}

// RemoteError is the peer's Error record: the other side failed and said why.
type RemoteError struct {
	Msg string
}

func (e *RemoteError) Error() string { return "peer failed: " + e.Msg }
