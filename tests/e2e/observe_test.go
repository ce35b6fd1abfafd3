package e2e

import (
	"bufio"
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// cleanwall observe streams what the datapath dropped and what the
// proxies refused, live.
func TestObserveStreamsDenials(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	env.DNSServer(zone...)
	sb := env.MustAddSandbox("observed", harness.SandboxOptions{Policy: policyDNS, NoIPv6: true})

	var mu sync.Mutex
	var got []api.DenyEvent
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.Client().Events(ctx, sb.ContainerID, func(ev api.DenyEvent) error {
		mu.Lock()
		got = append(got, ev)
		mu.Unlock()
		return nil
	})
	// The CLI, too.
	cli := exec.Command(filepath.Join(env.Bin, "cleanwall"), "observe", "--socket", d.Socket)
	out, _ := cli.StdoutPipe()
	if err := cli.Start(); err != nil {
		t.Fatal(err)
	}
	defer cli.Process.Kill()
	lines := make(chan string, 64)
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			lines <- s.Text()
		}
	}()
	time.Sleep(300 * time.Millisecond) // the streams are open

	if c, err := sb.Dial("tcp4", "198.51.100.10:9999", 500*time.Millisecond); err == nil {
		c.Close()
	}
	if _, err := exchange(t, sb, "198.51.100.53:53", "blocked.example.test", dns.TypeA, false); err != nil {
		t.Fatal(err)
	}
	has := func(source, reason string) bool {
		mu.Lock()
		defer mu.Unlock()
		for _, ev := range got {
			if ev.Source == source && ev.Reason == reason && strings.HasPrefix(ev.Sandbox, sb.ContainerID) {
				return true
			}
		}
		return false
	}
	if !harness.Eventually(5*time.Second, func() bool { return has("datapath", "no-rule") && has("dns", "not_allowed") }) {
		mu.Lock()
		t.Fatalf("events: %+v", got)
	}
	deadline := time.After(5 * time.Second)
	for {
		select {
		case l := <-lines:
			if strings.Contains(l, "datapath") && strings.Contains(l, "no-rule") && strings.Contains(l, "198.51.100.10:9999") {
				return
			}
		case <-deadline:
			t.Fatal("cleanwall observe printed no datapath denial")
		}
	}
}
