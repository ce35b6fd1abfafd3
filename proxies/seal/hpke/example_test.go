package hpke_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/cleanwall/cleanwall/proxies/seal/hpke"
)

// A trusted-mode proxy seals a request body to the customer's public key
// on its way out; the customer opens it with the private key.
func Example() {
	// The customer, once: a key pair; the public key file goes into the
	// policy, the private key file stays with the customer.
	priv, err := hpke.GenerateKey(hpke.SuiteXWing)
	if err != nil {
		panic(err)
	}
	publicKeyFile := priv.Public().Marshal()

	// The proxy: Content-Length first, then stream the body through a
	// Sealer.
	pub, err := hpke.ParsePublicKey(publicKeyFile)
	if err != nil {
		panic(err)
	}
	body := strings.Repeat("patient record\n", 10000)
	contentLength := hpke.SealedSize(int64(len(body)), pub)
	var upstream bytes.Buffer // the connection to the partner's server
	s, err := hpke.NewSealer(&upstream, pub, "rule=partner-crm")
	if err != nil {
		panic(err)
	}
	if _, err := io.Copy(s, strings.NewReader(body)); err != nil {
		panic(err)
	}
	if err := s.Close(); err != nil { // the final chunk
		panic(err)
	}
	fmt.Println("Content-Length matches:", int64(upstream.Len()) == contentLength)

	// The customer: only verified bytes come out, io.EOF only after the
	// final chunk.
	stored := upstream.Bytes()
	var plain bytes.Buffer
	if _, err := io.Copy(&plain, hpke.NewOpener(bytes.NewReader(stored), priv, "rule=partner-crm")); err != nil {
		panic(err) // discard what was written: the body ended badly
	}
	fmt.Println("round trip:", plain.String() == body)

	// A body cut at a chunk boundary is refused, not taken for a shorter one.
	cut := stored[:hpke.PrefixSize(hpke.SuiteXWing)+2*(hpke.ChunkSize+hpke.FrameOverhead)]
	_, err = hpke.Open(cut, priv, "rule=partner-crm")
	fmt.Println(errors.Is(err, hpke.ErrTruncated))
	// Output:
	// Content-Length matches: true
	// round trip: true
	// true
}
