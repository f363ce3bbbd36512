package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSinkCountsBytesPerConnection(t *testing.T) {
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := run(context.Background(), []string{"sink", "-listen", "127.0.0.1:0", "-n", "2", "-label", "x", "-timeout", "30s"},
			strings.NewReader(""), pw, io.Discard)
		pw.CloseWithError(err)
		done <- err
	}()
	sc := bufio.NewScanner(pr)
	require.True(t, sc.Scan())
	addr, ok := strings.CutPrefix(sc.Text(), "LISTEN ")
	require.True(t, ok, "first line %q", sc.Text())

	for _, size := range []int{3<<20 + 17, 0} {
		c, err := net.Dial("tcp", addr)
		require.NoError(t, err)
		_, err = c.Write(bytes.Repeat([]byte{'z'}, size))
		require.NoError(t, err)
		require.NoError(t, c.(*net.TCPConn).CloseWrite())
		// The sink closes after EOF: the read ends without data.
		require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
		n, err := c.Read(make([]byte, 1))
		assert.Equal(t, 0, n)
		assert.ErrorIs(t, err, io.EOF)
		c.Close()

		require.True(t, sc.Scan())
		r, ok, err := parseRow(sc.Text())
		require.NoError(t, err)
		require.True(t, ok, "line %q", sc.Text())
		assert.Equal(t, "x", r.Label)
		assert.Equal(t, float64(size), r.Values["bytes"])
		var res sinkResult
		require.NoError(t, json.Unmarshal([]byte(strings.SplitN(sc.Text(), " ", 3)[2]), &res))
		assert.Empty(t, res.Error)
		assert.GreaterOrEqual(t, res.AcceptSecs, res.Secs)
		if size > 0 {
			assert.Greater(t, res.Secs, 0.0)
			assert.InDelta(t, float64(size)/(1<<20)/res.Secs, res.MiBs, 1e-6)
		} else {
			assert.Zero(t, res.MiBs)
		}
	}
	require.NoError(t, <-done)
	assert.False(t, sc.Scan(), "nothing after the last row")
}

func TestSinkTimeout(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), []string{"sink", "-listen", "127.0.0.1:0", "-timeout", "100ms"},
		strings.NewReader(""), &out, io.Discard)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "0 of 1 connections")
	assert.True(t, strings.HasPrefix(out.String(), "LISTEN 127.0.0.1:"), out.String())
}

func TestSinkUsage(t *testing.T) {
	for _, args := range [][]string{{"sink"}, {"sink", "-listen", "127.0.0.1:0", "-n", "0"}} {
		err := run(context.Background(), args, strings.NewReader(""), io.Discard, io.Discard)
		assert.ErrorIs(t, err, errUsage, "args %q", args)
	}
}
