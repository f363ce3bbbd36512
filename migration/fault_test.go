package migration_test

import (
	"errors"
	"hash/crc32"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/migrationtest"
)

// faultConn breaks or corrupts the bytes written through it.
type faultConn struct {
	net.Conn
	mu      sync.Mutex
	n       int64 // bytes written so far
	limit   int64 // >= 0: after this many bytes the connection drops
	flipAt  int64 // >= 0: this byte is inverted
	flipped bool
	edit    func(off int64, p []byte)
}

var errInjected = errors.New("injected connection drop")

func (c *faultConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	buf := p
	if c.flipAt >= c.n && c.flipAt < c.n+int64(len(p)) || c.edit != nil {
		buf = append([]byte(nil), p...)
		if c.flipAt >= c.n && c.flipAt < c.n+int64(len(p)) {
			buf[c.flipAt-c.n] ^= 0xff
			c.flipped = true
		}
		if c.edit != nil {
			c.edit(c.n, buf)
		}
	}
	if c.limit >= 0 && c.n+int64(len(buf)) > c.limit {
		k := c.limit - c.n
		if k > 0 {
			w, _ := c.Conn.Write(buf[:k])
			c.n += int64(w)
		}
		c.Conn.Close()
		return int(max(k, 0)), errInjected
	}
	w, err := c.Conn.Write(buf)
	c.n += int64(w)
	return w, err
}

func dropAfter(n int64) func(net.Conn) net.Conn {
	return func(c net.Conn) net.Conn { return &faultConn{Conn: c, limit: n, flipAt: -1} }
}

var faultVM = migrationtest.Options{Regions: []kvm.RegionSpec{{Size: 2 << 20}}, WorkingSetPages: 32, DirtyRate: 20000}

// requireOneOwner checks the invariant of every fault: exactly one side
// runs the guest, and it is the source unless the source saw the Ack.
func requireOneOwner(t *testing.T, o outcome, what string) {
	t.Helper()
	if o.srcErr == nil {
		// The fault hit after the Ack (the Done record): migrated.
		assert.True(t, o.src.Status().Paused, "%s: source stays paused after the ack", what)
		assert.True(t, o.tgt.Status().Running(), "%s: target runs", what)
		require.NoError(t, o.tgtErr, what)
		return
	}
	var pe *migration.PhaseError
	require.ErrorAs(t, o.srcErr, &pe, what)
	require.Error(t, o.tgtErr, "%s: target must fail when the source did (%v)", what, o.srcErr)
	requireRunning(t, o.src)
	ts := o.tgt.Status()
	assert.False(t, ts.Running(), "%s: target must not run", what)
	if ts.Started {
		assert.True(t, ts.Aborted, "%s: a resumed target aborts", what)
	}
}

func TestFaultConnectionDropAtEveryPhase(t *testing.T) {
	if testing.Short() {
		t.Skip("many migrations")
	}
	ref := migrate(t, pipePair, faultVM, migrationtest.Options{}, migration.Options{}, nil, nil)
	requireMigrated(t, ref)
	total := int64(ref.stats.BytesSent)
	// Around every record boundary of the start and the end, and evenly
	// through the middle.
	points := []int64{0, 1, 19, 20, 21, 31, 32, 33, 60, 100}
	for k := int64(1); k < 16; k++ {
		points = append(points, total*k/16)
	}
	for d := int64(-120); d <= 40; d += 8 {
		points = append(points, total+d)
	}
	for _, n := range points {
		o := migrate(t, tcpPair, faultVM, migrationtest.Options{}, migration.Options{AckTimeout: 5 * time.Second}, dropAfter(n), nil)
		requireOneOwner(t, o, "source conn drops after "+strconv.FormatInt(n, 10))
		o.src.Stop()
		o.tgt.Stop()
	}
}

func TestFaultTargetSideDrop(t *testing.T) {
	if testing.Short() {
		t.Skip("many migrations")
	}
	for n := int64(0); n < 140; n += 6 {
		o := migrate(t, pipePair, faultVM, migrationtest.Options{}, migration.Options{AckTimeout: 5 * time.Second}, nil, dropAfter(n))
		requireOneOwner(t, o, "target conn drops after "+strconv.FormatInt(n, 10))
		o.src.Stop()
		o.tgt.Stop()
	}
}

func TestFaultCorruptedBytes(t *testing.T) {
	ref := migrate(t, pipePair, faultVM, migrationtest.Options{}, migration.Options{}, nil, nil)
	requireMigrated(t, ref)
	total := int64(ref.stats.BytesSent)
	points := []int64{3, 9, 14, 18, 22, 27, 40, 50}
	for k := int64(1); k < 12; k++ {
		points = append(points, total*k/12)
	}
	points = append(points, total-200, total-60, total-30)
	for _, off := range points {
		var fc *faultConn
		wrap := func(c net.Conn) net.Conn {
			fc = &faultConn{Conn: c, limit: -1, flipAt: off}
			return fc
		}
		o := migrate(t, pipePair, faultVM, migrationtest.Options{}, migration.Options{AckTimeout: 5 * time.Second}, wrap, nil)
		what := "byte " + strconv.FormatInt(off, 10) + " flipped"
		fc.mu.Lock()
		flipped, sent := fc.flipped, fc.n
		fc.mu.Unlock()
		if o.srcErr == nil {
			// Streams vary in length with the guest's dirtying: this one
			// may have ended before the offset, or the flip hit the Done
			// record (the last 16 bytes), which comes after the Ack.
			require.True(t, !flipped || off >= sent-16, "%s: corruption went unnoticed", what)
			requireMigrated(t, o)
			continue
		}
		requireOneOwner(t, o, what)
		switch {
		case off < 8:
			assert.ErrorIs(t, o.tgtErr, migration.ErrBadMagic, what)
		case off < 20:
			var ve *migration.VersionError
			var ce *migration.ChecksumError
			assert.True(t, errors.As(o.tgtErr, &ve) || errors.As(o.tgtErr, &ce), "%s: %v", what, o.tgtErr)
		default:
			var ce *migration.ChecksumError
			require.ErrorAs(t, o.tgtErr, &ce, what)
			assert.ErrorContains(t, o.srcErr, "checksum mismatch", "%s: the source hears why", what)
			if ce.Part == "payload" {
				assert.Contains(t, o.tgtErr.Error(), "record "+ce.Record.String(), "names the record")
			}
		}
		o.src.Stop()
		o.tgt.Stop()
	}
}

func TestFaultVersionMismatch(t *testing.T) {
	// A source speaking version 7 (header checksum valid).
	setVersion := func(c net.Conn) net.Conn {
		return &faultConn{Conn: c, limit: -1, flipAt: -1, edit: func(off int64, p []byte) {
			if off == 0 && len(p) >= 20 {
				p[8] = 7
				crc := crc32.Checksum(p[:16], crc32.MakeTable(crc32.Castagnoli))
				p[16], p[17], p[18], p[19] = byte(crc), byte(crc>>8), byte(crc>>16), byte(crc>>24)
			}
		}}
	}
	for name, wrap := range map[string][2]func(net.Conn) net.Conn{
		"old source": {setVersion, nil},
		"old target": {nil, setVersion},
	} {
		t.Run(name, func(t *testing.T) {
			o := migrate(t, tcpPair, faultVM, migrationtest.Options{}, migration.Options{}, wrap[0], wrap[1])
			requireOneOwner(t, o, name)
			var ve *migration.VersionError
			if wrap[0] != nil {
				require.ErrorAs(t, o.tgtErr, &ve)
				assert.ErrorContains(t, o.srcErr, "version 7 is not supported")
			} else {
				require.ErrorAs(t, o.srcErr, &ve)
			}
			assert.Equal(t, uint32(7), ve.Got)
			assert.Equal(t, migration.FormatVersion, ve.Want)
			assert.Equal(t, migration.PhaseHandshake, phaseOf(o.srcErr))
		})
	}
}

func phaseOf(err error) migration.Phase {
	var pe *migration.PhaseError
	if errors.As(err, &pe) {
		return pe.Phase
	}
	return ""
}
