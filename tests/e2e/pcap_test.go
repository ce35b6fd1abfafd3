package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
	"github.com/miekg/dns"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// observer is a running `cleanwall observe`: its stdout lines and its exit.
type observer struct {
	args   []string
	cmd    *exec.Cmd
	stderr bytes.Buffer
	done   chan struct{}
	err    error

	mu    sync.Mutex
	lines []string
}

func startObserver(t *testing.T, env *harness.Env, d *harness.Daemon, args ...string) *observer {
	t.Helper()
	o := &observer{args: args, done: make(chan struct{})}
	o.cmd = exec.Command(filepath.Join(env.Bin, "cleanwall"), append([]string{"observe", "--socket", d.Socket}, args...)...)
	o.cmd.Stderr = &o.stderr
	out, err := o.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := o.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		select {
		case <-o.done:
		default:
			o.cmd.Process.Kill()
			<-o.done
		}
	})
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			o.mu.Lock()
			o.lines = append(o.lines, s.Text())
			o.mu.Unlock()
		}
		o.err = o.cmd.Wait()
		close(o.done)
	}()
	return o
}

func (o *observer) exited() bool {
	select {
	case <-o.done:
		return true
	default:
		return false
	}
}

// events decodes the JSON lines printed so far.
func (o *observer) events(t *testing.T) []api.DenyEvent {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []api.DenyEvent
	for _, l := range o.lines {
		var ev api.DenyEvent
		if err := json.Unmarshal([]byte(l), &ev); err != nil {
			t.Fatalf("observe %v printed a line that is not an event: %q: %v", o.args, l, err)
		}
		out = append(out, ev)
	}
	return out
}

// untilExited repeats round (traffic) until every observer has exited
// after its --count events: an observer whose stream opened late simply
// sees a later round. Fails naming the observers still waiting.
func untilExited(t *testing.T, timeout time.Duration, round func(), obs ...*observer) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		waiting := 0
		for _, o := range obs {
			if !o.exited() {
				waiting++
			}
		}
		if waiting == 0 {
			return
		}
		round()
	}
	for _, o := range obs {
		if !o.exited() {
			o.mu.Lock()
			t.Errorf("observe %v still waiting after %v; printed %q", o.args, timeout, o.lines)
			o.mu.Unlock()
		}
	}
	t.FailNow()
}

// cleanwall observe --pcap writes the sampled headers of dropped packets
// as a capture that tcpdump reads back: Ethernet link type, the packets'
// addresses and ports, their headers only (never payload) with their
// original length, and timestamps of when they were dropped. The packets
// never arrived and every one was counted.
func TestObservePcapOfDrops(t *testing.T) {
	tcpdump, err := exec.LookPath("tcpdump")
	if err != nil {
		testutil.Skip(t, "tcpdump is not installed (make deps)")
	}
	env := harness.New(t)
	d := env.StartDaemon()
	sb := env.MustAddSandbox("captured", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	tcpSrv := env.TCPServer("198.51.100.10:9999")
	udpSrv := env.UDPServer("198.51.100.10:40999")
	sniff := env.Sniff()
	before := counter(t, d, sb, "drop", "no-rule", "")

	file := filepath.Join(t.TempDir(), "drops.pcap")
	start := time.Now()
	const count = 6
	o := startObserver(t, env, d, "--sandbox", sb.ContainerID, "--verdict", "drop", "--proto", "tcp,udp", "--pcap", file,
		"--output", "json", "--count", strconv.Itoa(count))
	payload := bytes.Repeat([]byte("exfiltrate "), 30) // 330 bytes: longer than the snapshot
	sport := 40100
	untilExited(t, 20*time.Second, func() {
		err := sb.Do(func() error {
			c, err := net.DialUDP("udp4", &net.UDPAddr{Port: sport}, &net.UDPAddr{IP: net.IPv4(198, 51, 100, 10), Port: 40999})
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write(payload)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		sport++
		// Shorter than the first SYN retransmission: one SYN per dial.
		if c, err := sb.Dial("tcp4", "198.51.100.10:9999", 300*time.Millisecond); err == nil {
			c.Close()
			t.Fatal("a connection to 198.51.100.10:9999 (no rule) was established")
		}
	}, o)
	end := time.Now()
	if o.err != nil {
		t.Fatalf("observe: %v\n%s", o.err, o.stderr.String())
	}
	if !strings.Contains(o.stderr.String(), fmt.Sprintf("%d dropped packets captured", count)) {
		t.Errorf("observe's summary: %q", o.stderr.String())
	}
	evs := o.events(t)
	if len(evs) != count {
		t.Fatalf("observe printed %d events, want %d", len(evs), count)
	}
	for _, ev := range evs {
		if ev.Verdict != api.VerdictDrop || ev.Reason != "no-rule" || ev.Length == 0 || len(ev.Header) != 0 {
			t.Errorf("event %+v: want a no-rule drop with its length (its header goes to the capture only)", ev)
		}
	}

	// Read back with gopacket: link type, lengths, times, and that each
	// capture is the packet the sandbox sent.
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	if r.LinkType() != layers.LinkTypeEthernet || r.Snaplen() != api.DenyHeaderLen {
		t.Fatalf("capture: link type %v, snapshot length %d", r.LinkType(), r.Snaplen())
	}
	var udp, syn int
	for i := 0; ; i++ {
		data, ci, err := r.ReadPacketData()
		if err != nil {
			if i != count {
				t.Fatalf("%d packets in the capture (%v), want %d", i, err, count)
			}
			break
		}
		if ci.Timestamp.Before(start.Add(-time.Second)) || ci.Timestamp.After(end.Add(time.Second)) {
			t.Errorf("packet %d dropped at %v, outside the test's %v..%v", i, ci.Timestamp, start, end)
		}
		if ci.Length != evs[i].Length || ci.CaptureLength != len(data) || ci.CaptureLength > api.DenyHeaderLen {
			t.Errorf("packet %d: length %d, captured %d (%d bytes), event length %d", i, ci.Length, ci.CaptureLength, len(data), evs[i].Length)
		}
		p := gopacket.NewPacket(data, layers.LayerTypeEthernet, gopacket.Default)
		ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		if ip == nil || !ip.SrcIP.Equal(sb.IP.AsSlice()) || !ip.DstIP.Equal(net.IPv4(198, 51, 100, 10)) {
			t.Fatalf("packet %d is not from the sandbox to 198.51.100.10: %v", i, p)
		}
		switch {
		case p.Layer(layers.LayerTypeUDP) != nil:
			udp++
			// Its headers only: the payload never reaches a capture
			// (docs/telemetry.md).
			if want := 14 + 20 + 8 + len(payload); ci.Length != want || ci.CaptureLength != 14+20+8 {
				t.Errorf("UDP packet %d: length %d, captured %d; want %d, %d (its headers)", i, ci.Length, ci.CaptureLength, want, 14+20+8)
			}
			if bytes.Contains(data, []byte("exfiltrate")) {
				t.Errorf("UDP packet %d: the capture holds the payload", i)
			}
		case p.Layer(layers.LayerTypeTCP) != nil:
			tcp := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
			if tcp.SYN && !tcp.ACK && tcp.DstPort == 9999 {
				syn++
			}
			// A SYN is all headers: captured whole, options included.
			if want := 14 + 20 + int(tcp.DataOffset)*4; ci.CaptureLength != want || ci.Length != want {
				t.Errorf("SYN %d: length %d, captured %d; want %d", i, ci.Length, ci.CaptureLength, want)
			}
		}
	}
	if udp == 0 || syn == 0 || udp+syn != count {
		t.Fatalf("capture: %d UDP datagrams and %d SYNs to 9999, want both and %d in all", udp, syn, count)
	}

	// tcpdump reads it: the addresses and ports of the denied packets.
	cmd := exec.Command(tcpdump, "-r", file, "-nn", "-e", "-tt")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("tcpdump -r: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "link-type EN10MB") || !strings.Contains(stderr.String(), "snapshot length 128") {
		t.Errorf("tcpdump: %s", stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != count {
		t.Fatalf("tcpdump printed %d packets, want %d:\n%s", len(lines), count, out)
	}
	var dumpUDP, dumpSYN int
	for _, l := range lines {
		switch {
		case strings.Contains(l, sb.IP.String()+".") && strings.Contains(l, " > 198.51.100.10.40999: UDP, length 330"):
			dumpUDP++
		case strings.Contains(l, sb.IP.String()+".") && strings.Contains(l, " > 198.51.100.10.9999: Flags [S]"):
			dumpSYN++
		default:
			t.Errorf("tcpdump shows a packet that is not one of the denied ones: %s", l)
		}
		if !strings.Contains(l, "ethertype IPv4") {
			t.Errorf("tcpdump -e shows no Ethernet header: %s", l)
		}
		sec, err := strconv.ParseFloat(strings.Fields(l)[0], 64)
		if err != nil || sec < float64(start.Unix()-1) || sec > float64(end.Unix()+1) {
			t.Errorf("tcpdump's timestamp %q is outside the test (%d..%d)", strings.Fields(l)[0], start.Unix(), end.Unix())
		}
	}
	if dumpUDP != udp || dumpSYN != syn {
		t.Errorf("tcpdump: %d UDP and %d SYN lines; the capture holds %d and %d", dumpUDP, dumpSYN, udp, syn)
	}

	// Dropped, not delivered, and counted (every drop, captured or not).
	if n := counter(t, d, sb, "drop", "no-rule", "") - before; n < count {
		t.Errorf("%d no-rule drops counted for %d captured: %s", n, count, countersString(t, d, sb))
	}
	if n := len(tcpSrv.Conns()); n != 0 {
		t.Errorf("the TCP server saw %d connections", n)
	}
	if n := len(udpSrv.Received()); n != 0 {
		t.Errorf("the UDP server received %d datagrams", n)
	}
	if n := sniff.FromSource(sb.IP); n != 0 {
		t.Errorf("%d packets from the sandbox arrived at the remote side", n)
	}
}

// policyObserved: DNS for one name, one rule on 8080 at one new flow per
// second (burst 2): a round of traffic makes a DNS refusal, no-rule drops
// over TCP and UDP, and flow-limit drops within the rule.
const policyObserved = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: observed}
spec:
  limits: {newFlowsPerSecond: 1}
  dns:
    upstream: 198.51.100.53:53
    allow: [api.example.test]
  egress:
    - name: results-api
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
`

// cleanwall observe's filters (verdict, reason, rule, protocol, sandbox)
// each pass exactly the events they name; a wrong filter is refused naming
// the flag.
func TestObserveFilters(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	env.DNSServer(zone...)
	env.TCPServer("198.51.100.10:8080")
	sb := env.MustAddSandbox("filtered", harness.SandboxOptions{Policy: policyObserved, NoIPv6: true})
	other := env.MustAddSandbox("other", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})

	refused := startObserver(t, env, d, "--verdict", "refuse", "--output", "json", "--count", "2")
	udpDrops := startObserver(t, env, d, "--verdict", "drop", "--proto", "udp", "--output", "json", "--count", "2")
	tcpNoRule := startObserver(t, env, d, "--reason", "no-rule", "--proto", "TCP", "--sandbox", sb.ContainerID, "--output", "json", "--count", "2")
	inRule := startObserver(t, env, d, "--rule", "results-api", "--output", "json", "--count", "2")
	otherOnly := startObserver(t, env, d, "--sandbox", other.ContainerID, "--proto", "tcp", "--output", "json", "--count", "1")
	table := startObserver(t, env, d, "--reason", "no-rule,spoofed-ip", "--proto", "tcp", "--sandbox", sb.ContainerID, "--count", "1")

	untilExited(t, 30*time.Second, func() {
		if _, err := exchange(t, sb, "198.51.100.53:53", "blocked.example.test", dns.TypeA, false); err != nil {
			t.Fatal(err)
		}
		if err := sb.Do(func() error {
			c, err := net.Dial("udp4", "198.51.100.10:40999")
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte("udp"))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if c, err := sb.Dial("tcp4", "198.51.100.10:9999", 300*time.Millisecond); err == nil {
			c.Close()
		}
		// Over the burst of 2: the later SYNs drop as flow-limit, within
		// the rule results-api.
		for range 4 {
			if c, err := sb.Dial("tcp4", "198.51.100.10:8080", 300*time.Millisecond); err == nil {
				c.Close()
			}
		}
		if c, err := other.Dial("tcp4", "198.51.100.10:9998", 300*time.Millisecond); err == nil {
			c.Close()
		}
	}, refused, udpDrops, tcpNoRule, inRule, otherOnly, table)

	check := func(o *observer, want string, ok func(api.DenyEvent) bool) {
		t.Helper()
		if o.err != nil {
			t.Errorf("observe %v: %v\n%s", o.args, o.err, o.stderr.String())
		}
		evs := o.events(t)
		if len(evs) == 0 {
			t.Errorf("observe %v printed no event", o.args)
		}
		for _, ev := range evs {
			if !ok(ev) {
				t.Errorf("observe %v printed %+v, want only %s", o.args, ev, want)
			}
		}
	}
	check(refused, "the DNS proxy's refusal", func(ev api.DenyEvent) bool {
		return ev.Verdict == api.VerdictRefuse && ev.Source == "dns" && ev.Reason == "not_allowed" && strings.HasPrefix(ev.Sandbox, sb.ContainerID)
	})
	check(udpDrops, "UDP drops", func(ev api.DenyEvent) bool {
		return ev.Verdict == api.VerdictDrop && ev.Source == "datapath" && ev.Proto == "UDP" && ev.Reason == "no-rule" && ev.Dst == "198.51.100.10:40999"
	})
	check(tcpNoRule, "the sandbox's TCP no-rule drops", func(ev api.DenyEvent) bool {
		return ev.Verdict == api.VerdictDrop && ev.Proto == "TCP" && ev.Reason == "no-rule" && ev.Dst == "198.51.100.10:9999" &&
			strings.HasPrefix(ev.Sandbox, sb.ContainerID+"/")
	})
	check(inRule, "flow-limit drops within results-api", func(ev api.DenyEvent) bool {
		return ev.Rule == "results-api" && ev.Verdict == api.VerdictDrop && ev.Reason == "flow-limit" && ev.Dst == "198.51.100.10:8080"
	})
	check(otherOnly, "the other sandbox's drop", func(ev api.DenyEvent) bool {
		return strings.HasPrefix(ev.Sandbox, other.ContainerID+"/") && ev.Dst == "198.51.100.10:9998"
	})
	table.mu.Lock()
	lines := append([]string(nil), table.lines...)
	table.mu.Unlock()
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "TIME ") || !strings.Contains(lines[0], "VERDICT") ||
		!strings.Contains(lines[1], "datapath") || !strings.Contains(lines[1], " drop ") || !strings.Contains(lines[1], "no-rule") ||
		!strings.Contains(lines[1], "-> 198.51.100.10:9999") {
		t.Errorf("observe --output table printed %q", lines)
	}
	if n := counter(t, d, sb, "drop", "flow-limit", ""); n == 0 {
		t.Errorf("no flow-limit drop counted: %s", countersString(t, d, sb))
	}

	// Wrong filters fail, naming the flag (the CLI) or the parameter (the API).
	for _, args := range [][]string{{"--verdict", "allow"}, {"--reason", "no-rule,"}, {"--output", "yaml"}} {
		cmd := exec.Command(filepath.Join(env.Bin, "cleanwall"), append([]string{"observe", "--socket", d.Socket}, args...)...)
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), args[0]) {
			t.Errorf("observe %v: %v, %q; want a failure naming %s", args, err, out, args[0])
		}
	}
	err := d.Client().WatchEvents(t.Context(), api.EventFilter{Verdicts: []string{"pass"}}, func(api.DenyEvent) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "verdict") {
		t.Errorf("the daemon took verdict=pass: %v", err)
	}
}
