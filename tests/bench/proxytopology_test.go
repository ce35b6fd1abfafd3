//go:build bench

package bench

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// originBody is what the origin answers to every GET.
const originBody = "ok cleanwall bench\n"

// proxyTopology is one harness environment for the proxy scenarios:
//
//	direct    ptp + host-local only: the node forwards DNS to the
//	          authoritative server and HTTP to the origin, and reaches the
//	          nginx reverse proxy on the node's own address
//	cleanwall ptp + host-local + cleanwall-cni, policy proxiesPolicyYAML:
//	          DNS through cleanwalld's DNS proxy, HTTP through its open-mode
//	          HTTP proxy
//
// with, in the remote namespace, the harness's authoritative DNS server on
// 198.51.100.53 and an nginx origin on 198.51.100.10:8080, and in the node
// namespace an nginx reverse proxy on 198.51.100.1:8080 in front of the
// same origin.
type proxyTopology struct {
	env    *harness.Env
	daemon *harness.Daemon
	dns    *harness.DNSServer
	direct *harness.Sandbox
	cw     *harness.Sandbox
	pid    int // cleanwalld's
	// nginx are the reverse proxy's processes (master and workers).
	nginx []int
}

// benchDNSRate is cleanwalld's per-sandbox DNS rate (--dns-rate, queries
// per second, burst twice that) in the proxy scenarios: far above what the
// dns rate rounds reach, so that they measure the DNS proxy rather than the
// default limit of 100 queries/s, while every query still takes a token
// from the sandbox's bucket as in a deployment.
const benchDNSRate = 1_000_000

// benchFlowRate is cleanwalld's per-sandbox new-flow rate (--flow-rate) in
// the benchmarks: far above the connect loops' rate, so that they measure
// the proxy path (every flow still takes a token, as in a deployment)
// rather than the default limit of 1000 new flows/s.
const benchFlowRate = 1_000_000

// nginxProxyAddr is where the reverse proxy listens (the node's address on
// its link to the remote namespace: local to the node, routed for the
// direct sandbox).
var nginxProxyAddr = netip.AddrPortFrom(harness.NodeRemoteIP, originPort)

func newProxyTopology(t *testing.T, withHTTP bool) *proxyTopology {
	env := harness.New(t)
	// At log level info, as startDaemon: at debug the daemon logs per flow.
	top := &proxyTopology{env: env, daemon: env.StartDaemon("--log-level", "info", "--dns-rate", strconv.Itoa(benchDNSRate),
		"--flow-rate", strconv.Itoa(benchFlowRate))}
	top.pid = top.daemon.Pid()
	top.dns = env.DNSServer(benchRecord)
	var err error
	if top.direct, err = env.AddSandbox("direct", harness.SandboxOptions{Direct: true, NoIPv6: true}); err != nil {
		t.Fatalf("direct sandbox: %v", err)
	}
	top.cw = env.MustAddSandbox("cw", harness.SandboxOptions{NoIPv6: true, Policy: string(proxiesPolicyYAML())})
	for _, ns := range []string{top.direct.NS, top.cw.NS, env.Node} {
		if err := setSysctls(ns, clientSysctls); err != nil {
			t.Fatal(err)
		}
	}
	if err := checkDNSPaths(top); err != nil {
		t.Fatal(err)
	}
	if !withHTTP {
		return top
	}
	ensureTools(t, map[string]string{"nginx": "nginx-light", "wrk": "wrk"})
	origin := netip.AddrPortFrom(remoteServer, originPort)
	startNginx(t, env.Remote, "origin", origin, originConf(origin))
	master := startNginx(t, env.Node, "proxy", nginxProxyAddr, proxyConf(nginxProxyAddr, origin))
	top.nginx = append([]int{master}, childPIDs(master)...)
	if err := checkHTTPPaths(top); err != nil {
		t.Fatal(err)
	}
	return top
}

// checkDNSPaths asks both sandboxes for a name under the zone, and for one
// outside the policy: only the cleanwall sandbox may have it refused (so
// its queries really reach the DNS proxy, whatever address they name).
func checkDNSPaths(top *proxyTopology) error {
	ask := func(s *harness.Sandbox, name string) (*dns.Msg, error) {
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), dns.TypeA)
		var r *dns.Msg
		err := s.Do(func() (err error) {
			r, _, err = (&dns.Client{Timeout: 3 * time.Second}).Exchange(m, dnsUpstream)
			return err
		})
		return r, err
	}
	for _, s := range []*harness.Sandbox{top.direct, top.cw} {
		r, err := ask(s, "check."+benchZone)
		if err != nil {
			return fmt.Errorf("sandbox %s: resolving check.%s: %w", s.Name, benchZone, err)
		}
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != remoteServer.String() {
			return fmt.Errorf("sandbox %s: unexpected answer %v", s.Name, r)
		}
	}
	want := map[*harness.Sandbox]int{top.direct: dns.RcodeNameError, top.cw: dns.RcodeRefused}
	for s, rcode := range want {
		r, err := ask(s, "outside.example.test")
		if err != nil {
			return fmt.Errorf("sandbox %s: %w", s.Name, err)
		}
		if r.Rcode != rcode {
			return fmt.Errorf("sandbox %s: a name outside the policy got %s, want %s", s.Name, dns.RcodeToString[r.Rcode], dns.RcodeToString[rcode])
		}
	}
	return nil
}

// checkHTTPPaths makes one GET on each of the three paths, and one POST
// through cleanwall that its rule refuses (so the flow is inspected).
func checkHTTPPaths(top *proxyTopology) error {
	origin := netip.AddrPortFrom(remoteServer, originPort)
	paths := []struct {
		s   *harness.Sandbox
		dst netip.AddrPort
	}{{top.direct, origin}, {top.direct, nginxProxyAddr}, {top.cw, origin}}
	for _, p := range paths {
		status, body, hdr, err := httpOnce(p.s, p.dst, "GET")
		if err != nil || status != 200 || body != originBody {
			return fmt.Errorf("sandbox %s GET http://%v/: %d %q %v %v", p.s.Name, p.dst, status, body, hdr, err)
		}
	}
	status, _, hdr, err := httpOnce(top.cw, origin, "POST")
	if err != nil || status != 403 || hdr.Get("Cleanwall-Reason") == "" {
		return fmt.Errorf("a POST through cleanwall was not refused by its rule: %d %v %v", status, hdr, err)
	}
	return nil
}

func httpOnce(s *harness.Sandbox, dst netip.AddrPort, method string) (int, string, http.Header, error) {
	c, err := s.Dial("tcp4", dst.String(), 3*time.Second)
	if err != nil {
		return 0, "", nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	req := fmt.Sprintf("%s /check HTTP/1.1\r\nHost: %v\r\nConnection: close\r\n", method, dst)
	if method == "POST" {
		req += "Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
	} else {
		req += "\r\n"
	}
	if _, err := io.WriteString(c, req); err != nil {
		return 0, "", nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, "", nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header, err
}

// nginxCommon is the part of both nginx configurations that is not about
// serving: a master in the foreground (the suite owns the process), files
// in the instance's directory, no access log (cleanwalld logs no line per
// request either), and keep-alive connections that last the whole run
// (nginx closes one after 1000 requests by default).
func nginxCommon(dir string) string {
	return fmt.Sprintf(`daemon off;
worker_processes auto;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 4096; }
`, dir)
}

func nginxHTTPCommon(dir string) string {
	return fmt.Sprintf(`    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path %[1]s/body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
`, dir)
}

// originConf serves originBody to every request.
func originConf(listen netip.AddrPort) func(dir string) string {
	return func(dir string) string {
		return nginxCommon(dir) + "http {\n" + nginxHTTPCommon(dir) + fmt.Sprintf(`    server {
        listen %v reuseport;
        location / {
            default_type text/plain;
            return 200 %q;
        }
    }
}
`, listen, originBody)
	}
}

// proxyConf is a reverse proxy in front of origin with a pool of
// kept-alive upstream connections (HTTP/1.1 upstream, the client's
// Connection header cleared), as one would deploy nginx for this job.
func proxyConf(listen, origin netip.AddrPort) func(dir string) string {
	return func(dir string) string {
		return nginxCommon(dir) + "http {\n" + nginxHTTPCommon(dir) + fmt.Sprintf(`    upstream origin {
        server %v;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen %v reuseport;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
`, origin, listen)
	}
}

// startNginx runs nginx with the configuration conf(dir), which listens
// on listen, in a namespace until the test ends, and returns the master's
// pid. The master and its workers get a process group of their own, which
// cleanup signals by its id.
func startNginx(t *testing.T, nsPath, name string, listen netip.AddrPort, conf func(dir string) string) int {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "nginx-"+name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	text := conf(dir)
	file := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(file, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := nsCommand(nsPath, "nginx", "-t", "-q", "-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", file).CombinedOutput(); err != nil {
		t.Fatalf("nginx %s: configuration refused: %v\n%s\n%s", name, err, out, text)
	}
	cmd := nsCommand(nsPath, "nginx", "-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", file)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("nginx %s: %v", name, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		pgid := cmd.Process.Pid
		_ = syscall.Kill(-pgid, syscall.SIGTERM) // nginx's fast shutdown, master and workers
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-done
		}
	})
	if err := waitListening(nsPath, int(listen.Port()), 10*time.Second); err != nil {
		select {
		case werr := <-done:
			err = errors.Join(err, werr)
		default:
		}
		log, _ := os.ReadFile(filepath.Join(dir, "error.log"))
		t.Fatalf("nginx %s: %v\n%s%s", name, err, stderr.String(), log)
	}
	return cmd.Process.Pid
}

// childPIDs lists a process's children (nginx's workers).
func childPIDs(pid int) []int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if c, err := strconv.Atoi(f); err == nil {
			out = append(out, c)
		}
	}
	return out
}

// tcpRetransmits sums the TCP segments retransmitted in namespaces
// (RetransSegs of /proc/net/snmp, read from a thread inside each).
func tcpRetransmits(nsPaths ...string) float64 {
	var sum float64
	for _, ns := range nsPaths {
		_ = netns.Do(ns, func() error {
			b, err := os.ReadFile("/proc/thread-self/net/snmp")
			if err != nil {
				return err
			}
			var head []string
			for _, l := range strings.Split(string(b), "\n") {
				f := strings.Fields(l)
				if len(f) == 0 || f[0] != "Tcp:" {
					continue
				}
				if head == nil {
					head = f
					continue
				}
				for i, name := range head {
					if name == "RetransSegs" && i < len(f) {
						v, _ := strconv.ParseFloat(f[i], 64)
						sum += v
					}
				}
			}
			return nil
		})
	}
	return sum
}

// cpuTicks is the CPU time (user + system, clock ticks) of processes.
func cpuTicks(pids []int) uint64 {
	var sum uint64
	for _, p := range pids {
		sum += takeCPU(p).proc
	}
	return sum
}

// nginxVersion is "nginx/1.22.1" or similar.
func nginxVersion() string {
	out, _ := exec.Command("nginx", "-v").CombinedOutput()
	s := strings.TrimSpace(string(out))
	_, v, _ := strings.Cut(s, "version: ")
	return v
}
