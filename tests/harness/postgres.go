package harness

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/internal/testutil"
)

// The relational data source of issue 15: Debian's PostgreSQL 15 in the
// remote namespace, holding a clinic's patients with canary values in the
// columns a policy denies, and pgbouncer in front of it for the benchmark.

// PostgresIP is the data source's address in the remote namespace (the
// address the example rule in POLICY.md names).
var PostgresIP = netip.MustParseAddr("198.51.100.20")

// PostgresBin is where Debian installs PostgreSQL 15's server programs.
const PostgresBin = "/usr/lib/postgresql/15/bin"

// PostgresRegions are the patients' regions and how many live in each:
// a minCount of 10 withholds east and west whatever the age filter.
var PostgresRegions = []struct {
	Name     string
	Patients int
}{{"north", 30}, {"south", 20}, {"east", 6}, {"west", 3}}

// PostgresVisits is the number of visits, one a day from 2024-01-01
// (patient 1 + i%59): visit_date >= 2024-01-01 + k days selects exactly
// PostgresVisits - k rows.
const PostgresVisits = 100

// Postgres is a PostgreSQL server in the remote namespace.
type Postgres struct {
	Addr     netip.AddrPort // 198.51.100.20:5432
	Database string         // clinic
	User     string         // cleanroom: the login the proxy uses upstream
	Password string         // random; the sandbox must never see it
	// UserFile and PasswordFile hold User and Password (0600, root): what
	// a rule's upstreamUserFile and upstreamPasswordFile name.
	UserFile, PasswordFile string
	// Canary is the random string every name, ssn and email holds.
	Canary  string
	Dir     string // owned by postgres: data directory, socket, log
	LogFile string // the server's log, log_statement=all
	uid     uint32
	gid     uint32
	cmd     *exec.Cmd
	done    chan struct{}
}

// postgresUser is the OS account Debian's package creates: PostgreSQL
// refuses to run as root.
func postgresUser(t testing.TB) (uid, gid uint32) {
	t.Helper()
	u, err := user.Lookup("postgres")
	if err != nil {
		testutil.Skip(t, "needs Debian's postgresql package (make deps installs it): no postgres user")
	}
	id, _ := strconv.Atoi(u.Uid)
	g, _ := strconv.Atoi(u.Gid)
	return uint32(id), uint32(g)
}

// ensureRemoteAddr adds a to the remote namespace's link (idempotent):
// the node reaches it on the link it already has to 198.51.100.0/24.
func (e *Env) ensureRemoteAddr(a netip.Addr) error {
	return e.InRemote(func() error {
		l, err := netlink.LinkByName("to-node")
		if err != nil {
			return err
		}
		if err := addAddr(l, a, 24); err != nil && !errors.Is(err, unix.EEXIST) {
			return err
		}
		return nil
	})
}

func randomToken(t testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// StartPostgres initialises a cluster as the postgres user, starts it in
// the remote namespace on 198.51.100.20:5432 with scram-sha-256 password
// authentication for the role cleanroom (a random password), seeds the
// database clinic and returns once the server accepts connections.
// Cleanup stops it.
func (e *Env) StartPostgres() *Postgres {
	t := e.T
	t.Helper()
	for _, f := range []string{PostgresBin + "/initdb", PostgresBin + "/postgres", PostgresBin + "/pg_isready", "/usr/bin/psql"} {
		if _, err := os.Stat(f); err != nil {
			testutil.Skip(t, "needs Debian's postgresql and postgresql-client packages (make deps installs them): no "+f)
		}
	}
	uid, gid := postgresUser(t)
	if err := e.ensureRemoteAddr(PostgresIP); err != nil {
		t.Fatal(err)
	}
	// Not under t.TempDir: its directories are root's with mode 0700, and
	// the server, running as postgres, could not enter them.
	dir, err := os.MkdirTemp("", "cleanwall-pg-")
	if err != nil {
		t.Fatal(err)
	}
	e.onCleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chown(dir, int(uid), int(gid)); err != nil {
		t.Fatal(err)
	}
	p := &Postgres{
		Addr: netip.AddrPortFrom(PostgresIP, 5432), Database: "clinic", User: "cleanroom",
		Password: "pw-" + randomToken(t, 16), Canary: "CANARY-" + randomToken(t, 8),
		Dir: dir, LogFile: filepath.Join(dir, "postgres.log"), uid: uid, gid: gid,
		UserFile: filepath.Join(e.Dir, "pg-user"), PasswordFile: filepath.Join(e.Dir, "pg-password"),
	}
	if err := os.WriteFile(p.UserFile, []byte(p.User+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p.PasswordFile, []byte(p.Password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	if out, err := p.asPostgres(PostgresBin+"/initdb", "-D", data, "-U", "postgres", "--auth-local=peer",
		"--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	hba := "local all postgres peer\nhost all cleanroom 0.0.0.0/0 scram-sha-256\n"
	if err := os.WriteFile(filepath.Join(data, "pg_hba.conf"), []byte(hba), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.OpenFile(p.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := p.asPostgres(PostgresBin+"/postgres", "-D", data,
		"-c", "listen_addresses="+PostgresIP.String(), "-c", "port=5432",
		"-c", "unix_socket_directories="+dir, "-c", "log_statement=all",
		"-c", "log_destination=stderr", "-c", "logging_collector=off",
		"-c", "log_line_prefix=%m [%p] %q%u@%d ", "-c", "max_connections=200",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
	cmd.Stdout, cmd.Stderr = logf, logf
	// Forked from a thread in the remote namespace (no Pdeathsig: see
	// TryStart); its own process group, so that a kill reaches the backends.
	cmd.SysProcAttr.Setpgid = true
	if err := netns.Do(e.Remote, cmd.Start); err != nil {
		t.Fatalf("starting postgres: %v", err)
	}
	p.cmd, p.done = cmd, make(chan struct{})
	go func() { _ = cmd.Wait(); close(p.done) }()
	e.onCleanup(p.Stop)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if p.asPostgres(PostgresBin+"/pg_isready", "-q", "-h", dir, "-p", "5432").Run() == nil {
			break
		}
		select {
		case <-p.done:
			t.Fatalf("postgres exited during its start:\n%s", p.StatementLog())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("postgres did not accept connections within 30 s:\n%s", p.StatementLog())
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.seed(t)
	return p
}

// asPostgres is a command run as the postgres user in its directory.
func (p *Postgres) asPostgres(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Dir = p.Dir
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + p.Dir, "LC_ALL=C.UTF-8"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: p.uid, Gid: p.gid}}
	return cmd
}

// seed creates the role, the database and its tables, with statement
// logging off for the session: the log then holds only what clients ran.
func (p *Postgres) seed(t testing.TB) {
	t.Helper()
	var sql strings.Builder
	fmt.Fprintf(&sql, "CREATE ROLE %s LOGIN PASSWORD '%s';\nCREATE DATABASE %s;\n\\connect %s\n", p.User, p.Password, p.Database, p.Database)
	sql.WriteString(`CREATE TABLE patients (id int PRIMARY KEY, name text NOT NULL, ssn text NOT NULL,
  email text NOT NULL, region text NOT NULL, age int NOT NULL);
CREATE TABLE visits (id int PRIMARY KEY, patient_id int NOT NULL REFERENCES patients(id),
  visit_date date NOT NULL, diagnosis text NOT NULL);
`)
	id := 0
	for _, r := range PostgresRegions {
		for i := 0; i < r.Patients; i++ {
			id++
			fmt.Fprintf(&sql, "INSERT INTO patients VALUES (%d, '%s-name-%d', '%s-ssn-%d', '%s-%d@example.test', '%s', %d);\n",
				id, p.Canary, id, p.Canary, id, p.Canary, id, r.Name, 20+(id*7)%60)
		}
	}
	for i := 0; i < PostgresVisits; i++ {
		fmt.Fprintf(&sql, "INSERT INTO visits VALUES (%d, %d, DATE '2024-01-01' + %d, 'dx-%d');\n", i+1, 1+i%id, i, i%7)
	}
	fmt.Fprintf(&sql, "GRANT SELECT ON patients, visits TO %s;\n", p.User)
	cmd := p.asPostgres("/usr/bin/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", p.Dir, "-p", "5432", "-U", "postgres", "-d", "postgres")
	cmd.Env = append(cmd.Env, "PGOPTIONS=-c log_statement=none")
	cmd.Stdin = strings.NewReader(sql.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("seeding postgres: %v\n%s", err, out)
	}
}

// Patients is the number of seeded patients.
func (p *Postgres) Patients() int {
	n := 0
	for _, r := range PostgresRegions {
		n += r.Patients
	}
	return n
}

// StatementLog is the server's log so far: with log_statement=all, every
// statement a client had executed ("statement: ..." for the simple
// protocol, "execute <name>: ..." for the extended one).
func (p *Postgres) StatementLog() string {
	b, _ := os.ReadFile(p.LogFile)
	return string(b)
}

// Stop shuts the server down (fast shutdown; SIGKILL to its process group
// after 10 s).
func (p *Postgres) Stop() {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

// PgBouncer is Debian's pgbouncer in the remote namespace, pooling
// connections to a Postgres (the benchmark's baseline for a PostgreSQL
// proxy).
type PgBouncer struct {
	Addr netip.AddrPort
	Dir  string
	cmd  *exec.Cmd
	done chan struct{}
}

// StartPgBouncer starts pgbouncer on addr (in the remote namespace) in
// front of p, transaction pooling, with the same user and password as p.
// Cleanup stops it.
func (e *Env) StartPgBouncer(p *Postgres, addr netip.AddrPort) *PgBouncer {
	t := e.T
	t.Helper()
	if _, err := os.Stat("/usr/sbin/pgbouncer"); err != nil {
		testutil.Skip(t, "needs Debian's pgbouncer package: no /usr/sbin/pgbouncer")
	}
	if err := e.ensureRemoteAddr(addr.Addr()); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(p.Dir, "pgbouncer-"+strconv.Itoa(int(addr.Port())))
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, int(p.uid), int(p.gid)); err != nil {
		t.Fatal(err)
	}
	ini := fmt.Sprintf(`[databases]
%[1]s = host=%[2]s port=%[3]d dbname=%[1]s
[pgbouncer]
listen_addr = %[4]s
listen_port = %[5]d
unix_socket_dir =
auth_type = scram-sha-256
auth_file = %[6]s/userlist.txt
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 32
logfile = %[6]s/pgbouncer.log
pidfile = %[6]s/pgbouncer.pid
`, p.Database, p.Addr.Addr(), p.Addr.Port(), addr.Addr(), addr.Port(), dir)
	users := fmt.Sprintf("%q %q\n", p.User, p.Password)
	for name, body := range map[string]string{"pgbouncer.ini": ini, "userlist.txt": users} {
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(f, int(p.uid), int(p.gid)); err != nil {
			t.Fatal(err)
		}
	}
	cmd := p.asPostgres("/usr/sbin/pgbouncer", filepath.Join(dir, "pgbouncer.ini"))
	var out testutil.SyncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr.Setpgid = true
	if err := netns.Do(e.Remote, cmd.Start); err != nil {
		t.Fatalf("starting pgbouncer: %v", err)
	}
	b := &PgBouncer{Addr: addr, Dir: dir, cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(b.done) }()
	e.onCleanup(b.Stop)
	ready := Eventually(10*time.Second, func() bool {
		select {
		case <-b.done:
			return true
		default:
		}
		var ok bool
		_ = e.InRemote(func() error {
			c, err := net.DialTimeout("tcp", addr.String(), 200*time.Millisecond)
			if err == nil {
				ok = true
				c.Close()
			}
			return nil
		})
		return ok
	})
	if b.exited() || !ready {
		log, _ := os.ReadFile(filepath.Join(dir, "pgbouncer.log"))
		t.Fatalf("pgbouncer did not listen on %s:\n%s%s", addr, out.String(), log)
	}
	return b
}

func (b *PgBouncer) exited() bool {
	select {
	case <-b.done:
		return true
	default:
		return false
	}
}

// Stop ends pgbouncer (SIGINT: immediate shutdown).
func (b *PgBouncer) Stop() {
	_ = b.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-b.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
		<-b.done
	}
}
