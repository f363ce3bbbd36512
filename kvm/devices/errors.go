package devices

import (
	"errors"
	"fmt"
)

// ErrStalled is wrapped by the error a Watchdog reports when the guest made
// no progress for its timeout.
var ErrStalled = errors.New("guest made no progress")

// ErrClosed is wrapped by operations on a UART after Close.
var ErrClosed = errors.New("device closed")

// ConfigError reports an invalid constructor option.
type ConfigError struct {
	Device string // device type, e.g. "Watchdog"
	Field  string // offending option, e.g. "Timeout"
	Reason string // what is wrong with it
}

// Error implements error.
func (e *ConfigError) Error() string {
	return fmt.Sprintf("%s config: %s %s", e.Device, e.Field, e.Reason)
}

// SinkError reports that a UART's output sink (or a pump's input source)
// failed. Bytes that could not be written are dropped so that the guest is
// never stalled by a broken sink.
type SinkError struct {
	Device string // UART name, e.g. "COM1"
	Op     string // "write" (sink) or "read" (input source)
	Err    error
}

// Error implements error.
func (e *SinkError) Error() string {
	return fmt.Sprintf("%s serial %s: %v", e.Device, e.Op, e.Err)
}

// Unwrap returns the sink's error.
func (e *SinkError) Unwrap() error { return e.Err }
