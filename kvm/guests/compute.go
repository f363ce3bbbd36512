package guests

import "math/bits"

// Constants of the compute guest's LCG (Knuth's MMIX multiplier and
// increment) and its initial state; they must match asm/compute.asm.
const (
	computeA     = 6364136223846793005
	computeC     = 1442695040888963407
	computeX0    = 0x0123456789ABCDEF
	computeAcc0  = 0x9E3779B9
	computeStack = 0x5555555555555555
)

// ComputeModel reproduces on the host the sequence of 32-bit values the
// compute guest writes to DataPort, so a test can check that a vCPU which
// was saved and restored (possibly into another VM) continues exactly.
// The zero value is not ready; use NewComputeModel.
type ComputeModel struct {
	x, acc, acc2, s uint64 // RAX, RBX, R14, the stack slot
	sumLo, sumHi    uint64 // XMM0
	carry           uint64 // CF across the loop back-edge
}

// NewComputeModel returns a model in the guest's initial state.
func NewComputeModel() *ComputeModel {
	return &ComputeModel{x: computeX0, acc: computeAcc0, s: computeStack}
}

// Next advances the model by one guest iteration and returns the value
// that iteration writes to DataPort.
func (m *ComputeModel) Next() uint32 {
	m.acc, _ = bits.Add64(m.acc, m.x, m.carry) // adc rbx, rax
	m.x *= computeA                            // imul rax, r12
	m.s += 2*m.acc + 1                         // lea rdx, [rdx+rbx*2+1]
	m.acc2 += 8 * m.s                          // lea r14, [r14+rdx*8]
	// paddq xmm0, (x, acc); pshufd 0x4E swaps the lanes.
	m.sumLo, m.sumHi = m.sumHi+m.acc, m.sumLo+m.x
	t := (m.sumLo ^ m.s ^ m.x ^ m.acc2) ^ m.sumHi
	out := uint32(t) ^ uint32(t>>32)
	m.x, m.carry = bits.Add64(m.x, computeC, 0) // add rax, r13
	return out
}

// ComputeSequence returns the first n values the compute guest writes to
// DataPort (none if n <= 0).
func ComputeSequence(n int) []uint32 {
	if n <= 0 {
		return nil
	}
	m := NewComputeModel()
	out := make([]uint32, n)
	for i := range out {
		out[i] = m.Next()
	}
	return out
}
