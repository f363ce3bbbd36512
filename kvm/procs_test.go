package kvm_test

import (
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/kvmkit/kvmkit/kvm"
)

func TestReserveProcs(t *testing.T) {
	old := runtime.GOMAXPROCS(1)
	defer runtime.GOMAXPROCS(old)
	n := runtime.NumCPU()
	assert.Equal(t, n+3, kvm.ReserveProcs(3))
	assert.Equal(t, n+3, runtime.GOMAXPROCS(0))
	assert.Equal(t, n+3, kvm.ReserveProcs(1), "never lowered")
	assert.Equal(t, n+3, runtime.GOMAXPROCS(0))
}
