package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/tests/harness"
)

// nothingLeft proves that no trace of any sandbox remains in the daemon or
// the kernel: no registered sandbox, no datapath entry, no rule, no link
// pin, no state file.
func nothingLeft(t *testing.T, d *harness.Daemon) {
	t.Helper()
	list, err := d.Client().List(harness.Ctx())
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 0 {
		t.Fatalf("daemon still has %d sandboxes", len(list))
	}
	dp := d.Pinned()
	sbs, err := dp.Sandboxes()
	if err != nil {
		t.Fatal(err)
	}
	if len(sbs) != 0 {
		t.Fatalf("datapath still has sandbox entries: %v", sbs)
	}
	if ids := dp.RuleSandboxIDs(); len(ids) != 0 {
		t.Fatalf("datapath still has rules of sandboxes %v", ids)
	}
	links, _ := os.ReadDir(filepath.Join(d.PinRoot, "links"))
	if len(links) != 0 {
		t.Fatalf("link pins left: %v", links)
	}
	state, _ := os.ReadDir(filepath.Join(d.StateDir, "sandboxes"))
	for _, e := range state {
		if strings.HasSuffix(e.Name(), ".json") {
			t.Fatalf("state file left: %s", e.Name())
		}
	}
}

func TestFailedAddLeavesNothing(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	cases := []struct {
		name string
		opts harness.SandboxOptions
		want string // in the ADD error
	}{
		{"invalid policy", harness.SandboxOptions{Policy: strings.Replace(policyOpen, "port: 8080", "port: 70000", 1)},
			"spec.egress[0].ports[0].port"},
		{"unknown policy field", harness.SandboxOptions{Policy: strings.Replace(policyOpen, "mode: open", "mode: open\n      portz: 1", 1)},
			"spec.egress[0].portz"},
		{"unreadable policy", harness.SandboxOptions{ExtraConf: map[string]any{"policy": "/nonexistent/policy.yaml"}},
			"/nonexistent/policy.yaml"},
		{"daemon unreachable", harness.SandboxOptions{Policy: policyOpen, Socket: "/run/cleanwall-test-nowhere.sock"},
			"not reachable"},
		{"malformed conf", harness.SandboxOptions{Policy: policyOpen, ExtraConf: map[string]any{"polcy": "x"}},
			"unknown field(s) in network configuration: polcy"},
		{"bad timeout", harness.SandboxOptions{Policy: policyOpen, ExtraConf: map[string]any{"timeout": "soon"}},
			"field timeout"},
		{"unknown named policy", harness.SandboxOptions{PolicyName: "does-not-exist"},
			`unknown policy "does-not-exist"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := env.AddSandbox("bad", c.opts)
			if err == nil {
				t.Fatal("ADD succeeded")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("ADD error does not name the problem (%q):\n%v", c.want, err)
			}
			nothingLeft(t, d)
		})
	}
}

// cleanwall-cni alone (no prevResult) refuses to run.
func TestAddWithoutPrevResultFails(t *testing.T) {
	env := harness.New(t)
	env.StartDaemon()
	conf := map[string]any{"cniVersion": "1.0.0", "name": "alone", "plugins": []any{
		map[string]any{"type": "cleanwall-cni", "socket": filepath.Join(env.Dir, "cleanwalld.sock"), "policy": "/dev/null"},
	}}
	b, _ := json.Marshal(conf)
	list, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir(env.CNIPaths, filepath.Join(env.Dir, "cache"), nil)
	err = env.InNode(func() error {
		_, err := cni.AddNetworkList(context.Background(), list, &libcni.RuntimeConf{ContainerID: "alone", NetNS: env.Node, IfName: "eth0"})
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "no prevResult") {
		t.Fatalf("want a prevResult error, got %v", err)
	}
}

func TestDelTwiceAndCheck(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	sb := env.MustAddSandbox("del", harness.SandboxOptions{Policy: policyOpen})
	if err := sb.Check(); err != nil {
		t.Fatalf("CHECK of a healthy sandbox failed: %v", err)
	}
	// Break the kernel state behind the daemon's back: CHECK must notice.
	dp := d.Pinned()
	sbs, _ := dp.Sandboxes()
	for ifindex := range sbs {
		if err := dp.DeleteSandbox(ifindex); err != nil {
			t.Fatal(err)
		}
	}
	if err := sb.Check(); err == nil || !strings.Contains(err.Error(), "datapath entry") {
		t.Fatalf("CHECK did not notice the missing map entry: %v", err)
	}
	if err := sb.Del(); err != nil {
		t.Fatalf("first DEL: %v", err)
	}
	if err := sb.Del(); err != nil {
		t.Fatalf("second DEL: %v", err)
	}
	nothingLeft(t, d)
}

// DEL succeeds when the netns is already gone (the runtime removed it).
func TestDelWithMissingNetns(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	sb := env.MustAddSandbox("gone", harness.SandboxOptions{Policy: policyOpen})
	if err := exec.Command("ip", "netns", "del", filepath.Base(sb.NS)).Run(); err != nil {
		t.Fatal(err)
	}
	if err := sb.Del(); err != nil {
		t.Fatalf("DEL with the netns gone: %v", err)
	}
	nothingLeft(t, d)
}

// STATUS and GC are CNI 1.1.0 operations; Debian's reference plugins stop at
// 1.0.0, so they are exercised with a 1.1.0 list holding cleanwall-cni alone.
func TestStatusAndGC(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	keep := env.MustAddSandbox("keep", harness.SandboxOptions{Policy: policyOpen})
	drop := env.MustAddSandbox("drop", harness.SandboxOptions{Policy: policyOpen})

	conf := func(socket string) *libcni.NetworkConfigList {
		b, _ := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": "gc", "plugins": []any{
			map[string]any{"type": "cleanwall-cni", "socket": socket},
		}})
		l, err := libcni.ConfListFromBytes(b)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	cni := libcni.NewCNIConfigWithCacheDir(env.CNIPaths, filepath.Join(env.Dir, "gc-cache"), nil)
	if err := env.InNode(func() error { return cni.GetStatusNetworkList(context.Background(), conf(d.Socket)) }); err != nil {
		t.Fatalf("STATUS of a ready daemon: %v", err)
	}
	err := env.InNode(func() error {
		return cni.GetStatusNetworkList(context.Background(), conf("/run/cleanwall-test-nowhere.sock"))
	})
	if err == nil || !strings.Contains(err.Error(), "not available") {
		t.Fatalf("STATUS without a daemon: %v", err)
	}
	err = env.InNode(func() error {
		return cni.GCNetworkList(context.Background(), conf(d.Socket), &libcni.GCArgs{
			ValidAttachments: []types.GCAttachment{{ContainerID: keep.ContainerID, IfName: "eth0"}},
		})
	})
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	list, _ := d.Client().List(harness.Ctx())
	if len(list) != 1 || list[0].ID != keep.ContainerID {
		t.Fatalf("after GC: %+v", list)
	}
	if err := keep.Check(); err != nil {
		t.Fatalf("the valid attachment broke: %v", err)
	}
	if err := drop.Check(); err == nil {
		t.Fatal("the collected attachment still checks")
	}
}

// The daemon refuses bad API requests with a field, and nothing changes.
func TestDaemonRejectsBadRequests(t *testing.T) {
	env := harness.New(t)
	d := env.StartDaemon()
	sb := env.MustAddSandbox("ok", harness.SandboxOptions{Policy: policyOpen})
	c := d.Client()
	before, _ := c.List(harness.Ctx())
	bad := []struct {
		name  string
		field string
		req   func() error
	}{
		{"empty container id", "containerID", func() error {
			_, err := c.Add(harness.Ctx(), addReq(sb, func(r *map[string]any) { (*r)["containerID"] = "" }))
			return err
		}},
		{"bad mac", "mac", func() error {
			_, err := c.Add(harness.Ctx(), addReq(sb, func(r *map[string]any) { (*r)["mac"] = "zz" }))
			return err
		}},
		{"no ips", "ips", func() error {
			_, err := c.Add(harness.Ctx(), addReq(sb, func(r *map[string]any) { delete(*r, "ips") }))
			return err
		}},
		{"already attached", "containerID", func() error {
			_, err := c.Add(harness.Ctx(), addReq(sb, func(*map[string]any) {}))
			return err
		}},
		{"missing host interface", "hostInterface", func() error {
			_, err := c.Add(harness.Ctx(), addReq(sb, func(r *map[string]any) {
				(*r)["containerID"] = "other"
				(*r)["hostInterface"] = "nope0"
				(*r)["ips"] = []any{map[string]any{"address": "10.250.0.77/32", "gateway": "10.250.0.1"}}
			}))
			return err
		}},
	}
	for _, b := range bad {
		err := b.req()
		if err == nil || !strings.Contains(err.Error(), b.field) {
			t.Errorf("%s: want an error naming %q, got %v", b.name, b.field, err)
		}
	}
	after, _ := c.List(harness.Ctx())
	if len(after) != len(before) {
		t.Fatalf("bad requests changed the registry: %d -> %d sandboxes", len(before), len(after))
	}
	if err := sb.Check(); err != nil {
		t.Fatalf("the existing sandbox broke: %v", err)
	}
}

// addReq builds a daemon add request like the plugin would for sb, then
// lets mutate break one field.
func addReq(sb *harness.Sandbox, mutate func(*map[string]any)) api.AddRequest {
	var gw string
	for _, ip := range sb.Result.IPs {
		if ip.Address.IP.To4() != nil {
			gw = ip.Gateway.String()
		}
	}
	m := map[string]any{
		"containerID": sb.ContainerID, "ifName": "eth0", "netns": sb.NS,
		"hostInterface": sb.HostVeth(), "mac": sb.MAC.String(),
		"ips":    []any{map[string]any{"address": sb.IP.String() + "/32", "gateway": gw}},
		"policy": []byte(policyOpen),
	}
	mutate(&m)
	b, _ := json.Marshal(m)
	var req api.AddRequest
	_ = json.Unmarshal(b, &req)
	return req
}
