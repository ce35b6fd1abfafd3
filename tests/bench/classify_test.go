//go:build bench

package bench

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// Classify scenario constants: one sandbox on a veth in a throwaway
// namespace, as in bpf/datapath_test.go.
var (
	clsSandboxMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}
	clsGatewayMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01}
	clsSandboxIP  = netip.MustParseAddr("10.99.0.2")
	clsGatewayIP  = netip.MustParseAddr("10.99.0.1")
)

const (
	clsSandboxID    = 7
	clsRedirectMark = 0x0c1e0000
	clsSocketMark   = 0x0c1f0000
	clsHotRepeat    = 200_000 // runs per TEST_RUN call, hot path
	clsColdFrames   = 2000    // distinct destinations, one run each
	clsTargets      = 8       // matching destinations averaged on the hot path
)

// skbContext is the prefix of struct __sk_buff that BPF_PROG_TEST_RUN
// accepts as input context (the same layout bpf/datapath_test.go uses).
type skbContext struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto uint32
	Priority, IngressIfindex, Ifindex, TCIndex                                  uint32
	CB                                                                          [5]uint32
}

// progTestRunAttr is the BPF_PROG_TEST_RUN part of union bpf_attr.
type progTestRunAttr struct {
	ProgFD      uint32
	Retval      uint32
	DataSizeIn  uint32
	DataSizeOut uint32
	DataIn      uint64
	DataOut     uint64
	Repeat      uint32
	Duration    uint32
	CtxSizeIn   uint32
	CtxSizeOut  uint32
	CtxIn       uint64
	CtxOut      uint64
	Flags       uint32
	CPU         uint32
	BatchSize   uint32
	_           uint32
}

// testRun runs prog repeat times on frame with the context of ifindex and
// returns the kernel's own per-run time and the program's return code.
//
// cilium/ebpf's Program.Benchmark returns that time but sends no context,
// so the kernel would run the program as if on the namespace's loopback
// device; Program.Run sends a context but drops the time. This is the one
// syscall both make, with both.
func testRun(progFD int, frame []byte, ifindex int, repeat uint32) (time.Duration, uint32, error) {
	ctx := skbContext{Ifindex: uint32(ifindex)}
	var pin runtime.Pinner
	defer pin.Unpin()
	pin.Pin(&frame[0])
	pin.Pin(&ctx)
	attr := progTestRunAttr{
		ProgFD:     uint32(progFD),
		DataSizeIn: uint32(len(frame)),
		DataIn:     uint64(uintptr(unsafe.Pointer(&frame[0]))),
		Repeat:     repeat,
		CtxSizeIn:  uint32(unsafe.Sizeof(ctx)),
		CtxIn:      uint64(uintptr(unsafe.Pointer(&ctx))),
	}
	for try := 0; ; try++ {
		_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_TEST_RUN, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
		if errno == 0 {
			return time.Duration(attr.Duration), attr.Retval, nil
		}
		// A signal interrupts a long run; run it again.
		if errno != unix.EINTR || try == 10 {
			return 0, 0, fmt.Errorf("BPF_PROG_TEST_RUN: %w", errno)
		}
	}
}

// classifyEnv is the throwaway namespace, its veth, our listener, and one
// loaded datapath per rule-set size.
type classifyEnv struct {
	nsPath  string
	ifindex int
	port    uint16
	sets    map[int]*classifySet
}

type classifySet struct {
	n        int
	dp       *bpf.Datapath
	prefixes []netip.Prefix
}

func newClassifyEnv(t *testing.T, sizes []int) *classifyEnv {
	name := fmt.Sprintf("%s%d-classify", harness.Prefix, os.Getpid())
	_ = netns.Delete(name)
	path, err := netns.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(name) })
	ce := &classifyEnv{nsPath: path, sets: map[int]*classifySet{}}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, clsSocketMark) })
		if err != nil {
			return err
		}
		return serr
	}}
	err = netns.Do(path, func() error {
		// This kernel has no dummy driver; a veth pair serves.
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "cw0"}, PeerName: "cw1"}); err != nil {
			return err
		}
		l, err := netlink.LinkByName("cw0")
		if err != nil {
			return err
		}
		ce.ifindex = l.Attrs().Index
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		// Our proxy listener: the SYN's listener lookup finds it.
		tl, err := lc.Listen(context.Background(), "tcp4", "0.0.0.0:0")
		if err != nil {
			return err
		}
		t.Cleanup(func() { tl.Close() })
		ce.port = uint16(tl.Addr().(*net.TCPAddr).Port)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	root := t.TempDir()
	if err := bpf.EnsureBPFFS(root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })
	largest := randomPrefixes(42, sizes[len(sizes)-1])
	for _, n := range sizes {
		// Each size gets its own datapath (its own maps): the 1-rule trie
		// really holds one rule, and all sizes are measured interleaved.
		dp, err := bpf.Load(bpf.Options{PinRoot: filepath.Join(root, fmt.Sprintf("n%d", n))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dp.Close() })
		if err := dp.SetConfig(bpf.Config{RedirectMark: clsRedirectMark, SocketMark: clsSocketMark, Ports: [4]uint16{ce.port}}); err != nil {
			t.Fatal(err)
		}
		set := &classifySet{n: n, dp: dp, prefixes: largest[:n]}
		if err := dp.PutRules(clsSandboxID, 0, ruleEntries(set.prefixes)); err != nil {
			t.Fatalf("%d rules: %v", n, err)
		}
		ce.sets[n] = set
		if err := ce.setBridge(set, false); err != nil {
			t.Fatal(err)
		}
	}
	return ce
}

// setBridge rewrites the sandbox entry as a ptp veth (the program assigns,
// which TEST_RUN refuses: an assign-failed drop) or as a bridge port (the
// program marks and returns the redirect verdict; no assign is tried).
func (ce *classifyEnv) setBridge(s *classifySet, bridge bool) error {
	return s.dp.PutSandbox(ce.ifindex, bpf.Sandbox{
		ID: clsSandboxID, Bridge: bridge, MAC: clsSandboxMAC, GatewayMAC: clsGatewayMAC,
		IPv4: clsSandboxIP, GatewayIPv4: clsGatewayIP, Name: "bench-sandbox",
	})
}

// synFrame is the sandbox's SYN from sport to dst.
func synFrame(dst netip.AddrPort, sport uint16) []byte {
	eth := &layers.Ethernet{SrcMAC: clsSandboxMAC, DstMAC: clsGatewayMAC, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: clsSandboxIP.AsSlice(), DstIP: dst.Addr().AsSlice()}
	tcp := &layers.TCP{SrcPort: layers.TCPPort(sport), DstPort: layers.TCPPort(dst.Port()), SYN: true, Window: 64240}
	_ = tcp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, tcp); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

// run measures frames on one set inside the namespace: the mean of the
// kernel's per-run times, each frame run repeat times, and checks every
// frame's return code (TC_ACT_OK 0 or TC_ACT_SHOT 2).
func (ce *classifyEnv) run(s *classifySet, frames [][]byte, repeat uint32, wantRet uint32) (float64, error) {
	var sum time.Duration
	err := netns.Do(ce.nsPath, func() error {
		fd := s.dp.SandboxProgram().FD()
		for _, f := range frames {
			d, ret, err := testRun(fd, f, ce.ifindex, repeat)
			if err != nil {
				return err
			}
			if ret != wantRet {
				return fmt.Errorf("program returned %d, want %d", ret, wantRet)
			}
			sum += d
		}
		return nil
	})
	return float64(sum) / float64(len(frames)), err
}

// benchClassify measures the per-packet cost of the sandbox program with
// BPF_PROG_TEST_RUN at 1, 1,000 and 100,000 rules.
func benchClassify(t *testing.T, rep *Report) {
	sizes := []int{1, 1000, 100_000}
	ce := newClassifyEnv(t, sizes)
	dstPort := uint16(connectPort)

	// Frames per set. Matching destinations are hosts of the set's first
	// prefixes (the 1-rule set has one); the no-rule destination matches
	// nothing in any set.
	hot := map[int][][]byte{}
	cold := map[int][][]byte{}
	for _, n := range sizes {
		s := ce.sets[n]
		for i := range clsTargets {
			hot[n] = append(hot[n], synFrame(netip.AddrPortFrom(hostIn(s.prefixes[i%n]), dstPort), 40000))
		}
		for i := range clsColdFrames {
			cold[n] = append(cold[n], synFrame(netip.AddrPortFrom(hostIn(s.prefixes[(i*7919)%n]), dstPort), uint16(20000+i)))
		}
	}
	noRule := [][]byte{synFrame(netip.AddrPortFrom(noRuleDst, dstPort), 40000)}

	const shot, ok = 2, 0
	type kind struct {
		key, label, note string
		bridge           bool
		frames           func(n int) [][]byte
		repeat           uint32
		ret              uint32
	}
	kinds := []kind{
		{"match", "SYN->rule, ptp", "flow lookup, LPM rule lookup, listener lookup, then TEST_RUN's assign-failed drop", false, func(n int) [][]byte { return hot[n] }, clsHotRepeat, shot},
		{"nomatch", "SYN->no rule", "flow lookup, LPM miss, drop", false, func(int) [][]byte { return noRule }, clsHotRepeat, shot},
		{"bridge", "SYN->rule, bridge port", "the ptp row's lookups ending in the redirect verdict (mark + count, no assign)", true, func(n int) [][]byte { return hot[n] }, clsHotRepeat, ok},
		{"cold", "SYN->rule, ptp, cold", "the ptp row, one run per call over 2000 distinct matching destinations", false, func(n int) [][]byte { return cold[n] }, 1, shot},
	}
	rows := map[string]map[int]*Comparison{}
	for _, k := range kinds {
		rows[k.key] = map[int]*Comparison{}
		for _, n := range sizes[1:] {
			c := &Comparison{Scenario: fmt.Sprintf("classify %s: %s vs 1 rule", k.label, countLabel(n)), Unit: "ns", LowerBetter: true, Note: k.note,
				Baseline: "1 rule", Cleanwall: countLabel(n) + " rules"}
			if k.key == "match" && n == 100_000 {
				c.Target, c.Check = "<=1.30", ratioAtMost(1.30)
			}
			rows[k.key][n] = rep.addRow(c)
		}
	}

	// Warm-up: also fills the deny-event ring buffer (nobody reads it
	// here), so every measured drop finds it full and skips the event.
	for _, n := range sizes {
		for _, k := range kinds {
			if err := ce.setBridge(ce.sets[n], k.bridge); err != nil {
				t.Fatal(err)
			}
			if _, err := ce.run(ce.sets[n], k.frames(n), 20_000, k.ret); err != nil {
				t.Fatalf("warm-up %d rules %s: %v", n, k.key, err)
			}
		}
	}
	for r := range rounds(7) {
		// Rotate which size goes first.
		for i := range sizes {
			n := sizes[(i+r)%len(sizes)]
			s := ce.sets[n]
			for _, k := range kinds {
				if err := ce.setBridge(s, k.bridge); err != nil {
					t.Fatal(err)
				}
				ns, err := ce.run(s, k.frames(n), k.repeat, k.ret)
				if err != nil {
					t.Fatalf("round %d, %d rules, %s: %v", r, n, k.key, err)
				}
				if n == 1 {
					for _, c := range rows[k.key] {
						c.Add(r, "baseline", ns, nil)
					}
				} else {
					rows[k.key][n].Add(r, "cleanwall", ns, nil)
				}
				t.Logf("round %d %6d rules %-8s %6.0f ns", r, n, k.key, ns)
			}
		}
	}
	rep.note("classify: kernel-measured ns per run of the sandbox program (BPF_PROG_TEST_RUN, %d runs per call; cold: one run per call over %d destinations). "+
		"TEST_RUN cannot bpf_sk_assign, so the ptp rows end in an assign-failed drop after the rule and listener lookups, counting it; "+
		"the deny-event ring buffer is full (nobody reads it), so those drops skip the event. "+
		"The bridge-port rows are the same lookups ending in the real redirect verdict (mark + count, no assign).", clsHotRepeat, clsColdFrames)
}

// rulesLabel is "1 rule", "1k rules", ...
func rulesLabel(n int) string {
	if n == 1 {
		return "1 rule"
	}
	return countLabel(n) + " rules"
}

func countLabel(n int) string {
	switch {
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprint(n)
}
