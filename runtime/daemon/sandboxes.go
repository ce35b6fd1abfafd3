package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	dnsproxy "github.com/cleanwall/cleanwall/proxies/dns"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/enforce"
	"github.com/cleanwall/cleanwall/runtime/limits"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// The API's sandbox operations: each resolves what it was given (the
// policy document, compiled, configured by the proxy registry, its keys
// released) before it takes the registry's lock, then hands the kernel
// work to the enforcer and the flows to the dispatcher.

var containerIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$`)

// validateAdd checks every field before anything is touched.
func validateAdd(req *api.AddRequest) error {
	bad := enforce.BadRequest
	if !containerIDPattern.MatchString(req.ContainerID) {
		return bad("containerID", "%q is not a container ID (letters, digits, _ . -; up to 255)", req.ContainerID)
	}
	if req.IfName == "" || len(req.IfName) > 15 || strings.ContainsAny(req.IfName, "/ \x00") {
		return bad("ifName", "%q is not an interface name", req.IfName)
	}
	if req.Netns == "" {
		return bad("netns", "required")
	}
	if req.HostInterface == "" {
		return bad("hostInterface", "required: the chain's previous result names no host-side interface")
	}
	if mac, err := net.ParseMAC(req.MAC); err != nil || len(mac) != 6 {
		return bad("mac", "%q is not an Ethernet MAC address", req.MAC)
	}
	if len(req.IPs) == 0 {
		return bad("ips", "the sandbox has no IP address")
	}
	var v4, v6 int
	for i, ip := range req.IPs {
		f := fmt.Sprintf("ips[%d]", i)
		if !ip.Address.IsValid() {
			return bad(f+".address", "missing or invalid")
		}
		a := ip.Address.Addr()
		if a.Is4In6() || a.Zone() != "" || a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() {
			return bad(f+".address", "%v cannot be a sandbox address", a)
		}
		if !ip.Gateway.IsValid() {
			return bad(f+".gateway", "missing: the sandbox needs a gateway")
		}
		if ip.Gateway.Is4() != a.Is4() {
			return bad(f+".gateway", "%v is not of the address's family", ip.Gateway)
		}
		if a.Is4() {
			v4++
		} else {
			v6++
		}
	}
	if v4 > 1 || v6 > 1 {
		return bad("ips", "at most one IPv4 and one IPv6 address per sandbox interface")
	}
	if len(req.Policy) == 0 && req.PolicyName == "" {
		return bad("policy", "no policy: set the CNI conf's policy or CNI_ARGS CLEANWALL_POLICY")
	}
	if len(req.Policy) > 0 && req.PolicyName != "" {
		return bad("policyName", "give a policy document or a policy name, not both")
	}
	if req.PolicyName != "" && !policyNamePattern.MatchString(req.PolicyName) {
		return bad("policyName", "%q is not a policy name (a DNS label)", req.PolicyName)
	}
	return nil
}

var policyNamePattern = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// policyOf returns the policy document of a request: its own bytes, or
// the named file in the policy directory.
func (d *Daemon) policyOf(req *api.AddRequest) ([]byte, string, error) {
	if req.PolicyName == "" {
		src := req.PolicySource
		if src == "" {
			src = "request"
		}
		return req.Policy, src, nil
	}
	for _, ext := range []string{".yaml", ".yml"} {
		path := filepath.Join(d.cfg.PolicyDir, req.PolicyName+ext)
		data, err := os.ReadFile(path)
		if err == nil {
			return data, path, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, "", enforce.BadRequest("policyName", "reading %s: %v", path, err)
		}
	}
	return nil, "", enforce.BadRequest("policyName", "unknown policy %q: no %s/%s.yaml", req.PolicyName, d.cfg.PolicyDir, req.PolicyName)
}

// resolve compiles a policy document and has the proxy registry configure
// its rules: a rule no registered proxy serves (or whose proxy refuses its
// configuration) fails here, naming the rule, never at flow time.
func (d *Daemon) resolve(doc []byte, source string) (enforce.Change, error) {
	p, err := policy.Parse(doc)
	if err != nil {
		return enforce.Change{}, &api.Error{Field: "policy", Message: fmt.Sprintf("%s: invalid policy:\n%v", source, err)}
	}
	c, err := policy.Compile(p)
	if err != nil {
		return enforce.Change{}, &api.Error{Field: "policy", Message: fmt.Sprintf("%s: %v", source, err)}
	}
	configs, err := d.proxies.Configure(c)
	if err != nil {
		return enforce.Change{}, &api.Error{Field: "policy", Message: fmt.Sprintf("%s: %v", source, err)}
	}
	return enforce.Change{Policy: doc, Source: source, Compiled: c, Configs: configs, Limits: limits.Effective(d.cfg.Limits, c)}, nil
}

// Add attaches and programs a sandbox. It returns only once enforcement is
// in place; on any error nothing of the sandbox remains. A sandbox whose
// secure rules have no released key never starts.
func (d *Daemon) Add(ctx context.Context, req api.AddRequest) (api.Sandbox, error) {
	start := time.Now()
	if err := validateAdd(&req); err != nil {
		return api.Sandbox{}, err
	}
	doc, source, err := d.policyOf(&req)
	if err != nil {
		return api.Sandbox{}, err
	}
	ch, err := d.resolve(doc, source)
	if err != nil {
		return api.Sandbox{}, err
	}
	resolved := time.Now()
	d.metrics.ObservePhase("add", "resolve", resolved.Sub(start))
	if err := d.keys.Ensure(ctx, ch.Compiled); err != nil {
		return api.Sandbox{}, err
	}
	d.metrics.ObservePhase("add", "keys", time.Since(resolved))
	defer d.consent.settle() // a failed ADD's answers are forgotten
	if err := d.consent.admit(ctx, req.ContainerID, doc, ch.Compiled); err != nil {
		return api.Sandbox{}, err
	}
	d.sandboxes.Lock()
	defer d.sandboxes.Unlock()
	vols, err := d.mountVolumes(ctx, &req, ch.Compiled)
	if err != nil {
		return api.Sandbox{}, err
	}
	s, err := d.enforcer.Admit(enforce.Admission{Req: req, Policy: doc, Source: source, Compiled: ch.Compiled, Configs: ch.Configs, Limits: ch.Limits})
	if err != nil {
		_ = d.closeVolumes(vols, "admission failed")
		return api.Sandbox{}, err
	}
	d.admitted(vols)
	d.registered(s)
	d.metrics.ObservePhase("add", "total", time.Since(start))
	return d.view(s, false), nil
}

// registered tells the DNS proxy a sandbox's spec.dns (again, after a
// flip) and counts the sandboxes. Call with the registry locked.
func (d *Daemon) registered(s *sandbox.Sandbox) {
	s.Lock()
	c := s.Compiled
	s.Unlock()
	d.dns.SetSandbox(s.Name, dnsproxy.ConfigFromPolicy(c))
	d.metrics.Sandboxes.Set(float64(d.sandboxes.Len()))
}

// unregistered forgets a sandbox that was torn down. Call with the
// registry locked.
func (d *Daemon) unregistered(name, policyName string) {
	d.dns.SetSandbox(name, nil)
	d.metrics.Sandboxes.Set(float64(d.sandboxes.Len()))
	d.audit.record(auditSandboxDelete, map[string]any{"sandbox": name, "policy": policyName})
}

// notFound is an API 404.
type notFound struct{ msg string }

func (e *notFound) Error() string { return e.msg }

// Apply replaces the policy of a container's sandbox(es): the new rules
// are written into the inactive generation, one atomic update flips to it,
// then the old generation is removed (enforce.Flip). Established flows
// the new policy does not allow under the same rule are closed.
func (d *Daemon) Apply(id, ifName string, doc []byte, source string) (int, *policy.Compiled, error) {
	if source == "" {
		source = "request"
	}
	ch, err := d.resolve(doc, source)
	if err != nil {
		return 0, nil, err
	}
	if err := d.keys.Ensure(d.ctx, ch.Compiled); err != nil {
		return 0, nil, err
	}
	defer d.consent.settle() // the old policy's answers are forgotten
	if err := d.consent.admit(d.ctx, id, doc, ch.Compiled); err != nil {
		return 0, nil, err
	}
	d.sandboxes.Lock()
	defer d.sandboxes.Unlock()
	list := d.sandboxes.Find(id, ifName)
	if len(list) == 0 {
		return 0, nil, &notFound{fmt.Sprintf("no sandbox %s", sandbox.AttachmentKey(id, ifName))}
	}
	if err := volumesUnchanged(list, ch.Compiled); err != nil {
		return 0, nil, err
	}
	closed := 0
	for _, s := range list {
		if err := d.enforcer.Flip(s, ch); err != nil {
			return closed, nil, fmt.Errorf("%s: %w", s.Name, err)
		}
		d.registered(s)
		n := d.dispatch.Revoke(s)
		closed += n
		d.log.Info("flows closed by the new policy", "sandbox", s.Name, "closed_flows", n)
	}
	return closed, ch.Compiled, nil
}

// Delete detaches a container's sandbox(es). Unknown sandboxes are not an
// error: DEL is idempotent.
func (d *Daemon) Delete(id, ifName string) error {
	defer d.consent.settle()
	start := time.Now()
	defer func() { d.metrics.ObservePhase("del", "total", time.Since(start)) }()
	d.sandboxes.Lock()
	defer d.sandboxes.Unlock()
	var errs []error
	for _, s := range d.sandboxes.Find(id, ifName) {
		errs = append(errs, d.enforcer.Teardown(s))
		errs = append(errs, d.unmountVolumes(s.Name, "deleted"))
		d.unregistered(s.Name, s.Record().PolicyName)
	}
	return errors.Join(errs...)
}

// Check verifies a container's sandbox(es) against the kernel (enforce.Check).
func (d *Daemon) Check(id, ifName string) error {
	d.sandboxes.Lock()
	defer d.sandboxes.Unlock()
	list := d.sandboxes.Find(id, ifName)
	if len(list) == 0 {
		return &api.Error{Field: "containerID", Message: fmt.Sprintf("no sandbox %s/%s", id, ifName)}
	}
	for _, s := range list {
		if err := d.enforcer.Check(s); err != nil {
			return fmt.Errorf("%s: %w", s.Name, err)
		}
	}
	return nil
}

// GC removes every attachment not in valid (CNI GC).
func (d *Daemon) GC(valid []api.AttachmentRef) []api.AttachmentRef {
	defer d.consent.settle()
	d.sandboxes.Lock()
	defer d.sandboxes.Unlock()
	removed := d.enforcer.GC(valid)
	for _, r := range removed {
		_ = d.unmountVolumes(sandbox.AttachmentKey(r.ContainerID, r.IfName), "gc")
		d.unregistered(sandbox.AttachmentKey(r.ContainerID, r.IfName), "")
	}
	return removed
}

// reconcile re-adopts the persisted sandboxes after a restart
// (enforce.Reconcile), each under its stored policy resolved as an ADD's.
func (d *Daemon) reconcile() error {
	d.sandboxes.Lock()
	defer d.sandboxes.Unlock()
	err := d.enforcer.Reconcile(func(rec *sandbox.Record) (enforce.Change, error) {
		return d.resolve(rec.Policy, rec.PolicySource)
	})
	for _, s := range d.sandboxes.All() {
		d.registered(s)
	}
	d.remountVolumes()
	return err
}

// learn writes addresses the DNS proxy learnt for a name into the
// sandbox's active generation (fqdn.Learner).
func (d *Daemon) learn(attachment, name string, addrs []netip.Addr, ttl time.Duration) {
	if s := d.sandboxes.Lookup(attachment); s != nil {
		d.learner.Learn(s, name, addrs, ttl)
	}
}
