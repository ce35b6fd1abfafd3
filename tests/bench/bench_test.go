//go:build bench

package bench

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/testutil"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// Flags go after -args: go test -tags bench ./tests/bench -run TestBench -v -args -scenarios=connect
var (
	flagScenarios = flag.String("scenarios", "throughput,connect,apply,classify,iptables,dns,http,release,postgres,admission,volumes-block,volumes-files", "comma-separated scenarios to run")
	flagRounds    = flag.Int("rounds", 0, "rounds per side of every scenario (0: each scenario's default)")
	flagConns     = flag.Int("conns", 2000, "connections per round in the connect and iptables scenarios")
	flagOut       = flag.String("out", "", "JSON result file (default results/<UTC timestamp>.json)")
	flagPerf      = flag.String("perf", "", "directory: record cleanwalld with perf(1) during the cleanwall rounds of throughput, connect, apply, http and the dns rate rounds")
)

func TestMain(m *testing.M) {
	if addr := os.Getenv(serverEnv); addr != "" {
		fmt.Fprintln(os.Stderr, serveConnect(addr))
		os.Exit(1)
	}
	flag.Parse()
	if os.Geteuid() == 0 {
		harness.SweepLeftovers()
	}
	os.Exit(m.Run())
}

// rounds returns the flag's override or a scenario's default.
func rounds(def int) int {
	if *flagRounds > 0 {
		return *flagRounds
	}
	return def
}

// order says which side goes first in round r: the sides alternate
// (AB, BA, AB, ...), so neither always runs right after the other.
func order(r int) []string {
	if r%2 == 0 {
		return []string{"baseline", "cleanwall"}
	}
	return []string{"cleanwall", "baseline"}
}

// TestBench runs the selected scenarios, prints one table and writes the
// JSON report. A scenario that fails still leaves its rows ("no data" or
// partial rounds) in both.
func TestBench(t *testing.T) {
	testutil.RequireRoot(t)
	want := map[string]bool{}
	for _, s := range strings.Split(*flagScenarios, ",") {
		want[strings.TrimSpace(s)] = true
	}
	rep := &Report{
		Started: time.Now().UTC(),
		Host:    hostInfo(),
		Config: map[string]any{
			"scenarios": *flagScenarios, "roundsOverride": *flagRounds, "conns": *flagConns,
		},
	}
	// Other work on the machine widens every spread: say so up front.
	idle := takeCPU(0)
	time.Sleep(2 * time.Second)
	busy := idle.extra(0, nil)["hostBusyPercent"]
	rep.Host["busyBeforeStartPercent"] = busy
	if busy > 10 {
		rep.note("the machine was %.0f%% busy with other work before the suite started: expect wide spreads (per-round host busy time is in the JSON)", busy)
	}
	out := *flagOut
	if out == "" {
		out = filepath.Join("results", rep.Started.Format("20060102T150405Z")+".json")
	}
	defer func() {
		rep.Finished = time.Now().UTC()
		for _, r := range rep.Rows {
			r.Summarise()
		}
		fmt.Printf("\n%s\n", Table(rep.Rows))
		for _, n := range rep.Notes {
			fmt.Printf("note: %s\n", n)
		}
		if err := rep.Write(out); err != nil {
			t.Errorf("writing %s: %v", out, err)
		} else {
			abs, _ := filepath.Abs(out)
			fmt.Printf("raw rounds: %s\n", abs)
		}
	}()

	if want["throughput"] || want["connect"] || want["apply"] {
		t.Run("topology", func(t *testing.T) {
			top := newTopology(t)
			rep.Notes = append(rep.Notes, top.notes...)
			if want["throughput"] {
				t.Run("throughput", func(t *testing.T) { benchThroughput(t, top, rep) })
			}
			if want["connect"] {
				t.Run("connect", func(t *testing.T) { benchConnect(t, top, rep) })
			}
			if want["apply"] {
				t.Run("apply", func(t *testing.T) { benchApply(t, top, rep) })
			}
		})
	}
	if want["classify"] {
		t.Run("classify", func(t *testing.T) { benchClassify(t, rep) })
	}
	if want["iptables"] {
		t.Run("iptables", func(t *testing.T) { benchIptables(t, rep) })
	}
	if want["dns"] || want["http"] {
		t.Run("proxies", func(t *testing.T) {
			top := newProxyTopology(t, want["http"])
			if want["dns"] {
				t.Run("dns", func(t *testing.T) { benchDNS(t, top, rep) })
			}
			if want["http"] {
				t.Run("http", func(t *testing.T) { benchHTTP(t, top, rep) })
			}
		})
	}
	if want["release"] {
		t.Run("release", func(t *testing.T) { benchRelease(t, rep) })
	}
	if want["postgres"] {
		t.Run("postgres", func(t *testing.T) { benchPostgres(t, rep) })
	}
	if want["volumes-block"] {
		t.Run("volumes-block", func(t *testing.T) { benchVolumesBlock(t, rep) })
	}
	if want["volumes-files"] {
		t.Run("volumes-files", func(t *testing.T) { benchVolumesFiles(t, rep) })
	}
	if want["admission"] {
		t.Run("admission", func(t *testing.T) { benchAdmission(t, rep) })
	}
}

// addRow registers a row before it is measured, so that a scenario that
// fails half-way still shows up.
func (r *Report) addRow(c *Comparison) *Comparison {
	r.Rows = append(r.Rows, c)
	return c
}

func (r *Report) note(format string, args ...any) {
	r.Notes = append(r.Notes, fmt.Sprintf(format, args...))
}

func hostInfo() map[string]any {
	var u unix.Utsname
	_ = unix.Uname(&u)
	h := map[string]any{
		"kernel":   unix.ByteSliceToString(u.Release[:]),
		"cpus":     runtime.NumCPU(),
		"go":       runtime.Version(),
		"iperf3":   firstLine("iperf3", "--version"),
		"iptables": firstLine("iptables", "-V"),
		"commit":   firstLine("git", "rev-parse", "HEAD"),
		"modified": strings.Fields(cmdOut("git", "diff", "--name-only", "HEAD")),
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				h["cpu"] = strings.TrimSpace(l[strings.Index(l, ":")+1:])
				break
			}
		}
	}
	return h
}

func cmdOut(name string, args ...string) string {
	b, _ := exec.Command(name, args...).Output()
	return string(b)
}

func firstLine(name string, args ...string) string {
	lines := strings.Split(strings.TrimSpace(cmdOut(name, args...)), "\n")
	return lines[0]
}

// ensureTools fails the test naming the Debian packages that are missing.
func ensureTools(t *testing.T, tools map[string]string) {
	t.Helper()
	var missing []string
	for bin, pkg := range tools {
		if _, err := exec.LookPath(bin); err != nil {
			missing = append(missing, pkg)
		}
	}
	slices.Sort(missing)
	if len(missing) > 0 {
		t.Fatalf("missing tools: apt-get install -y %s", strings.Join(missing, " "))
	}
}
