package devices

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestACPIPM(t *testing.T) {
	type access struct {
		off  uint64
		data []byte
	}
	le16 := func(v uint16) []byte { return binary.LittleEndian.AppendUint16(nil, v) }
	tests := []struct {
		name   string
		writes []access
		sleeps []uint8
		cnt    uint16 // PM1_CNT read back
		en     uint16
	}{
		{"reset state", nil, nil, pm1CntSCIEn, 0},
		{"ACPICA S5: SLP_TYP, then SLP_TYP|SLP_EN", []access{{4, le16(5 << 10)}, {4, le16(5<<10 | 1<<13)}}, []uint8{5}, 5<<10 | pm1CntSCIEn, 0},
		{"byte writes: high byte carries SLP_EN", []access{{4, []byte{0x01}}, {5, []byte{0x34}}}, []uint8{5}, 5<<10 | pm1CntSCIEn, 0},
		{"other sleep type reported as is", []access{{4, le16(3<<10 | 1<<13)}}, []uint8{3}, 3<<10 | pm1CntSCIEn, 0},
		{"SLP_TYP alone does not sleep", []access{{4, le16(5 << 10)}}, nil, 5<<10 | pm1CntSCIEn, 0},
		{"enable register keeps its value", []access{{2, le16(0x0121)}}, nil, pm1CntSCIEn, 0x0121},
		{"32-bit write across the event block", []access{{0, []byte{0xFF, 0xFF, 0x20, 0x01}}}, nil, pm1CntSCIEn, 0x0120},
		{"writes past the device are dropped", []access{{6, []byte{0xFF, 0xFF}}}, nil, pm1CntSCIEn, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var sleeps []uint8
			p := NewACPIPM(func(typ uint8) { sleeps = append(sleeps, typ) })
			for _, w := range tc.writes {
				p.Write(w.off, w.data)
			}
			assert.Equal(t, tc.sleeps, sleeps)
			var b [2]byte
			p.Read(4, b[:])
			assert.Equal(t, tc.cnt, binary.LittleEndian.Uint16(b[:]), "PM1_CNT")
			p.Read(2, b[:])
			assert.Equal(t, tc.en, binary.LittleEndian.Uint16(b[:]), "PM1_EN")
			p.Read(0, b[:])
			assert.Equal(t, uint16(0), binary.LittleEndian.Uint16(b[:]), "PM1_STS")
			assert.Equal(t, uint8(0xFF), port{p}.in(ACPIPMSize), "past the device")
		})
	}
	NewACPIPM(nil).Write(4, le16(5<<10|1<<13)) // nil callback is allowed
}

func FuzzACPIPM(f *testing.F) {
	f.Add([]byte{0x04, 0x00, 0x05, 0x34, 0x82, 0x00})
	f.Fuzz(func(t *testing.T, ops []byte) {
		p := NewACPIPM(func(typ uint8) {
			if typ > 7 {
				t.Fatalf("sleep type %d does not fit SLP_TYP", typ)
			}
		})
		for i := 0; i+1 < len(ops); i += 2 {
			off := uint64(ops[i] & 0x07)
			n := 1 + int(ops[i]>>4&0x3)
			if ops[i]&0x80 != 0 {
				p.Read(off, make([]byte, n))
				continue
			}
			b := make([]byte, n)
			for j := range b {
				b[j] = ops[i+1] + byte(j)
			}
			p.Write(off, b)
			var cnt [2]byte
			p.Read(4, cnt[:])
			v := binary.LittleEndian.Uint16(cnt[:])
			if v&pm1CntSCIEn == 0 || v&pm1CntSlpEn != 0 {
				t.Fatalf("PM1_CNT reads %#04x: SCI_EN must read 1, SLP_EN 0", v)
			}
		}
	})
}
