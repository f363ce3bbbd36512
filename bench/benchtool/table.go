package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
)

// maxLine caps one input line of `table` (and of the console scanner).
const maxLine = 1 << 20

// resultRow is one measurement: a label and named numeric values.
type resultRow struct {
	Label  string
	Values map[string]float64
	Notes  string // non-numeric values, shown in a last column
}

// parseRow parses a "ROW <label> <json>" line or a `go test -bench`
// result line ("BenchmarkX-2  3  123 ns/op  4.5 downtime_ms", possibly
// with the name replaced by another label). ok is false for any other
// line.
func parseRow(line string) (r resultRow, ok bool, err error) {
	line = strings.TrimSpace(line)
	switch {
	case strings.HasPrefix(line, "ROW "):
		rest := strings.TrimSpace(line[len("ROW "):])
		label, js, found := strings.Cut(rest, " ")
		if !found || label == "" {
			return r, false, fmt.Errorf("table: ROW line without label and JSON: %q", clip(line))
		}
		var obj map[string]any
		if err := json.Unmarshal([]byte(js), &obj); err != nil {
			return r, false, fmt.Errorf("table: ROW %s: bad JSON: %w", label, err)
		}
		r = resultRow{Label: label, Values: map[string]float64{}}
		var notes []string
		for k, v := range obj {
			switch x := v.(type) {
			case float64:
				r.Values[k] = x
			case bool:
				notes = append(notes, fmt.Sprintf("%s=%v", k, x))
			case string:
				notes = append(notes, fmt.Sprintf("%s=%s", k, x))
			}
		}
		slices.Sort(notes)
		r.Notes = strings.Join(notes, " ")
		return r, true, nil
	default:
		f := strings.Fields(line)
		if len(f) < 4 || len(f)%2 != 0 || f[3] != "ns/op" {
			return r, false, nil
		}
		if _, err := strconv.ParseUint(f[1], 10, 64); err != nil {
			return r, false, nil
		}
		name := f[0]
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			if _, err := strconv.Atoi(name[i+1:]); err == nil {
				name = name[:i]
			}
		}
		r = resultRow{Label: name, Values: map[string]float64{}}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				return resultRow{}, false, nil
			}
			r.Values[f[i+1]] = v
		}
		return r, true, nil
	}
}

func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// derive adds the columns computed from others: sent_MiB from bytes_sent,
// ms columns from ns/op.
func derive(v map[string]float64) {
	if b, ok := v["bytes_sent"]; ok {
		if _, has := v["sent_MiB"]; !has {
			v["sent_MiB"] = b / (1 << 20)
		}
	}
	if ns, ok := v["ns/op"]; ok {
		if _, has := v["op_ms"]; !has {
			v["op_ms"] = ns / 1e6
		}
	}
}

// summary is the per-label aggregate: the mean of each column over the
// rows with that label (go test -count gives several).
type summary struct {
	label string
	n     int
	sum   map[string]float64
	cnt   map[string]int
	notes string
}

// aggregate groups rows by label, keeping first-seen order.
func aggregate(rows []resultRow) []*summary {
	var out []*summary
	idx := map[string]*summary{}
	for _, r := range rows {
		s := idx[r.Label]
		if s == nil {
			s = &summary{label: r.Label, sum: map[string]float64{}, cnt: map[string]int{}}
			idx[r.Label] = s
			out = append(out, s)
		}
		s.n++
		derive(r.Values)
		for k, v := range r.Values {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				continue
			}
			s.sum[k] += v
			s.cnt[k]++
		}
		if r.Notes != "" {
			s.notes = r.Notes
		}
	}
	return out
}

func formatValue(v float64) string {
	switch a := math.Abs(v); {
	case a == 0:
		return "0"
	case a >= 1e5:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
}

// writeTable prints the aggregated rows with the given columns.
func writeTable(w io.Writer, title string, cols []string, rows []*summary) error {
	if title != "" {
		if _, err := fmt.Fprintln(w, title); err != nil {
			return err
		}
	}
	header := append([]string{"label", "n"}, cols...)
	cells := [][]string{header}
	for _, s := range rows {
		line := []string{s.label, strconv.Itoa(s.n)}
		for _, c := range cols {
			if s.cnt[c] == 0 {
				line = append(line, "-")
				continue
			}
			line = append(line, formatValue(s.sum[c]/float64(s.cnt[c])))
		}
		cells = append(cells, line)
	}
	width := make([]int, len(header))
	for _, l := range cells {
		for i, c := range l {
			width[i] = max(width[i], len(c))
		}
	}
	for li, l := range cells {
		var b strings.Builder
		for i, c := range l {
			if i == 0 {
				fmt.Fprintf(&b, "%-*s", width[i], c)
			} else {
				fmt.Fprintf(&b, "  %*s", width[i], c)
			}
		}
		if li > 0 && rows[li-1].notes != "" {
			b.WriteString("  " + rows[li-1].notes)
		}
		if _, err := fmt.Fprintln(w, strings.TrimRight(b.String(), " ")); err != nil {
			return err
		}
	}
	return nil
}

func cmdTable(fs *flag.FlagSet, args []string, stdin io.Reader, stdout io.Writer) error {
	colsFlag := fs.String("cols", "", "comma-separated columns (metric units or JSON keys)")
	title := fs.String("title", "", "line printed above the table")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *colsFlag == "" {
		return fmt.Errorf("%w: table: -cols is required", errUsage)
	}
	cols := strings.Split(*colsFlag, ",")
	sc := bufio.NewScanner(stdin)
	sc.Buffer(make([]byte, 64<<10), maxLine)
	var rows []resultRow
	var errs []error
	for sc.Scan() {
		r, ok, err := parseRow(sc.Text())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if ok {
			rows = append(rows, r)
		}
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("table: reading input: %w", err))
	}
	if err := writeTable(stdout, *title, cols, aggregate(rows)); err != nil {
		return err
	}
	return errors.Join(errs...)
}
