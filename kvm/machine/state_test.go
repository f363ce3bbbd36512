package machine

import (
	"bytes"
	"encoding/binary"
	"encoding/gob"
	"hash/crc32"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmkit/kvmkit/kvm"
)

// fill sets every exported field reachable from v to pseudo-random values
// (slices get n elements), so a codec that drops or swaps a field fails.
func fill(v reflect.Value, r *rand.Rand, n int) {
	switch v.Kind() {
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if v.Type().Field(i).IsExported() {
				fill(v.Field(i), r, n)
			}
		}
	case reflect.Array:
		for i := 0; i < v.Len(); i++ {
			fill(v.Index(i), r, n)
		}
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), n, n))
		for i := 0; i < n; i++ {
			fill(v.Index(i), r, n)
		}
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(r.Uint64())
	case reflect.Int:
		v.SetInt(int64(r.Uint32()))
	case reflect.Bool:
		v.SetBool(r.IntN(2) == 1)
	}
}

func randomState(seed uint64, vcpus int) *State {
	r := rand.New(rand.NewPCG(seed, 1))
	s := &State{Devices: map[string][]byte{"uart": {1, 2, 3}, "virtio-blk0": bytes.Repeat([]byte{7}, 300), "empty": {}}}
	for i := 0; i < vcpus; i++ {
		var c kvm.VCPUState
		fill(reflect.ValueOf(&c).Elem(), r, 3+i)
		s.VCPUs = append(s.VCPUs, c)
	}
	fill(reflect.ValueOf(&s.VM).Elem(), r, 2)
	return s
}

// roundTrip encodes and decodes s.
func roundTrip(t *testing.T, s *State) *State {
	t.Helper()
	b, err := s.Bytes()
	require.NoError(t, err)
	got, err := DecodeState(bytes.NewReader(b))
	require.NoError(t, err)
	return got
}

func TestStateRoundTrip(t *testing.T) {
	for _, vcpus := range []int{0, 1, 4} {
		s := randomState(uint64(vcpus), vcpus)
		got := roundTrip(t, s)
		assert.Equal(t, s, got, "%d vCPUs", vcpus)
	}
	// Empty slices and maps come back as nil/empty, not as garbage.
	got := roundTrip(t, &State{VCPUs: []kvm.VCPUState{{ID: 3}}})
	require.Len(t, got.VCPUs, 1)
	assert.Equal(t, 3, got.VCPUs[0].ID)
	assert.Empty(t, got.VCPUs[0].MSRs)
	assert.Empty(t, got.Devices)
}

func TestStateEncodingIsDeterministic(t *testing.T) {
	s := randomState(7, 2)
	a, err := s.Bytes()
	require.NoError(t, err)
	for range 10 {
		b, err := s.Bytes()
		require.NoError(t, err)
		require.Equal(t, a, b, "same state, same bytes (devices sorted)")
	}
	var w bytes.Buffer
	require.NoError(t, s.Encode(&w))
	assert.Equal(t, a, w.Bytes())
}

// TestStateReadsVersion1 decodes a gob state as builds before version 2
// wrote it.
func TestStateReadsVersion1(t *testing.T) {
	s := randomState(3, 2)
	var payload bytes.Buffer
	require.NoError(t, gob.NewEncoder(&payload).Encode(s))
	got, err := DecodeState(bytes.NewReader(frame(1, payload.Bytes())))
	require.NoError(t, err)
	assert.Equal(t, s.VCPUs, got.VCPUs)
	assert.Equal(t, s.VM, got.VM)
}

// frame wraps a payload in the state header and checksum.
func frame(version uint32, payload []byte) []byte {
	b := []byte(stateMagic)
	b = binary.LittleEndian.AppendUint32(b, version)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(payload)))
	b = append(b, payload...)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(payload, crc32.MakeTable(crc32.Castagnoli)))
}

func TestStateDecodeRejects(t *testing.T) {
	good, err := randomState(5, 1).Bytes()
	require.NoError(t, err)
	payload := good[16 : len(good)-4]
	u32 := func(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
	// A minimal valid payload: no vCPUs, a VM state, no devices.
	var vm []byte
	vm = append(vm, 0)
	vm = append(vm, make([]byte, 3*binary.Size(kvm.IRQChipState{}))...)
	vm = append(vm, 0)
	vm = append(vm, make([]byte, binary.Size(kvm.PITState2{})+binary.Size(kvm.ClockData{}))...)
	minimal := append(append(u32(0), vm...), u32(0)...)
	_, err = DecodeState(bytes.NewReader(frame(StateVersion, minimal)))
	require.NoError(t, err, "the minimal payload is valid")
	dev := func(name string, data []byte) []byte {
		b := append([]byte{byte(len(name))}, name...)
		return append(append(b, u32(uint32(len(data)))...), data...)
	}
	withDevices := func(n uint32, devs ...[]byte) []byte {
		b := append(append(u32(0), vm...), u32(n)...)
		for _, d := range devs {
			b = append(b, d...)
		}
		return b
	}
	badBool := append(u32(0), 2)

	tests := []struct {
		name string
		in   []byte
		want string
	}{
		{"truncated payload", frame(StateVersion, payload[:len(payload)/2]), "at offset"},
		{"vCPU count too large", frame(StateVersion, u32(maxStateVCPUs+1)), "vCPU count"},
		{"CPUID count too large", frame(StateVersion, append(u32(1), append(u32(0), u32(maxStateCPUID+1)...)...)), "CPUID count"},
		{"boolean not 0 or 1", frame(StateVersion, badBool), "boolean byte 2"},
		{"bytes left over", frame(StateVersion, append(append([]byte(nil), minimal...), 9)), "left over"},
		{"device named twice", frame(StateVersion, withDevices(2, dev("a", nil), dev("a", []byte{1}))), "named twice"},
		{"device state past the end", frame(StateVersion, withDevices(1, append(dev("a", nil)[:2], u32(1000)...))), "device a state"},
		{"device count too large", frame(StateVersion, withDevices(maxStateDevices+1)), "device count"},
		{"unknown version", frame(3, minimal), "version 3"},
		{"bad magic", append([]byte("NOTSTATE"), good[8:]...), "bad magic"},
		{"checksum", append(append([]byte(nil), good[:len(good)-1]...), good[len(good)-1]^1), "checksum"},
		{"gob garbage as version 1", frame(1, []byte{1, 2, 3}), "decode"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeState(bytes.NewReader(tt.in))
			var se *StateError
			require.ErrorAs(t, err, &se)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
	// Every truncation of a valid payload is an error, never a panic.
	for i := 0; i < len(payload); i += 97 {
		_, err := DecodeState(bytes.NewReader(frame(StateVersion, payload[:i])))
		require.Error(t, err, "cut at %d", i)
	}
}

func TestStateEncodeRejects(t *testing.T) {
	tests := []struct {
		name string
		s    *State
		want string
	}{
		{"long device name", &State{Devices: map[string][]byte{strings.Repeat("x", 256): nil}}, "longer than 255"},
		{"too many vCPUs", &State{VCPUs: make([]kvm.VCPUState, maxStateVCPUs+1)}, "vCPUs, at most"},
		{"too many MSRs", &State{VCPUs: []kvm.VCPUState{{MSRs: make([]kvm.MSREntry, maxStateMSRs+1)}}}, "MSRs, at most"},
		{"too many CPUID entries", &State{VCPUs: []kvm.VCPUState{{CPUID: make([]kvm.CPUIDEntry, maxStateCPUID+1)}}}, "CPUID entries, at most"},
	}
	for _, tt := range tests {
		_, err := tt.s.Bytes()
		assert.ErrorContains(t, err, tt.want, tt.name)
	}
}

// BenchmarkStateEncode and BenchmarkStateDecode measure the codec alone
// (two vCPUs with realistic slice sizes).
func BenchmarkStateEncode(b *testing.B) {
	s := benchState()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Bytes(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkStateDecode(b *testing.B) {
	enc, err := benchState().Bytes()
	require.NoError(b, err)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeState(bytes.NewReader(enc)); err != nil {
			b.Fatal(err)
		}
	}
}

func benchState() *State {
	s := randomState(9, 2)
	for i := range s.VCPUs {
		s.VCPUs[i].CPUID = make([]kvm.CPUIDEntry, 60)
		s.VCPUs[i].MSRs = make([]kvm.MSREntry, 50)
		s.VCPUs[i].XSave.Extra = nil
	}
	return s
}

// TestStateStructsHaveNoHiddenPadding: every structure the state encodes
// as its memory has all its bytes in declared fields, so the encoding is
// the fields (little endian) and nothing the compiler chose.
func TestStateStructsHaveNoHiddenPadding(t *testing.T) {
	check := func(name string, declared int, mem uintptr) {
		assert.Equal(t, declared, int(mem), "%s: declared fields vs memory size", name)
	}
	check("CPUIDEntry", binary.Size(kvm.CPUIDEntry{}), unsafe.Sizeof(kvm.CPUIDEntry{}))
	check("Regs", binary.Size(kvm.Regs{}), unsafe.Sizeof(kvm.Regs{}))
	check("Sregs", binary.Size(kvm.Sregs{}), unsafe.Sizeof(kvm.Sregs{}))
	check("XSave.Region", binary.Size([1024]uint32{}), unsafe.Sizeof([1024]uint32{}))
	check("XCRs", binary.Size(kvm.XCRs{}), unsafe.Sizeof(kvm.XCRs{}))
	check("DebugRegs", binary.Size(kvm.DebugRegs{}), unsafe.Sizeof(kvm.DebugRegs{}))
	check("LAPICState", binary.Size(kvm.LAPICState{}), unsafe.Sizeof(kvm.LAPICState{}))
	check("MSREntry", binary.Size(kvm.MSREntry{}), unsafe.Sizeof(kvm.MSREntry{}))
	check("VCPUEvents", binary.Size(kvm.VCPUEvents{}), unsafe.Sizeof(kvm.VCPUEvents{}))
	check("IRQChipState", binary.Size(kvm.IRQChipState{}), unsafe.Sizeof(kvm.IRQChipState{}))
	check("PITState2", binary.Size(kvm.PITState2{}), unsafe.Sizeof(kvm.PITState2{}))
	check("ClockData", binary.Size(kvm.ClockData{}), unsafe.Sizeof(kvm.ClockData{}))
	// And the bytes are the little-endian fields, as encoding/binary
	// writes them.
	r := kvm.Regs{RAX: 0x0102030405060708, RIP: 0xfffffff0}
	want, err := binary.Append(nil, binary.LittleEndian, &r)
	require.NoError(t, err)
	assert.Equal(t, want, abiBytes(&r))
}
