package bpf

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

// ErrNoBTF means the kernel exposes no BTF for itself.
var ErrNoBTF = errors.New("kernel has no BTF (/sys/kernel/btf/vmlinux is missing): cleanwall needs a kernel built with CONFIG_DEBUG_INFO_BTF")

// ErrNoTCX means the kernel cannot attach tcx links (Linux < 6.6).
var ErrNoTCX = errors.New("kernel has no tcx (needs Linux >= 6.6): use --attach tc for the legacy tc fallback")

// ProbeBTF checks that the kernel has BTF.
func ProbeBTF() error {
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		return ErrNoBTF
	}
	return nil
}

// ProbeTCX attaches a pass-everything program to loopback's tcx ingress
// (at the tail, so it never runs before anything already there) and
// detaches it at once: the only reliable test.
func ProbeTCX() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:    "cw_probe",
		Type:    ebpf.SchedCLS,
		License: "Dual BSD/GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, -1), // TCX_NEXT: let the rest of the chain decide
			asm.Return(),
		},
	})
	if err != nil {
		return fmt.Errorf("loading a probe program: %w", err)
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: 1, Program: prog, Attach: ebpf.AttachTCXIngress, Anchor: link.Tail()})
	if err != nil {
		if errors.Is(err, ebpf.ErrNotSupported) {
			return ErrNoTCX
		}
		return fmt.Errorf("probing tcx: %w", err)
	}
	return l.Close()
}
