package virtio

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// ErrStateMismatch is wrapped when saved state does not fit the device it is
// restored into (another device type, queue count or queue size).
var ErrStateMismatch = errors.New("saved state does not match the device")

// ErrStateCorrupt is wrapped when saved state cannot be decoded (truncated or
// not produced by kvmkit).
var ErrStateCorrupt = errors.New("saved state corrupt or truncated")

// StateError reports saved state that cannot be restored.
type StateError struct {
	What string // which state (for example "virtio-blk device")
	Err  error
}

func (e *StateError) Error() string { return fmt.Sprintf("restore %s: %v", e.What, e.Err) }

// Unwrap returns the underlying error.
func (e *StateError) Unwrap() error { return e.Err }

// StateVersionError reports saved state of a version this code cannot read.
type StateVersionError struct {
	What      string
	Got, Want uint32
}

func (e *StateVersionError) Error() string {
	return fmt.Sprintf("restore %s: state version %d, this build reads version %d", e.What, e.Got, e.Want)
}

// versioned is the envelope of every encoded state.
type versioned struct {
	Kind    string          `json:"kind"`
	Version uint32          `json:"version"`
	Data    json.RawMessage `json:"data"`
}

// EncodeState wraps v (JSON-encodable) in an envelope naming its kind and
// version. The encoding is deterministic, so save-restore-save round-trips
// byte for byte.
func EncodeState(kind string, version uint32, v any) ([]byte, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode %s state: %w", kind, err)
	}
	return json.Marshal(versioned{Kind: kind, Version: version, Data: data})
}

// DecodeState checks the envelope's kind and version and decodes its data
// into v. Unknown fields are rejected so that state from a newer layout
// carrying the same version is not silently half-restored.
func DecodeState(b []byte, kind string, version uint32, v any) error {
	var env versioned
	if err := json.Unmarshal(b, &env); err != nil {
		return &StateError{What: kind, Err: errors.Join(ErrStateCorrupt, err)}
	}
	if env.Kind != kind {
		return &StateError{What: kind, Err: fmt.Errorf("%w: state is for %q", ErrStateMismatch, env.Kind)}
	}
	if env.Version != version {
		return &StateVersionError{What: kind, Got: env.Version, Want: version}
	}
	dec := json.NewDecoder(bytes.NewReader(env.Data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &StateError{What: kind, Err: errors.Join(ErrStateCorrupt, err)}
	}
	return nil
}
