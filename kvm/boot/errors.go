package boot

import (
	"errors"
	"fmt"
)

// ErrNoPVHNote is returned (wrapped) by LoadPVH when the ELF image carries no
// XEN_ELFNOTE_PHYS32_ENTRY note; the caller may fall back to LoadELF.
var ErrNoPVHNote = errors.New("ELF image has no XEN_ELFNOTE_PHYS32_ENTRY (PVH) note")

// FormatError reports an image that is malformed or unsupported. Field names
// the header field that is wrong, as spelled in the format's specification.
type FormatError struct {
	Format string // "bzImage", "ELF", "PVH", "flat"
	Field  string // e.g. "setup_sects", "e_phoff", "version"
	Reason string
}

func (e *FormatError) Error() string {
	return fmt.Sprintf("%s: %s: %s", e.Format, e.Field, e.Reason)
}

// LayoutError reports something that does not fit in guest memory or in its
// load window: an image too large, RAM too small, a command line too long.
// What names the object or limit, e.g. "image", "cmdline", "RAM".
type LayoutError struct {
	What   string
	Reason string
}

func (e *LayoutError) Error() string {
	return fmt.Sprintf("boot layout: %s: %s", e.What, e.Reason)
}

func formatErr(format, field, reason string, args ...any) error {
	return &FormatError{Format: format, Field: field, Reason: fmt.Sprintf(reason, args...)}
}

func layoutErr(what, reason string, args ...any) error {
	return &LayoutError{What: what, Reason: fmt.Sprintf(reason, args...)}
}
