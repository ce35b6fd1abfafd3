// Package daemon is cleanwalld, assembled: it loads the datapath, opens
// the proxy sockets, builds the privacy-proxy registry (built-in proxies
// and configured extensions), serves the unix-socket API and runs the
// background loops (watchdog, sweeps, deny events). The work itself lives
// in the packages it wires together:
//
//   - runtime/sandbox: the registry of sandboxes and their persisted state
//   - runtime/enforce: admission with rollback, generation flips, teardown,
//     check, reconcile after restart, GC, the watchdog's repairs
//   - runtime/dispatch: which proxy serves a redirected flow, under which
//     rule, within which limits
//   - runtime/fqdn: addresses learnt through the DNS proxy
//   - runtime/keys: data keys released by the key broker
//   - runtime/limits, runtime/metrics, runtime/kernel (netlink, nftables)
//   - proxies/...: the privacy proxies, behind proxies.StreamProxy and
//     proxies.PacketProxy
//
// It is also embedded by `cleanwall run`.
//
// Fail closed: a sandbox is registered only once its rules, its datapath
// entry and its attachment are all in place; any failure on the way rolls
// back what was done. Pinned links keep enforcing when the daemon dies, and
// with no proxy socket to assign to, the datapath drops every new flow.
package daemon

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/cleanwall/cleanwall/proxies/extension"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/kernel"
	"github.com/cleanwall/cleanwall/runtime/keys"
	"github.com/cleanwall/cleanwall/runtime/limits"
)

// Defaults of cleanwalld.
const (
	DefaultPinRoot   = "/sys/fs/bpf/cleanwall"
	DefaultStateDir  = "/var/lib/cleanwall"
	DefaultPolicyDir = "/etc/cleanwall/policies"
	// DefaultRedirectMark is the skb mark of redirected packets; the low 8
	// bits carry the listener kind and are masked out by the fwmark rule.
	DefaultRedirectMark = 0x0c1e0000
	// DefaultSocketMark is SO_MARK on proxy sockets. It must not match the
	// redirect rule, or the proxy's own replies would be routed locally.
	DefaultSocketMark = 0x0c1f0000
	DefaultTable      = 3102
	// DefaultDenyEventsPerSecond is each sandbox's budget of deny events.
	DefaultDenyEventsPerSecond = 100
	DefaultPriority            = 100
	// RedirectMask is the part of the mark the fwmark rule matches.
	RedirectMask = kernel.RedirectMask
	// DefaultWatchdogInterval is how often the watchdog verifies and
	// repairs attachments, pins and the nftables wall: what is removed
	// under a running daemon is back within about one interval.
	DefaultWatchdogInterval = time.Second
)

// Limits bound each sandbox's flows (runtime/limits).
type Limits = limits.Limits

// DefaultLimits are the daemon's limits when its flags set none.
var DefaultLimits = limits.Default

// KeyBrokerConfig connects the daemon to a key broker (docs/keybroker.md).
type KeyBrokerConfig = keys.BrokerConfig

// Config configures a daemon. Zero values take the defaults above.
type Config struct {
	Socket    string
	PinRoot   string
	StateDir  string
	PolicyDir string

	RedirectMark uint32
	SocketMark   uint32
	Table        int
	RulePriority int

	// Ports of the proxy listeners (0: let the kernel pick). The datapath
	// learns them from its config map on every start.
	TCPPort, UDPPort, DNSPort uint16
	// FQDNMinTTL and FQDNMaxTTL clamp how long an address learnt through
	// the DNS proxy stays in the datapath (0: the DNS proxy's defaults,
	// 30s and 1h).
	FQDNMinTTL, FQDNMaxTTL time.Duration
	// DNSRefuseNXDomain answers refused names with NXDOMAIN, not REFUSED.
	DNSRefuseNXDomain bool
	// DNSQueriesPerSecond is each sandbox's DNS query rate (token bucket,
	// burst twice the rate); 0: the DNS proxy's default (100); negative:
	// unlimited.
	DNSQueriesPerSecond float64
	// ListenersPerFamily sizes the SO_REUSEPORT group (0: one per CPU).
	ListenersPerFamily int

	// AttachMode is "auto" (tcx, else legacy tc), "tcx" or "tc".
	AttachMode string

	MaxSandboxes, MaxRules, MaxCounters uint32

	// IdleTimeout closes proxied TCP flows idle in both directions.
	IdleTimeout time.Duration
	// UDPIdleTimeout ends a proxied UDP flow (and its reply socket).
	UDPIdleTimeout time.Duration

	// Limits bound each sandbox's flows (zero fields: DefaultLimits;
	// negative: unlimited). A policy's spec.limits can lower them.
	Limits Limits

	// DenyEventsPerSecond bounds the deny events each sandbox's drops
	// report (burst twice that; 0: DefaultDenyEventsPerSecond; negative:
	// every drop). Drops are always counted.
	DenyEventsPerSecond float64

	// WatchdogInterval is how often attachments, pins and the nftables
	// wall are verified and repaired (default DefaultWatchdogInterval).
	WatchdogInterval time.Duration

	// AuditLog is the hash-chained audit log (default <StateDir>/audit.jsonl;
	// "-" disables it).
	AuditLog string
	// NodeKey is the Ed25519 key that signs audit checkpoints and is bound
	// into key releases (default <StateDir>/node.key, created at the first
	// start).
	NodeKey string
	// AuditCheckpointInterval is how often a signed checkpoint is written
	// (0: DefaultAuditCheckpointInterval; negative: only at rotation and
	// stop). AuditMaxSize rotates the log past that many bytes (0:
	// DefaultAuditMaxSize; negative: never); AuditKeep is how many rotated
	// files are kept (0: all).
	AuditCheckpointInterval time.Duration
	AuditMaxSize            int64
	AuditKeep               int
	// AuditSink forwards the audit records to an HTTPS sink (docs/audit.md);
	// AuditSinkCA is a PEM file of the CAs its certificate chains to
	// (empty: the system roots).
	AuditSink, AuditSinkCA string

	// KeyBroker, when set, releases the data keys of secure-mode rules.
	KeyBroker *KeyBrokerConfig

	// ConsentURL is the consent service (https; docs/consent.md), ConsentCA
	// a PEM file of the CAs its certificate chains to (default: the system
	// roots), ConsentTimeout the bound of each request (default 2s).
	// Without ConsentURL a policy requiring consent is refused.
	ConsentURL, ConsentCA string
	ConsentTimeout        time.Duration

	// VolumeDir is where the sandboxes' volumes are mounted (default
	// DefaultVolumeDir): <VolumeDir>/<containerID>@<ifName>/<name>.
	VolumeDir string

	// Extensions are out-of-process privacy proxies, NAME=unix:/path each
	// (docs/extensions.md): open rules with open.protocol NAME go to the
	// extension listening on that socket.
	Extensions []string

	Logger  *slog.Logger
	Version string
}

func (c *Config) setDefaults() error {
	if c.Socket == "" {
		c.Socket = api.DefaultSocket
	}
	if c.PinRoot == "" {
		c.PinRoot = DefaultPinRoot
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.PolicyDir == "" {
		c.PolicyDir = DefaultPolicyDir
	}
	if c.RedirectMark == 0 {
		c.RedirectMark = DefaultRedirectMark
	}
	if c.SocketMark == 0 {
		c.SocketMark = DefaultSocketMark
	}
	if c.Table == 0 {
		c.Table = DefaultTable
	}
	if c.RulePriority == 0 {
		c.RulePriority = DefaultPriority
	}
	if c.ListenersPerFamily == 0 {
		c.ListenersPerFamily = runtime.NumCPU()
	}
	if c.AttachMode == "" {
		c.AttachMode = "auto"
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 5 * time.Minute
	}
	if c.UDPIdleTimeout == 0 {
		c.UDPIdleTimeout = 60 * time.Second
	}
	c.Limits.SetDefaults()
	if c.DenyEventsPerSecond == 0 {
		c.DenyEventsPerSecond = DefaultDenyEventsPerSecond
	}
	if c.WatchdogInterval <= 0 {
		c.WatchdogInterval = DefaultWatchdogInterval
	}
	if c.VolumeDir == "" {
		c.VolumeDir = DefaultVolumeDir
	}
	if c.AuditLog == "" {
		c.AuditLog = filepath.Join(c.StateDir, "audit.jsonl")
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Version == "" {
		c.Version = "dev"
	}
	if c.RedirectMark&^RedirectMask != 0 {
		return fmt.Errorf("redirect mark %#x: the low 8 bits must be clear", c.RedirectMark)
	}
	if c.SocketMark&RedirectMask == c.RedirectMark {
		return fmt.Errorf("socket mark %#x matches the redirect rule (mark %#x/%#x): proxy replies would loop", c.SocketMark, c.RedirectMark, uint32(RedirectMask))
	}
	switch c.AttachMode {
	case "auto", "tcx", "tc":
	default:
		return fmt.Errorf("attach mode %q: want auto, tcx or tc", c.AttachMode)
	}
	seen := map[string]bool{}
	for _, spec := range c.Extensions {
		name, _, err := extension.ParseSpec(spec)
		if err != nil {
			return fmt.Errorf("--extension: %w", err)
		}
		if seen[name] {
			return fmt.Errorf("--extension: %s given twice", name)
		}
		seen[name] = true
	}
	if !filepath.IsAbs(c.PinRoot) || !filepath.IsAbs(c.StateDir) || !filepath.IsAbs(c.VolumeDir) {
		return errors.New("pin root, state dir and volume dir must be absolute paths")
	}
	return os.MkdirAll(c.StateDir, 0o700)
}
