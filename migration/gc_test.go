package migration

import (
	"runtime/debug"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestGCHoldNests(t *testing.T) {
	orig := debug.SetGCPercent(150)
	defer debug.SetGCPercent(orig)
	var g gcHold
	g.hold()
	g.hold()
	assert.Equal(t, -1, debug.SetGCPercent(-1), "held")
	g.release()
	assert.Equal(t, -1, debug.SetGCPercent(-1), "still held by the second")
	g.release()
	assert.Equal(t, 150, debug.SetGCPercent(150), "restored by the last release")
	g.release() // an extra release changes nothing
	assert.Equal(t, 150, debug.SetGCPercent(150))

	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.hold()
			g.release()
		}()
	}
	wg.Wait()
	assert.Equal(t, 150, debug.SetGCPercent(150), "concurrent holds restore the setting")
}
