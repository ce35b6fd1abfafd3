package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"slices"
	"strings"
)

// normalize brings a policy to its canonical form: defaults filled in,
// names lowercased without a trailing dot, prefixes and addresses in
// canonical notation, empty lists dropped. It leaves values it cannot read
// as they are, so it is safe on invalid policies, and it is idempotent.
func (p *Policy) normalize() {
	if d := p.Spec.DNS; d != nil {
		if ap, problem := parseUpstream(d.Upstream); problem == "" {
			d.Upstream = ap.String()
		}
		for i, a := range d.Allow {
			d.Allow[i] = normName(a)
		}
		d.Allow = nilIfEmpty(d.Allow)
		if d.QueryTypes == nil {
			d.QueryTypes = slices.Clone(defaultQueryTypes)
		}
	}
	if l := p.Spec.Limits; l != nil && *l == (LimitsSpec{}) {
		p.Spec.Limits = nil // "limits: {}" means the daemon's limits
	}
	p.Spec.Egress = nilIfEmpty(p.Spec.Egress)
	p.Spec.Volumes = nilIfEmpty(p.Spec.Volumes)
	if g := p.Spec.Governance; g != nil {
		if g.Consent == ConsentNone {
			g.Consent = "" // none is the default
		}
		if *g == (GovernanceSpec{}) {
			p.Spec.Governance = nil
		}
	}
	for i := range p.Spec.Egress {
		r := &p.Spec.Egress[i]
		for j := range r.To {
			d := &r.To[j]
			if pfx, problem := parseCIDR(d.CIDR); problem == "" {
				d.CIDR = pfx.String()
			}
			d.FQDN = normName(d.FQDN)
		}
		for j := range r.Ports {
			if r.Ports[j].Protocol == "" {
				r.Ports[j].Protocol = ProtoTCP.String()
			}
		}
		if r.Mode == ModeOpen.String() && r.Open == nil {
			r.Open = &OpenSpec{}
		}
		if o := r.Open; o != nil {
			if o.Protocol == "" {
				o.Protocol = "tcp"
			}
			if h := o.HTTP; h != nil {
				if h.MaxBodyBytes == nil {
					h.MaxBodyBytes = ptr(int64(DefaultMaxBodyBytes))
				}
				for k := range h.Rules {
					for m, ct := range h.Rules[k].ContentTypes {
						h.Rules[k].ContentTypes[m] = strings.ToLower(ct)
					}
				}
				h.DenyBodyPatterns = nilIfEmpty(h.DenyBodyPatterns)
				h.DenyPatterns = nilIfEmpty(h.DenyPatterns)
			}
			if pg := o.Postgres; pg != nil {
				if pg.UpstreamTLS != nil {
					pg.UpstreamTLS.normalize()
				}
				pg.Queries = nilIfEmpty(pg.Queries)
				if c := pg.Columns; c != nil {
					c.Deny = nilIfEmpty(c.Deny)
					if c.Deny == nil {
						pg.Columns = nil // "columns: {}" denies nothing
					}
				}
				if r := pg.Rows; r != nil && r.MaxRows == nil && r.MinCount == nil {
					pg.Rows = nil // "rows: {}" limits nothing
				}
			}
		}
		if t := r.Trusted; t != nil && t.TLS != nil {
			t.TLS.normalize()
		}
		if s := r.Secure; s != nil && s.UpstreamTLS != nil {
			s.UpstreamTLS.normalize()
		}
	}
}

func (t *TLSSpec) normalize() {
	t.ServerName = normName(t.ServerName)
	t.SPKISHA256 = nilIfEmpty(t.SPKISHA256)
}

func nilIfEmpty[S ~[]E, E any](s S) S {
	if len(s) == 0 {
		return nil
	}
	return s
}

func ptr[T any](v T) *T { return &v }

// Hash identifies what a policy means: the SHA-256 (lowercase hex) of the
// canonical JSON encoding of its normalised form. Formatting, comments,
// key order, name case and written-out defaults do not change it.
func (p *Policy) Hash() string {
	q := p.Clone()
	q.normalize()
	return q.digest()
}

// digest is the hash of p's canonical JSON encoding; p must be normalised.
func (p *Policy) digest() string {
	b, err := json.Marshal(p)
	if err != nil {
		// Only strings, integers, slices and structs: encoding cannot fail.
		panic("policy: encoding policy: " + err.Error())
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// Clone returns a deep copy of p.
func (p *Policy) Clone() *Policy {
	if p == nil {
		return nil
	}
	q := *p
	if d := p.Spec.DNS; d != nil {
		q.Spec.DNS = &DNSSpec{Upstream: d.Upstream, Allow: slices.Clone(d.Allow), QueryTypes: slices.Clone(d.QueryTypes)}
	}
	if l := p.Spec.Limits; l != nil {
		q.Spec.Limits = &LimitsSpec{TCPFlows: clonePtr(l.TCPFlows), UDPFlows: clonePtr(l.UDPFlows),
			NewFlowsPerSecond: clonePtr(l.NewFlowsPerSecond), DNSQueriesInFlight: clonePtr(l.DNSQueriesInFlight)}
	}
	q.Spec.Egress = slices.Clone(p.Spec.Egress)
	for i := range q.Spec.Egress {
		r := &q.Spec.Egress[i]
		r.To = slices.Clone(r.To)
		r.Ports = slices.Clone(r.Ports)
		if o := r.Open; o != nil {
			oc := *o
			if h := o.HTTP; h != nil {
				hc := *h
				hc.Rules = slices.Clone(h.Rules)
				for k := range hc.Rules {
					hr := &hc.Rules[k]
					hr.Methods = slices.Clone(hr.Methods)
					hr.Paths = slices.Clone(hr.Paths)
					hr.ContentTypes = slices.Clone(hr.ContentTypes)
				}
				hc.MaxBodyBytes = clonePtr(h.MaxBodyBytes)
				hc.DenyBodyPatterns = slices.Clone(h.DenyBodyPatterns)
				hc.DenyPatterns = slices.Clone(h.DenyPatterns)
				oc.HTTP = &hc
			}
			if t := o.TCP; t != nil {
				oc.TCP = &TCPSpec{MaxBytesOut: clonePtr(t.MaxBytesOut)}
			}
			if pg := o.Postgres; pg != nil {
				pc := *pg
				pc.UpstreamTLS = pg.UpstreamTLS.clone()
				pc.Queries = slices.Clone(pg.Queries)
				if c := pg.Columns; c != nil {
					pc.Columns = &PostgresColumns{Deny: slices.Clone(c.Deny)}
				}
				if r := pg.Rows; r != nil {
					pc.Rows = &PostgresRows{MaxRows: clonePtr(r.MaxRows), MinCount: clonePtr(r.MinCount)}
				}
				oc.Postgres = &pc
			}
			r.Open = &oc
		}
		if t := r.Trusted; t != nil {
			tc := *t
			tc.UpstreamPort = clonePtr(t.UpstreamPort)
			tc.TLS = t.TLS.clone()
			tc.HPKE = clonePtr(t.HPKE)
			r.Trusted = &tc
		}
		if s := r.Secure; s != nil {
			sc := *s
			sc.UpstreamTLS = s.UpstreamTLS.clone()
			r.Secure = &sc
		}
	}
	return &q
}

func (t *TLSSpec) clone() *TLSSpec {
	if t == nil {
		return nil
	}
	c := *t
	c.SPKISHA256 = slices.Clone(t.SPKISHA256)
	return &c
}

func clonePtr[T any](p *T) *T {
	if p == nil {
		return nil
	}
	v := *p
	return &v
}
