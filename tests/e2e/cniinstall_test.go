package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/runtime/cnichain"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// The conflist `cleanwall cni install` writes (deploy/kubernetes' init
// container) is what a runtime runs: read as libcni reads a configuration
// directory (its first file), with the installed copy of the plugin, and a
// pod's annotation passed as containerd passes it, it attaches the pod
// under the named policy: the allowed destination answers through the
// proxy, a denied port gets nothing and the drop is counted; DEL detaches.
func TestInstalledConflistEnforces(t *testing.T) {
	env := harness.New(t)
	policyDir := filepath.Join(env.Dir, "policies")
	if err := os.MkdirAll(policyDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(policyDir, "k8s-open.yaml"), []byte(policyOpen), 0o644); err != nil {
		t.Fatal(err)
	}
	d := env.StartDaemon("--policy-dir", policyDir)
	allowed := env.TCPServer("198.51.100.10:8080")
	denied := env.TCPServer("198.51.100.10:9999")

	// The node's own network: ptp, no cleanwall.
	confDir, binDir := filepath.Join(env.Dir, "net.d"), filepath.Join(env.Dir, "cni-bin")
	for _, dir := range []string{confDir, binDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	node := env.ChainOptions(harness.SandboxOptions{NoIPv6: true}, "")
	node.Cleanwall = false
	conf, err := cnichain.ConfList(node)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(confDir, "10-node.conflist"), conf, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(filepath.Join(env.Bin, "cleanwall"), "cni", "install",
		"--plugin="+filepath.Join(env.Bin, "cleanwall-cni"), "--bin-dir="+binDir, "--conf-dir="+confDir, "--socket="+d.Socket).CombinedOutput()
	if err != nil {
		t.Fatalf("cleanwall cni install: %v\n%s", err, out)
	}

	files, err := libcni.ConfFiles(confDir, []string{".conf", ".conflist", ".json"})
	if err != nil || len(files) != 2 || filepath.Base(files[0]) != "00-cleanwall.conflist" {
		t.Fatalf("the runtime would read %v (%v)", files, err)
	}
	list, err := libcni.ConfListFromFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	nsName := env.Name + "-k8s"
	nsPath, err := netns.Create(nsName)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netns.Delete(nsName) })
	id := fmt.Sprintf("%s-pod-%d", env.Name, time.Now().UnixNano()%100000)
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: nsPath, IfName: "eth0",
		CapabilityArgs: map[string]any{"io.kubernetes.cri.pod-annotations": map[string]string{"cleanwall.dev/policy": "k8s-open"}}}
	// The installed plugin, and the node's reference plugins: not the build's copy.
	cni := libcni.NewCNIConfigWithCacheDir([]string{binDir, harness.CNIPluginDir(t)}, filepath.Join(env.Dir, "k8s-cache"), nil)
	ctx := context.Background()
	if err := env.InNode(func() error { _, err := cni.AddNetworkList(ctx, list, rt); return err }); err != nil {
		t.Fatalf("ADD with the installed conflist: %v", err)
	}
	t.Cleanup(func() { _ = env.InNode(func() error { return cni.DelNetworkList(ctx, list, rt) }) })

	// Without the annotation reaching the plugin, ADD fails (no policy).
	sb, err := d.Client().Get(ctx, id, "eth0")
	if err != nil || sb.PolicyName != "e2e" {
		t.Fatalf("the daemon holds %+v (%v), want the pod under k8s-open.yaml (metadata.name e2e)", sb, err)
	}
	dial := func(addr string) (net.Conn, error) {
		var c net.Conn
		err := netns.Do(nsPath, func() error {
			var err error
			c, err = net.DialTimeout("tcp4", addr, 500*time.Millisecond)
			return err
		})
		return c, err
	}
	c, err := dial("198.51.100.10:8080")
	if err != nil {
		t.Fatalf("allowed destination: %v", err)
	}
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if ack, err := harness.ReadAck(c, 3*time.Second); err != nil || !strings.HasPrefix(ack, "ack:") {
		t.Fatalf("allowed destination answered %q, %v", ack, err)
	}
	c.Close()
	if len(allowed.Conns()) != 1 {
		t.Fatalf("the allowed server saw %d connections", len(allowed.Conns()))
	}

	drops := func() uint64 {
		sb, err := d.Client().Get(ctx, id, "eth0")
		if err != nil {
			t.Fatal(err)
		}
		var n uint64
		for _, c := range sb.Counters {
			if c.Verdict == "drop" && c.Reason == "no-rule" {
				n += c.Packets
			}
		}
		return n
	}
	before := drops()
	if c, err := dial("198.51.100.10:9999"); err == nil {
		c.Close()
		t.Fatal("a connection to a port without a rule was established")
	}
	if !harness.Eventually(3*time.Second, func() bool { return drops() > before }) {
		t.Fatal("the denied SYN was not counted")
	}
	if n := len(denied.Conns()); n != 0 {
		t.Fatalf("the denied server saw %d connections", n)
	}

	if err := env.InNode(func() error { return cni.DelNetworkList(ctx, list, rt) }); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	all, err := d.Client().List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range all {
		if s.ID == id {
			t.Fatalf("after DEL the daemon still holds the pod: %+v", s)
		}
	}
}
