// Package broker is the key broker service of docs/keybroker.md: it issues
// single-use challenges, verifies SEV-SNP evidence (attest/snp) against each
// key's release policy, and seals the newest version of the key to the
// attester's ephemeral HPKE public key. Every release decision goes to the
// audit log before the answer leaves; a decision that cannot be audited is
// not made. Challenge decisions are audited in aggregate (see below).
//
// It owns the broker's configuration, its challenges (stateless MAC'd
// sessions and the bounded set of used ones), the challenge tally and the
// HTTPS handler. It holds keys only through attest/broker/keystore and never
// writes them in the clear; it trusts the simulated (test-only) AMD roots,
// of every product line or of simulatedProductLines, only when the
// configuration says allowSimulatedTEE.
//
// Where docs/keybroker.md is silent, the broker decides:
//   - HTTP statuses: bad-request and evidence-malformed 400 (413 for a body
//     over 64 KiB, 405 for a method other than POST, 404 for another path),
//     unknown-key 404, every other refusal 403.
//   - Two answers are not refusals and carry codes outside the protocol's
//     list: 503 "unavailable" (with Retry-After) when the set of used
//     sessions is full, 500 "internal" when the broker fails, e.g. cannot
//     write its audit log (then nothing is released, and no challenge is
//     issued while the challenge tally cannot be written).
//   - A challenge stores nothing: the session is a MAC'd token carrying its
//     expiry and key (challenges.go), so no number of challenges locks
//     anyone out. Sessions do not survive a restart (nonce-unknown).
//   - A session is consumed by the first release whose evidence's signature
//     chain verifies, whatever the outcome after that; it is then kept in
//     the used set until it expires. Requests that fail before (malformed,
//     unverifiable evidence) do not consume it, so unauthenticated clients
//     cannot fill the used set. A session issued for another key id is a
//     bad-request. A release for an unknown key is refused before its
//     session is looked at.
//   - Challenges are audited in aggregate: one keybroker.challenges record
//     per challenges.auditInterval (10s) that had any, with counts per key,
//     per refusal code and per client address (the 16 busiest named). Each
//     release record names its session's expiry, which dates its challenge.
//   - notAfter is the release time plus releaseValidity (1h by default).
//   - Guest policies that allow a migration agent or CXL memory are refused
//     (policy-not-satisfied) whatever the release policy; SMT is allowed.
//   - The report must be self-consistent (committed = current TCB and
//     firmware, reported TCB = the VCEK's, CHIP_ID = the VCEK's HWID), else
//     policy-not-satisfied.
//   - A policySHA256 is bound to an anyOf entry like its other members: an
//     entry with egressPolicies fails for a request that names none or
//     another one (egress-policy-not-allowed).
//   - A nodeKey (the requesting node's audit key) is bound like the policy
//     hash: evidence that did not bind it is report-data-mismatch, and the
//     release record names it.
//   - When every failing anyOf entry fails with one and the same code, that
//     code is sent; otherwise policy-not-satisfied, with each entry's reasons
//     in the detail.
package broker

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/google/go-sev-guest/verify/trust"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/broker/keystore"
	"github.com/cleanwall/cleanwall/attest/simulated/simroots"
	"github.com/cleanwall/cleanwall/attest/snp"
	"github.com/cleanwall/cleanwall/governance/audit"
)

// Audit record kinds written by the broker.
const (
	KindStart = "keybroker.start"
	// KindChallenge is the challenge tally: one record per interval, with
	// counts, never one per challenge.
	KindChallenge = "keybroker.challenges"
	KindRelease   = "keybroker.release"
)

// Log and audit field names.
const (
	fieldDecision         = "decision"
	fieldCode             = "code"
	fieldDetail           = "detail"
	fieldKeyID            = "keyID"
	fieldVersion          = "version"
	fieldSession          = "session"
	fieldRequester        = "requester"
	fieldTEE              = "tee"
	fieldKEM              = "kemID"
	fieldSimulated        = "simulated"
	fieldSimulatedAllowed = "simulatedAllowed"
	fieldMeasurement      = "measurement"
	fieldReportData       = "reportData"
	fieldPolicyEntry      = "policyEntry"
	fieldNotAfter         = "notAfter"
	fieldKeys             = "keys"
	fieldListen           = "listen"
	fieldPolicySHA256     = "policySHA256"
	fieldNodeKey          = "nodeKey"
	fieldSessionExpiresAt = "sessionExpiresAt"
	fieldProductLines     = "simulatedProductLines"

	// The challenge tally.
	fieldFrom            = "from"
	fieldTo              = "to"
	fieldChallenges      = "challenges"
	fieldIssued          = "issued"
	fieldRefused         = "refused"
	fieldRequesters      = "requesters"
	fieldOtherRequests   = "otherRequests"
	fieldDistinctClients = "distinctRequesters"
	fieldDistinctAtLeast = "distinctRequestersAtLeast"
)

const (
	decisionGranted = "granted"
	decisionRefused = "refused"
	decisionFailed  = "failed"
)

// verifyTimeout bounds one evidence verification (it may fetch from AMD).
const verifyTimeout = 20 * time.Second

// Options are what New needs besides the configuration.
type Options struct {
	// Keys is the open key store.
	Keys *keystore.Store
	// Audit receives every decision.
	Audit *audit.Log
	// Logger; slog.Default() if nil.
	Logger *slog.Logger
	// Now is the clock (nonce expiry, certificate validity, notAfter);
	// time.Now if nil.
	Now func() time.Time
	// Getter fetches from AMD's KDS for real evidence; a caching getter
	// over go-sev-guest's default if nil.
	Getter trust.HTTPSGetter
}

// Server is the key broker.
type Server struct {
	cfg        *Config
	keys       *keystore.Store
	audit      *audit.Log
	log        *slog.Logger
	now        func() time.Time
	verifier   *snp.Verifier
	challenges *challenges
	tally      *challengeTally
	// keyIndex maps a key id to its index in cfg.Keys, which sessions carry.
	keyIndex   map[string]int
	closeAudit bool
}

// New checks that every configured key has a version in the store and
// returns the broker. With AllowSimulatedTEE it warns loudly and records it.
func New(cfg *Config, o Options) (*Server, error) {
	if cfg.Release == nil {
		return nil, errors.New("configuration was not checked (use LoadConfig or ParseConfig)")
	}
	if o.Keys == nil || o.Audit == nil {
		return nil, errors.New("broker needs a key store and an audit log")
	}
	s := &Server{cfg: cfg, keys: o.Keys, audit: o.Audit, log: o.Logger, now: o.Now}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.now == nil {
		s.now = time.Now
	}
	var ids []string
	s.keyIndex = map[string]int{}
	for i, k := range cfg.Keys {
		if _, err := s.keys.Latest(k.ID); err != nil {
			return nil, fmt.Errorf("key %q has no version in the key store %s: create one with `cleanwall-keybroker key create --config FILE --id %s`", k.ID, cfg.KeyStore.Dir, k.ID)
		}
		ids = append(ids, k.ID)
		s.keyIndex[k.ID] = i
	}
	if len(cfg.Keys) > math.MaxUint16+1 {
		return nil, fmt.Errorf("%d keys: a session names its key in 16 bits", len(cfg.Keys))
	}
	s.challenges = newChallenges(cfg.challengeTTL(), cfg.maxUsed(), s.now)
	s.tally = newChallengeTally(s.now())
	s.verifier = &snp.Verifier{
		AllowSimulated:        cfg.AllowSimulatedTEE,
		SimulatedProductLines: cfg.SimulatedProductLines,
		CheckRevocations:      cfg.checkRevocations(),
		FetchCertificates:     cfg.fetchCertificates(),
		Getter:                o.Getter,
		Now:                   s.now,
	}
	start := map[string]any{fieldSimulatedAllowed: cfg.AllowSimulatedTEE, fieldKeys: ids, fieldListen: cfg.Listen}
	if cfg.AllowSimulatedTEE {
		lines := cfg.SimulatedProductLines
		if lines == nil {
			lines = simroots.ProductLines
		}
		start[fieldProductLines] = lines
		s.log.Warn("ALLOWING SIMULATED TEE EVIDENCE: go-sev-guest's test-only AMD roots are trusted and keys will be released to software simulations; never run this configuration in production",
			"allowSimulatedTEE", true, fieldProductLines, lines)
	}
	if _, err := s.audit.Append(KindStart, start); err != nil {
		return nil, fmt.Errorf("auditing start: %w", err)
	}
	return s, nil
}

// Open opens the key store and the audit log named by cfg and returns the
// broker; Close closes the audit log.
func Open(cfg *Config, logger *slog.Logger) (*Server, error) {
	master, err := keystore.LoadMasterKey(cfg.KeyStore.MasterKeyFile)
	if err != nil {
		return nil, err
	}
	keys, err := keystore.Open(cfg.KeyStore.Dir, master)
	if err != nil {
		return nil, err
	}
	log, err := audit.Open(cfg.auditLogPath(), audit.Options{})
	if err != nil {
		return nil, err
	}
	s, err := New(cfg, Options{Keys: keys, Audit: log, Logger: logger})
	if err != nil {
		log.Close()
		return nil, err
	}
	s.closeAudit = true
	return s, nil
}

// Close writes the pending challenge tally and closes what Open opened.
func (s *Server) Close() error {
	err := s.FlushAudit()
	if s.closeAudit {
		err = errors.Join(err, s.audit.Close())
	}
	return err
}

// FlushAudit writes the challenge tally now (one record, none if there were
// no challenges since the last). Serve calls it every
// challenges.auditInterval and when it shuts down.
func (s *Server) FlushAudit() error {
	if err := s.tally.flush(s.audit, s.now()); err != nil {
		s.log.Error("audit failed: challenge tally not written; no challenge is issued until it is", "error", err)
		return fmt.Errorf("auditing challenges: %w", err)
	}
	return nil
}

// housekeeping writes the challenge tally and drops expired used sessions
// every audit interval until ctx ends.
func (s *Server) housekeeping(ctx context.Context) {
	tick := time.NewTicker(s.cfg.challengeAuditInterval())
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			s.FlushAudit()
			s.challenges.sweep()
		}
	}
}

// ReloadKeys re-reads the key store (after a rotation).
func (s *Server) ReloadKeys() error {
	if err := s.keys.Reload(); err != nil {
		return err
	}
	for _, k := range s.cfg.Keys {
		v, err := s.keys.Latest(k.ID)
		if err != nil {
			return err
		}
		s.log.Info("key loaded", fieldKeyID, k.ID, fieldVersion, v.Number)
	}
	return nil
}

// Handler is the broker's HTTP API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/challenge", s.post(s.handleChallenge))
	mux.HandleFunc("/v1/release", s.post(s.handleRelease))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, attest.CodeBadRequest, "no such endpoint: POST /v1/challenge or /v1/release")
	})
	return mux
}

// Serve answers HTTPS on ln with the configured certificate until ctx ends,
// then shuts down gracefully.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	cert, err := tls.LoadX509KeyPair(s.cfg.TLS.CertFile, s.cfg.TLS.KeyFile)
	if err != nil {
		return fmt.Errorf("loading TLS certificate: %w", err)
	}
	srv := &http.Server{
		Handler:           s.Handler(),
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}},
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      verifyTimeout + 10*time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	done := make(chan error, 1)
	go func() { done <- srv.ServeTLS(ln, "", "") }()
	hkCtx, stopHousekeeping := context.WithCancel(ctx)
	hkDone := make(chan struct{})
	go func() { defer close(hkDone); s.housekeeping(hkCtx) }()
	defer func() { stopHousekeeping(); <-hkDone }()
	select {
	case err := <-done:
		return errors.Join(fmt.Errorf("serving: %w", err), s.FlushAudit())
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return errors.Join(fmt.Errorf("shutting down: %w", err), s.FlushAudit())
	}
	if err := <-done; !errors.Is(err, http.ErrServerClosed) {
		return errors.Join(fmt.Errorf("serving: %w", err), s.FlushAudit())
	}
	return s.FlushAudit()
}

// post wraps a handler with the method check and the body limit.
func (s *Server) post(h func(w http.ResponseWriter, r *http.Request, body []byte)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", http.MethodPost)
			writeError(w, http.StatusMethodNotAllowed, attest.CodeBadRequest, r.Method+" not allowed: use POST")
			return
		}
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, attest.MaxRequestBytes))
		if err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				writeError(w, http.StatusRequestEntityTooLarge, attest.CodeBadRequest,
					fmt.Sprintf("request body exceeds %d bytes", attest.MaxRequestBytes))
				return
			}
			writeError(w, http.StatusBadRequest, attest.CodeBadRequest, "reading request body: "+err.Error())
			return
		}
		h(w, r, body)
	}
}

// handleChallenge issues a stateless challenge and counts the decision in
// the challenge tally. Nothing here allocates per challenge beyond the
// answer, so a flood costs CPU only.
func (s *Server) handleChallenge(w http.ResponseWriter, r *http.Request, body []byte) {
	if now := s.now(); s.tally.healthy() != nil || s.tally.due(now, s.cfg.challengeAuditInterval()) {
		if err := s.FlushAudit(); err != nil {
			writeError(w, http.StatusInternalServerError, attest.CodeInternal, "audit log unavailable")
			return
		}
	}
	req, err := attest.DecodeChallengeRequest(body)
	if err != nil {
		s.refuseChallenge(w, r, err)
		return
	}
	index, ok := s.keyIndex[req.KeyID]
	if !ok {
		s.refuseChallenge(w, r, attest.Refuse(attest.CodeUnknownKey, "no key %q", req.KeyID))
		return
	}
	session, ch := s.challenges.issue(index)
	s.tally.add(r.RemoteAddr, req.KeyID, "")
	writeJSON(w, http.StatusOK, attest.ChallengeResponse{Session: session, Nonce: ch.nonce, ExpiresAt: ch.expires.UTC()})
}

// refuseChallenge counts and answers a refused challenge.
func (s *Server) refuseChallenge(w http.ResponseWriter, r *http.Request, err error) {
	var ref *attest.Refusal
	if !errors.As(err, &ref) {
		ref = &attest.Refusal{Code: attest.CodeInternal, Detail: "internal error"}
		s.log.Error("key broker failure", "error", err, "kind", KindChallenge)
	}
	s.tally.add(r.RemoteAddr, "", ref.Code)
	s.log.Debug("challenge refused", fieldCode, string(ref.Code), fieldDetail, ref.Detail, fieldRequester, r.RemoteAddr)
	writeError(w, ref.Code.HTTPStatus(), ref.Code, ref.Detail)
}

func (s *Server) handleRelease(w http.ResponseWriter, r *http.Request, body []byte) {
	rec := map[string]any{fieldRequester: r.RemoteAddr, fieldSimulatedAllowed: s.cfg.AllowSimulatedTEE}
	ctx, cancel := context.WithTimeout(r.Context(), verifyTimeout)
	defer cancel()
	resp, err := s.decide(ctx, body, rec)
	if err != nil {
		s.refuse(w, KindRelease, rec, err)
		return
	}
	rec[fieldDecision] = decisionGranted
	rec[fieldNotAfter] = resp.NotAfter.Format(time.RFC3339Nano)
	if _, err := s.audit.Append(KindRelease, rec); err != nil {
		s.log.Error("audit failed, release withheld", "error", err, fieldKeyID, resp.KeyID)
		writeError(w, http.StatusInternalServerError, attest.CodeInternal, "audit log unavailable")
		return
	}
	s.log.Info("key released", fieldKeyID, resp.KeyID, fieldVersion, resp.Version, fieldSimulated, rec[fieldSimulated],
		fieldRequester, r.RemoteAddr)
	writeJSON(w, http.StatusOK, resp)
}

// decide runs release and turns a panic (the evidence parsers and
// go-sev-guest see attacker bytes) into a failure that is audited and
// answered, instead of a dropped connection with no record.
func (s *Server) decide(ctx context.Context, body []byte, rec map[string]any) (resp *attest.ReleaseResponse, err error) {
	defer func() {
		if p := recover(); p != nil {
			resp, err = nil, fmt.Errorf("panic while deciding a release: %v", p)
		}
	}()
	return s.release(ctx, body, rec)
}

// release decides a release request, recording what it learns in rec.
func (s *Server) release(ctx context.Context, body []byte, rec map[string]any) (*attest.ReleaseResponse, error) {
	req, err := attest.DecodeReleaseRequest(body)
	if err != nil {
		return nil, err
	}
	rec[fieldKeyID], rec[fieldSession], rec[fieldTEE], rec[fieldKEM] = req.KeyID, req.Session, req.TEE, req.KEMID
	policyHash, _ := req.PolicyHash() // checked by the decoder
	if policyHash != nil {
		rec[fieldPolicySHA256] = hex.EncodeToString(policyHash)
	}
	if req.NodeKey != nil {
		// The key that signs the node's audit checkpoints: a verifier ties
		// that log to the attested node through this record.
		rec[fieldNodeKey] = base64.StdEncoding.EncodeToString(req.NodeKey)
	}
	if req.TEE != attest.TEESNP {
		return nil, attest.Refuse(attest.CodeBadRequest, "tee %q: only %q is supported", req.TEE, attest.TEESNP)
	}
	kem, _ := attest.KEM(req.KEMID) // checked by the decoder
	if _, err := kem.NewPublicKey(req.PublicKey); err != nil {
		return nil, attest.Refuse(attest.CodeBadRequest, "publicKey is not a KEM 0x%04x public key: %v", req.KEMID, err)
	}
	policy, ok := s.cfg.Release[req.KeyID]
	if !ok {
		return nil, attest.Refuse(attest.CodeUnknownKey, "no key %q", req.KeyID)
	}
	ch, err := s.challenges.check(req.Session)
	if err != nil {
		return nil, err
	}
	rec[fieldSessionExpiresAt] = ch.expires.UTC().Format(time.RFC3339Nano)
	if ch.keyIndex >= len(s.cfg.Keys) || s.cfg.Keys[ch.keyIndex].ID != req.KeyID {
		issuedFor := "?"
		if ch.keyIndex < len(s.cfg.Keys) {
			issuedFor = s.cfg.Keys[ch.keyIndex].ID
		}
		return nil, attest.Refuse(attest.CodeBadRequest, "session was issued for key %q, not %q", issuedFor, req.KeyID)
	}
	v, err := s.verifier.Verify(ctx, req.Evidence)
	if err != nil {
		// What the evidence claims, for the record, even when its signature is bad.
		if p, perr := snp.Parse(req.Evidence); perr == nil {
			rec[fieldMeasurement] = hex.EncodeToString(p.Measurement())
			rec[fieldSimulated] = p.Labelled
		}
		return nil, err
	}
	rec[fieldMeasurement] = hex.EncodeToString(v.Measurement())
	rec[fieldSimulated] = v.Simulated
	// Signed by a trusted chain: from here on the session is spent.
	if err := s.challenges.consume(ch); err != nil {
		return nil, err
	}
	want := attest.ReportDataBound(ch.nonce, req.KEMID, req.PublicKey, req.KeyID, policyHash, req.NodeKey)
	rec[fieldReportData] = hex.EncodeToString(want[:])
	if err := v.CheckReportData(want); err != nil {
		return nil, err
	}
	entry, err := v.Satisfies(policy, policyHash)
	if err != nil {
		return nil, err
	}
	rec[fieldPolicyEntry] = entry
	key, err := s.keys.Latest(req.KeyID)
	if err != nil {
		return nil, fmt.Errorf("key %q: %w", req.KeyID, err)
	}
	rec[fieldVersion] = key.Number
	sealed, err := attest.SealKey(req.KEMID, req.PublicKey, want, key.Bytes)
	if err != nil {
		return nil, err
	}
	return &attest.ReleaseResponse{
		KeyID:    req.KeyID,
		Version:  key.Number,
		Sealed:   sealed,
		NotAfter: s.now().Add(s.cfg.releaseValidity()).UTC(),
	}, nil
}

// refuse audits and answers a refusal (or a failure of the broker).
func (s *Server) refuse(w http.ResponseWriter, kind string, rec map[string]any, err error) {
	var r *attest.Refusal
	status, code, detail := 0, attest.Code(""), ""
	switch {
	case errors.As(err, &r):
		rec[fieldDecision] = decisionRefused
		status, code, detail = r.Code.HTTPStatus(), r.Code, r.Detail
	case errors.Is(err, ErrUsedSessionsFull):
		rec[fieldDecision] = decisionRefused
		status, code, detail = http.StatusServiceUnavailable, attest.CodeUnavailable, err.Error()
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(s.challenges.retryAfter().Seconds()))))
	default:
		rec[fieldDecision] = decisionFailed
		status, code, detail = http.StatusInternalServerError, attest.CodeInternal, "internal error"
		s.log.Error("key broker failure", "error", err, "kind", kind)
	}
	rec[fieldCode] = string(code)
	rec[fieldDetail] = detail
	if _, aerr := s.audit.Append(kind, rec); aerr != nil {
		s.log.Error("audit failed", "error", aerr)
		writeError(w, http.StatusInternalServerError, attest.CodeInternal, "audit log unavailable")
		return
	}
	s.log.Info("request refused", "kind", kind, fieldCode, string(code), fieldDetail, detail, fieldKeyID, rec[fieldKeyID], fieldRequester, rec[fieldRequester])
	writeError(w, status, code, detail)
}

func writeError(w http.ResponseWriter, status int, code attest.Code, detail string) {
	writeJSON(w, status, attest.ErrorResponse{Error: code, Detail: detail})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":"internal","detail":"encoding response"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}
