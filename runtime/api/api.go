// Package api is the contract between cleanwalld and its clients (the CNI
// plugin and the CLI): JSON over HTTP on a unix socket. It holds the wire
// types and the client; it must not import the daemon, bpf or proxies.
package api

import (
	"fmt"
	"net/netip"
	"time"
)

// DefaultSocket is where cleanwalld listens unless told otherwise.
const DefaultSocket = "/run/cleanwall/cleanwalld.sock"

// Routes served by the daemon.
const (
	PathStatus    = "/v1/status"
	PathSandboxes = "/v1/sandboxes" // GET list, POST add
	PathSandbox   = "/v1/sandboxes/{id}"
	PathCheck     = "/v1/sandboxes/{id}/check"
	PathPolicy    = "/v1/sandboxes/{id}/policy" // GET (read back from the kernel), PUT (apply)
	PathGC        = "/v1/gc"
)

// IPConfig is one address of the sandbox interface.
type IPConfig struct {
	Address netip.Prefix `json:"address"`
	Gateway netip.Addr   `json:"gateway,omitzero"`
}

// AddRequest asks the daemon to attach and program a sandbox. The daemon
// returns only once enforcement is in place, or fails leaving nothing.
type AddRequest struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
	Netns       string `json:"netns"`
	// HostInterface is the host-side veth (ptp) or bridge port of the sandbox.
	HostInterface string `json:"hostInterface"`
	// Bridge is the bridge device when the chain put the sandbox on a bridge.
	Bridge string `json:"bridge,omitempty"`
	// MAC of the sandbox's own interface.
	MAC string     `json:"mac"`
	IPs []IPConfig `json:"ips"`
	// Policy is the policy document (YAML), or empty when PolicyName selects
	// one from the daemon's policy directory.
	Policy       []byte `json:"policy,omitempty"`
	PolicyName   string `json:"policyName,omitempty"`
	PolicySource string `json:"policySource,omitempty"` // for messages: file path or CNI_ARGS
}

// AttachmentRef names one attachment (CNI's container ID + interface).
type AttachmentRef struct {
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
}

// Sandbox is what the daemon knows about one attached sandbox.
type Sandbox struct {
	ID            string     `json:"id"` // CNI container ID
	IfName        string     `json:"ifName"`
	Netns         string     `json:"netns"`
	HostInterface string     `json:"hostInterface"`
	HostIfindex   int        `json:"hostIfindex"`
	Bridge        string     `json:"bridge,omitempty"`
	DatapathID    uint32     `json:"datapathID"`
	MAC           string     `json:"mac"`
	IPs           []IPConfig `json:"ips"`
	PolicyName    string     `json:"policyName"`
	PolicyHash    string     `json:"policyHash"`
	Generation    uint64     `json:"generation"`
	AttachMode    string     `json:"attachMode"`
	Created       time.Time  `json:"created"`
	Rules         int        `json:"rules"` // datapath entries of the active generation
	Counters      []Counter  `json:"counters,omitempty"`
	// Volumes are the policy's spec.volumes as the daemon serves them.
	Volumes []Volume `json:"volumes,omitempty"`
}

// Volume is one of a sandbox's volumes (spec.volumes), as served.
type Volume struct {
	Name string `json:"name"`
	Kind string `json:"kind"` // files or block
	// Path is where the sandbox sees it (the policy's path).
	Path     string `json:"path"`
	ReadOnly bool   `json:"readOnly,omitempty"`
	// HostPath is where the node sees the decrypted volume while it is
	// mounted: the directory a container runtime binds (files), or the
	// loop device (block). Empty when the volume is not mounted.
	HostPath string `json:"hostPath,omitempty"`
	// Device is the block device's number (block, mounted).
	Device *DeviceNumber `json:"device,omitempty"`
	// Error is why the volume is not mounted (after a restart, its key
	// was not released again or its store did not open).
	Error string `json:"error,omitempty"`
}

// DeviceNumber is a block device's major and minor number.
type DeviceNumber struct {
	Major uint32 `json:"major"`
	Minor uint32 `json:"minor"`
}

// Counter is one datapath counter of a sandbox.
type Counter struct {
	Rule    string `json:"rule,omitempty"` // egress rule name, when a rule decided
	RuleID  uint32 `json:"ruleID,omitempty"`
	Verdict string `json:"verdict"`
	Reason  string `json:"reason"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
	Flows   uint64 `json:"flows"`
}

// ApplyRequest replaces a sandbox's policy.
type ApplyRequest struct {
	Policy       []byte `json:"policy"`
	PolicySource string `json:"policySource,omitempty"`
}

// ApplyResult reports an applied policy generation.
type ApplyResult struct {
	Sandbox     Sandbox  `json:"sandbox"`
	ClosedFlows int      `json:"closedFlows"` // established flows the new policy no longer allows
	Warnings    []string `json:"warnings,omitempty"`
}

// KernelRule is one rule entry read back from the kernel's maps.
type KernelRule struct {
	Prefix   netip.Prefix `json:"prefix"`
	Protocol string       `json:"protocol"`
	Port     uint16       `json:"port"`
	RuleID   uint32       `json:"ruleID"`
	Rule     string       `json:"rule"`
	Mode     string       `json:"mode"`
	Expires  *time.Time   `json:"expires,omitempty"`
}

// PolicyView is a sandbox's policy as the kernel holds it.
type PolicyView struct {
	Sandbox    string       `json:"sandbox"`
	PolicyName string       `json:"policyName"`
	Generation uint64       `json:"generation"`
	Slot       uint8        `json:"slot"` // the datapath generation bit
	Rules      []KernelRule `json:"rules"`
}

// GCRequest lists the attachments that are still valid; the daemon removes
// every other one (CNI GC, cni.dev/valid-attachments).
type GCRequest struct {
	Valid []AttachmentRef `json:"valid"`
}

// GCResult lists what was removed.
type GCResult struct {
	Removed []AttachmentRef `json:"removed"`
}

// Status reports daemon readiness.
type Status struct {
	Ready     bool      `json:"ready"`
	Version   string    `json:"version"`
	PinRoot   string    `json:"pinRoot"`
	Sandboxes int       `json:"sandboxes"`
	Started   time.Time `json:"started"`
	Ports     [4]uint16 `json:"ports"`
	Reason    string    `json:"reason,omitempty"`
}

// Error is the body of every non-2xx response.
type Error struct {
	Message string `json:"error"`
	// Field names the request field that was wrong, when one was.
	Field string `json:"field,omitempty"`
}

func (e *Error) Error() string {
	if e.Field != "" {
		return fmt.Sprintf("%s: %s", e.Field, e.Message)
	}
	return e.Message
}

// PathAttest reports the node's attestation and held keys.
const PathAttest = "/v1/attest"

// AttestStatus is what `cleanwall attest status` shows.
type AttestStatus struct {
	Configured  bool       `json:"configured"` // a key broker is configured
	Broker      string     `json:"broker,omitempty"`
	Evidence    string     `json:"evidence,omitempty"` // "snp", or labelled simulated
	Simulated   bool       `json:"simulated"`
	Measurement string     `json:"measurement,omitempty"` // hex
	LastRelease *time.Time `json:"lastRelease,omitempty"`
	LastError   string     `json:"lastError,omitempty"`
	Keys        []HeldKey  `json:"keys,omitempty"`
}

// HeldKey describes a released data key (never its bytes).
type HeldKey struct {
	ID      string `json:"id"`
	Version int    `json:"version"`
	// PolicySHA256 is the egress policy the key was released for
	// (docs/keybroker.md §5): a key is held once per policy that needs it.
	PolicySHA256 string    `json:"policySHA256,omitempty"`
	ReleasedAt   time.Time `json:"releasedAt"`
	NotAfter     time.Time `json:"notAfter"`
	LastError    string    `json:"lastError,omitempty"`
}

// PathEvents streams deny events as JSON lines (GET). The query filters
// them (EventFilter): sandbox=ID, verdict=, reason=, rule=, proto= (each a
// comma-separated list, any of which matches) and headers=1 to receive the
// sampled headers of dropped packets.
const PathEvents = "/v1/events"

// Verdicts of deny events.
const (
	VerdictDrop   = "drop"   // the datapath dropped a packet
	VerdictRefuse = "refuse" // a proxy refused a flow, a DNS query or a request
)

// Link types of DenyEvent.Header.
const (
	LinkEthernet = "ethernet" // the header starts at the Ethernet header
	LinkRaw      = "raw"      // the header starts at the IP header
)

// DenyHeaderLen is the most bytes of a dropped packet a deny event carries
// (the datapath's DENY_SAMPLE_LEN): the snapshot length of a capture.
const DenyHeaderLen = 128

// DenyEvent is one denial: a packet the datapath dropped, a DNS query or an
// HTTP request a proxy refused.
type DenyEvent struct {
	Time    time.Time `json:"time"`
	Sandbox string    `json:"sandbox"` // containerID/ifName, or "unknown"
	Source  string    `json:"source"`  // datapath, proxy, dns, http or an extension's name
	Verdict string    `json:"verdict"` // VerdictDrop (datapath) or VerdictRefuse (proxies)
	Reason  string    `json:"reason"`
	// Rule is the egress rule the denied flow matched, when one did (a
	// proxy's refusal within a rule; a datapath drop of an expired entry
	// or over the flow limit).
	Rule   string `json:"rule,omitempty"`
	Proto  string `json:"proto,omitempty"`
	Src    string `json:"src,omitempty"`
	Dst    string `json:"dst,omitempty"`
	Name   string `json:"name,omitempty"`   // DNS: the (truncated, escaped) name
	Method string `json:"method,omitempty"` // HTTP
	Path   string `json:"path,omitempty"`   // HTTP: without the query
	Status int    `json:"status,omitempty"` // HTTP
	// Length is a dropped packet's length; Header its first bytes (at
	// most DenyHeaderLen), starting at the layer Link names. Sent only to
	// observers that ask for headers.
	Length int    `json:"length,omitempty"`
	Header []byte `json:"header,omitempty"`
	Link   string `json:"link,omitempty"`
}
