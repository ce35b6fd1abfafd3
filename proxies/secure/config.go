package secure

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/proxies/seal"
)

// Denial reasons of secure mode (proxies.Denial.Reason). The HTTP proxy's
// refusals of a request add their own (http.go).
const (
	// ReasonNoKey: the flow's KeySource holds no current version of the
	// rule's key. The sandbox's connection is reset before anything is
	// dialed.
	ReasonNoKey = "no-key"
	// ReasonSealOpenFailed: what came back from the remote did not open
	// (not sealed, another context or key, tampered, cut short, extended).
	// Both connections are reset; no byte of the failed segment reached
	// the sandbox.
	ReasonSealOpenFailed = "seal-open-failed"
	// ReasonSealFailed: sealing the outbound direction failed for a reason
	// other than the network (the format's segment limit).
	ReasonSealFailed = "seal-failed"
	// ReasonUpstreamTLS: the remote's certificate failed upstreamTLS's
	// verification (CA, pin or name).
	ReasonUpstreamTLS = "upstream-tls"
)

// Defaults of a zero Options.
const (
	DefaultDialTimeout = 10 * time.Second
	DefaultIdleTimeout = 5 * time.Minute
)

// DialFunc connects to a flow's original destination (network "tcp",
// address Flow.Dst). The daemon supplies one whose traffic the datapath
// does not redirect again.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// ruleConfig is what Configure keeps of a secure rule (Flow.Config).
type ruleConfig struct {
	rule     string
	protocol string // "tcp" or "http"
	keyID    string
	// out is the context of what this rule seals; in the context the TCP
	// proxy opens the remote's direction with. The HTTP proxy opens bodies
	// carrying either (bodies.go says why).
	out, in string
	tls     *upstreamTLS // nil: plain TCP to the remote
}

// Contexts returns the seal contexts of a secure rule named rule: out for
// what the proxies seal (a TCP flow's sandbox-to-remote stream, an HTTP
// request body), in for the remote-to-sandbox stream of a TCP flow (and an
// HTTP body the key holder sealed for the Clean Room). docs/sealing.md,
// "Secure mode proxies", lists them for the key holder's tools.
func Contexts(rule string) (out, in string) {
	return "rule=" + rule + " dir=out", "rule=" + rule + " dir=in"
}

// configure checks that r is a secure rule of protocol and precomputes
// what its flows need. Field paths in errors are relative to the rule, as
// proxies.Registry.Configure prefixes the rule's own path.
func configure(r *policy.Rule, protocol string) (*ruleConfig, error) {
	if r.Mode != policy.ModeSecure {
		return nil, fmt.Errorf("mode: %s, this proxy serves mode secure", r.Mode)
	}
	s := r.Spec.Secure
	if s == nil {
		return nil, errors.New("secure: required with mode secure")
	}
	if s.Protocol != protocol {
		return nil, fmt.Errorf("secure.protocol: %q, this proxy serves %q", s.Protocol, protocol)
	}
	if s.KeyID == "" {
		return nil, errors.New("secure.keyID: required (the key the key broker releases after attestation)")
	}
	cfg := &ruleConfig{rule: r.Name, protocol: protocol, keyID: s.KeyID}
	cfg.out, cfg.in = Contexts(r.Name)
	// A context the sealer refuses would fail every flow: refuse the rule.
	if _, err := (&seal.SealConfig{Key: make([]byte, seal.KeySize), KeyID: s.KeyID, Context: cfg.out}).Layout(); err != nil {
		return nil, fmt.Errorf("secure.keyID: %w", err)
	}
	if s.UpstreamTLS != nil {
		t, err := loadUpstreamTLS(s.UpstreamTLS, "secure.upstreamTLS")
		if err != nil {
			return nil, err
		}
		cfg.tls = t
	}
	return cfg, nil
}

// flowConfig is the rule's configuration of a flow, checked.
func flowConfig(f *proxies.Flow, protocol string) (*ruleConfig, error) {
	cfg, ok := f.Config.(*ruleConfig)
	if !ok || cfg == nil || cfg.protocol != protocol {
		return nil, fmt.Errorf("secure %s proxy: rule %q was not configured by this proxy", protocol, f.RuleName())
	}
	return cfg, nil
}

// currentKey is the key to seal with: the newest version of the rule's
// key. Any error of the key source means no key.
func currentKey(f *proxies.Flow, keyID string) (proxies.DataKey, error) {
	if f.Keys == nil {
		return proxies.DataKey{}, fmt.Errorf("key %q: %w (the flow has no key source)", keyID, proxies.ErrNoKey)
	}
	k, err := f.Keys.Current(keyID)
	if err != nil {
		return k, fmt.Errorf("key %q: %w", keyID, err)
	}
	if len(k.Key) != seal.KeySize {
		return k, fmt.Errorf("key %q version %d: %d bytes, want %d", keyID, k.Version, len(k.Key), seal.KeySize)
	}
	return k, nil
}

// sealConfig is the seal configuration of one object under key k.
func (c *ruleConfig) sealConfig(k proxies.DataKey, segment int, interactive bool) seal.SealConfig {
	return seal.SealConfig{Key: k.Key, KeyID: c.keyID, KeyVersion: k.Version, Context: c.out, SegmentSize: segment, Interactive: interactive}
}

// keyFunc is the opener's key source: any held version of the rule's key
// (rotated versions open what older ones sealed), and only the rule's key.
func (c *ruleConfig) keyFunc(f *proxies.Flow) seal.KeyFunc {
	return func(id string, v int) ([]byte, error) {
		if id != c.keyID {
			return nil, fmt.Errorf("key %q is not the rule's key %q", id, c.keyID)
		}
		if f.Keys == nil {
			return nil, proxies.ErrNoKey
		}
		k, err := f.Keys.Version(id, v)
		if err != nil {
			return nil, err
		}
		return k.Key, nil
	}
}

// acceptKeyID refuses, before the key source is asked, an object sealed
// under another key id than the rule's.
func (c *ruleConfig) acceptKeyID(h seal.Header) error {
	if h.KeyID != c.keyID {
		return fmt.Errorf("sealed under key %q, the rule's key is %q", h.KeyID, c.keyID)
	}
	return nil
}

// isSealError reports whether err is an opener's refusal (as opposed to an
// I/O error of either connection).
func isSealError(err error) bool {
	var se *seal.Error
	return errors.As(err, &se)
}
