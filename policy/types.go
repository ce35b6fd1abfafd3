package policy

// The types below mirror docs/policy.md field for field. Parse fills them from
// YAML (the yaml tags are the field names of the language) and returns them
// normalised: defaults filled in, names lowercased, prefixes canonical (see
// the package documentation). The json tags define the canonical encoding
// that Hash digests; omitempty keeps hashes stable when optional fields are
// added to the language.

// APIVersion and Kind are the only values the v1 language accepts.
const (
	APIVersion = "cleanwall.dev/v1"
	Kind       = "EgressPolicy"
)

// Policy is one egress policy document.
type Policy struct {
	APIVersion string   `yaml:"apiVersion,omitempty" json:"apiVersion,omitempty"`
	Kind       string   `yaml:"kind,omitempty" json:"kind,omitempty"`
	Metadata   Metadata `yaml:"metadata,omitempty" json:"metadata"`
	Spec       Spec     `yaml:"spec,omitempty" json:"spec"`

	// lines maps field paths to the YAML line they were read from; nil for
	// a policy built in Go. Validation uses it to place errors.
	lines map[string]int
}

// Metadata names the policy.
type Metadata struct {
	Name string `yaml:"name,omitempty" json:"name,omitempty"`
}

// Spec holds the DNS and egress rules.
type Spec struct {
	// DNS nil means every DNS query from the sandbox is refused.
	DNS *DNSSpec `yaml:"dns,omitempty" json:"dns,omitempty"`
	// Egress empty means every flow is dropped.
	Egress []EgressRule `yaml:"egress,omitempty" json:"egress,omitempty"`
	// Limits lower the node daemon's per-sandbox limits for this sandbox;
	// nil means the daemon's limits. A value above the daemon's is
	// allowed and has no effect: a policy can only lower a limit.
	Limits *LimitsSpec `yaml:"limits,omitempty" json:"limits,omitempty"`
	// Volumes are encrypted data stores shown to the sandbox as files or
	// as a block device; the store on the node holds only ciphertext.
	Volumes []Volume `yaml:"volumes,omitempty" json:"volumes,omitempty"`
	// Governance nil means no consent is asked.
	Governance *GovernanceSpec `yaml:"governance,omitempty" json:"governance,omitempty"`
}

// Volume kinds.
const (
	VolumeFiles = "files"
	VolumeBlock = "block"
)

// Volume is one encrypted volume (docs/volumes.md).
type Volume struct {
	// Name is a DNS label, unique in the policy.
	Name string `yaml:"name,omitempty" json:"name,omitempty"`
	// Kind is files (a directory of per-file encrypted items) or block (a
	// fixed-size image encrypted per 4 KiB sector).
	Kind string `yaml:"kind,omitempty" json:"kind,omitempty"`
	// Store is the absolute path on the node of the backing directory
	// (files) or image file (block).
	Store string `yaml:"store,omitempty" json:"store,omitempty"`
	// SizeBytes is the block image's size, a positive multiple of 4096;
	// block only.
	SizeBytes int64 `yaml:"sizeBytes,omitempty" json:"sizeBytes,omitempty"`
	// KeyID names the key the key broker releases after attestation.
	KeyID string `yaml:"keyID,omitempty" json:"keyID,omitempty"`
	// ReadOnly mounts the volume read-only.
	ReadOnly bool `yaml:"readOnly,omitempty" json:"readOnly,omitempty"`
	// Path is where the sandbox sees it: a directory (files) or a block
	// device node (block); absolute.
	Path string `yaml:"path,omitempty" json:"path,omitempty"`
}

// Consent values.
const (
	ConsentNone     = "none"
	ConsentRequired = "required"
)

// GovernanceSpec configures the governance hooks (GOVERNANCE.md).
type GovernanceSpec struct {
	// Consent is required or none (the default, normalised to "").
	Consent string `yaml:"consent,omitempty" json:"consent,omitempty"`
}

// ConsentRequired reports whether the policy needs consent.
func (p *Policy) ConsentRequired() bool {
	return p.Spec.Governance != nil && p.Spec.Governance.Consent == ConsentRequired
}

// LimitsSpec bounds what one sandbox may take of the node's proxies.
// Each field is optional (nil: the daemon's limit). Over a limit, a new
// flow is refused and counted; established flows are unaffected.
type LimitsSpec struct {
	// TCPFlows bounds the sandbox's concurrent TCP flows (open tcp and
	// http rules alike).
	TCPFlows *int `yaml:"tcpFlows,omitempty" json:"tcpFlows,omitempty"`
	// UDPFlows bounds its concurrent UDP flows.
	UDPFlows *int `yaml:"udpFlows,omitempty" json:"udpFlows,omitempty"`
	// NewFlowsPerSecond bounds the rate of new TCP and UDP flows (a token
	// bucket holding twice the rate).
	NewFlowsPerSecond *int `yaml:"newFlowsPerSecond,omitempty" json:"newFlowsPerSecond,omitempty"`
	// DNSQueriesInFlight bounds the DNS queries being answered at once.
	DNSQueriesInFlight *int `yaml:"dnsQueriesInFlight,omitempty" json:"dnsQueriesInFlight,omitempty"`
}

// DNSSpec governs the DNS proxy.
type DNSSpec struct {
	// Upstream is ip:port; a bare IP means port 53 (normalised to ip:port).
	Upstream string `yaml:"upstream,omitempty" json:"upstream,omitempty"`
	// Allow lists exact names or "*." + suffix (one or more labels before
	// the suffix); normalised lowercase without a trailing dot.
	Allow []string `yaml:"allow,omitempty" json:"allow,omitempty"`
	// QueryTypes are RR type names; absent means A, AAAA, CNAME (filled in).
	QueryTypes []string `yaml:"queryTypes,omitempty" json:"queryTypes,omitempty"`
}

// EgressRule opens destinations and ports to one proxy mode.
type EgressRule struct {
	Name    string        `yaml:"name,omitempty" json:"name,omitempty"`
	To      []Destination `yaml:"to,omitempty" json:"to,omitempty"`
	Ports   []PortSpec    `yaml:"ports,omitempty" json:"ports,omitempty"`
	Mode    string        `yaml:"mode,omitempty" json:"mode,omitempty"` // open | trusted | secure
	Open    *OpenSpec     `yaml:"open,omitempty" json:"open,omitempty"`
	Trusted *TrustedSpec  `yaml:"trusted,omitempty" json:"trusted,omitempty"`
	Secure  *SecureSpec   `yaml:"secure,omitempty" json:"secure,omitempty"`
}

// Destination is exactly one of CIDR or FQDN.
type Destination struct {
	CIDR string `yaml:"cidr,omitempty" json:"cidr,omitempty"`
	FQDN string `yaml:"fqdn,omitempty" json:"fqdn,omitempty"`
}

// PortSpec is one destination port.
type PortSpec struct {
	Port     int    `yaml:"port,omitempty" json:"port,omitempty"`
	Protocol string `yaml:"protocol,omitempty" json:"protocol,omitempty"` // TCP (default, filled in) | UDP
}

// OpenSpec configures mode open. A rule with mode open and no open block
// gets an OpenSpec with protocol tcp.
type OpenSpec struct {
	Protocol string        `yaml:"protocol,omitempty" json:"protocol,omitempty"` // http | tcp (default, filled in) | postgres | an extension's name
	HTTP     *HTTPSpec     `yaml:"http,omitempty" json:"http,omitempty"`         // only with protocol http
	TCP      *TCPSpec      `yaml:"tcp,omitempty" json:"tcp,omitempty"`           // with any protocol: a per-connection budget
	Postgres *PostgresSpec `yaml:"postgres,omitempty" json:"postgres,omitempty"` // only (and required) with protocol postgres
}

// PostgresSpec is the PostgreSQL privacy proxy of an open rule: the
// sandbox speaks PostgreSQL to it, it logs in upstream with credentials the
// sandbox never sees and runs only the listed statements.
type PostgresSpec struct {
	// Database is the upstream database the proxy connects to, whatever
	// the sandbox asks for.
	Database string `yaml:"database,omitempty" json:"database,omitempty"`
	// UpstreamUserFile and UpstreamPasswordFile hold the upstream login.
	UpstreamUserFile     string `yaml:"upstreamUserFile,omitempty" json:"upstreamUserFile,omitempty"`
	UpstreamPasswordFile string `yaml:"upstreamPasswordFile,omitempty" json:"upstreamPasswordFile,omitempty"`
	// UpstreamTLS nil means plaintext upstream; same fields as trusted.tls.
	UpstreamTLS *TLSSpec `yaml:"upstreamTLS,omitempty" json:"upstreamTLS,omitempty"`
	// Queries are the only statements that run; literals and $n
	// parameters may differ (matched by parsed fingerprint).
	Queries []PostgresQuery  `yaml:"queries,omitempty" json:"queries,omitempty"`
	Columns *PostgresColumns `yaml:"columns,omitempty" json:"columns,omitempty"`
	Rows    *PostgresRows    `yaml:"rows,omitempty" json:"rows,omitempty"`
}

// PostgresQuery is one allowed statement.
type PostgresQuery struct {
	Name string `yaml:"name,omitempty" json:"name,omitempty"`
	SQL  string `yaml:"sql,omitempty" json:"sql,omitempty"`
}

// PostgresColumns are column rules: a result column named in Deny fails
// its statement.
type PostgresColumns struct {
	Deny []string `yaml:"deny,omitempty" json:"deny,omitempty"`
}

// PostgresRows are row rules of every statement.
type PostgresRows struct {
	// MaxRows nil means no limit; a statement fails past it.
	MaxRows *int64 `yaml:"maxRows,omitempty" json:"maxRows,omitempty"`
	// MinCount nil withholds nothing.
	MinCount *PostgresMinCount `yaml:"minCount,omitempty" json:"minCount,omitempty"`
}

// PostgresMinCount withholds result rows whose Column is below AtLeast
// (k-anonymity for aggregates).
type PostgresMinCount struct {
	Column  string `yaml:"column,omitempty" json:"column,omitempty"`
	AtLeast int64  `yaml:"atLeast,omitempty" json:"atLeast,omitempty"`
}

// DefaultMaxBodyBytes is the request body limit of open HTTP rules that do
// not set maxBodyBytes.
const DefaultMaxBodyBytes = 1 << 20

// HTTPSpec is the request filter of an open HTTP rule.
type HTTPSpec struct {
	// Rules: a request must match at least one.
	Rules []HTTPRule `yaml:"rules,omitempty" json:"rules,omitempty"`
	// MaxBodyBytes bounds a request body; 0 allows no body at all.
	// Absent means DefaultMaxBodyBytes (filled in).
	MaxBodyBytes *int64 `yaml:"maxBodyBytes,omitempty" json:"maxBodyBytes,omitempty"`
	// DenyBodyPatterns are RE2 expressions; a body that matches one is refused.
	DenyBodyPatterns []string `yaml:"denyBodyPatterns,omitempty" json:"denyBodyPatterns,omitempty"`
	// DenyPatterns are RE2 expressions matched against the whole request:
	// the decoded path and query, every header value and the decoded body.
	DenyPatterns []string `yaml:"denyPatterns,omitempty" json:"denyPatterns,omitempty"`
}

// HTTPRule matches a request when its method, path and (for a request with
// a body) content type each match one of the listed values.
type HTTPRule struct {
	Methods []string `yaml:"methods,omitempty" json:"methods,omitempty"`
	// Paths: "*" matches one segment, "**" (last segment only) any rest.
	Paths []string `yaml:"paths,omitempty" json:"paths,omitempty"`
	// ContentTypes are type/subtype, lowercase, without parameters. Absent
	// means any content type.
	ContentTypes []string `yaml:"contentTypes,omitempty" json:"contentTypes,omitempty"`
}

// TCPSpec bounds a connection of an open rule.
type TCPSpec struct {
	// MaxBytesOut is the budget of bytes the sandbox may send per
	// connection; nil means no budget.
	MaxBytesOut *int64 `yaml:"maxBytesOut,omitempty" json:"maxBytesOut,omitempty"`
}

// TrustedSpec configures mode trusted: TLS originated by the proxy and/or
// HTTP request bodies sealed with HPKE.
type TrustedSpec struct {
	// UpstreamPort nil means the port the sandbox connected to.
	UpstreamPort *int     `yaml:"upstreamPort,omitempty" json:"upstreamPort,omitempty"`
	TLS          *TLSSpec `yaml:"tls,omitempty" json:"tls,omitempty"`
	// HPKE makes the flow HTTP: the proxy parses the sandbox's requests
	// and seals their bodies to the key.
	HPKE *HPKESpec `yaml:"hpke,omitempty" json:"hpke,omitempty"`
}

// TLSSpec is TLS originated by a proxy towards the upstream.
type TLSSpec struct {
	// ServerName is the SNI and the name verified in the certificate.
	// Required in trusted.tls; in secure.upstreamTLS it defaults to the fqdn
	// the flow matched (for a cidr destination: the IP address).
	ServerName string `yaml:"serverName,omitempty" json:"serverName,omitempty"`
	// CAFile and SPKISHA256 pin the upstream. In secure.upstreamTLS with
	// neither, the proxy's system roots verify the upstream.
	CAFile     string   `yaml:"caFile,omitempty" json:"caFile,omitempty"`
	SPKISHA256 []string `yaml:"spkiSHA256,omitempty" json:"spkiSHA256,omitempty"`
	// ClientCertFile and ClientKeyFile (both or neither) enable mTLS.
	ClientCertFile string `yaml:"clientCertFile,omitempty" json:"clientCertFile,omitempty"`
	ClientKeyFile  string `yaml:"clientKeyFile,omitempty" json:"clientKeyFile,omitempty"`
	// MinVersion is the oldest TLS version accepted, "1.2" or "1.3" (a
	// cleanwall addition to v1). Default: 1.3 in trusted.tls; 1.2 in
	// secure.upstreamTLS, whose payload is sealed anyway.
	MinVersion string `yaml:"minVersion,omitempty" json:"minVersion,omitempty"`
}

// HPKESpec names the customer's HPKE public key.
type HPKESpec struct {
	PublicKeyFile string `yaml:"publicKeyFile,omitempty" json:"publicKeyFile,omitempty"`
}

// SecureSpec configures mode secure.
type SecureSpec struct {
	// KeyID names the key the key broker releases after attestation.
	KeyID string `yaml:"keyID,omitempty" json:"keyID,omitempty"`
	// Protocol is required: http seals bodies per object, tcp seals the
	// stream.
	Protocol    string   `yaml:"protocol,omitempty" json:"protocol,omitempty"`
	UpstreamTLS *TLSSpec `yaml:"upstreamTLS,omitempty" json:"upstreamTLS,omitempty"`
}
