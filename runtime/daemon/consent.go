package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/cleanwall/cleanwall/governance/consent"
	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/runtime/api"
	"github.com/cleanwall/cleanwall/runtime/dispatch"
	"github.com/cleanwall/cleanwall/runtime/metrics"
	"github.com/cleanwall/cleanwall/runtime/sandbox"
)

// Consent (shared/GOVERNANCE.md, docs/consent.md): a policy with
// spec.governance.consent: required runs only while the consent service
// allows it. execute is asked at admission (ADD, and an apply of a new
// policy) and re-asked before each answer expires; egress is asked per
// rule on the rule's first flow and re-asked the same way. A deny closes
// what it covers (every flow of the sandbox, or the rule's) and refuses
// new flows (counted reason="consent-denied") until an allow.

// Audit record kinds of consent.
const (
	auditConsentDecision = "consent.decision" // every fresh answer
	auditConsentClose    = "consent.close"    // flows a deny closed
)

// errConsentDenied is the cause flows are closed with on a deny.
var errConsentDenied = errors.New("consent denied")

// consentGate is the daemon's consent: the cache of the service's answers
// (nil without --consent-url: a policy that needs consent is refused) and
// the subjects (policy name and hash) of the sandboxes' records.
type consentGate struct {
	d       *Daemon
	client  *consent.Client
	cache   *consent.Cache
	metrics *metrics.Consent
	closed  atomic.Int64 // flows closed by denies, ever

	mu       sync.Mutex
	subjects map[*sandbox.Record]subject
}

// subject is what a request names of a sandbox's policy.
type subject struct {
	sandbox, policy, sha string
}

func (s subject) request(kind consent.Kind, rule, dst string) consent.Request {
	return consent.Request{Kind: kind, Sandbox: s.sandbox, Policy: s.policy, PolicySHA256: s.sha, Rule: rule, Destination: dst}
}

func policySHA256(doc []byte) string {
	sum := sha256.Sum256(doc)
	return hex.EncodeToString(sum[:])
}

// newConsentGate checks the consent flags (the CA file is read now: a bad
// one fails the start, naming the flag).
func newConsentGate(d *Daemon) (*consentGate, error) {
	g := &consentGate{d: d, subjects: map[*sandbox.Record]subject{}}
	cfg := d.cfg
	if cfg.ConsentURL == "" {
		if cfg.ConsentCA != "" {
			return nil, errors.New("--consent-ca without --consent-url")
		}
		return g, nil
	}
	c, err := consent.NewClient(consent.Config{URL: cfg.ConsentURL, CAFile: cfg.ConsentCA, Timeout: cfg.ConsentTimeout})
	if err != nil {
		return nil, err
	}
	g.client = c
	return g, nil
}

// start makes the cache (its re-asks end with ctx) and the metrics.
func (g *consentGate) start(ctx context.Context) error {
	m, err := metrics.NewConsent(g.d.metrics.Registry)
	if err != nil {
		return err
	}
	g.metrics = m
	if g.client == nil {
		return nil
	}
	g.cache = consent.NewCache(ctx, g.client)
	g.cache.Observe = g.observe
	g.cache.Denied = g.denied
	g.cache.Keep = g.live
	g.d.log.Info("consent service configured", "url", g.d.cfg.ConsentURL, "timeout", g.client.Timeout(), "node", g.client.Node())
	return nil
}

func (g *consentGate) configured() bool { return g != nil && g.cache != nil }

// observe counts every decision and audits every fresh one.
func (g *consentGate) observe(req consent.Request, d consent.Decision, src consent.Source) {
	g.metrics.Decision(string(req.Kind), d.Word(), string(src))
	if src != consent.SourceFresh {
		return
	}
	if d.Cause != "" {
		g.metrics.Failure(d.Cause)
	}
	fields := map[string]any{"kind": string(req.Kind), "sandbox": req.Sandbox, "policy": req.Policy,
		"policySHA256": req.PolicySHA256, "decision": d.Word(), "ttlSeconds": d.TTL.Seconds()}
	if req.Rule != "" {
		fields["rule"] = req.Rule
	}
	if d.Reason != "" {
		fields["reason"] = d.Reason
	}
	if d.Cause != "" {
		fields["cause"] = d.Cause
	}
	g.d.audit.record(auditConsentDecision, fields)
	if !d.Allow {
		g.d.log.Warn("consent denied", "kind", req.Kind, "sandbox", req.Sandbox, "policy", req.Policy, "rule", req.Rule,
			"cause", d.Cause, "reason", d.Reason, "ttl", d.TTL)
	} else {
		g.d.log.Debug("consent allowed", "kind", req.Kind, "sandbox", req.Sandbox, "policy", req.Policy, "rule", req.Rule, "ttl", d.TTL)
	}
}

// denied closes what a fresh deny covers: every flow of the sandbox's
// attachments under that policy (execute), or the rule's flows (egress).
func (g *consentGate) denied(req consent.Request, d consent.Decision) {
	closed := 0
	for _, s := range g.d.sandboxes.Snapshot() {
		if s.ContainerID != req.Sandbox || g.subjectOf(s.Record()).sha != req.PolicySHA256 {
			continue
		}
		var keep func(*sandbox.Flow) bool // execute: none
		if req.Kind == consent.KindEgress {
			keep = func(f *sandbox.Flow) bool { return f.Rule == nil || f.Rule.Name != req.Rule }
		}
		closed += s.CloseFlows(keep, errConsentDenied)
	}
	if closed == 0 {
		return
	}
	g.closed.Add(int64(closed))
	g.d.log.Warn("consent denied: flows closed", "kind", req.Kind, "sandbox", req.Sandbox, "rule", req.Rule, "closed_flows", closed)
	fields := map[string]any{"kind": string(req.Kind), "sandbox": req.Sandbox, "policySHA256": req.PolicySHA256, "closedFlows": closed}
	if req.Rule != "" {
		fields["rule"] = req.Rule
	}
	g.d.audit.record(auditConsentClose, fields)
}

// subjectOf is the subject of a sandbox record (its policy file's hash
// computed once per record).
func (g *consentGate) subjectOf(rec *sandbox.Record) subject {
	g.mu.Lock()
	defer g.mu.Unlock()
	if s, ok := g.subjects[rec]; ok {
		return s
	}
	s := subject{sandbox: rec.ContainerID, policy: rec.PolicyName, sha: policySHA256(rec.Policy)}
	g.subjects[rec] = s
	return s
}

// admit asks execute for a policy about to be admitted (ADD) or applied:
// nil when the policy needs no consent or the service allows it.
func (g *consentGate) admit(ctx context.Context, containerID string, doc []byte, c *policy.Compiled) error {
	if c.Policy == nil || !c.Policy.ConsentRequired() {
		return nil
	}
	if !g.configured() {
		return &api.Error{Field: "policy", Message: fmt.Sprintf("policy %q: spec.governance.consent is required, but this cleanwalld has no --consent-url: refused", c.Name)}
	}
	sub := subject{sandbox: containerID, policy: c.Name, sha: policySHA256(doc)}
	d := g.cache.Check(ctx, sub.request(consent.KindExecute, "", ""))
	if d.Allow {
		return nil
	}
	return &api.Error{Field: "consent", Message: fmt.Sprintf("denied (execute, policy %q): %s", c.Name, explain(d))}
}

// explain says why a decision is a deny.
func explain(d consent.Decision) string {
	what := map[string]string{
		consent.CauseUnreachable: "the consent service is unreachable",
		consent.CauseTimeout:     "the consent service did not answer in time",
		consent.CauseTLS:         "the consent service's TLS handshake failed",
		consent.CauseStatus:      "the consent service's answer is not 200",
		consent.CauseMalformed:   "the consent service's answer is malformed",
	}[d.Cause]
	if what == "" {
		what = "the consent service denied it"
	}
	if d.Reason != "" {
		return what + ": " + d.Reason
	}
	return what
}

// Admit is dispatch.Consent: a flow of a sandbox whose policy needs
// consent runs while execute and its rule's egress are allowed (asked
// now, at most the timeout each, unless answered already).
func (g *consentGate) Admit(ctx context.Context, dec *dispatch.Decision, dst netip.AddrPort) bool {
	if dec.Compiled == nil || dec.Compiled.Policy == nil || !dec.Compiled.Policy.ConsentRequired() {
		return true
	}
	if !g.configured() {
		return false
	}
	sub := g.subjectOf(dec.Record)
	if !g.cache.Check(ctx, sub.request(consent.KindExecute, "", "")).Allow {
		return false
	}
	return g.cache.Check(ctx, sub.request(consent.KindEgress, dec.Rule.Name, dst.String())).Allow
}

// Cached is dispatch.Consent's answer without waiting (UDP: the datagram
// path must not block): known false while an answer is asked for in the
// background.
func (g *consentGate) Cached(dec *dispatch.Decision, dst netip.AddrPort) (allow, known bool) {
	if dec.Compiled == nil || dec.Compiled.Policy == nil || !dec.Compiled.Policy.ConsentRequired() {
		return true, true
	}
	if !g.configured() {
		return false, true
	}
	sub := g.subjectOf(dec.Record)
	for _, req := range []consent.Request{sub.request(consent.KindExecute, "", ""), sub.request(consent.KindEgress, dec.Rule.Name, dst.String())} {
		d, ok := g.cache.Peek(consent.KeyOf(req))
		if !ok {
			go g.cache.Check(g.d.ctx, req)
			return false, false
		}
		g.metrics.Decision(string(req.Kind), d.Word(), string(consent.SourceCached))
		if !d.Allow {
			return false, true
		}
	}
	return true, true
}

// adopted asks execute, in the background, for each re-adopted sandbox
// whose policy needs consent (after a restart): its answer is then
// re-asked on the usual schedule, and its first flow finds it cached.
func (g *consentGate) adopted() {
	if !g.configured() {
		return
	}
	for _, s := range g.d.sandboxes.Snapshot() {
		s.Lock()
		c, rec := s.Compiled, s.Rec
		s.Unlock()
		if c == nil || c.Policy == nil || !c.Policy.ConsentRequired() {
			continue
		}
		go g.cache.Check(g.d.ctx, g.subjectOf(rec).request(consent.KindExecute, "", ""))
	}
}

// live reports whether a registered sandbox still uses an answer's
// policy version (an answer asked by a flow of a sandbox being deleted
// must not be re-asked for ever).
func (g *consentGate) live(k consent.Key) bool {
	for _, s := range g.d.sandboxes.Snapshot() {
		if s.ContainerID == k.Sandbox && g.subjectOf(s.Record()).sha == k.PolicySHA256 {
			return true
		}
	}
	return false
}

// settle forgets the answers and subjects no registered sandbox uses any
// more (after an ADD, a DEL, an apply, a GC). Call without the registry
// locked.
func (g *consentGate) settle() {
	if !g.configured() {
		return
	}
	live := g.d.sandboxes.Snapshot()
	type use struct{ sandbox, sha string }
	inUse := map[use]bool{}
	recs := map[*sandbox.Record]bool{}
	for _, s := range live {
		rec := s.Record()
		recs[rec] = true
		inUse[use{s.ContainerID, g.subjectOf(rec).sha}] = true
	}
	g.mu.Lock()
	for rec := range g.subjects {
		if !recs[rec] {
			delete(g.subjects, rec)
		}
	}
	g.mu.Unlock()
	if g.cache != nil {
		g.cache.ForgetWhere(func(k consent.Key) bool { return !inUse[use{k.Sandbox, k.PolicySHA256}] })
	}
}

// refresh drops the cached answers of a sandbox (container ID; "" for
// all) and asks again now: denies among the answers have closed what they
// cover when it returns.
func (g *consentGate) refresh(ctx context.Context, containerID string) (api.ConsentRefreshResult, error) {
	if !g.configured() {
		return api.ConsentRefreshResult{}, &api.Error{Message: "this cleanwalld has no --consent-url: there is nothing to refresh"}
	}
	if containerID != "" {
		g.d.sandboxes.RLock()
		n := len(g.d.sandboxes.Find(containerID, ""))
		g.d.sandboxes.RUnlock()
		if n == 0 {
			return api.ConsentRefreshResult{}, &notFound{"no sandbox " + containerID}
		}
	}
	before := g.closed.Load()
	res := api.ConsentRefreshResult{Answers: []api.ConsentAnswer{}}
	for _, r := range g.cache.Refresh(ctx, containerID) {
		res.Answers = append(res.Answers, api.ConsentAnswer{Kind: string(r.Request.Kind), Sandbox: r.Request.Sandbox,
			Policy: r.Request.Policy, Rule: r.Request.Rule, Decision: r.Decision.Word(), Reason: r.Decision.Reason,
			Cause: r.Decision.Cause, TTLSeconds: r.Decision.TTL.Seconds()})
	}
	sort.Slice(res.Answers, func(i, j int) bool {
		a, b := res.Answers[i], res.Answers[j]
		if a.Sandbox != b.Sandbox {
			return a.Sandbox < b.Sandbox
		}
		if a.Kind != b.Kind {
			return a.Kind > b.Kind // execute first
		}
		return a.Rule < b.Rule
	})
	res.ClosedFlows = int(g.closed.Load() - before)
	g.d.audit.record("consent.refresh", map[string]any{"sandbox": containerID, "answers": len(res.Answers), "closedFlows": res.ClosedFlows})
	return res, nil
}

func (d *Daemon) handleConsentRefresh(w http.ResponseWriter, r *http.Request) {
	var req api.ConsentRefreshRequest
	if err := decode(r, &req); err != nil {
		writeError(w, err)
		return
	}
	res, err := d.consent.refresh(r.Context(), req.Sandbox)
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}
