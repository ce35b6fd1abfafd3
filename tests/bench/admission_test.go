//go:build bench

package bench

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/invoke"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/runtime/cnichain"
	"github.com/cleanwall/cleanwall/tests/harness"
)

var (
	flagSandboxes    = flag.Int("sandboxes", 200, "sandboxes attached in the admission scenario's timed ADD/DEL rows")
	flagRSSSandboxes = flag.Int("rss-sandboxes", 1000, "sandboxes attached before the admission scenario's daemon RSS row (0: skip)")
)

// The admission scenario (issue 19): sandboxes attached one after another
// through the real chain, the way a runtime does it. Each sandbox's ptp
// ADD goes through libcni; cleanwall-cni is then run the way libcni runs
// the second plugin of a list (same stdin with the ptp result as
// prevResult, same CNI_* environment), so that its own time is measured
// apart from ptp's. ptp is the baseline: what the chain costs without us.
// DEL runs in the reverse order, cleanwall-cni first.
//
// The daemon's side of each ADD is read from
// cleanwall_admission_phase_seconds; "plugin start" is cleanwall-cni's
// VERSION command (a process start and nothing else).
func benchAdmission(t *testing.T, rep *Report) {
	env := harness.New(t)
	// Room for the RSS row's sandboxes: a /20 that lives only in this
	// environment's namespaces.
	env.SandboxNet = netip.MustParsePrefix("10.64.0.0/20")
	d := env.StartDaemon()
	policyFile := filepath.Join(env.Dir, "admission-policy.yaml")
	doc := policyYAML("bench-admission", []netip.Prefix{netip.PrefixFrom(remoteServer, 32)}, connectPort)
	if err := os.WriteFile(policyFile, doc, 0o644); err != nil {
		t.Fatal(err)
	}
	plugin := filepath.Join(env.Bin, "cleanwall-cni")
	cniPath := strings.Join(env.CNIPaths, ":")
	ptpOpts := env.ChainOptions(harness.SandboxOptions{NoIPv6: true, Direct: true}, "")
	socket := ptpOpts.Socket

	rssStart, err := rssKiB(d.Pid())
	if err != nil {
		t.Fatal(err)
	}

	type attached struct {
		att    *cnichain.Attachment
		ns, id string
		conf   []byte
	}
	var live []attached
	t.Cleanup(func() {
		for _, a := range live {
			_ = env.InNode(func() error {
				_, _ = execCNI(plugin, "DEL", a.id, a.ns, cniPath, a.conf)
				return a.att.Del(context.Background())
			})
			_ = netns.Delete(filepath.Base(a.ns))
		}
	})
	add := func(i int) (ptp, cw time.Duration, err error) {
		name := fmt.Sprintf("%s-a%d", env.Name, i)
		ns, err := netns.Create(name)
		if err != nil {
			return 0, 0, err
		}
		id := fmt.Sprintf("adm-%d-%d", os.Getpid(), i)
		err = env.InNode(func() error {
			t0 := time.Now()
			att, err := cnichain.Add(context.Background(), ptpOpts, id, ns, "eth0", nil)
			ptp = time.Since(t0)
			if err != nil {
				return fmt.Errorf("ptp ADD: %w", err)
			}
			conf, err := json.Marshal(map[string]any{
				"cniVersion": "1.0.0", "name": ptpOpts.Name, "type": "cleanwall-cni",
				"policy": policyFile, "socket": socket, "prevResult": att.Result,
			})
			if err != nil {
				return err
			}
			live = append(live, attached{att: att, ns: ns, id: id, conf: conf})
			t1 := time.Now()
			if out, err := execCNI(plugin, "ADD", id, ns, cniPath, conf); err != nil {
				return fmt.Errorf("cleanwall-cni ADD: %v: %s", err, out)
			}
			cw = time.Since(t1)
			return nil
		})
		if err != nil {
			_ = netns.Delete(name)
		}
		return ptp, cw, err
	}
	del := func(a attached) (ptp, cw time.Duration, err error) {
		err = env.InNode(func() error {
			t0 := time.Now()
			if out, err := execCNI(plugin, "DEL", a.id, a.ns, cniPath, a.conf); err != nil {
				return fmt.Errorf("cleanwall-cni DEL: %v: %s", err, out)
			}
			cw = time.Since(t0)
			t1 := time.Now()
			err := a.att.Del(context.Background())
			ptp = time.Since(t1)
			return err
		})
		_ = netns.Delete(filepath.Base(a.ns))
		return ptp, cw, err
	}

	n := *flagSandboxes
	addP50 := rep.addRow(&Comparison{Scenario: fmt.Sprintf("CNI ADD, %d sandboxes one after another, p50", n), Unit: "ms", LowerBetter: true,
		Baseline: "ptp plugin", Cleanwall: "cleanwall-cni", ShowAdded: true})
	addP99 := rep.addRow(&Comparison{Scenario: fmt.Sprintf("CNI ADD, %d sandboxes one after another, p99", n), Unit: "ms", LowerBetter: true,
		Baseline: "ptp plugin", Cleanwall: "cleanwall-cni", Target: "cleanwall-cni < 20 ms", Check: cleanwallBelow(20)})
	delP50 := rep.addRow(&Comparison{Scenario: fmt.Sprintf("CNI DEL, %d sandboxes one after another, p50", n), Unit: "ms", LowerBetter: true,
		Baseline: "ptp plugin", Cleanwall: "cleanwall-cni", ShowAdded: true})
	delP99 := rep.addRow(&Comparison{Scenario: fmt.Sprintf("CNI DEL, %d sandboxes one after another, p99", n), Unit: "ms", LowerBetter: true,
		Baseline: "ptp plugin", Cleanwall: "cleanwall-cni", Target: "cleanwall-cni < 20 ms", Check: cleanwallBelow(20)})
	rss := rep.addRow(&Comparison{Scenario: fmt.Sprintf("cleanwalld RSS with %d sandboxes", *flagRSSSandboxes), Unit: "MiB", LowerBetter: true,
		Baseline: "no sandboxes", Cleanwall: fmt.Sprintf("%d sandboxes", *flagRSSSandboxes), Target: "< 64 MiB", Check: cleanwallBelow(64)})

	// Rounds of 50 sandboxes: the p50/p99 rows show each round, so growth
	// with the node's sandbox count shows up as rounds that drift.
	const perRound = 50
	var addPtp, addCW []time.Duration
	for r := 0; r*perRound < n; r++ {
		var rp, rc []time.Duration
		for i := r * perRound; i < min(n, (r+1)*perRound); i++ {
			p, c, err := add(i)
			if err != nil {
				t.Fatalf("sandbox %d: %v", i, err)
			}
			rp, rc = append(rp, p), append(rc, c)
		}
		slices.Sort(rp)
		slices.Sort(rc)
		addP50.Add(r, "baseline", ms(percentile(rp, 50)), nil)
		addP50.Add(r, "cleanwall", ms(percentile(rc, 50)), nil)
		addP99.Add(r, "baseline", ms(percentile(rp, 99)), nil)
		addP99.Add(r, "cleanwall", ms(percentile(rc, 99)), nil)
		addPtp, addCW = append(addPtp, rp...), append(addCW, rc...)
	}
	slices.Sort(addPtp)
	slices.Sort(addCW)
	rep.note("admission: over all %d ADDs, ptp p50 %.1f ms p99 %.1f ms; cleanwall-cni p50 %.1f ms p99 %.1f ms, max %.1f ms",
		n, ms(percentile(addPtp, 50)), ms(percentile(addPtp, 99)), ms(percentile(addCW, 50)), ms(percentile(addCW, 99)), ms(addCW[len(addCW)-1]))
	if m, err := d.Metrics(); err == nil {
		rep.note("admission: daemon side of an ADD (mean per phase, from cleanwall_admission_phase_seconds): %s", phaseMeans(m, "add"))
	}
	if start, err := pluginStart(plugin, 30); err == nil {
		rep.note("admission: cleanwall-cni process start (VERSION, 30 runs) p50 %.1f ms", ms(start))
	}

	// RSS: keep adding (untimed rows) up to the RSS count.
	for i := n; i < *flagRSSSandboxes; i++ {
		if _, _, err := add(i); err != nil {
			t.Fatalf("sandbox %d: %v", i, err)
		}
	}
	if *flagRSSSandboxes > 0 {
		kib, err := rssKiB(d.Pid())
		if err != nil {
			t.Fatal(err)
		}
		rss.Add(0, "baseline", float64(rssStart)/1024, nil)
		rss.Add(0, "cleanwall", float64(kib)/1024, nil)
	}

	// DEL, newest first, the first n timed.
	var delPtp, delCW []time.Duration
	round, inRound := 0, 0
	var rp, rc []time.Duration
	flush := func() {
		if len(rc) == 0 {
			return
		}
		slices.Sort(rp)
		slices.Sort(rc)
		delP50.Add(round, "baseline", ms(percentile(rp, 50)), nil)
		delP50.Add(round, "cleanwall", ms(percentile(rc, 50)), nil)
		delP99.Add(round, "baseline", ms(percentile(rp, 99)), nil)
		delP99.Add(round, "cleanwall", ms(percentile(rc, 99)), nil)
		delPtp, delCW = append(delPtp, rp...), append(delCW, rc...)
		rp, rc = nil, nil
		round++
		inRound = 0
	}
	for len(live) > 0 {
		a := live[len(live)-1]
		live = live[:len(live)-1]
		p, c, err := del(a)
		if err != nil {
			t.Fatalf("DEL %s: %v", a.id, err)
		}
		if len(live) < n { // the timed rows: the last n sandboxes on the node
			rp, rc = append(rp, p), append(rc, c)
			if inRound++; inRound == perRound {
				flush()
			}
		}
	}
	flush()
	slices.Sort(delCW)
	if len(delCW) > 0 {
		rep.note("admission: over %d DELs, cleanwall-cni p50 %.1f ms p99 %.1f ms", len(delCW), ms(percentile(delCW, 50)), ms(percentile(delCW, 99)))
	}
	if m, err := d.Metrics(); err == nil {
		rep.note("admission: daemon side of a DEL (mean per phase): %s", phaseMeans(m, "del"))
	}
}

// execCNI runs a CNI plugin the way libcni does and returns its output.
func execCNI(plugin, command, id, ns, path string, conf []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := &invoke.Args{Command: command, ContainerID: id, NetNS: ns, IfName: "eth0", Path: path}
	return (&invoke.RawExec{Stderr: os.Stderr}).ExecPlugin(ctx, plugin, conf, args.AsEnv())
}

// pluginStart is the median time of cleanwall-cni's VERSION command.
func pluginStart(plugin string, runs int) (time.Duration, error) {
	var ds []time.Duration
	conf := []byte(`{"cniVersion":"1.0.0"}`)
	for range runs {
		t0 := time.Now()
		if _, err := execCNI(plugin, "VERSION", "", "", "", conf); err != nil {
			return 0, err
		}
		ds = append(ds, time.Since(t0))
	}
	slices.Sort(ds)
	return percentile(ds, 50), nil
}

// phaseMeans renders the mean of each phase of op from the histogram.
func phaseMeans(metrics, op string) string {
	type ph struct {
		name     string
		sum, cnt float64
	}
	var out []ph
	idx := map[string]int{}
	for _, line := range strings.Split(metrics, "\n") {
		var suffix string
		switch {
		case strings.HasPrefix(line, "cleanwall_admission_phase_seconds_sum{"):
			suffix = "sum"
		case strings.HasPrefix(line, "cleanwall_admission_phase_seconds_count{"):
			suffix = "count"
		default:
			continue
		}
		if !strings.Contains(line, `op="`+op+`"`) {
			continue
		}
		i := strings.Index(line, `phase="`)
		if i < 0 {
			continue
		}
		name := line[i+7:]
		name = name[:strings.IndexByte(name, '"')]
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			continue
		}
		j, ok := idx[name]
		if !ok {
			j = len(out)
			idx[name] = j
			out = append(out, ph{name: name})
		}
		if suffix == "sum" {
			out[j].sum = v
		} else {
			out[j].cnt = v
		}
	}
	var parts []string
	for _, p := range out {
		if p.cnt > 0 {
			parts = append(parts, fmt.Sprintf("%s %.2f ms", p.name, p.sum/p.cnt*1000))
		}
	}
	return strings.Join(parts, ", ")
}

// rssKiB is a process's resident set (VmRSS) in KiB.
func rssKiB(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			return strconv.Atoi(f[1])
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
