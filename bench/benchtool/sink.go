package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"time"
)

// sinkResult is the row `benchtool sink` prints for one connection.
type sinkResult struct {
	Bytes int64 `json:"bytes"`
	// Secs runs from the first byte received to EOF; AcceptSecs from the
	// accept to EOF (it includes the sender's start-up).
	Secs       float64 `json:"secs"`
	AcceptSecs float64 `json:"accept_secs"`
	MiBs       float64 `json:"sink_MiB_s"`
	Error      string  `json:"error,omitempty"`
}

// cmdSink accepts -n TCP connections on -listen one after another, reads
// each to EOF (discarding the data), closes it and prints one row per
// connection. Before accepting it prints "LISTEN <addr>" so that a script
// can wait for it (benchtool waitfor).
func cmdSink(ctx context.Context, fs *flag.FlagSet, args []string, stdout io.Writer) error {
	listen := fs.String("listen", "", "TCP address to listen on, e.g. 127.0.0.1:5001")
	n := fs.Int("n", 1, "number of connections to serve, one after another")
	label := fs.String("label", "sink", "row label")
	timeout := fs.Duration("timeout", 10*time.Minute, "give up after this long in total")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *listen == "" || *n < 1 || *label == "" {
		return fmt.Errorf("%w: sink: need -listen ADDR, -n >= 1 and a -label", errUsage)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", *listen)
	if err != nil {
		return fmt.Errorf("sink: %w", err)
	}
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	if _, err := fmt.Fprintf(stdout, "LISTEN %s\n", ln.Addr()); err != nil {
		return err
	}
	for i := 0; i < *n; i++ {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("sink: %d of %d connections after %v: %w", i, *n, *timeout, ctx.Err())
			}
			return fmt.Errorf("sink: accept: %w", err)
		}
		res := drain(ctx, c)
		js, err := json.Marshal(res)
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintf(stdout, "ROW %s %s\n", *label, js); err != nil {
			return err
		}
	}
	return nil
}

// drain reads c to EOF, then closes it.
func drain(ctx context.Context, c net.Conn) sinkResult {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	accepted := time.Now()
	var res sinkResult
	buf := make([]byte, 256<<10)
	var first time.Time
	for {
		k, err := c.Read(buf)
		if k > 0 {
			if first.IsZero() {
				first = time.Now()
			}
			res.Bytes += int64(k)
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				res.Error = err.Error()
			}
			break
		}
	}
	end := time.Now()
	res.AcceptSecs = end.Sub(accepted).Seconds()
	if !first.IsZero() {
		res.Secs = end.Sub(first).Seconds()
	}
	if res.Secs > 0 {
		res.MiBs = float64(res.Bytes) / (1 << 20) / res.Secs
	}
	return res
}
