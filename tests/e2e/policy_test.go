package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// policyPorts allows TCP to the remote on the given ports, one rule each.
func policyPorts(name string, ports ...int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: %s}\nspec:\n  egress:\n", name)
	for _, p := range ports {
		fmt.Fprintf(&b, "    - name: port-%d\n      to: [{cidr: 198.51.100.10/32}]\n      ports: [{port: %d}]\n      mode: open\n", p, p)
	}
	return b.String()
}

// policyCIDRs allows TCP 8080 to n distinct /32s (198.51.100.10 among them).
func policyCIDRs(name string, n int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: %s}\nspec:\n  egress:\n    - name: many\n      to:\n        - cidr: 198.51.100.10/32\n", name)
	for i := 1; i < n; i++ {
		fmt.Fprintf(&b, "        - cidr: 10.%d.%d.%d/32\n", 200+i/65536, (i/256)%256, i%256)
	}
	b.WriteString("      ports: [{port: 8080}]\n      mode: open\n")
	return b.String()
}

func apply(t *testing.T, d *harness.Daemon, sb *harness.Sandbox, doc string) (api.ApplyResult, error) {
	t.Helper()
	return d.Client().ApplyPolicy(harness.Ctx(), sb.ContainerID, "", api.ApplyRequest{Policy: []byte(doc), PolicySource: "test"})
}

// A full rule map fails the ADD or apply that needs more room, with a clear
// error, and never changes what is enforced.
func TestRuleMapFull(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon("--max-rules", "16")
	env.TCPServer("198.51.100.10:8080")
	a := env.MustAddSandbox("a", harness.SandboxOptions{Policy: policyCIDRs("ten", 10), NoIPv6: true})

	// A flip needs room for both generations: 10 + 10 > 16.
	_, err := apply(t, d, a, policyCIDRs("ten-b", 10))
	if err == nil || !strings.Contains(err.Error(), "full") || !strings.Contains(err.Error(), "stays enforced") {
		t.Fatalf("apply into a full map: %v", err)
	}
	if err := a.Check(); err != nil {
		t.Fatalf("the old generation is no longer intact: %v", err)
	}
	got, _ := d.Client().Get(harness.Ctx(), a.ContainerID, "")
	if got.PolicyName != "ten" || got.Rules != 10 {
		t.Fatalf("after the failed apply: %+v", got)
	}
	if c, err := a.Dial("tcp4", "198.51.100.10:8080", 5*time.Second); err != nil {
		t.Fatalf("the enforced policy stopped working: %v", err)
	} else {
		c.Close()
	}
	// Another sandbox whose rules do not fit: ADD fails, nothing of it stays.
	_, err = env.AddSandbox("b", harness.SandboxOptions{Policy: policyCIDRs("ten-c", 10), NoIPv6: true})
	if err == nil || !strings.Contains(err.Error(), "full") {
		t.Fatalf("ADD into a full map: %v", err)
	}
	if ids := d.Pinned().RuleSandboxIDs(); len(ids) != 1 {
		t.Fatalf("rules of %d sandboxes in the map, want only the first's", len(ids))
	}
	// A smaller policy still fits and applies.
	if _, err := apply(t, d, a, policyCIDRs("five", 5)); err != nil {
		t.Fatalf("apply of a policy that fits: %v", err)
	}
}

// Generation flips under traffic: no allowed flow breaks, no disallowed
// packet passes, established flows the new policy drops are closed.
func TestLiveApplyUnderTraffic(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	for _, p := range []string{"8080", "8081", "8082"} {
		env.TCPServer("198.51.100.10:" + p)
	}
	sb := env.MustAddSandbox("live", harness.SandboxOptions{Policy: policyPorts("a", 8080, 8081), NoIPv6: true})
	sniff := env.Sniff()

	// A long-lived flow on 8081 that policy "c" will revoke.
	revoked, err := sb.Dial("tcp4", "198.51.100.10:8081", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer revoked.Close()

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var allowedOK, allowedFail, deniedOK atomic.Int64
	wg.Add(2)
	go func() { // allowed by every generation: must never fail
		defer wg.Done()
		for ctx.Err() == nil {
			c, err := sb.Dial("tcp4", "198.51.100.10:8080", 3*time.Second)
			if err != nil {
				allowedFail.Add(1)
				continue
			}
			c.Write([]byte("x"))
			if _, err := harness.ReadAck(c, 3*time.Second); err != nil {
				allowedFail.Add(1)
			} else {
				allowedOK.Add(1)
			}
			c.Close()
		}
	}()
	go func() { // allowed by no generation: must never connect
		defer wg.Done()
		for ctx.Err() == nil {
			if c, err := sb.Dial("tcp4", "198.51.100.10:8082", 200*time.Millisecond); err == nil {
				deniedOK.Add(1)
				c.Close()
			}
		}
	}()
	for i := 0; i < 10; i++ {
		doc := policyPorts(fmt.Sprintf("gen-%d", i), 8080, 8081)
		if i%2 == 1 {
			// The same rule name for 8080 in every generation: a flow is
			// kept across a flip when the new policy allows it under the
			// same rule (a renamed rule closes it, by design).
			doc = strings.Replace(policyCIDRs(fmt.Sprintf("gen-%d", i), 2000), "name: many", "name: port-8080", 1) + strings.TrimPrefix(policyPorts("x", 8081), "apiVersion: cleanwall.dev/v1\nkind: EgressPolicy\nmetadata: {name: x}\nspec:\n  egress:\n")
		}
		if _, err := apply(t, d, sb, doc); err != nil {
			t.Fatalf("apply %d: %v", i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Revoke 8081: its established flow is closed by the proxy.
	res, err := apply(t, d, sb, policyPorts("c", 8080))
	if err != nil {
		t.Fatal(err)
	}
	if res.ClosedFlows < 1 {
		t.Fatalf("apply closed %d flows, want the revoked one", res.ClosedFlows)
	}
	revoked.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := revoked.Write([]byte("still there?")); err == nil {
		if _, err := revoked.Read(make([]byte, 64)); err == nil {
			t.Fatal("the revoked flow is still open")
		}
	}
	if c, err := sb.Dial("tcp4", "198.51.100.10:8081", time.Second); err == nil {
		c.Close()
		t.Fatal("new flows to the revoked port still connect")
	}
	time.Sleep(300 * time.Millisecond)
	cancel()
	wg.Wait()
	t.Logf("during 11 flips: %d allowed round trips, %d failures; %d disallowed connects", allowedOK.Load(), allowedFail.Load(), deniedOK.Load())
	if allowedFail.Load() != 0 {
		t.Fatalf("%d allowed flows broke during generation flips", allowedFail.Load())
	}
	if allowedOK.Load() == 0 {
		t.Fatal("no allowed flow ran during the flips")
	}
	if deniedOK.Load() != 0 {
		t.Fatalf("%d disallowed connections succeeded during the flips", deniedOK.Load())
	}
	if n := sniff.FromSource(sb.IP); n != 0 {
		t.Fatalf("%d packets from the sandbox reached the remote side", n)
	}
	if counter(t, d, sb, "drop", bpf.ReasonNoRule.String(), "") == 0 {
		t.Fatal("the disallowed attempts were not counted")
	}
}

// cleanwall policy show reads the kernel's maps and matches the file.
func TestPolicyShowMatchesTheFile(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	doc := `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: show}
spec:
  egress:
    - name: web
      to: [{cidr: 198.51.100.0/24}, {cidr: "2001:db8:100::/64"}]
      ports: [{port: 80}, {port: 443}]
      mode: open
    - name: metrics
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 9000, protocol: UDP}]
      mode: open
`
	sb := env.MustAddSandbox("show", harness.SandboxOptions{Policy: doc})
	out, err := exec.Command(filepath.Join(env.Bin, "cleanwall"), "policy", "show", "--sandbox", sb.ContainerID, "--socket", d.Socket).CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	text := string(out)
	want := []string{
		"web       1   open  TCP    80    198.51.100.0/24",
		"web       1   open  TCP    443   198.51.100.0/24",
		"web       1   open  TCP    80    2001:db8:100::/64",
		"web       1   open  TCP    443   2001:db8:100::/64",
		"metrics   2   open  UDP    9000  198.51.100.10/32",
		"5 entries in the kernel",
	}
	for _, w := range want {
		if !strings.Contains(squash(text), squash(w)) {
			t.Errorf("policy show lacks %q:\n%s", w, text)
		}
	}
	// Read back from the kernel, not the daemon's memory: remove one entry
	// behind the daemon's back and show must reflect it.
	dp := d.Pinned()
	if err := dp.DeleteRuleEntries(mustGet(t, d, sb).DatapathID, 0, []bpf.RuleEntry{{Prefix: mustPrefix("198.51.100.10/32"), Proto: 17, Port: 9000}}); err != nil {
		t.Fatal(err)
	}
	out, _ = exec.Command(filepath.Join(env.Bin, "cleanwall"), "policy", "show", "--sandbox", sb.ContainerID, "--socket", d.Socket).CombinedOutput()
	if strings.Contains(string(out), "9000") || !strings.Contains(string(out), "4 entries in the kernel") {
		t.Fatalf("policy show did not read the kernel:\n%s", out)
	}
}

func squash(s string) string { return strings.Join(strings.Fields(s), " ") }

func mustGet(t *testing.T, d *harness.Daemon, sb *harness.Sandbox) api.Sandbox {
	t.Helper()
	s, err := d.Client().Get(harness.Ctx(), sb.ContainerID, "")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// A runtime picks a sandbox's policy by name through CNI_ARGS.
func TestCNIArgsSelectsPolicy(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	env.TCPServer("198.51.100.10:8080")
	env.TCPServer("198.51.100.10:8081")
	if err := os.WriteFile(filepath.Join(d.PolicyDir, "only-8081.yaml"), []byte(policyPorts("only-8081", 8081)), 0o644); err != nil {
		t.Fatal(err)
	}
	// The conf names a file too; CNI_ARGS wins.
	sb := env.MustAddSandbox("named", harness.SandboxOptions{Policy: policyOpen, PolicyName: "only-8081", NoIPv6: true})
	if got := mustGet(t, d, sb); got.PolicyName != "only-8081" {
		t.Fatalf("policy %q", got.PolicyName)
	}
	if c, err := sb.Dial("tcp4", "198.51.100.10:8081", 5*time.Second); err != nil {
		t.Fatalf("the named policy's port: %v", err)
	} else {
		c.Close()
	}
	if c, err := sb.Dial("tcp4", "198.51.100.10:8080", time.Second); err == nil {
		c.Close()
		t.Fatal("the conf's policy applied instead of the named one")
	}
}

func TestPolicyCheckCLI(t *testing.T) {
	env := harness.New(t)
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(body), 0o644)
		return p
	}
	good := write("good.yaml", policyOpen)
	shadow := write("shadow.yaml", policyOpen+"    - name: again\n      to: [{cidr: 198.51.100.10/32}]\n      ports: [{port: 8080}]\n      mode: open\n")
	bad := write("bad.yaml", strings.Replace(policyOpen, "port: 8080", "port: 70000", 1))
	run := func(p string) (int, string, string) {
		cmd := exec.Command(filepath.Join(env.Bin, "cleanwall"), "policy", "check", p)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), out.String(), errb.String()
		}
		return 0, out.String(), errb.String()
	}
	if code, out, _ := run(good); code != 0 || !strings.Contains(out, "valid") {
		t.Fatalf("good: %d %s", code, out)
	}
	if code, _, errs := run(bad); code != 1 || !strings.Contains(errs, "spec.egress[0].ports[0].port: 70000 is not a port (1-65535)") {
		t.Fatalf("bad: %d %s", code, errs)
	}
	code, out, errs := run(shadow)
	if code != 0 || !strings.Contains(out, "warning:") || !strings.Contains(out, "spec.egress[1]") {
		t.Fatalf("a shadowed rule: exit %d, want 0 with a warning naming spec.egress[1]:\n%s%s", code, out, errs)
	}
}

func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// cleanwall sandboxes lists each sandbox with its netns, interface,
// addresses, policy, generation and counters.
func TestSandboxesCLI(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	env.TCPServer("198.51.100.10:8080")
	sb := env.MustAddSandbox("list", harness.SandboxOptions{Policy: policyOpen, NoIPv6: true})
	if c, err := sb.Dial("tcp4", "198.51.100.10:8080", 5*time.Second); err == nil {
		c.Close()
	}
	if c, err := sb.Dial("tcp4", "198.51.100.10:8081", time.Second); err == nil {
		c.Close()
	}
	if _, err := apply(t, d, sb, policyPorts("listed", 8080)); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(filepath.Join(env.Bin, "cleanwall"), "sandboxes", "--socket", d.Socket).CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 2 {
		t.Fatalf("want a header and one sandbox:\n%s", out)
	}
	row := strings.Fields(lines[1])
	want := []string{sb.ContainerID, sb.NS, sb.HostVeth(), sb.IP.String(), "listed", "1", "1"}
	for i, w := range want {
		if i >= len(row) || row[i] != w {
			t.Fatalf("column %d: want %q in:\n%s", i, w, out)
		}
	}
	if !strings.Contains(lines[1], "1 flows") || strings.Contains(lines[1], " 0 pkts") {
		t.Fatalf("counters missing (a redirected flow and dropped packets):\n%s", out)
	}
}
