package keys

import (
	"crypto/x509"
	"fmt"
	"os"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/simulated"
	"github.com/cleanwall/cleanwall/attest/snp/guest"
)

// BrokerFromFlags builds a BrokerConfig from the --keybroker, --broker-ca
// and --attestation flags of cleanwalld and `cleanwall run`: the broker's
// URL, a PEM file of the CAs its certificate chains to (empty: the system
// roots), and the evidence: snp (the SEV-SNP guest device) or simulated
// (the labelled fake, which only a broker allowing simulated evidence
// trusts).
func BrokerFromFlags(url, caFile, attestation string) (*BrokerConfig, error) {
	var roots *x509.CertPool
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("--broker-ca: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--broker-ca %s: no PEM certificate in it", caFile)
		}
	}
	var a attest.Attester
	switch attestation {
	case "snp":
		g, err := guest.New()
		if err != nil {
			return nil, fmt.Errorf("--attestation snp: %w (on a machine without SEV-SNP, only --attestation simulated works, and only with a broker that allows simulated evidence)", err)
		}
		a = g
	case "simulated":
		s, err := simulated.New(simulated.DefaultConfig())
		if err != nil {
			return nil, err
		}
		a = s
	default:
		return nil, fmt.Errorf("--attestation %q: want snp or simulated", attestation)
	}
	return &BrokerConfig{URL: url, Roots: roots, Attester: a}, nil
}
