package guests_test

import (
	"fmt"

	"github.com/kvmkit/kvmkit/kvm/guests"
)

// A VMM loads a guest image at its mode's load address and enters it there.
func ExampleGet() {
	img, mode, err := guests.Get(guests.Hello16)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%s mode, load at %#x, fits: %v\n", mode, mode.LoadAddr(), len(img) <= mode.MaxSize())
	// Output: real mode, load at 0x7c00, fits: true
}

func ExampleAll() {
	for _, g := range guests.All()[:3] {
		fmt.Println(g.Name, g.Mode)
	}
	// Output:
	// compute long
	// dirty long
	// echo long
}

// The parameter block goes to guest memory before the vCPUs start; any
// io.WriterAt at guest-physical offsets (such as kvm.Memory) will do.
func ExampleParams() {
	p := guests.Params{Iterations: 1000}
	fmt.Printf("% x\n", p.Bytes()[:8])
	// Output: e8 03 00 00 00 00 00 00
}

// A save/restore test compares what a restored compute guest writes to
// DataPort with the model, continuing from where the original stopped.
func ExampleComputeModel() {
	m := guests.NewComputeModel()
	want := guests.ComputeSequence(5)
	same := true
	for _, v := range want {
		same = same && m.Next() == v
	}
	fmt.Println(len(want), same)
	// Output: 5 true
}
