package migration

import (
	"runtime/debug"
	"sync"
)

// gcHold keeps the Go garbage collector from starting a cycle while a
// guest is paused for its switch-over. A collection that lands in the
// downtime competes with the last pages, the state save and the resume
// for the CPU (in the nested lab, with one P, a cycle there cost tens of
// milliseconds). The collector's setting is process-wide, so holds are
// counted: the first takes it (debug.SetGCPercent(-1)), the last gives the
// old setting back, and concurrent migrations in one process (a source and
// a target, or many VMs) compose. The heap may grow by what the
// switch-over allocates (the final dirty pages and the state), which is
// bounded by the downtime budget.
type gcHold struct {
	mu   sync.Mutex
	n    int
	prev int
}

// gcHolds is the process's one counter: the setting it guards is global
// to the process as well.
var gcHolds gcHold

// hold stops new collection cycles until the matching release.
func (g *gcHold) hold() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.n == 0 {
		g.prev = debug.SetGCPercent(-1)
	}
	g.n++
}

// release undoes one hold; the last one restores the previous setting.
func (g *gcHold) release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.n == 0 {
		return
	}
	g.n--
	if g.n == 0 {
		debug.SetGCPercent(g.prev)
	}
}
