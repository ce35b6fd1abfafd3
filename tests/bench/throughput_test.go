//go:build bench

package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// iperfSeconds is the measured length of one round, after iperfOmit
// seconds of warm-up (slow start) that iperf3 leaves out of its totals.
const (
	iperfSeconds = 5
	iperfOmit    = 1
)

// iperfResult is the part of iperf3 -J output we read.
type iperfResult struct {
	Error string `json:"error"`
	End   struct {
		SumSent struct {
			BitsPerSecond float64 `json:"bits_per_second"`
			Retransmits   float64 `json:"retransmits"`
		} `json:"sum_sent"`
		SumReceived struct {
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
		CPU struct {
			HostTotal   float64 `json:"host_total"`
			RemoteTotal float64 `json:"remote_total"`
		} `json:"cpu_utilization_percent"`
	} `json:"end"`
}

// iperfRound runs one iperf3 client in the sandbox against the remote server.
func iperfRound(s *harness.Sandbox, streams int) (iperfResult, error) {
	cmd := nsCommand(s.NS, "iperf3", "-c", remoteServer.String(), "-p", strconv.Itoa(iperfPort),
		"-t", strconv.Itoa(iperfSeconds), "-O", strconv.Itoa(iperfOmit), "-P", strconv.Itoa(streams), "-J")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var res iperfResult
	if jerr := json.Unmarshal(stdout.Bytes(), &res); jerr != nil {
		return res, fmt.Errorf("iperf3: %v %v: %s", err, jerr, stderr.String())
	}
	if res.Error != "" {
		return res, fmt.Errorf("iperf3: %s", res.Error)
	}
	if err != nil {
		return res, fmt.Errorf("iperf3: %v: %s", err, stderr.String())
	}
	return res, nil
}

// benchThroughput compares bulk TCP throughput (sandbox → remote, the
// receiver's count) direct and through cleanwall, 1 and 8 streams.
func benchThroughput(t *testing.T, top *topology, rep *Report) {
	ensureTools(t, map[string]string{"iperf3": "iperf3"})
	srv := nsCommand(top.env.Remote, "iperf3", "-s", "-B", remoteServer.String(), "-p", strconv.Itoa(iperfPort))
	var srvErr bytes.Buffer
	srv.Stderr = &srvErr
	if err := srv.Start(); err != nil {
		t.Fatalf("iperf3 server: %v", err)
	}
	t.Cleanup(func() {
		_ = srv.Process.Kill() // the server we started, by its pid
		_ = srv.Wait()
	})
	if err := waitListening(top.env.Remote, iperfPort, 5*time.Second); err != nil {
		t.Fatalf("iperf3 server: %v: %s", err, srvErr.String())
	}
	rep.note("throughput: %s, %d s per round after %d s omitted, receiver-side bits/s; iperf3 before 3.16 runs all streams on one thread", firstLine("iperf3", "--version"), iperfSeconds, iperfOmit)
	sb := map[string]*harness.Sandbox{"baseline": top.direct, "cleanwall": top.cw}
	perf := newPerfRecorder(t, top.daemon)
	for _, streams := range []int{1, 8} {
		c := &Comparison{Scenario: fmt.Sprintf("tcp throughput, %d stream", streams), Unit: "bit/s", Baseline: "direct", Cleanwall: "cleanwall"}
		if streams == 1 {
			c.Target, c.Check = ">=0.80", ratioAtLeast(0.80)
		} else {
			c.Scenario += "s"
		}
		rep.addRow(c)
		// The single stream carries the target and is the noisiest: more rounds.
		n := rounds(3)
		if streams == 1 {
			n = rounds(5)
		}
		for r := range n {
			for _, side := range order(r) {
				if side == "cleanwall" {
					perf.start(fmt.Sprintf("iperf-%dstreams-round%d", streams, r))
				}
				cpu := takeCPU(top.pid)
				res, err := iperfRound(sb[side], streams)
				if side == "cleanwall" {
					perf.stop()
				}
				if err != nil {
					t.Fatalf("%s round %d: %v", side, r, err)
				}
				bps := res.End.SumReceived.BitsPerSecond
				extra := cpu.extra(top.pid, map[string]float64{
					"sentBitsPerSecond": res.End.SumSent.BitsPerSecond, "retransmits": res.End.SumSent.Retransmits,
					"clientCPUPercent": res.End.CPU.HostTotal, "serverCPUPercent": res.End.CPU.RemoteTotal,
				})
				c.Add(r, side, bps, extra)
				t.Logf("round %d %-9s %d stream(s): %.2f Gbit/s (retransmits %.0f; cpu: client %.0f%% server %.0f%% cleanwalld %.0f%% host busy %.0f%% steal %.0f%%)",
					r, side, streams, bps/1e9, res.End.SumSent.Retransmits, res.End.CPU.HostTotal, res.End.CPU.RemoteTotal,
					extra["daemonCPUPercent"], extra["hostBusyPercent"], extra["hostStealPercent"])
			}
		}
	}
}
