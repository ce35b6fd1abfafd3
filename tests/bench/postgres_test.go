//go:build bench

package bench

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/tests/harness"
)

// The postgres scenario (issue 15): a point query from a sandbox, directly
// to PostgreSQL, through pgbouncer, and through cleanwalld's postgres
// privacy proxy, interleaved. The load generator is PostgreSQL's own
// pgbench in the sandbox's namespace.

// pgbench is Debian's, shipped with the server package.
const pgbench = harness.PostgresBin + "/pgbench"

// pgPointQuery is the statement every side runs, the listed statement of
// the cleanwall sandbox's rule; pgbench binds :id as $1.
const pgPointQuery = "SELECT id, region, age FROM patients WHERE id = :id;"

// pgBouncerAddr is where pgbouncer listens, in the remote namespace next
// to the database (a pooler runs by its database).
var pgBouncerAddr = netip.MustParseAddrPort("198.51.100.20:6432")

// postgresPolicy lists the point query; the login files are the harness's.
const postgresPolicy = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: bench-postgres}
spec:
  egress:
    - name: warehouse
      to: [{cidr: 198.51.100.20/32}]
      ports: [{port: 5432}]
      mode: open
      open:
        protocol: postgres
        postgres:
          database: clinic
          upstreamUserFile: %s
          upstreamPasswordFile: %s
          queries:
            - name: patient
              sql: SELECT id, region, age FROM patients WHERE id = $1
          columns:
            deny: [ssn, name, email]
          rows:
            maxRows: 10
`

// pgLoad is one fixed pgbench load.
type pgLoad struct {
	name             string
	clients, threads int
	duration         time.Duration
	rate, p99        *Comparison // vs pgbouncer
	rateD, p99D      *Comparison // vs direct
}

// pgResult is one pgbench run.
type pgResult struct {
	TPS      float64
	Count    int
	P50, P99 time.Duration
	Failed   int
}

var pgTPS = regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`)
var pgFailed = regexp.MustCompile(`number of failed transactions: ([0-9]+)`)

// pgbenchRound runs pgbench in a sandbox against conn with the point
// query (extended protocol, unnamed statements: pgbouncer 1.18 in
// transaction pooling cannot keep named ones) and reads the per-statement
// latencies from its transaction log.
func pgbenchRound(t *testing.T, s *harness.Sandbox, conn harness.PGConn, clients, threads int, d time.Duration) (pgResult, error) {
	dir := t.TempDir()
	script := filepath.Join(dir, "point.sql")
	if err := os.WriteFile(script, []byte(fmt.Sprintf("\\set id random(1, %d)\n%s\n", 59, pgPointQuery)), 0o644); err != nil {
		return pgResult{}, err
	}
	cmd := nsCommand(s.NS, pgbench, "-n", "-M", "extended", "-f", script, "-c", strconv.Itoa(clients), "-j", strconv.Itoa(threads),
		"-T", strconv.Itoa(int(d.Seconds())), "-l", "--log-prefix", filepath.Join(dir, "tx"),
		"-h", conn.Host, "-p", strconv.Itoa(conn.Port), "-U", conn.User, conn.Database)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+conn.Password, "PGSSLMODE=disable")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return pgResult{}, fmt.Errorf("pgbench: %v\n%s%s", err, stdout.String(), stderr.String())
	}
	m := pgTPS.FindStringSubmatch(stdout.String())
	if m == nil {
		return pgResult{}, fmt.Errorf("no tps in pgbench's output:\n%s%s", stdout.String(), stderr.String())
	}
	var res pgResult
	res.TPS, _ = strconv.ParseFloat(m[1], 64)
	if f := pgFailed.FindStringSubmatch(stdout.String()); f != nil {
		res.Failed, _ = strconv.Atoi(f[1])
	}
	logs, _ := filepath.Glob(filepath.Join(dir, "tx.*"))
	var lat []time.Duration
	for _, f := range logs {
		b, err := os.ReadFile(f)
		if err != nil {
			return res, err
		}
		// client_id transaction_no time_us script_no epoch epoch_us
		for _, l := range strings.Split(string(b), "\n") {
			fs := strings.Fields(l)
			if len(fs) < 3 {
				continue
			}
			us, err := strconv.ParseInt(fs[2], 10, 64)
			if err != nil {
				continue
			}
			lat = append(lat, time.Duration(us)*time.Microsecond)
		}
	}
	if len(lat) == 0 {
		return res, fmt.Errorf("pgbench logged no transaction:\n%s%s", stdout.String(), stderr.String())
	}
	slices.Sort(lat)
	res.Count, res.P50, res.P99 = len(lat), percentile(lat, 50), percentile(lat, 99)
	return res, nil
}

// postgresSides rotates the order of the three paths each round.
func postgresSides(r int, sides []string) []string {
	r %= len(sides)
	return append(slices.Clone(sides[r:]), sides[:r]...)
}

func benchPostgres(t *testing.T, rep *Report) {
	if _, err := os.Stat(pgbench); err != nil {
		t.Fatalf("missing tools: apt-get install -y postgresql (for %s)", pgbench)
	}
	env := harness.New(t)
	d := env.StartDaemon("--log-level", "info", "--flow-rate", strconv.Itoa(benchFlowRate))
	pg := env.StartPostgres()
	bouncer := env.StartPgBouncer(pg, pgBouncerAddr)
	direct, err := env.AddSandbox("direct", harness.SandboxOptions{Direct: true, NoIPv6: true})
	if err != nil {
		t.Fatalf("direct sandbox: %v", err)
	}
	if err := setSysctls(direct.NS, clientSysctls); err != nil {
		t.Fatal(err)
	}
	conns := map[string]harness.PGConn{"direct": pg.Conn(), "pgbouncer": pg.Conn()}
	c := conns["pgbouncer"]
	c.Host, c.Port = bouncer.Addr.Addr().String(), int(bouncer.Addr.Port())
	conns["pgbouncer"] = c
	sb := map[string]*harness.Sandbox{"direct": direct, "pgbouncer": direct}
	sides := []string{"direct", "pgbouncer"}
	// Each path answers before anything is measured.
	check := func(side string) {
		if res, err := pgbenchRound(t, sb[side], conns[side], 1, 1, time.Second); err != nil || res.Failed > 0 {
			t.Fatalf("the %s path does not answer the point query: %v %+v", side, err, res)
		} else {
			t.Logf("check %s: %.0f stmt/s, p99 %v over %d statements", side, res.TPS, res.P99, res.Count)
		}
	}
	check("direct")
	check("pgbouncer")
	if ready := harness.Grep(d.Log(), "cleanwalld ready"); !strings.Contains(ready, "open/postgres") {
		rep.note("postgres: skipped: the postgres proxy is not registered in this cleanwalld (its ready line lists no open/postgres); direct and pgbouncer paths were checked")
		t.Skip("the postgres proxy is not registered in this cleanwalld")
	}
	cw := env.MustAddSandbox("cw", harness.SandboxOptions{NoIPv6: true, Policy: fmt.Sprintf(postgresPolicy, pg.UserFile, pg.PasswordFile)})
	if err := setSysctls(cw.NS, clientSysctls); err != nil {
		t.Fatal(err)
	}
	// Any user, no password: the proxy logs in upstream.
	sb["cleanwall"], conns["cleanwall"] = cw, harness.PGConn{Host: pg.Addr.Addr().String(), Port: int(pg.Addr.Port()), User: "analyst", Database: pg.Database}
	sides = append(sides, "cleanwall")
	check("cleanwall")

	loads := []*pgLoad{
		{name: "8 clients", clients: 8, threads: 2, duration: 4 * time.Second},
		{name: "1 client", clients: 1, threads: 1, duration: 3 * time.Second},
	}
	for _, l := range loads {
		l.rate = rep.addRow(&Comparison{Scenario: "postgres point query rate, " + l.name + ", vs pgbouncer", Unit: "stmt/s", Baseline: "pgbouncer", Cleanwall: "cleanwall"})
		l.rateD = rep.addRow(&Comparison{Scenario: "postgres point query rate, " + l.name + ", vs direct", Unit: "stmt/s", Baseline: "direct", Cleanwall: "cleanwall"})
		l.p99 = rep.addRow(&Comparison{Scenario: "postgres point query p99, " + l.name + ", vs pgbouncer", Unit: "µs", LowerBetter: true, Baseline: "pgbouncer", Cleanwall: "cleanwall", ShowAdded: true})
		l.p99D = rep.addRow(&Comparison{Scenario: "postgres point query p99, " + l.name + ", vs direct", Unit: "µs", LowerBetter: true, Baseline: "direct", Cleanwall: "cleanwall", ShowAdded: true})
	}
	loads[0].rate.Target, loads[0].rate.Check = ">=0.80", ratioAtLeast(0.80)
	rep.note("postgres: pgbench -n -M extended (unnamed statements) in the sandbox, %q with :id random in 1..59, -c<clients> -j<threads> -T<seconds>; statements/s are pgbench's tps without connection time, p99 from its transaction log; pgbouncer %s (transaction pooling, pool 32, scram-sha-256) and PostgreSQL 15 (fsync off) in the remote namespace; cleanwall's rule lists the statement, denies ssn, name, email, maxRows 10",
		pgPointQuery, firstLine("/usr/sbin/pgbouncer", "--version"))
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	for r := range rounds(3) {
		for _, l := range loads {
			res := map[string]pgResult{}
			for _, side := range postgresSides(r, sides) {
				cpu := takeCPU(d.Pid())
				p, err := pgbenchRound(t, sb[side], conns[side], l.clients, l.threads, l.duration)
				if err != nil {
					t.Fatalf("%s round %d %s: %v", side, r, l.name, err)
				}
				if p.Failed > 0 {
					t.Errorf("%s round %d %s: %d failed statements", side, r, l.name, p.Failed)
				}
				extra := cpu.extra(d.Pid(), map[string]float64{"tps": p.TPS, "p50us": us(p.P50), "p99us": us(p.P99), "statements": float64(p.Count)})
				if side != "cleanwall" {
					delete(extra, "daemonCPUPercent")
				}
				res[side] = p
				t.Logf("round %d %-9s %-9s: %7.0f stmt/s p50 %6.0f µs p99 %6.0f µs (host busy %.0f%% steal %.0f%%)",
					r, side, l.name, p.TPS, us(p.P50), us(p.P99), extra["hostBusyPercent"], extra["hostStealPercent"])
				switch side {
				case "pgbouncer":
					l.rate.Add(r, "baseline", p.TPS, extra)
				case "direct":
					l.rateD.Add(r, "baseline", p.TPS, extra)
				default:
					l.rate.Add(r, "cleanwall", p.TPS, extra)
				}
			}
			cwr, dr, br := res["cleanwall"], res["direct"], res["pgbouncer"]
			l.rateD.Add(r, "cleanwall", cwr.TPS, nil)
			l.p99.Add(r, "baseline", us(br.P99), nil)
			l.p99.Add(r, "cleanwall", us(cwr.P99), nil)
			l.p99D.Add(r, "baseline", us(dr.P99), nil)
			l.p99D.Add(r, "cleanwall", us(cwr.P99), nil)
		}
	}
}
