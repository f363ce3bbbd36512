package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"time"
)

// QMPError is an error reply of QEMU's machine protocol.
type QMPError struct {
	Command string
	Class   string
	Desc    string
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// qmpMessage is any message QEMU sends: a greeting, a reply or an event.
type qmpMessage struct {
	QMP    json.RawMessage `json:"QMP"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string `json:"event"`
}

// qmpClient speaks QMP over one connection, one command at a time.
type qmpClient struct {
	conn net.Conn
	rd   *bufio.Reader
}

// maxQMPMessage caps one QMP message (query-migrate replies are ~1 KiB).
const maxQMPMessage = 1 << 20

// readMessage reads one newline-terminated JSON message.
func readMessage(rd *bufio.Reader) (qmpMessage, error) {
	var m qmpMessage
	var line []byte
	for {
		chunk, err := rd.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > maxQMPMessage {
			return m, fmt.Errorf("qmp: message longer than %d bytes", maxQMPMessage)
		}
		if err == nil {
			break
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return m, fmt.Errorf("qmp: reading: %w", err)
		}
	}
	if err := json.Unmarshal(line, &m); err != nil {
		return m, fmt.Errorf("qmp: bad message %q: %w", clip(string(line)), err)
	}
	return m, nil
}

// dialQMP connects to a QMP unix socket, retrying until it exists or ctx
// ends, and negotiates capabilities.
func dialQMP(ctx context.Context, sock string) (*qmpClient, error) {
	var conn net.Conn
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", sock)
		if err == nil {
			conn = c
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("qmp: connecting to %s: %w", sock, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	q := &qmpClient{conn: conn, rd: bufio.NewReaderSize(conn, 64<<10)}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	greet, err := readMessage(q.rd)
	if err != nil {
		conn.Close()
		return nil, err
	}
	if greet.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: %s: no greeting", sock)
	}
	if _, err := q.execute("qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

// execute sends one command and returns its "return" value, skipping
// events that arrive before it.
func (q *qmpClient) execute(cmd string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	return q.reply(cmd)
}

// executeRaw sends a JSON command as given.
func (q *qmpClient) executeRaw(js string) (json.RawMessage, error) {
	var req struct {
		Execute string `json:"execute"`
	}
	if err := json.Unmarshal([]byte(js), &req); err != nil || req.Execute == "" {
		return nil, fmt.Errorf("%w: qmp: %q is not a QMP command object", errUsage, clip(js))
	}
	if _, err := q.conn.Write([]byte(js + "\n")); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", req.Execute, err)
	}
	return q.reply(req.Execute)
}

func (q *qmpClient) reply(cmd string) (json.RawMessage, error) {
	for {
		m, err := readMessage(q.rd)
		if err != nil {
			return nil, err
		}
		switch {
		case m.Error != nil:
			return nil, &QMPError{Command: cmd, Class: m.Error.Class, Desc: m.Error.Desc}
		case m.Return != nil:
			return m.Return, nil
		}
		// an event or a stray greeting: keep reading
	}
}

func (q *qmpClient) Close() error { return q.conn.Close() }

func cmdQMP(ctx context.Context, fs *flag.FlagSet, args []string, stdout io.Writer) error {
	sock := fs.String("sock", "", "QMP unix socket")
	timeout := fs.Duration("timeout", time.Minute, "overall timeout")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *sock == "" || fs.NArg() == 0 {
		return fmt.Errorf("%w: qmp: need -sock and at least one JSON command", errUsage)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	q, err := dialQMP(ctx, *sock)
	if err != nil {
		return err
	}
	defer q.Close()
	for _, js := range fs.Args() {
		ret, err := q.executeRaw(js)
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintf(stdout, "%s\n", ret); err != nil {
			return err
		}
	}
	return nil
}

// migrateInfo is the part of query-migrate's reply the bench uses.
type migrateInfo struct {
	Status       string  `json:"status"`
	TotalTime    float64 `json:"total-time"`
	Downtime     float64 `json:"downtime"`
	SetupTime    float64 `json:"setup-time"`
	ExpectedDown float64 `json:"expected-downtime"`
	ErrorDesc    string  `json:"error-desc"`
	CPUThrottle  float64 `json:"cpu-throttle-percentage"`
	RAM          *struct {
		Transferred    float64 `json:"transferred"`
		Duplicate      float64 `json:"duplicate"`
		Normal         float64 `json:"normal"`
		DirtySyncCount float64 `json:"dirty-sync-count"`
		Mbps           float64 `json:"mbps"`
		Total          float64 `json:"total"`
	} `json:"ram"`
}

// migrateRow is the ROW printed by qmp-migrate: the same keys as kvmkit's
// migration.Summary where QEMU reports the same quantity.
type migrateRow struct {
	DowntimeMs  float64 `json:"downtime_ms"`
	TotalMs     float64 `json:"total_ms"`
	SetupMs     float64 `json:"setup_ms"`
	Rounds      float64 `json:"rounds"`
	BytesSent   float64 `json:"bytes_sent"`
	PagesSent   float64 `json:"pages_sent"`
	ZeroPages   float64 `json:"zero_pages"`
	MemoryBytes float64 `json:"memory_bytes"`
	Throttle    float64 `json:"max_throttle"`
	ClientMs    float64 `json:"client_ms"` // migrate command to "completed", as seen here
	Target      string  `json:"target"`    // target run state after the migration
}

// migrationDone reports whether a query-migrate status is final, and an
// error for the failing final states.
func migrationDone(st migrateInfo) (bool, error) {
	switch st.Status {
	case "completed":
		return true, nil
	case "failed", "cancelled":
		return true, fmt.Errorf("qemu migration %s: %s", st.Status, st.ErrorDesc)
	}
	return false, nil
}

func cmdQMPMigrate(ctx context.Context, fs *flag.FlagSet, args []string, stdout, stderr io.Writer) error {
	label := fs.String("label", "", "row label")
	src := fs.String("src", "", "source QEMU's QMP socket")
	dst := fs.String("dst", "", "target QEMU's QMP socket (optional: checks it runs afterwards)")
	uri := fs.String("uri", "", "migration URI, e.g. tcp:127.0.0.1:4444")
	downtime := fs.Int("downtime-limit-ms", 50, "migrate-set-parameters downtime-limit (kvmkit's default budget is 50 ms; QEMU's 300 ms); 0 keeps QEMU's")
	bandwidth := fs.Int64("max-bandwidth", 1<<40, "migrate-set-parameters max-bandwidth in bytes/s (kvmkit is unlimited; QEMU's default is 128 MiB/s); 0 keeps QEMU's")
	autoConverge := fs.Bool("auto-converge", true, "set the auto-converge capability (kvmkit auto-converges by default; QEMU does not)")
	timeout := fs.Duration("timeout", 10*time.Minute, "overall timeout")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *label == "" || *src == "" || *uri == "" {
		return fmt.Errorf("%w: qmp-migrate: need -label, -src and -uri", errUsage)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	q, err := dialQMP(ctx, *src)
	if err != nil {
		return err
	}
	defer q.Close()
	if *autoConverge {
		caps := []map[string]any{{"capability": "auto-converge", "state": true}}
		if _, err := q.execute("migrate-set-capabilities", map[string]any{"capabilities": caps}); err != nil {
			return err
		}
	}
	params := map[string]any{}
	if *downtime > 0 {
		params["downtime-limit"] = *downtime
	}
	if *bandwidth > 0 {
		params["max-bandwidth"] = *bandwidth
	}
	if len(params) > 0 {
		if _, err := q.execute("migrate-set-parameters", params); err != nil {
			return err
		}
	}
	start := time.Now()
	if _, err := q.execute("migrate", map[string]any{"uri": *uri}); err != nil {
		return err
	}
	var info migrateInfo
	for {
		raw, err := q.execute("query-migrate", nil)
		if err != nil {
			return err
		}
		info = migrateInfo{}
		if err := json.Unmarshal(raw, &info); err != nil {
			return fmt.Errorf("qmp query-migrate: %w", err)
		}
		done, err := migrationDone(info)
		if err != nil {
			return err
		}
		if done {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("qemu migration not completed within %v (status %q)", *timeout, info.Status)
		case <-time.After(5 * time.Millisecond):
		}
	}
	row := migrateRow{
		DowntimeMs: info.Downtime, TotalMs: info.TotalTime, SetupMs: info.SetupTime,
		Throttle: info.CPUThrottle / 100, ClientMs: ms(time.Since(start)),
	}
	if info.RAM != nil {
		row.Rounds, row.BytesSent = info.RAM.DirtySyncCount, info.RAM.Transferred
		row.PagesSent, row.ZeroPages, row.MemoryBytes = info.RAM.Normal, info.RAM.Duplicate, info.RAM.Total
	}
	if *dst != "" {
		row.Target = targetState(ctx, *dst, stderr)
	}
	js, err := json.Marshal(row)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "ROW %s %s\n", *label, js)
	return err
}

// targetState asks the target for its run state, waiting briefly for it
// to leave "inmigrate".
func targetState(ctx context.Context, sock string, stderr io.Writer) string {
	q, err := dialQMP(ctx, sock)
	if err != nil {
		fmt.Fprintf(stderr, "benchtool: target: %v\n", err)
		return "unreachable"
	}
	defer q.Close()
	var st struct {
		Status string `json:"status"`
	}
	for range 200 {
		raw, err := q.execute("query-status", nil)
		if err != nil {
			fmt.Fprintf(stderr, "benchtool: target: %v\n", err)
			return "error"
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return "error"
		}
		if st.Status != "inmigrate" && st.Status != "postmigrate" {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return st.Status
}
