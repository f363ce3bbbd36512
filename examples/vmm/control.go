package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/kvmkit/kvmkit/kvm"
	"github.com/kvmkit/kvmkit/kvm/machine"
	"github.com/kvmkit/kvmkit/migration"
	"github.com/kvmkit/kvmkit/migration/machinevm"
)

// The control API is HTTP/JSON on a unix socket:
//
//	GET  /v1/vm           status: {"state","vcpus","memory_bytes","exits"}
//	POST /v1/vm/pause     pause all vCPUs and devices
//	POST /v1/vm/resume    resume them
//	POST /v1/vm/stop      stop the VM (vmm exits 0)
//	POST /v1/vm/snapshot  {"dir"}: write a snapshot (the VM resumes after)
//	POST /v1/vm/migrate   {"to","downtime_ms","max_bandwidth"}: live-migrate;
//	                      the response is a stream of JSON lines:
//	                      {"progress":{...}} ... then {"result":{...}} or {"error":"..."}
//
// Errors are {"error": "..."} with a 4xx/5xx status.

// statusResponse is GET /v1/vm.
type statusResponse struct {
	State       string `json:"state"`
	VCPUs       int    `json:"vcpus"`
	MemoryBytes uint64 `json:"memory_bytes"`
	Exits       uint64 `json:"exits"`
}

// snapshotRequest is POST /v1/vm/snapshot.
type snapshotRequest struct {
	Dir string `json:"dir"`
}

// migrateRequest is POST /v1/vm/migrate.
type migrateRequest struct {
	To           string  `json:"to"`
	DowntimeMs   float64 `json:"downtime_ms,omitempty"`
	MaxBandwidth int64   `json:"max_bandwidth,omitempty"`
}

// progressLine is one line of the migrate stream.
type progressLine struct {
	Progress *progressJSON      `json:"progress,omitempty"`
	Result   *migration.Summary `json:"result,omitempty"`
	Error    string             `json:"error,omitempty"`
}

type progressJSON struct {
	Phase      string  `json:"phase"`
	Round      int     `json:"round"`
	ElapsedMs  float64 `json:"elapsed_ms"`
	BytesSent  uint64  `json:"bytes_sent"`
	PagesSent  uint64  `json:"pages_sent"`
	TotalPages uint64  `json:"total_pages"`
	DirtyPages uint64  `json:"dirty_pages"`
	DirtyRate  float64 `json:"dirty_rate"`
	Bandwidth  float64 `json:"bandwidth"`
	Throttle   float64 `json:"throttle"`
}

// controlServer serves the control API for one machine.
type controlServer struct {
	m   *machine.Machine
	log *slog.Logger
	mu  sync.Mutex // one state-changing request at a time
}

// serveControl listens on path and serves m until ctx ends.
func serveControl(ctx context.Context, path string, m *machine.Machine) (func(), error) {
	_ = os.Remove(path) // a stale socket from a crashed vmm
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("--control %s: %w", path, err)
	}
	cs := &controlServer{m: m, log: slog.Default()}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/vm", cs.status)
	mux.HandleFunc("POST /v1/vm/pause", cs.pause)
	mux.HandleFunc("POST /v1/vm/resume", cs.resume)
	mux.HandleFunc("POST /v1/vm/stop", cs.stop)
	mux.HandleFunc("POST /v1/vm/snapshot", cs.snapshot)
	mux.HandleFunc("POST /v1/vm/migrate", cs.migrate)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	stop := func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		_ = os.Remove(path)
	}
	return stop, nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, code int, err error) {
	writeJSON(w, code, map[string]string{"error": err.Error()})
}

func (cs *controlServer) state() string {
	r := cs.m.Runner()
	if r == nil {
		return "created"
	}
	select {
	case <-r.Done():
		return "stopped"
	default:
	}
	if r.Paused() {
		return "paused"
	}
	return "running"
}

func (cs *controlServer) status(w http.ResponseWriter, _ *http.Request) {
	st := statusResponse{State: cs.state(), VCPUs: len(cs.m.VCPUs()), MemoryBytes: cs.m.Mem().Size()}
	if r := cs.m.Runner(); r != nil {
		st.Exits = r.Exits()
	}
	writeJSON(w, http.StatusOK, st)
}

func (cs *controlServer) pause(w http.ResponseWriter, r *http.Request) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	if err := cs.m.Pause(ctx); err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	cs.status(w, r)
}

func (cs *controlServer) resume(w http.ResponseWriter, r *http.Request) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if err := cs.m.Resume(); err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	cs.status(w, r)
}

func (cs *controlServer) stop(w http.ResponseWriter, r *http.Request) {
	cs.m.Stop(kvm.Result{Reason: kvm.StopPowerOff})
	writeJSON(w, http.StatusOK, statusResponse{State: "stopped", VCPUs: len(cs.m.VCPUs()), MemoryBytes: cs.m.Mem().Size()})
}

// decodeBody reads a bounded JSON request body.
func decodeBody(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<16))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("request body: %w", err)
	}
	return nil
}

func (cs *controlServer) snapshot(w http.ResponseWriter, r *http.Request) {
	var req snapshotRequest
	if err := decodeBody(r, &req); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	if req.Dir == "" {
		writeErr(w, http.StatusBadRequest, errors.New("snapshot: dir is required"))
		return
	}
	cs.mu.Lock()
	defer cs.mu.Unlock()
	info, err := migration.SaveSnapshot(r.Context(), &machinevm.Source{M: cs.m}, req.Dir, migration.SnapshotOptions{})
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, info)
}

func (cs *controlServer) migrate(w http.ResponseWriter, r *http.Request) {
	var req migrateRequest
	if err := decodeBody(r, &req); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	if req.To == "" {
		writeErr(w, http.StatusBadRequest, errors.New("migrate: to is required"))
		return
	}
	cs.mu.Lock()
	defer cs.mu.Unlock()
	conn, err := (&net.Dialer{Timeout: 10 * time.Second}).DialContext(r.Context(), "tcp", req.To)
	if err != nil {
		writeErr(w, http.StatusBadGateway, fmt.Errorf("migrate: %w", err))
		return
	}
	defer conn.Close()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	flush := func() {
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
	opts := migration.Options{
		DowntimeBudget: time.Duration(req.DowntimeMs * float64(time.Millisecond)),
		MaxBandwidth:   req.MaxBandwidth,
		Progress: func(p migration.Progress) {
			_ = enc.Encode(progressLine{Progress: &progressJSON{
				Phase: fmt.Sprint(p.Phase), Round: p.Round, ElapsedMs: float64(p.Elapsed) / 1e6,
				BytesSent: p.BytesSent, PagesSent: p.PagesSent, TotalPages: p.TotalPages,
				DirtyPages: p.DirtyPages, DirtyRate: p.DirtyRate, Bandwidth: p.Bandwidth, Throttle: p.Throttle,
			}})
			flush()
		},
	}
	st, err := migration.Migrate(r.Context(), &machinevm.Source{M: cs.m}, conn, opts)
	if err != nil {
		_ = enc.Encode(progressLine{Error: err.Error()})
		flush()
		return
	}
	sum := st.Summary()
	_ = enc.Encode(progressLine{Result: &sum})
	flush()
	// The target owns the guest now: this VMM stops.
	cs.log.Info("migrated", "to", req.To, "downtime_ms", sum.DowntimeMs)
	cs.m.Stop(kvm.Result{Reason: kvm.StopMigrated})
}
