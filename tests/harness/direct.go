package harness

import (
	"context"
	"fmt"
	"time"

	"github.com/cleanwall/cleanwall/internal/netns"
	"github.com/cleanwall/cleanwall/runtime/cnichain"
)

// AddDirectSandbox attaches a sandbox through the same chain as AddSandbox
// but without cleanwall-cni (cnichain.Options.Cleanwall false): the node
// simply forwards its traffic (ip_forward is on, the remote routes
// 10.0.0.0/8 back). It exists for benchmarks that need an unenforced
// baseline beside enforced sandboxes in the same topology and address
// range; a test must never use it to show that something is enforced.
func (e *Env) AddDirectSandbox(name string, o SandboxOptions) (*Sandbox, error) {
	e.T.Helper()
	nsName := fmt.Sprintf("%s-%s", e.Name, name)
	path, err := netns.Create(nsName)
	if err != nil {
		return nil, err
	}
	e.onCleanup(func() { _ = netns.Delete(nsName) })
	if err := netns.Do(path, func() error {
		return sysctls(map[string]string{"net/ipv6/conf/default/accept_dad": "0", "net/ipv6/conf/all/accept_dad": "0"})
	}); err != nil {
		return nil, err
	}
	opts := e.ChainOptions(o, "")
	opts.Cleanwall = false
	s := &Sandbox{
		env: e, Name: name, ContainerID: fmt.Sprintf("%s-%s-%d", e.Name, name, time.Now().UnixNano()%100000),
		NS: path, IfName: "eth0",
	}
	err = e.InNode(func() error {
		var aerr error
		s.att, aerr = cnichain.Add(context.Background(), opts, s.ContainerID, path, s.IfName, nil)
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
