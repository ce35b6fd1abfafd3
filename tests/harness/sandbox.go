package harness

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/runtime/cnichain"
)

// Chain selects the plugin cleanwall-cni is chained after.
type Chain string

const (
	ChainPTP    Chain = "ptp"
	ChainBridge Chain = "bridge"
)

// SandboxOptions configure one sandbox.
type SandboxOptions struct {
	Chain Chain
	// Policy is the policy YAML; written to a file the conf names.
	Policy string
	// PolicyName is passed as CNI_ARGS CLEANWALL_POLICY (instead of Policy).
	PolicyName string
	// Socket overrides the daemon socket in the conf.
	Socket string
	// ExtraConf adds raw fields to cleanwall-cni's conf (for bad-input tests).
	ExtraConf map[string]any
	// NoIPv6 gives the sandbox only an IPv4 address.
	NoIPv6 bool
	// Bridge names the bridge (ChainBridge); default cwbr0.
	Bridge string
	// Direct leaves cleanwall-cni out of the chain: the node simply forwards
	// the sandbox's traffic (forwarding is on, the remote routes 10.0.0.0/8
	// back). For benchmark baselines only: a test must never use a direct
	// sandbox to show that something is enforced.
	Direct bool
}

// Sandbox is a network namespace attached through the CNI chain.
type Sandbox struct {
	env         *Env
	Name        string
	ContainerID string
	NS          string // netns path
	IfName      string
	IP, IP6     netip.Addr
	MAC         net.HardwareAddr
	Result      *current.Result
	att         *cnichain.Attachment
}

// ChainOptions returns the chain options of a sandbox in this env: one
// network name per env, so host-local hands every sandbox its own address.
func (e *Env) ChainOptions(o SandboxOptions, policyFile string) cnichain.Options {
	c := cnichain.Options{
		Name: e.Name, Chain: string(o.Chain), Bridge: o.Bridge,
		Subnet: e.SandboxNet, Cleanwall: !o.Direct, PolicyFile: policyFile,
		Socket: o.Socket, ExtraConf: o.ExtraConf, PluginDirs: e.CNIPaths,
		CacheDir: filepath.Join(e.Dir, "cni-cache"), IPAMDir: filepath.Join(e.Dir, "ipam"),
	}
	if c.Chain == "bridge" && c.Bridge == "" {
		c.Bridge = "cwbr0"
	}
	if c.Socket == "" {
		c.Socket = filepath.Join(e.Dir, "cleanwalld.sock")
	}
	if !o.NoIPv6 {
		c.Subnet6 = e.SandboxNet6
	}
	return c
}

// AddSandbox creates a namespace and runs CNI ADD on it the way a runtime
// does (libcni, from the node namespace). On failure, like a runtime, it
// runs DEL and returns the ADD error; the namespace is removed.
func (e *Env) AddSandbox(name string, o SandboxOptions) (*Sandbox, error) {
	e.T.Helper()
	nsName := fmt.Sprintf("%s-%s", e.Name, name)
	path, err := netns.Create(nsName)
	if err != nil {
		e.T.Fatal(err)
	}
	e.onCleanup(func() { _ = netns.Delete(nsName) })
	if err := netns.Do(path, func() error {
		return sysctls(map[string]string{"net/ipv6/conf/default/accept_dad": "0", "net/ipv6/conf/all/accept_dad": "0"})
	}); err != nil {
		e.T.Fatal(err)
	}
	policyFile := ""
	if o.Policy != "" {
		policyFile = filepath.Join(e.Dir, name+"-policy.yaml")
		if err := os.WriteFile(policyFile, []byte(o.Policy), 0o644); err != nil {
			e.T.Fatal(err)
		}
	}
	var args [][2]string
	if o.PolicyName != "" {
		args = [][2]string{{"IgnoreUnknown", "1"}, {"CLEANWALL_POLICY", o.PolicyName}}
	}
	s := &Sandbox{
		env: e, Name: name, ContainerID: fmt.Sprintf("%s-%s-%d", e.Name, name, time.Now().UnixNano()%100000),
		NS: path, IfName: "eth0",
	}
	err = e.InNode(func() error {
		var aerr error
		s.att, aerr = cnichain.Add(context.Background(), e.ChainOptions(o, policyFile), s.ContainerID, path, s.IfName, args)
		return aerr
	})
	if err != nil {
		_ = netns.Delete(nsName)
		return nil, err
	}
	s.Result, s.IP, s.IP6, s.MAC = s.att.Result, s.att.IPv4, s.att.IPv6, s.att.MAC
	e.onCleanup(func() { _ = s.Del() })
	return s, nil
}

// MustAddSandbox is AddSandbox failing the test on error.
func (e *Env) MustAddSandbox(name string, o SandboxOptions) *Sandbox {
	e.T.Helper()
	s, err := e.AddSandbox(name, o)
	if err != nil {
		e.T.Fatalf("CNI ADD %s: %v", name, err)
	}
	return s
}

// Del runs CNI DEL for the sandbox (idempotent).
func (s *Sandbox) Del() error {
	return s.env.InNode(func() error { return s.att.Del(context.Background()) })
}

// Check runs CNI CHECK.
func (s *Sandbox) Check() error {
	return s.env.InNode(func() error { return s.att.Check(context.Background()) })
}

// Do runs fn inside the sandbox namespace.
func (s *Sandbox) Do(fn func() error) error { return netns.Do(s.NS, fn) }

// Dial connects from inside the sandbox.
func (s *Sandbox) Dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := s.Do(func() error {
		var err error
		c, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	return c, err
}

// HostVeth returns the name of the sandbox's host-side interface.
func (s *Sandbox) HostVeth() string { return s.att.HostInterface() }
