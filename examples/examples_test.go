// Package examples holds example policies and CNI network configurations;
// this test keeps them valid.
package examples

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/cleanwall/cleanwall/policy"
)

func TestExamplePoliciesAreValid(t *testing.T) {
	files, _ := filepath.Glob("*.yaml")
	more, _ := filepath.Glob("policies/*.yaml")
	files = append(files, more...)
	if len(files) < 4 {
		t.Fatalf("found only %v", files)
	}
	for _, f := range files {
		p, err := policy.LoadFile(f)
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		if _, err := policy.Compile(p); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}

func TestExampleConflistsParse(t *testing.T) {
	files, _ := filepath.Glob("cni/*.conflist")
	if len(files) == 0 {
		t.Fatal("no conflists")
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		list, err := libcni.ConfListFromBytes(data)
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		if last := list.Plugins[len(list.Plugins)-1]; last.Network.Type != "cleanwall-cni" {
			t.Errorf("%s: cleanwall-cni must come last in the chain, found %s", f, last.Network.Type)
		}
	}
}
