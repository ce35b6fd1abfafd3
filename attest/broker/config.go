package broker

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/broker/keystore"
	"github.com/cleanwall/cleanwall/attest/simulated/simroots"
	"github.com/cleanwall/cleanwall/attest/snp"
)

// Config is the broker's configuration file (docs/keybroker.md §4). Members
// marked "extension" are not in docs/keybroker.md; each is optional and has the
// default it documents.
type Config struct {
	Listen            string         `yaml:"listen"`
	TLS               TLSConfig      `yaml:"tls"`
	AllowSimulatedTEE bool           `yaml:"allowSimulatedTEE"`
	KeyStore          KeyStoreConfig `yaml:"keyStore"`
	Keys              []KeyConfig    `yaml:"keys"`

	// AuditLog is the audit log file (extension); <keyStore.dir>/audit.jsonl if empty.
	AuditLog string `yaml:"auditLog"`
	// ReleaseValidity is how long after a release its notAfter lies
	// (extension); 1h if zero.
	ReleaseValidity time.Duration `yaml:"releaseValidity"`
	// Challenges tunes challenges and the replay protection (extension).
	Challenges ChallengeConfig `yaml:"challenges"`
	// SimulatedProductLines lists the AMD product lines (Milan, Genoa,
	// Turin) whose simulated roots are trusted when allowSimulatedTEE is
	// set (extension); every line go-sev-guest knows if absent. Simulated
	// evidence from another line is refused as untrusted-root.
	SimulatedProductLines []string `yaml:"simulatedProductLines"`
	// Verification tunes the AMD chain checks for real evidence (extension).
	Verification VerificationConfig `yaml:"verification"`

	// Release holds each key's release policy, built and checked by Load.
	Release map[string][]snp.ReferenceValues `yaml:"-"`
}

// TLSConfig names the broker's certificate and key (PEM).
type TLSConfig struct {
	CertFile string `yaml:"certFile"`
	KeyFile  string `yaml:"keyFile"`
}

// KeyStoreConfig locates the sealed keys and the master key.
type KeyStoreConfig struct {
	Dir           string `yaml:"dir"`
	MasterKeyFile string `yaml:"masterKeyFile"`
}

// KeyConfig is one releasable key.
type KeyConfig struct {
	ID      string        `yaml:"id"`
	Release ReleaseConfig `yaml:"release"`
}

// ReleaseConfig is a key's release policy.
type ReleaseConfig struct {
	AnyOf []PolicyEntry `yaml:"anyOf"`
}

// PolicyEntry is one complete reference set. Every member is a pointer so
// that a missing member is told apart from a zero one: every member is
// required, none means "unchecked" — except egressPolicies (docs/keybroker.md
// §5), whose absence means the key is not bound to an egress policy.
type PolicyEntry struct {
	TEE             *string    `yaml:"tee"`
	Measurements    *[]string  `yaml:"measurements"`
	HostData        *string    `yaml:"hostData"`
	MinimumTCB      *TCBConfig `yaml:"minimumTCB"`
	MinimumFirmware *string    `yaml:"minimumFirmware"`
	Debug           *bool      `yaml:"debug"`
	VMPL            *int       `yaml:"vmpl"`
	AllowedChipIDs  *[]string  `yaml:"allowedChipIDs"`
	// EgressPolicies lists the egress policy hashes (`cleanwall policy hash
	// FILE`) of the sandboxes the key may be released to; a release that
	// carries no policySHA256 or another one fails this entry. It is a node
	// so that "egressPolicies:" with nothing after it (null) is an error
	// rather than "no binding", which only leaving the member out means.
	EgressPolicies yaml.Node `yaml:"egressPolicies"`
}

// TCBConfig is a minimum TCB; every component is required.
type TCBConfig struct {
	Bootloader *int `yaml:"bootloader"`
	TEE        *int `yaml:"tee"`
	SNP        *int `yaml:"snp"`
	Microcode  *int `yaml:"microcode"`
}

// ChallengeConfig tunes challenges. Challenges are stateless (a MAC'd
// session that carries its own expiry), so nothing bounds how many are
// outstanding; what is bounded is the set of used sessions kept until they
// expire, so that none can be replayed.
type ChallengeConfig struct {
	// TTL is a nonce's lifetime; 60s if zero.
	TTL time.Duration `yaml:"ttl"`
	// MaxUsed bounds the used sessions kept until they expire; if zero,
	// 200000 per minute of ttl (at least 200000), see DefaultMaxUsed. A session takes room only once its release's evidence verified,
	// so only attested clients fill it; when it is full of unexpired
	// sessions, releases are answered 503 unavailable until the oldest
	// expires (a used session is never forgotten early).
	MaxUsed int `yaml:"maxUsed"`
	// AuditInterval is how often the challenge tally is written: one audit
	// record per interval that had challenges; 10s if zero.
	AuditInterval time.Duration `yaml:"auditInterval"`
	// MaxOutstanding is refused: it capped the live challenges of the old
	// nonce store, which a flood filled for everyone.
	MaxOutstanding *int `yaml:"maxOutstanding"`
}

// VerificationConfig tunes the checks of real (non-simulated) evidence.
type VerificationConfig struct {
	// CheckRevocations fetches AMD's CRL (cached) and refuses revoked
	// chains; true if absent. Without network access to AMD it refuses
	// every release, so it can be turned off.
	CheckRevocations *bool `yaml:"checkRevocations"`
	// FetchCertificates fetches certificates missing from evidence from
	// AMD's KDS (cached); true if absent.
	FetchCertificates *bool `yaml:"fetchCertificates"`
}

// Defaults of the extension members.
const (
	DefaultReleaseValidity = time.Hour
	DefaultChallengeTTL    = 60 * time.Second
	// DefaultMaxUsed holds every session a broker can consume within one
	// default TTL, so the set is not full in practice: a session is
	// consumed only once its evidence verified, measured at 560-910
	// verifications per second per core on our 2-core machine
	// (TestUsedSessionSizing; a whole release round trip, with its fsynced
	// audit record, about 335 per second), and 200000 covers 3333 per
	// second for 60 s in about 10 MiB (52 bytes per session). With a longer
	// ttl the default grows in proportion.
	DefaultMaxUsed            = 200000
	DefaultChallengeAuditEach = 10 * time.Second
)

// FieldError is one problem in a configuration, located by its path
// (keys[0].release.anyOf[0].minimumTCB).
type FieldError struct {
	Path string
	Msg  string
}

func (e *FieldError) Error() string { return e.Path + ": " + e.Msg }

// LoadConfig reads and checks a configuration file. Relative file names in
// it are relative to the file's directory.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	cfg.resolve(filepath.Dir(path))
	return cfg, nil
}

// ParseConfig decodes a configuration strictly (unknown members are errors)
// and checks it; the error joins one *FieldError per problem.
func ParseConfig(data []byte) (*Config, error) {
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("empty configuration")
		}
		return nil, fmt.Errorf("decoding: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("decoding: more than one YAML document")
	}
	if err := cfg.check(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

func (c *Config) resolve(dir string) {
	for _, p := range []*string{&c.TLS.CertFile, &c.TLS.KeyFile, &c.KeyStore.Dir, &c.KeyStore.MasterKeyFile, &c.AuditLog} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
}

func (c *Config) check() error {
	var errs []error
	fail := func(path, format string, args ...any) {
		errs = append(errs, &FieldError{Path: path, Msg: fmt.Sprintf(format, args...)})
	}
	required := func(path, v string) {
		if v == "" {
			fail(path, "required")
		}
	}
	required("listen", c.Listen)
	required("tls.certFile", c.TLS.CertFile)
	required("tls.keyFile", c.TLS.KeyFile)
	required("keyStore.dir", c.KeyStore.Dir)
	required("keyStore.masterKeyFile", c.KeyStore.MasterKeyFile)
	if c.ReleaseValidity < 0 {
		fail("releaseValidity", "negative")
	}
	if c.Challenges.TTL < 0 {
		fail("challenges.ttl", "negative")
	}
	if c.Challenges.MaxUsed < 0 {
		fail("challenges.maxUsed", "negative")
	}
	if c.Challenges.AuditInterval < 0 {
		fail("challenges.auditInterval", "negative")
	}
	if c.Challenges.MaxOutstanding != nil {
		fail("challenges.maxOutstanding", "no longer supported: challenges are stateless; the used sessions are bounded by challenges.maxUsed")
	}
	for i, line := range c.SimulatedProductLines {
		if !slices.Contains(simroots.ProductLines, line) {
			fail(fmt.Sprintf("simulatedProductLines[%d]", i), "%q: want one of %s", line, strings.Join(simroots.ProductLines, ", "))
		}
	}
	if c.SimulatedProductLines != nil && len(c.SimulatedProductLines) == 0 {
		fail("simulatedProductLines", "empty: leave it out to trust every product line's simulated roots, or set allowSimulatedTEE: false")
	}
	if len(c.Keys) == 0 {
		fail("keys", "at least one key required")
	}
	c.Release = map[string][]snp.ReferenceValues{}
	for i, k := range c.Keys {
		kp := fmt.Sprintf("keys[%d]", i)
		switch {
		case k.ID == "":
			fail(kp+".id", "required")
		case !keystore.ValidKeyID(k.ID):
			fail(kp+".id", "%q: 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit", k.ID)
		case c.Release[k.ID] != nil:
			fail(kp+".id", "%q appears twice", k.ID)
		}
		if len(k.Release.AnyOf) == 0 {
			fail(kp+".release.anyOf", "at least one entry required")
		}
		var refs []snp.ReferenceValues
		for j, e := range k.Release.AnyOf {
			ref, entryErrs := e.compile(fmt.Sprintf("%s.release.anyOf[%d]", kp, j))
			errs = append(errs, entryErrs...)
			refs = append(refs, ref)
		}
		if k.ID != "" && c.Release[k.ID] == nil {
			c.Release[k.ID] = refs
		}
	}
	return errors.Join(errs...)
}

func (e PolicyEntry) compile(path string) (snp.ReferenceValues, []error) {
	var errs []error
	fail := func(member, format string, args ...any) {
		errs = append(errs, &FieldError{Path: path + "." + member, Msg: fmt.Sprintf(format, args...)})
	}
	var ref snp.ReferenceValues
	switch {
	case e.TEE == nil:
		fail("tee", "required")
	case *e.TEE != attest.TEESNP:
		fail("tee", "%q: only %q is supported", *e.TEE, attest.TEESNP)
	}
	if e.Measurements == nil {
		fail("measurements", "required")
	} else if len(*e.Measurements) == 0 {
		fail("measurements", "at least one measurement required")
	} else {
		for i, m := range *e.Measurements {
			b, err := hexField(m, 48)
			if err != nil {
				fail(fmt.Sprintf("measurements[%d]", i), "%v", err)
			}
			ref.Measurements = append(ref.Measurements, b)
		}
	}
	if e.HostData == nil {
		fail("hostData", "required")
	} else if b, err := hexField(*e.HostData, 32); err != nil {
		fail("hostData", "%v", err)
	} else {
		ref.HostData = b
	}
	if e.MinimumTCB == nil {
		fail("minimumTCB", "required")
	} else {
		t := e.MinimumTCB
		for _, c := range []struct {
			name string
			v    *int
			max  int
			into *uint8
		}{
			{"bootloader", t.Bootloader, 127, &ref.MinimumTCB.Bootloader},
			{"tee", t.TEE, 127, &ref.MinimumTCB.TEE},
			{"snp", t.SNP, 127, &ref.MinimumTCB.SNP},
			{"microcode", t.Microcode, 255, &ref.MinimumTCB.Microcode},
		} {
			switch {
			case c.v == nil:
				fail("minimumTCB."+c.name, "required")
			case *c.v < 0 || *c.v > c.max:
				fail("minimumTCB."+c.name, "%d: want 0-%d", *c.v, c.max)
			default:
				*c.into = uint8(*c.v)
			}
		}
	}
	if e.MinimumFirmware == nil {
		fail("minimumFirmware", "required")
	} else if f, err := snp.ParseFirmware(*e.MinimumFirmware); err != nil {
		fail("minimumFirmware", "%v", err)
	} else {
		ref.MinimumFirmware = f
	}
	if e.Debug == nil {
		fail("debug", "required")
	} else {
		ref.Debug = *e.Debug
	}
	switch {
	case e.VMPL == nil:
		fail("vmpl", "required")
	case *e.VMPL < 0 || *e.VMPL > 3:
		fail("vmpl", "%d: want 0-3", *e.VMPL)
	default:
		ref.VMPL = *e.VMPL
	}
	if e.AllowedChipIDs == nil {
		fail("allowedChipIDs", "required (an empty list allows any chip)")
	} else {
		for i, c := range *e.AllowedChipIDs {
			b, err := hexField(c, 64)
			if err != nil {
				fail(fmt.Sprintf("allowedChipIDs[%d]", i), "%v", err)
			}
			ref.AllowedChipIDs = append(ref.AllowedChipIDs, b)
		}
	}
	if n := e.EgressPolicies; n.Kind != 0 { // 0: the member is absent, no binding
		switch {
		case n.Kind != yaml.SequenceNode:
			fail("egressPolicies", "want a list of egress policy hashes (leave the member out for no egress-policy binding)")
		case len(n.Content) == 0:
			fail("egressPolicies", "empty: no sandbox could ever get the key; leave the member out for no egress-policy binding")
		}
		ref.EgressPolicies = [][]byte{}
		for i, item := range n.Content {
			var b []byte
			var err error
			if item.Kind != yaml.ScalarNode || item.ShortTag() == "!!null" {
				err = errors.New("want a hash")
			} else {
				// The text as written: a hash that happens to look like a
				// number must not go through YAML's number parsing.
				b, err = attest.ParsePolicySHA256(item.Value)
			}
			if err != nil {
				fail(fmt.Sprintf("egressPolicies[%d]", i), "%v (the hash `cleanwall policy hash FILE` prints)", err)
			}
			ref.EgressPolicies = append(ref.EgressPolicies, b)
		}
	}
	if len(errs) == 0 {
		if err := ref.Check(); err != nil {
			errs = append(errs, &FieldError{Path: path, Msg: err.Error()})
		}
	}
	return ref, errs
}

func hexField(s string, size int) ([]byte, error) {
	if len(s) != 2*size {
		return nil, fmt.Errorf("%d hex characters, want %d", len(s), 2*size)
	}
	b, err := hex.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("not hex: %v", err)
	}
	return b, nil
}

func (c *Config) auditLogPath() string {
	if c.AuditLog != "" {
		return c.AuditLog
	}
	return filepath.Join(c.KeyStore.Dir, "audit.jsonl")
}

func (c *Config) releaseValidity() time.Duration {
	if c.ReleaseValidity == 0 {
		return DefaultReleaseValidity
	}
	return c.ReleaseValidity
}

func (c *Config) checkRevocations() bool {
	return c.Verification.CheckRevocations == nil || *c.Verification.CheckRevocations
}

func (c *Config) fetchCertificates() bool {
	return c.Verification.FetchCertificates == nil || *c.Verification.FetchCertificates
}

func (c *Config) challengeTTL() time.Duration {
	if c.Challenges.TTL == 0 {
		return DefaultChallengeTTL
	}
	return c.Challenges.TTL
}

func (c *Config) maxUsed() int {
	if c.Challenges.MaxUsed != 0 {
		return c.Challenges.MaxUsed
	}
	// Sized from rate × lifetime: DefaultMaxUsed per DefaultChallengeTTL.
	scaled := int(math.Ceil(float64(DefaultMaxUsed) * c.challengeTTL().Seconds() / DefaultChallengeTTL.Seconds()))
	return max(DefaultMaxUsed, scaled)
}

func (c *Config) challengeAuditInterval() time.Duration {
	if c.Challenges.AuditInterval == 0 {
		return DefaultChallengeAuditEach
	}
	return c.Challenges.AuditInterval
}
