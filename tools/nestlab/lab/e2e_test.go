package lab

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestBootE2E boots a real L1 (about 20-40 s). It runs only with
// KVMKIT_LAB_E2E=1 because it needs QEMU, the cloud kernel and time.
func TestBootE2E(t *testing.T) {
	if os.Getenv("KVMKIT_LAB_E2E") != "1" {
		t.Skip("set KVMKIT_LAB_E2E=1 to boot a real nested lab")
	}
	host, err := FindHost("/")
	require.NoError(t, err)
	files := NewImage()
	require.NoError(t, files.AddFile("/lab/data/hello.txt", 0o644, []byte("from host\n")))
	payload := `#!/bin/sh
[ -c /dev/kvm ] && echo "kvm=yes"
echo "nestlab=$KVMKIT_NESTLAB extra=$EXTRA"
cat /lab/data/hello.txt
ip -o link show lo | grep -q UP && echo "lo=up"
exit 7
`
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	res, err := Boot(ctx, host, Spec{Payload: payload, Env: []string{"EXTRA=x y"}, Files: files},
		Options{Mem: "2G", Output: &out, PayloadOnly: true, Timeout: 8 * time.Minute})
	require.NoError(t, err, out.String())
	assert.Equal(t, 7, res.ExitCode)
	assert.Equal(t, "kvm=yes\nnestlab=1 extra=x y\nfrom host\nlo=up\n", out.String())
	assert.Greater(t, res.StartAt, res.BootAt)
	t.Logf("L1 /init at %v, payload at %v, total %v", res.BootAt, res.StartAt, res.Wall)
}
