// Package cni is cleanwall's chained CNI plugin. Chained after ptp or
// bridge, it asks cleanwalld to attach and program the sandbox the previous
// plugins created, and passes their result through. ADD returns only once
// enforcement is in place; whatever fails, ADD fails and nothing of
// cleanwall stays behind. It never imports bpf: the daemon owns the kernel.
package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"

	"github.com/cleanwall/cleanwall/runtime/api"
)

// SupportedVersions are the CNI spec versions cleanwall-cni speaks: every
// version with chaining (prevResult), up to 1.1.0.
var SupportedVersions = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// PolicyArg is the CNI_ARGS key that selects a named policy per sandbox.
const PolicyArg = "CLEANWALL_POLICY"

// PodAnnotationsCapability is the CNI capability through which CRI runtimes
// (containerd 1.6 and later, CRI-O) hand the plugin a pod's annotations, in
// runtimeConfig. libcni passes them only to a plugin whose conf declares
// "capabilities": {"io.kubernetes.cri.pod-annotations": true}.
const PodAnnotationsCapability = "io.kubernetes.cri.pod-annotations"

// PolicyAnnotation is the pod annotation that names a policy for the pod's
// sandbox (resolved by the daemon like CLEANWALL_POLICY).
const PolicyAnnotation = "cleanwall.dev/policy"

// Conf is the plugin's network configuration.
type Conf struct {
	types.PluginConf
	// Policy is the path of the sandbox's policy file.
	Policy string `json:"policy,omitempty"`
	// Socket is cleanwalld's API socket (default /run/cleanwall/cleanwalld.sock).
	Socket string `json:"socket,omitempty"`
	// Timeout bounds the daemon call, e.g. "60s" (default 60s).
	Timeout string `json:"timeout,omitempty"`
	// RuntimeConfig holds what the runtime passes for the capabilities
	// the conf declares; only the pod annotations are read.
	RuntimeConfig struct {
		PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations,omitempty"`
	} `json:"runtimeConfig"`
}

// knownFields are the conf keys cleanwall-cni accepts: its own and those
// the CNI spec and runtimes put into every plugin's conf.
var knownFields = map[string]bool{
	"cniVersion": true, "cniVersions": true, "name": true, "type": true, "capabilities": true,
	"ipam": true, "dns": true, "prevResult": true, "runtimeConfig": true, "args": true,
	"cni.dev/valid-attachments": true, "cni.dev/attachments": true, "disableCheck": true, "disableGC": true,
	"policy": true, "socket": true, "timeout": true,
}

// parseConf decodes and validates the conf; errors name the field.
func parseConf(data []byte) (*Conf, error) {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("cleanwall-cni: malformed network configuration: %w", err)
	}
	var unknown []string
	for k := range raw {
		if !knownFields[k] {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return nil, fmt.Errorf("cleanwall-cni: unknown field(s) in network configuration: %s (known: policy, socket, timeout)", strings.Join(unknown, ", "))
	}
	conf := &Conf{}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, fmt.Errorf("cleanwall-cni: network configuration: %w", err)
	}
	if conf.Timeout != "" {
		if d, err := time.ParseDuration(conf.Timeout); err != nil || d <= 0 {
			return nil, fmt.Errorf("cleanwall-cni: field timeout: %q is not a positive duration", conf.Timeout)
		}
	}
	if conf.Socket != "" && !strings.HasPrefix(conf.Socket, "/") {
		return nil, fmt.Errorf("cleanwall-cni: field socket: %q is not an absolute path", conf.Socket)
	}
	return conf, nil
}

func (c *Conf) client() *api.Client { return api.NewClient(c.Socket) }

func (c *Conf) timeout() time.Duration {
	if d, err := time.ParseDuration(c.Timeout); err == nil && d > 0 {
		return d
	}
	return 60 * time.Second
}

// policyArg returns CLEANWALL_POLICY from CNI_ARGS ("K=V;K=V"), ignoring
// every other key (runtimes pass their own).
func policyArg(args string) string {
	for _, kv := range strings.Split(args, ";") {
		k, v, ok := strings.Cut(kv, "=")
		if ok && strings.TrimSpace(k) == PolicyArg {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// Add is CNI ADD.
func Add(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if conf.RawPrevResult == nil {
		return errors.New("cleanwall-cni: no prevResult: chain cleanwall-cni after ptp or bridge, it cannot run alone")
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return fmt.Errorf("cleanwall-cni: prevResult: %w", err)
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return fmt.Errorf("cleanwall-cni: prevResult: %w", err)
	}
	req, err := addRequest(args, conf, prev)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout())
	defer cancel()
	client := conf.client()
	if _, err := client.Add(ctx, req); err != nil {
		// The daemon rolls back what it did; if the call itself broke (a
		// timeout), make sure nothing stays: ask for a delete.
		if !errors.As(err, new(*api.Error)) {
			dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = client.Delete(dctx, args.ContainerID, args.IfName)
			dcancel()
		}
		return fmt.Errorf("cleanwall-cni: enforcement not installed, the sandbox must not start: %w", err)
	}
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

// addRequest builds the daemon request from the chain's previous result.
func addRequest(args *skel.CmdArgs, conf *Conf, prev *current.Result) (api.AddRequest, error) {
	req := api.AddRequest{ContainerID: args.ContainerID, IfName: args.IfName, Netns: args.Netns}
	contIdx := -1
	for i, iface := range prev.Interfaces {
		if iface.Sandbox != "" && iface.Name == args.IfName {
			contIdx = i
			req.MAC = iface.Mac
		}
	}
	if contIdx < 0 {
		return req, fmt.Errorf("cleanwall-cni: prevResult has no interface %q inside the sandbox", args.IfName)
	}
	for _, iface := range prev.Interfaces {
		if iface.Sandbox != "" {
			continue
		}
		l, err := netlink.LinkByName(iface.Name)
		if err != nil {
			return req, fmt.Errorf("cleanwall-cni: host interface %s from prevResult: %w", iface.Name, err)
		}
		switch l.Type() {
		case "bridge":
			req.Bridge = iface.Name
		case "veth":
			if req.HostInterface != "" {
				return req, fmt.Errorf("cleanwall-cni: prevResult names two host veths (%s, %s)", req.HostInterface, iface.Name)
			}
			req.HostInterface = iface.Name
		}
	}
	if req.HostInterface == "" {
		return req, errors.New("cleanwall-cni: prevResult names no host-side veth: chain after ptp or bridge")
	}
	for _, ip := range prev.IPs {
		if ip.Interface != nil && *ip.Interface != contIdx {
			continue
		}
		addr, ok := netip.AddrFromSlice(ip.Address.IP)
		if !ok {
			return req, fmt.Errorf("cleanwall-cni: prevResult address %v", ip.Address)
		}
		ones, _ := ip.Address.Mask.Size()
		cfg := api.IPConfig{Address: netip.PrefixFrom(addr.Unmap(), ones)}
		if gw, ok := netip.AddrFromSlice(ip.Gateway); ok && ip.Gateway != nil {
			cfg.Gateway = gw.Unmap()
		}
		req.IPs = append(req.IPs, cfg)
	}
	sel, err := selectPolicy(conf, args.Args)
	if err != nil {
		return req, err
	}
	req.PolicyName, req.PolicySource = sel.name, sel.source
	if sel.file != "" {
		data, err := os.ReadFile(sel.file)
		if err != nil {
			return req, fmt.Errorf("cleanwall-cni: field policy: %w", err)
		}
		req.Policy = data
	}
	return req, nil
}

// policySelection is where a sandbox's policy comes from: a named policy
// the daemon resolves, or a policy file.
type policySelection struct {
	name, file, source string
}

// selectPolicy picks the sandbox's policy, first match wins: CNI_ARGS
// CLEANWALL_POLICY (set by the runtime), the pod annotation
// cleanwall.dev/policy (passed by CRI runtimes when the conf declares the
// pod-annotations capability), the conf's policy file. An empty annotation
// is an error, never a fallback.
func selectPolicy(conf *Conf, cniArgs string) (policySelection, error) {
	name, annotated := conf.RuntimeConfig.PodAnnotations[PolicyAnnotation]
	name = strings.TrimSpace(name)
	if annotated && name == "" {
		return policySelection{}, fmt.Errorf("cleanwall-cni: runtimeConfig %s: annotation %s is empty: name a policy or remove the annotation", PodAnnotationsCapability, PolicyAnnotation)
	}
	switch arg := policyArg(cniArgs); {
	case arg != "":
		return policySelection{name: arg, source: "CNI_ARGS " + PolicyArg + "=" + arg}, nil
	case annotated:
		return policySelection{name: name, source: "pod annotation " + PolicyAnnotation + "=" + name}, nil
	case conf.Policy != "":
		return policySelection{file: conf.Policy, source: conf.Policy}, nil
	}
	return policySelection{}, errors.New("cleanwall-cni: no policy: set \"policy\" (a file) in the conf, CNI_ARGS " + PolicyArg + "=<name>, or the pod annotation " + PolicyAnnotation + " (conf capability " + PodAnnotationsCapability + ")")
}

// Del is CNI DEL: idempotent, and fine with a missing netns or prevResult.
// When the daemon is unreachable there is nothing it could keep open: the
// interface's pinned program keeps dropping, and a restarted daemon cleans
// up sandboxes whose interface is gone.
func Del(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout())
	defer cancel()
	err = conf.client().Delete(ctx, args.ContainerID, args.IfName)
	if errors.Is(err, api.ErrUnreachable) {
		fmt.Fprintf(os.Stderr, "cleanwall-cni: DEL %s/%s: %v (the daemon cleans up on restart)\n", args.ContainerID, args.IfName, err)
		return nil
	}
	if err != nil {
		return fmt.Errorf("cleanwall-cni: DEL: %w", err)
	}
	return nil
}

// Check is CNI CHECK: the attachment and the map entries must be in place.
func Check(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if conf.RawPrevResult == nil {
		return errors.New("cleanwall-cni: CHECK needs prevResult")
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout())
	defer cancel()
	if err := conf.client().Check(ctx, args.ContainerID, args.IfName); err != nil {
		return fmt.Errorf("cleanwall-cni: CHECK %s/%s: %w", args.ContainerID, args.IfName, err)
	}
	return nil
}

// Status is CNI STATUS: ready when the daemon answers ready.
func Status(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := conf.client().Status(ctx)
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "cleanwalld is not available", err.Error())
	}
	if !st.Ready {
		return types.NewError(types.ErrPluginNotAvailable, "cleanwalld is not ready", st.Reason)
	}
	return nil
}

// GC is CNI GC: remove every attachment not in cni.dev/valid-attachments.
func GC(args *skel.CmdArgs) error {
	conf, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	req := api.GCRequest{Valid: []api.AttachmentRef{}}
	for _, a := range conf.ValidAttachments {
		req.Valid = append(req.Valid, api.AttachmentRef{ContainerID: a.ContainerID, IfName: a.IfName})
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.timeout())
	defer cancel()
	if _, err := conf.client().GC(ctx, req); err != nil {
		return fmt.Errorf("cleanwall-cni: GC: %w", err)
	}
	return nil
}

// Funcs are the plugin's command handlers for skel.
var Funcs = skel.CNIFuncs{Add: Add, Del: Del, Check: Check, Status: Status, GC: GC}
