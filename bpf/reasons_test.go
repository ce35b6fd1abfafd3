package bpf

import (
	"testing"

	"github.com/cilium/ebpf/btf"
)

// Every value of the C enum reason has a Go name, and every Go name a C
// value: a reason added on one side only would be counted as reason-N.
func TestReasonsMatchTheCEnum(t *testing.T) {
	spec, err := loadDatapath()
	if err != nil {
		t.Fatal(err)
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("reason", &enum); err != nil {
		t.Fatal(err)
	}
	inC := map[Reason]string{}
	for _, v := range enum.Values {
		if v.Name == "REASON_NONE" {
			continue
		}
		inC[Reason(v.Value)] = v.Name
		if _, ok := reasonNames[Reason(v.Value)]; !ok {
			t.Errorf("%s (%d) has no name in reasons.go", v.Name, v.Value)
		}
	}
	for r, name := range reasonNames {
		if _, ok := inC[r]; !ok {
			t.Errorf("reason %q (%d) is not in datapath.h", name, r)
		}
		if back, ok := ParseReason(name); !ok || back != r {
			t.Errorf("ParseReason(%q) = %d, %v", name, back, ok)
		}
	}
}
