package trusted

import (
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// ruleConfig is what Configure keeps of a trusted rule (Flow.Config).
type ruleConfig struct {
	rule     string
	protocol string // "tcp" (tls only) or "http" (hpke, and tls or not)
	port     uint16 // trusted.upstreamPort; 0: the flow's own port
	tls      *tlsRule
	hpke     *hpkeRule // nil for the TCP proxy
}

// tlsRule is a rule's trusted.tls: its pins, and its files watched so
// that a rotated CA or client certificate is used by the next flow.
type tlsRule struct {
	serverName string // "": the flow's first host name
	minVersion uint16 // tls.VersionTLS13, or tls.VersionTLS12 when minVersion says 1.2
	pins       [][sha256.Size]byte
	ca         *watchedCA   // nil: no caFile (pins alone)
	client     *watchedPair // nil: no client certificate
}

// configure checks that r is a trusted rule this proxy serves and loads
// what its flows need. Field paths in errors are relative to the rule, as
// proxies.Registry.Configure prefixes the rule's own path.
func configure(r *policy.Rule, protocol string, reload time.Duration) (*ruleConfig, error) {
	if r.Mode != policy.ModeTrusted {
		return nil, fmt.Errorf("mode: %s, this proxy serves mode trusted", r.Mode)
	}
	t := r.Spec.Trusted
	if t == nil {
		return nil, errors.New("trusted: required with mode trusted")
	}
	switch {
	case protocol == "tcp" && t.HPKE != nil:
		return nil, errors.New("trusted.hpke: a rule with hpke is served by the trusted HTTP proxy")
	case protocol == "tcp" && t.TLS == nil:
		return nil, errors.New("trusted.tls: required (the trusted TCP proxy originates TLS)")
	case protocol == "http" && t.HPKE == nil:
		return nil, errors.New("trusted.hpke: required (the trusted HTTP proxy seals request bodies)")
	}
	cfg := &ruleConfig{rule: r.Name, protocol: protocol}
	if t.UpstreamPort != nil {
		if p := *t.UpstreamPort; p < 1 || p > 65535 {
			return nil, fmt.Errorf("trusted.upstreamPort: %d is not a port (1-65535)", p)
		}
		cfg.port = uint16(*t.UpstreamPort)
	}
	if t.TLS != nil {
		tr, err := loadTLS(t.TLS, reload)
		if err != nil {
			return nil, fmt.Errorf("trusted.tls.%w", err)
		}
		cfg.tls = tr
	}
	if t.HPKE != nil {
		h, err := loadHPKE(t.HPKE, r.Name, reload)
		if err != nil {
			return nil, fmt.Errorf("trusted.hpke.%w", err)
		}
		cfg.hpke = h
	}
	return cfg, nil
}

// loadTLS reads trusted.tls: a rule that could never verify its remote
// (neither pin nor CA, a malformed pin, a file that cannot be used) is
// refused here, naming the field, rather than failing every flow.
func loadTLS(t *policy.TLSSpec, reload time.Duration) (*tlsRule, error) {
	if t.CAFile == "" && len(t.SPKISHA256) == 0 {
		// policy refuses this too; a proxy never trusts by default.
		return nil, errors.New("caFile: trusted.tls needs caFile and/or spkiSHA256 (there is no accepting any certificate)")
	}
	pins, err := t.Pins()
	if err != nil {
		return nil, err // "spkiSHA256[i]: ..."
	}
	tr := &tlsRule{serverName: t.ServerName, pins: pins, minVersion: tls.VersionTLS13}
	if t.MinVersion == "1.2" {
		tr.minVersion = tls.VersionTLS12
	}
	if t.CAFile != "" {
		if tr.ca, err = newWatchedCA(t.CAFile, reload); err != nil {
			return nil, err
		}
	}
	switch {
	case t.ClientCertFile != "" && t.ClientKeyFile != "":
		if tr.client, err = newWatchedPair(t.ClientCertFile, t.ClientKeyFile, reload); err != nil {
			return nil, err
		}
	case t.ClientCertFile != "":
		return nil, errors.New("clientKeyFile: required with clientCertFile (mTLS needs both)")
	case t.ClientKeyFile != "":
		return nil, errors.New("clientCertFile: required with clientKeyFile (mTLS needs both)")
	}
	return tr, nil
}

// flowConfig is the rule's configuration of a flow, checked.
func flowConfig(f *proxies.Flow, protocol string) (*ruleConfig, error) {
	cfg, ok := f.Config.(*ruleConfig)
	if !ok || cfg == nil || cfg.protocol != protocol {
		return nil, fmt.Errorf("trusted %s proxy: rule %q was not configured by this proxy", protocol, f.RuleName())
	}
	return cfg, nil
}

// upstream is where a flow goes: the original destination's address at
// trusted.upstreamPort, or at the port the sandbox used.
func (c *ruleConfig) upstream(dst netip.AddrPort) netip.AddrPort {
	if c.port == 0 {
		return dst
	}
	return netip.AddrPortFrom(dst.Addr(), c.port)
}

// serverName is the name the remote is verified as (and its SNI):
// trusted.tls.serverName, which policy requires; else the first name the
// flow's destination was resolved from; else its address.
func (t *tlsRule) serverNameFor(f *proxies.Flow) string {
	switch {
	case t.serverName != "":
		return t.serverName
	case len(f.Hosts) > 0 && f.Hosts[0] != "":
		return f.Hosts[0]
	}
	return f.Dst.Addr().Unmap().String()
}
