package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// median of xs (NaN for none). xs is not modified.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// percentile is the nearest-rank percentile p (0-100] of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

// Round is one measurement of one side in one round.
type Round struct {
	Round int                `json:"round"`
	Side  string             `json:"side"` // "baseline" or "cleanwall"
	Value float64            `json:"value"`
	Extra map[string]float64 `json:"extra,omitempty"`
}

// Comparison is one row of the result: a baseline and cleanwall measured in
// interleaved rounds. Lower is better when LowerBetter is set.
type Comparison struct {
	Scenario    string  `json:"scenario"`
	Unit        string  `json:"unit"`
	Baseline    string  `json:"baselineLabel"`
	Cleanwall   string  `json:"cleanwallLabel"`
	LowerBetter bool    `json:"lowerIsBetter"`
	Rounds      []Round `json:"rounds"`
	// Target describes the goal; Check decides it from the row (nil: no target).
	Target string                 `json:"target,omitempty"`
	Check  func(*Comparison) bool `json:"-"`
	Note   string                 `json:"note,omitempty"`

	// Filled by Summarise.
	BaselineMedian  float64 `json:"baselineMedian"`
	CleanwallMedian float64 `json:"cleanwallMedian"`
	Ratio           float64 `json:"ratio"` // cleanwall median / baseline median
	RatioMin        float64 `json:"pairedRatioMin"`
	RatioMax        float64 `json:"pairedRatioMax"`
	// AddedMedian is the median of the paired differences (cleanwall −
	// baseline, in Unit); ShowAdded prints it next to the verdict.
	AddedMedian float64 `json:"pairedDiffMedian"`
	ShowAdded   bool    `json:"-"`
	// Reference rows carry a baseline only, for context.
	Reference bool   `json:"reference,omitempty"`
	Verdict   string `json:"verdict"`
}

// Add records one round of one side.
func (c *Comparison) Add(round int, side string, v float64, extra map[string]float64) {
	c.Rounds = append(c.Rounds, Round{Round: round, Side: side, Value: v, Extra: extra})
}

func (c *Comparison) values(side string) []float64 {
	var out []float64
	for _, r := range c.Rounds {
		if r.Side == side {
			out = append(out, r.Value)
		}
	}
	return out
}

// PairedDiffs are cleanwall − baseline of the rounds measured together.
func (c *Comparison) PairedDiffs() []float64 {
	b := map[int]float64{}
	for _, r := range c.Rounds {
		if r.Side == "baseline" {
			b[r.Round] = r.Value
		}
	}
	var out []float64
	for _, r := range c.Rounds {
		if v, ok := b[r.Round]; ok && r.Side == "cleanwall" {
			out = append(out, r.Value-v)
		}
	}
	return out
}

// Summarise computes medians, the ratio of medians, the spread of the
// per-round ratios, and the verdict.
func (c *Comparison) Summarise() {
	c.BaselineMedian = median(c.values("baseline"))
	c.CleanwallMedian = median(c.values("cleanwall"))
	c.Ratio = c.CleanwallMedian / c.BaselineMedian
	b := map[int]float64{}
	for _, r := range c.Rounds {
		if r.Side == "baseline" {
			b[r.Round] = r.Value
		}
	}
	c.RatioMin, c.RatioMax = math.NaN(), math.NaN()
	for _, r := range c.Rounds {
		if v, ok := b[r.Round]; ok && r.Side == "cleanwall" {
			q := r.Value / v
			if math.IsNaN(c.RatioMin) || q < c.RatioMin {
				c.RatioMin = q
			}
			if math.IsNaN(c.RatioMax) || q > c.RatioMax {
				c.RatioMax = q
			}
		}
	}
	c.AddedMedian = median(c.PairedDiffs())
	switch {
	case c.Reference:
		c.Verdict = "reference"
	case math.IsNaN(c.CleanwallMedian):
		c.Verdict = "no data"
	case c.Check == nil:
		c.Verdict = "-"
	case c.Check(c):
		c.Verdict = "ok"
	default:
		c.Verdict = "MISS"
	}
	if c.ShowAdded && !math.IsNaN(c.AddedMedian) {
		added := fmt.Sprintf("%+.0f %s", c.AddedMedian, c.Unit)
		if c.Verdict == "-" {
			c.Verdict = added
		} else {
			c.Verdict += " (" + added + ")"
		}
	}
}

// formatValue prints v in unit with a sensible scale.
func formatValue(v float64, unit string) string {
	if math.IsNaN(v) {
		return "-"
	}
	switch unit {
	case "bit/s":
		return fmt.Sprintf("%.2f Gbit/s", v/1e9)
	case "s":
		return fmt.Sprintf("%.3f s", v)
	case "µs":
		if v >= 10000 {
			return fmt.Sprintf("%.2f ms", v/1000)
		}
		return fmt.Sprintf("%.0f µs", v)
	case "ns":
		return fmt.Sprintf("%.0f ns", v)
	case "conn/s", "q/s", "req/s":
		return fmt.Sprintf("%.0f %s", v, unit)
	}
	return fmt.Sprintf("%.3g %s", v, unit)
}

// Table renders the rows like:
//
//	scenario   baseline   cleanwall   ratio   spread   target   verdict
func Table(rows []*Comparison) string {
	header := []string{"scenario", "baseline", "cleanwall", "ratio", "spread", "target", "verdict"}
	cells := [][]string{header}
	for _, c := range rows {
		spread := "-"
		if !math.IsNaN(c.RatioMin) {
			spread = fmt.Sprintf("%.2f-%.2f", c.RatioMin, c.RatioMax)
		}
		ratio := "-"
		if !math.IsNaN(c.Ratio) && !math.IsInf(c.Ratio, 0) {
			ratio = fmt.Sprintf("%.2f", c.Ratio)
		}
		target := c.Target
		if target == "" {
			target = "-"
		}
		cells = append(cells, []string{c.Scenario, formatValue(c.BaselineMedian, c.Unit), formatValue(c.CleanwallMedian, c.Unit), ratio, spread, target, c.Verdict})
	}
	width := make([]int, len(header))
	for _, row := range cells {
		for i, s := range row {
			width[i] = max(width[i], len([]rune(s)))
		}
	}
	var b strings.Builder
	for _, row := range cells {
		for i, s := range row {
			pad := width[i] - len([]rune(s))
			b.WriteString(s)
			if i < len(row)-1 {
				b.WriteString(strings.Repeat(" ", pad+3))
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

// Report is the JSON document of one run.
type Report struct {
	Started  time.Time      `json:"started"`
	Finished time.Time      `json:"finished"`
	Host     map[string]any `json:"host"`
	Config   map[string]any `json:"config"`
	Rows     []*Comparison  `json:"rows"`
	// Notes are per-scenario facts worth keeping next to the numbers
	// (versions, what a path measures, anomalies seen).
	Notes []string `json:"notes,omitempty"`
}

// Write stores the report as indented JSON, creating the directory.
func (r *Report) Write(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// MarshalJSON writes NaN (no data) as null.
func (c *Comparison) MarshalJSON() ([]byte, error) {
	type plain Comparison
	fix := func(v float64) any {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return nil
		}
		return v
	}
	return json.Marshal(struct {
		*plain
		BaselineMedian  any `json:"baselineMedian"`
		CleanwallMedian any `json:"cleanwallMedian"`
		Ratio           any `json:"ratio"`
		RatioMin        any `json:"pairedRatioMin"`
		RatioMax        any `json:"pairedRatioMax"`
		AddedMedian     any `json:"pairedDiffMedian"`
	}{(*plain)(c), fix(c.BaselineMedian), fix(c.CleanwallMedian), fix(c.Ratio), fix(c.RatioMin), fix(c.RatioMax), fix(c.AddedMedian)})
}

// Checks for targets.

// ratioAtLeast: cleanwall/baseline >= r (throughput).
func ratioAtLeast(r float64) func(*Comparison) bool {
	return func(c *Comparison) bool { return c.Ratio >= r }
}

// ratioAtMost: cleanwall/baseline <= r (costs).
func ratioAtMost(r float64) func(*Comparison) bool {
	return func(c *Comparison) bool { return c.Ratio <= r }
}

// addedBelow: median of the paired differences (cleanwall − baseline) < d.
func addedBelow(d float64) func(*Comparison) bool {
	return func(c *Comparison) bool { return median(c.PairedDiffs()) < d }
}

// cleanwallBelow: cleanwall's median < v (absolute targets).
func cleanwallBelow(v float64) func(*Comparison) bool {
	return func(c *Comparison) bool { return c.CleanwallMedian < v }
}

func TestMedianAndPercentile(t *testing.T) {
	if m := median([]float64{3, 1, 2}); m != 2 {
		t.Fatalf("median odd = %v", m)
	}
	if m := median([]float64{4, 1, 3, 2}); m != 2.5 {
		t.Fatalf("median even = %v", m)
	}
	if !math.IsNaN(median(nil)) {
		t.Fatal("median of nothing must be NaN")
	}
	d := make([]time.Duration, 100)
	for i := range d {
		d[i] = time.Duration(i + 1)
	}
	if p := percentile(d, 50); p != 50 {
		t.Fatalf("p50 = %v", p)
	}
	if p := percentile(d, 99); p != 99 {
		t.Fatalf("p99 = %v", p)
	}
	if p := percentile(d, 100); p != 100 {
		t.Fatalf("p100 = %v", p)
	}
}

func TestComparisonVerdicts(t *testing.T) {
	c := &Comparison{Scenario: "x", Unit: "bit/s", Check: ratioAtLeast(0.8), Target: ">=0.80"}
	for r, v := range [][2]float64{{10, 7}, {10, 9}, {12, 8}} {
		c.Add(r, "baseline", v[0], nil)
		c.Add(r, "cleanwall", v[1], nil)
	}
	c.Summarise()
	if c.BaselineMedian != 10 || c.CleanwallMedian != 8 || c.Ratio != 0.8 || c.Verdict != "ok" {
		t.Fatalf("summary %+v", c)
	}
	if math.Abs(c.RatioMin-8.0/12) > 1e-9 || c.RatioMax != 0.9 {
		t.Fatalf("spread %v-%v", c.RatioMin, c.RatioMax)
	}
	miss := &Comparison{Scenario: "p99", Unit: "µs", Check: addedBelow(200), Target: "+<200µs", ShowAdded: true}
	miss.Add(0, "baseline", 250, nil)
	miss.Add(0, "cleanwall", 1500, nil)
	miss.Summarise()
	if miss.Verdict != "MISS (+1250 µs)" {
		t.Fatalf("a miss was reported as %q", miss.Verdict)
	}
	empty := &Comparison{Scenario: "none", Check: ratioAtMost(1.3)}
	empty.Summarise()
	if empty.Verdict != "no data" {
		t.Fatalf("no data reported as %q", empty.Verdict)
	}
	out := Table([]*Comparison{c, miss, empty})
	for _, want := range []string{"ok", "MISS", "no data", "0.80", "0.67-0.90"} {
		if !strings.Contains(out, want) {
			t.Fatalf("table lacks %q:\n%s", want, out)
		}
	}
	if _, err := json.Marshal(&Report{Rows: []*Comparison{c, miss, empty}}); err != nil {
		t.Fatalf("NaN must encode: %v", err)
	}
}
