package trusted

import (
	"fmt"
	"os"
	"time"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies/seal/hpke"
)

// Context is the HPKE context request bodies of trusted rule rule are
// sealed under (bound into the HPKE key schedule; its digest is in every
// body's prefix): the same "rule=R dir=out" grammar as secure mode's
// contexts, so that a body sealed for one rule never passes for
// another's. docs/trusted.md gives it to recipients that check it.
func Context(rule string) string { return "rule=" + rule + " dir=out" }

// SealedHeader is the request field that says a body is sealed, and its
// value: the format and its version (docs/sealing.md, "Trusted mode:
// HPKE"). The body's prefix names the suite and the recipient's key.
const (
	SealedHeader = "Cleanwall-Sealed"
	SealedValue  = "hpke-v1"
)

// hpkeRule is a rule's trusted.hpke: the customer's public key, watched
// like the TLS files. A key file that stops parsing fails closed: a key
// may be replaced because its private half leaked, and a body must never
// be sealed to a key the customer withdrew; the rule's requests with a
// body are refused (hpke-key) until it loads.
type hpkeRule struct {
	key     *watched[*hpke.PublicKey]
	context string
}

func loadHPKE(h *policy.HPKESpec, rule string, reload time.Duration) (*hpkeRule, error) {
	if h.PublicKeyFile == "" {
		return nil, fmt.Errorf("publicKeyFile: required")
	}
	file := h.PublicKeyFile
	w := &watched[*hpke.PublicKey]{files: []string{file}, every: reload, load: func() (*hpke.PublicKey, error) {
		data, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		k, err := hpke.ParsePublicKey(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		return k, nil
	}}
	if err := w.start(); err != nil {
		return nil, fmt.Errorf("publicKeyFile: %w", err)
	}
	return &hpkeRule{key: w, context: Context(rule)}, nil
}
