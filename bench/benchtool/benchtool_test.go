package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseRow(t *testing.T) {
	tests := []struct {
		name    string
		line    string
		ok      bool
		wantErr bool
		label   string
		values  map[string]float64
		notes   string
	}{
		{"row", `ROW qemu-idle {"downtime_ms":2,"total_ms":2161.5,"target":"running"}`, true, false,
			"qemu-idle", map[string]float64{"downtime_ms": 2, "total_ms": 2161.5}, "target=running"},
		{"bench", "BenchmarkMigrateDirty-2   1  65416579370 ns/op  61.71 downtime_ms  9.000 rounds", true, false,
			"BenchmarkMigrateDirty", map[string]float64{"ns/op": 65416579370, "downtime_ms": 61.71, "rounds": 9}, ""},
		{"renamed bench", "kvmkit-go-idle-2 1 100 ns/op 3 downtime_ms", true, false,
			"kvmkit-go-idle", map[string]float64{"ns/op": 100, "downtime_ms": 3}, ""},
		{"pass line", "PASS", false, false, "", nil, ""},
		{"goos line", "goos: linux", false, false, "", nil, ""},
		{"odd fields", "BenchmarkX-2 1 100 ns/op 3", false, false, "", nil, ""},
		{"bad json", "ROW x {nope", false, true, "", nil, ""},
		{"no json", "ROW x", false, true, "", nil, ""},
		{"bad value", "BenchmarkX-2 1 abc ns/op", false, false, "", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, ok, err := parseRow(tt.line)
			if tt.wantErr {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.ok, ok)
			if !ok {
				return
			}
			assert.Equal(t, tt.label, r.Label)
			assert.Equal(t, tt.values, r.Values)
			assert.Equal(t, tt.notes, r.Notes)
		})
	}
}

func TestTable(t *testing.T) {
	in := strings.Join([]string{
		"goos: linux",
		`ROW qemu-idle {"downtime_ms":2,"bytes_sent":2097152,"target":"running"}`,
		`ROW qemu-idle {"downtime_ms":4,"bytes_sent":4194304,"target":"running"}`,
		"kvmkit-go-idle-2 1 1000000 ns/op 3.5 downtime_ms 2 sent_MiB",
		"PASS",
	}, "\n")
	var out bytes.Buffer
	err := run(context.Background(), []string{"table", "-title", "T", "-cols", "downtime_ms,sent_MiB,missing"}, strings.NewReader(in), &out, &out)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 4)
	assert.Equal(t, "T", lines[0])
	assert.Equal(t, []string{"label", "n", "downtime_ms", "sent_MiB", "missing"}, strings.Fields(lines[1]))
	assert.Equal(t, []string{"qemu-idle", "2", "3.00", "3.00", "-", "target=running"}, strings.Fields(lines[2]), "mean of the two rows; sent_MiB derived from bytes_sent")
	assert.Equal(t, []string{"kvmkit-go-idle", "1", "3.50", "2.00", "-"}, strings.Fields(lines[3]))
}

func TestTableReportsBadRows(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), []string{"table", "-cols", "a"}, strings.NewReader("ROW x {bad\n"), &out, &out)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "ROW x")
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		nil, {"nope"}, {"table"}, {"run"}, {"run", "-label", "x"}, {"qmp"}, {"qmp-migrate", "-label", "x"},
		{"waitfor"}, {"run", "-label", "x", "-ram", "12Q", "--", "true"},
	} {
		err := run(context.Background(), args, strings.NewReader(""), &bytes.Buffer{}, &bytes.Buffer{})
		assert.ErrorIs(t, err, errUsage, "args %q", args)
	}
}

const smapsText = `00400000-00500000 r-xp 00000000 08:01 123 /usr/bin/qemu
Size:               1024 kB
Rss:                 800 kB
VmFlags: rd ex mr mw me dw
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               32768 kB
VmFlags: rd wr mr mw me ac
7f1000000000-7f1000200000 rw-p 00000000 00:00 0 [heap]
Size:               2048 kB
Rss:                1000 kB
`

func TestParseSmaps(t *testing.T) {
	tests := []struct {
		name string
		ram  uint64
		want memSample
	}{
		{"guest mapping found", 256 << 20, memSample{RSSKiB: 34568, GuestKiB: 32768, GuestVMA: 1}},
		{"no guest size", 0, memSample{RSSKiB: 34568}},
		{"size mismatch", 128 << 20, memSample{RSSKiB: 34568}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSmaps(strings.NewReader(smapsText), tt.ram)
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
	_, err := parseSmaps(strings.NewReader("Rss: lots kB\n"), 0)
	assert.Error(t, err)
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"0": 0, "4096": 4096, "256M": 256 << 20, "1G": 1 << 30, "8k": 8 << 10, "2GB": 2 << 30} {
		got, err := parseSize(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"", "M", "-1G", "1T", "99999999999999999999G"} {
		_, err := parseSize(in)
		assert.Error(t, err, in)
	}
}

func TestRunMeasuresMarkerAndExit(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("no sh: cannot run the child process")
	}
	log := filepath.Join(t.TempDir(), "console.log")
	var out bytes.Buffer
	err := run(context.Background(), []string{"run", "-label", "child", "-marker", "READY", "-log", log, "--",
		"sh", "-c", "echo booting; sleep 0.2; echo READY now; exit 3"}, nil, &out, &out)
	require.NoError(t, err)
	label, js, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(out.String()), "ROW "), " ")
	require.True(t, ok, out.String())
	assert.Equal(t, "child", label)
	var res runResult
	require.NoError(t, json.Unmarshal([]byte(js), &res))
	assert.Equal(t, 3, res.ExitCode)
	assert.GreaterOrEqual(t, res.MarkerMs, 150.0, "the marker came after the sleep")
	assert.GreaterOrEqual(t, res.ExitMs, res.MarkerMs)
	assert.Greater(t, res.PeakRSSMiB, 0.0)
	console, err := os.ReadFile(log)
	require.NoError(t, err)
	assert.Equal(t, "booting\nREADY now\n", string(console))
}

func TestRunKillAfterMarkerAndTimeout(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("no sh: cannot run the child process")
	}
	res, err := measure(context.Background(), []string{"sh", "-c", "echo UP; exec sleep 30"}, "UP", 0, time.Minute, 10*time.Millisecond, 100*time.Millisecond, nil)
	require.NoError(t, err)
	assert.True(t, res.Terminated)
	assert.Less(t, res.ExitMs, 10000.0)
	res, err = measure(context.Background(), []string{"sh", "-c", "exec sleep 30"}, "UP", 0, 200*time.Millisecond, 10*time.Millisecond, 0, nil)
	require.NoError(t, err)
	assert.True(t, res.TimedOut)
	assert.Equal(t, -1.0, res.MarkerMs)
}

func TestWaitFor(t *testing.T) {
	f := filepath.Join(t.TempDir(), "serial.log")
	go func() {
		time.Sleep(50 * time.Millisecond)
		_ = os.WriteFile(f, []byte("SeaBIOS\nidle\n"), 0o644)
	}()
	require.NoError(t, run(context.Background(), []string{"waitfor", "-file", f, "-string", "idle", "-timeout", "10s"}, nil, &bytes.Buffer{}, &bytes.Buffer{}))
	err := run(context.Background(), []string{"waitfor", "-file", f, "-string", "never", "-timeout", "50ms"}, nil, &bytes.Buffer{}, &bytes.Buffer{})
	assert.ErrorContains(t, err, "never")
}

// fakeQEMU serves QMP on a unix socket: a greeting, then one reply per
// command from replies (keyed by the command name; an event is sent before
// every reply). query-migrate answers with the statuses in order.
func fakeQEMU(t *testing.T, replies map[string]string, statuses []string) (sock string, got chan string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "qmp") // short path: unix socket names are limited
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock = filepath.Join(dir, "s")
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	got = make(chan string, 100)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = c.Write([]byte(`{"QMP": {"version": {}, "capabilities": []}}` + "\n"))
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					var req struct {
						Execute string `json:"execute"`
					}
					if json.Unmarshal(sc.Bytes(), &req) != nil {
						return
					}
					got <- req.Execute
					_, _ = c.Write([]byte(`{"event": "RESUME", "timestamp": {}}` + "\n"))
					reply, ok := replies[req.Execute]
					switch {
					case req.Execute == "query-migrate" && len(statuses) > 0:
						reply = statuses[0]
						statuses = statuses[1:]
					case !ok:
						reply = `{"return": {}}`
					}
					_, _ = c.Write([]byte(reply + "\n"))
				}
			}()
		}
	}()
	return sock, got
}

func TestQMPMigrate(t *testing.T) {
	src, srcGot := fakeQEMU(t, nil, []string{
		`{"return": {"status": "setup"}}`,
		`{"return": {"status": "active", "ram": {"transferred": 10}}}`,
		`{"return": {"status": "completed", "downtime": 12, "total-time": 3400, "setup-time": 5, "ram": {"transferred": 2860724, "duplicate": 262152, "normal": 122, "dirty-sync-count": 3, "total": 1074274304}}}`,
	})
	dst, _ := fakeQEMU(t, map[string]string{"query-status": `{"return": {"status": "running", "running": true}}`}, nil)
	var out bytes.Buffer
	err := run(context.Background(), []string{"qmp-migrate", "-label", "q", "-src", src, "-dst", dst, "-uri", "tcp:127.0.0.1:1", "-timeout", "10s"}, nil, &out, &out)
	require.NoError(t, err)
	_, js, _ := strings.Cut(strings.TrimPrefix(strings.TrimSpace(out.String()), "ROW "), " ")
	var row migrateRow
	require.NoError(t, json.Unmarshal([]byte(js), &row), out.String())
	assert.Equal(t, migrateRow{DowntimeMs: 12, TotalMs: 3400, SetupMs: 5, Rounds: 3, BytesSent: 2860724, PagesSent: 122,
		ZeroPages: 262152, MemoryBytes: 1074274304, ClientMs: row.ClientMs, Target: "running"}, row)
	var cmds []string
	for len(srcGot) > 0 {
		cmds = append(cmds, <-srcGot)
	}
	assert.Equal(t, []string{"qmp_capabilities", "migrate-set-capabilities", "migrate-set-parameters", "migrate",
		"query-migrate", "query-migrate", "query-migrate"}, cmds)
}

func TestQMPMigrateFailure(t *testing.T) {
	src, _ := fakeQEMU(t, nil, []string{`{"return": {"status": "failed", "error-desc": "connection refused"}}`})
	err := run(context.Background(), []string{"qmp-migrate", "-label", "q", "-src", src, "-uri", "tcp:127.0.0.1:1", "-timeout", "10s"}, nil, &bytes.Buffer{}, &bytes.Buffer{})
	assert.ErrorContains(t, err, "connection refused")
}

func TestQMPErrorReply(t *testing.T) {
	src, _ := fakeQEMU(t, map[string]string{"stop": `{"error": {"class": "GenericError", "desc": "nope"}}`}, nil)
	var out bytes.Buffer
	err := run(context.Background(), []string{"qmp", "-sock", src, "-timeout", "10s", `{"execute":"query-status"}`, `{"execute":"stop"}`}, nil, &out, &out)
	var qe *QMPError
	require.ErrorAs(t, err, &qe)
	assert.Equal(t, "stop", qe.Command)
	assert.Equal(t, "GenericError", qe.Class)
	assert.Equal(t, "{}\n", out.String(), "the first command's reply was printed")
	err = run(context.Background(), []string{"qmp", "-sock", src, "-timeout", "10s", `not json`}, nil, &out, &out)
	assert.ErrorIs(t, err, errUsage)
}

func FuzzParseRow(f *testing.F) {
	f.Add(`ROW a {"x":1,"s":"y","b":true}`)
	f.Add("BenchmarkX-2 3 100 ns/op 4.5 downtime_ms")
	f.Add("ROW  ")
	f.Fuzz(func(t *testing.T, line string) {
		r, ok, err := parseRow(line)
		if err == nil && ok {
			assert.NotEmpty(t, r.Label)
			var b bytes.Buffer
			require.NoError(t, writeTable(&b, "", []string{"x", "ns/op"}, aggregate([]resultRow{r})))
		}
	})
}

func FuzzParseSmaps(f *testing.F) {
	f.Add([]byte(smapsText), uint64(256<<20))
	f.Add([]byte("0-1\nRss: 1 kB\n"), uint64(1))
	f.Fuzz(func(t *testing.T, data []byte, ram uint64) {
		s, err := parseSmaps(bytes.NewReader(data), ram)
		if err == nil {
			assert.LessOrEqual(t, s.GuestKiB, s.RSSKiB)
		}
	})
}

func FuzzReadQMPMessage(f *testing.F) {
	f.Add([]byte(`{"return": {"status": "completed", "ram": {"transferred": 1}}}` + "\n"))
	f.Add([]byte(`{"error": {"class": "x", "desc": "y"}}` + "\n"))
	f.Add([]byte("{\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := readMessage(bufio.NewReaderSize(bytes.NewReader(data), 16))
		if err != nil {
			return
		}
		var info migrateInfo
		if m.Return != nil && json.Unmarshal(m.Return, &info) == nil {
			_, _ = migrationDone(info)
		}
	})
}
