package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/cleanwall/cleanwall/internal/netns"
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
	list        *libcni.NetworkConfigList
	rt          *libcni.RuntimeConf
	cni         *libcni.CNIConfig
	deleted     bool
}

// ConfList builds the chain's conflist: the reference plugin (CNI 1.0.0,
// the newest Debian's 1.1.1 plugins speak) then cleanwall-cni.
func (e *Env) ConfList(name string, o SandboxOptions, policyFile string) []byte {
	ranges := []any{[]any{map[string]any{"subnet": e.SandboxNet.String()}}}
	routes := []any{map[string]any{"dst": "0.0.0.0/0"}}
	if !o.NoIPv6 {
		ranges = append(ranges, []any{map[string]any{"subnet": e.SandboxNet6.String()}})
		routes = append(routes, map[string]any{"dst": "::/0"})
	}
	ipam := map[string]any{
		"type": "host-local", "ranges": ranges, "routes": routes,
		"dataDir": filepath.Join(e.Dir, "ipam"),
	}
	var first map[string]any
	switch o.Chain {
	case ChainBridge:
		br := o.Bridge
		if br == "" {
			br = "cwbr0"
		}
		first = map[string]any{"type": "bridge", "bridge": br, "isGateway": true, "ipMasq": false, "ipam": ipam}
	default:
		first = map[string]any{"type": "ptp", "ipMasq": false, "ipam": ipam}
	}
	cw := map[string]any{"type": "cleanwall-cni"}
	if policyFile != "" {
		cw["policy"] = policyFile
	}
	sock := o.Socket
	if sock == "" {
		sock = filepath.Join(e.Dir, "cleanwalld.sock")
	}
	cw["socket"] = sock
	for k, v := range o.ExtraConf {
		cw[k] = v
	}
	list := map[string]any{"cniVersion": "1.0.0", "name": name, "plugins": []any{first, cw}}
	b, _ := json.Marshal(list)
	return b
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
	// One network name per env: host-local then hands every sandbox its own address.
	list, err := libcni.ConfListFromBytes(e.ConfList(e.Name, o, policyFile))
	if err != nil {
		e.T.Fatal(err)
	}
	s := &Sandbox{
		env: e, Name: name, ContainerID: fmt.Sprintf("%s-%s-%d", e.Name, name, time.Now().UnixNano()%100000),
		NS: path, IfName: "eth0", list: list,
		cni: libcni.NewCNIConfigWithCacheDir(e.CNIPaths, filepath.Join(e.Dir, "cni-cache"), nil),
	}
	s.rt = &libcni.RuntimeConf{ContainerID: s.ContainerID, NetNS: path, IfName: s.IfName}
	if o.PolicyName != "" {
		s.rt.Args = [][2]string{{"IgnoreUnknown", "1"}, {"CLEANWALL_POLICY", o.PolicyName}}
	}
	var res types.Result
	err = e.InNode(func() error {
		var aerr error
		res, aerr = s.cni.AddNetworkList(context.Background(), list, s.rt)
		return aerr
	})
	if err != nil {
		_ = s.Del()
		_ = netns.Delete(nsName)
		return nil, err
	}
	if s.Result, err = current.NewResultFromResult(res); err != nil {
		e.T.Fatal(err)
	}
	for _, ip := range s.Result.IPs {
		a, _ := netip.AddrFromSlice(ip.Address.IP)
		if a.Unmap().Is4() {
			s.IP = a.Unmap()
		} else {
			s.IP6 = a
		}
	}
	for _, iface := range s.Result.Interfaces {
		if iface.Sandbox != "" {
			s.MAC, _ = net.ParseMAC(iface.Mac)
		}
	}
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
	return s.env.InNode(func() error {
		return s.cni.DelNetworkList(context.Background(), s.list, s.rt)
	})
}

// Check runs CNI CHECK.
func (s *Sandbox) Check() error {
	return s.env.InNode(func() error {
		return s.cni.CheckNetworkList(context.Background(), s.list, s.rt)
	})
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
func (s *Sandbox) HostVeth() string {
	for _, iface := range s.Result.Interfaces {
		if iface.Sandbox == "" && iface.Name != "" && iface.Name[:min(4, len(iface.Name))] == "veth" {
			return iface.Name
		}
	}
	return ""
}
