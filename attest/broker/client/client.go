// Package client is the runtime side of the key release protocol: it asks a
// key broker for a challenge, makes a fresh ephemeral HPKE key pair, has the
// attester bind nonce, KEM, public key and key id into its evidence, sends
// the release request and opens the sealed key. The private key never
// leaves the Release call.
//
// It imports only the standard library and package attest, so the daemon can
// use it without go-sev-guest. It must not cache or persist keys: that is
// the caller's decision.
//
//	a, err := guest.New() // attest/snp/guest; simulated.New(cfg) in tests
//	c := client.New("https://broker:8443", pool, a)
//	key, err := c.ReleaseWith(ctx, "egress-dek", client.ReleaseOptions{PolicySHA256: compiled.Hash})
//	if errors.Is(err, attest.CodeEgressPolicyNotAllowed) { … }
package client

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/cleanwall/cleanwall/attest"
)

// maxResponseBytes bounds what the client reads from the broker.
const maxResponseBytes = 64 << 10

// ErrBadResponse is returned when the broker's answer breaks the protocol:
// unparsable, for another key, or a sealed key that does not open.
var ErrBadResponse = errors.New("bad key broker response")

// Client releases keys from one broker.
type Client struct {
	baseURL  string
	http     *http.Client
	attester attest.Attester

	// KEMID is the HPKE KEM of the ephemeral key pair; attest.KEMX25519 by
	// default, attest.KEMMLKEM768X25519 for the post-quantum hybrid.
	KEMID uint16
}

// New returns a client for the broker at baseURL (https://host:port) whose
// TLS certificate chains to roots (the system roots if nil), attesting with
// attester.
func New(baseURL string, roots *x509.CertPool, attester attest.Attester) *Client {
	transport := &http.Transport{
		TLSClientConfig:       &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots},
		ForceAttemptHTTP2:     true,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
	}
	return &Client{
		baseURL:  strings.TrimRight(baseURL, "/"),
		attester: attester,
		KEMID:    attest.KEMX25519,
		http: &http.Client{
			Transport: transport,
			Timeout:   60 * time.Second,
			// A redirect would send evidence somewhere nobody chose.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
}

// Key is a released key.
type Key struct {
	ID      string
	Version int
	Bytes   []byte
	// NotAfter is when the broker wants the key released again.
	NotAfter time.Time
	Evidence EvidenceInfo
}

// EvidenceInfo says what the key was released against.
type EvidenceInfo struct {
	TEE       string
	Simulated bool
	// Session is the broker's challenge session.
	Session string
	// ReportData is the REPORT_DATA the evidence bound.
	ReportData [64]byte
	// PolicySHA256 is the egress policy hash the request carried and the
	// evidence bound (lowercase hex); empty when none.
	PolicySHA256 string
	// NodeKey is the node key the request carried and the evidence bound;
	// nil when none.
	NodeKey ed25519.PublicKey
}

// ReleaseOptions are the optional members of a release request.
type ReleaseOptions struct {
	// PolicySHA256 is the hash of the egress policy the requesting sandbox
	// runs under (docs/keybroker.md §5): 64 hex characters, the value that
	// `cleanwall policy hash FILE` prints and policy.Compiled.Hash holds. It
	// is sent as policySHA256 and bound into REPORT_DATA. Empty: the request
	// binds no policy, and a key whose release policy lists egressPolicies is
	// refused (egress-policy-not-allowed).
	PolicySHA256 string
	// NodeKey is the Ed25519 public key that signs this node's audit
	// checkpoints (docs/keybroker.md §7). It is sent as nodeKey and bound
	// into REPORT_DATA, so the broker's release record ties the node's
	// audit log to this attestation. Nil: no node key.
	NodeKey ed25519.PublicKey
}

// Release runs challenge, evidence and release for keyID without an egress
// policy binding: ReleaseWith with zero options.
func (c *Client) Release(ctx context.Context, keyID string) (Key, error) {
	return c.ReleaseWith(ctx, keyID, ReleaseOptions{})
}

// ReleaseWith runs challenge, evidence and release for keyID. A refusal is
// an *attest.Refusal (errors.Is(err, attest.CodeMeasurementNotAllowed) and
// so on), carrying the broker's code, detail and HTTP status. A malformed
// o.PolicySHA256 is an error before anything is sent.
func (c *Client) ReleaseWith(ctx context.Context, keyID string, o ReleaseOptions) (Key, error) {
	kem, err := attest.KEM(c.KEMID)
	if err != nil {
		return Key{}, err
	}
	var policy []byte
	if o.PolicySHA256 != "" {
		if policy, err = attest.ParsePolicySHA256(o.PolicySHA256); err != nil {
			return Key{}, fmt.Errorf("release options: %w", err)
		}
	}
	// One spelling on the wire, whatever case the caller used.
	policyHex := ""
	if policy != nil {
		policyHex = hex.EncodeToString(policy)
	}
	if o.NodeKey != nil && len(o.NodeKey) != attest.NodeKeySize {
		return Key{}, fmt.Errorf("release options: node key of %d bytes, want %d", len(o.NodeKey), attest.NodeKeySize)
	}
	var ch attest.ChallengeResponse
	if err := c.post(ctx, "/v1/challenge", attest.ChallengeRequest{KeyID: keyID}, &ch); err != nil {
		return Key{}, fmt.Errorf("challenge: %w", err)
	}
	if ch.Session == "" || len(ch.Nonce) != attest.NonceSize {
		return Key{}, fmt.Errorf("%w: challenge without session or %d-byte nonce", ErrBadResponse, attest.NonceSize)
	}
	priv, err := kem.GenerateKey()
	if err != nil {
		return Key{}, fmt.Errorf("generating ephemeral HPKE key: %w", err)
	}
	pub := priv.PublicKey().Bytes()
	rd := attest.ReportDataBound(ch.Nonce, c.KEMID, pub, keyID, policy, o.NodeKey)
	evidence, err := c.attester.Evidence(ctx, rd)
	if err != nil {
		return Key{}, fmt.Errorf("attesting: %w", err)
	}
	var rel attest.ReleaseResponse
	req := attest.ReleaseRequest{Session: ch.Session, KeyID: keyID, TEE: c.attester.TEE(), Evidence: evidence, KEMID: c.KEMID, PublicKey: pub,
		PolicySHA256: policyHex, NodeKey: o.NodeKey}
	if err := c.post(ctx, "/v1/release", req, &rel); err != nil {
		return Key{}, fmt.Errorf("release: %w", err)
	}
	if rel.KeyID != keyID || rel.Version < 1 {
		return Key{}, fmt.Errorf("%w: released %q version %d, asked for %q", ErrBadResponse, rel.KeyID, rel.Version, keyID)
	}
	key, err := attest.OpenKey(priv, rd, rel.Sealed)
	if err != nil {
		return Key{}, fmt.Errorf("%w: %v", ErrBadResponse, err)
	}
	if len(key) != attest.KeySize {
		return Key{}, fmt.Errorf("%w: key of %d bytes, want %d", ErrBadResponse, len(key), attest.KeySize)
	}
	return Key{
		ID: rel.KeyID, Version: rel.Version, Bytes: key, NotAfter: rel.NotAfter,
		Evidence: EvidenceInfo{TEE: c.attester.TEE(), Simulated: c.attester.Simulated(), Session: ch.Session, ReportData: rd,
			PolicySHA256: policyHex, NodeKey: o.NodeKey},
	}, nil
}

func (c *Client) post(ctx context.Context, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.baseURL+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes+1))
	if err != nil {
		return fmt.Errorf("reading response: %w", err)
	}
	if len(data) > maxResponseBytes {
		return fmt.Errorf("%w: response larger than %d bytes", ErrBadResponse, maxResponseBytes)
	}
	if resp.StatusCode != http.StatusOK {
		var e attest.ErrorResponse
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			return fmt.Errorf("%w: status %d without a refusal code", ErrBadResponse, resp.StatusCode)
		}
		return &attest.Refusal{Code: e.Error, Detail: e.Detail, Status: resp.StatusCode}
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%w: %v", ErrBadResponse, err)
	}
	return nil
}

// CloseIdleConnections closes kept-alive connections to the broker.
func (c *Client) CloseIdleConnections() { c.http.CloseIdleConnections() }
