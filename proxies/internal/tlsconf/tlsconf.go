// Package tlsconf reads the TLS settings an egress rule gives a proxy
// (policy.TLSSpec: secure.upstreamTLS, trusted.tls) into crypto/tls terms,
// and tells a remote's identity failing from the network failing. It is
// shared so that every mode reads a caFile and matches a spkiSHA256 pin
// alike; what a mode then trusts (system roots or none, whether a pin
// alone skips the name) stays in the mode's package. It holds no
// connection and never imports runtime, bpf or attest.
package tlsconf

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
)

// FieldError is a TLSSpec file that cannot be used; Field is its name
// relative to the TLSSpec ("caFile", "clientCertFile", "clientKeyFile"),
// for the caller to prefix with the spec's path.
type FieldError struct {
	Field string
	Err   error
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }
func (e *FieldError) Unwrap() error { return e.Err }

// LoadCA reads a PEM file of CA certificates. A file without a single
// certificate is an error: an empty pool would refuse every remote, which
// is never what a caFile means.
func LoadCA(file string) (*x509.CertPool, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, &FieldError{"caFile", err}
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, &FieldError{"caFile", fmt.Errorf("%s holds no PEM certificate", file)}
	}
	return pool, nil
}

// LoadKeyPair reads a client certificate (PEM, leaf first) and its
// private key; the error names the file at fault: the certificate file
// when it cannot be read or holds no certificate, else the key file (it
// cannot be read, holds no key, or the key is not the certificate's).
func LoadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return tls.Certificate{}, &FieldError{"clientCertFile", err}
	}
	if err := hasCertificate(certPEM); err != nil {
		return tls.Certificate{}, &FieldError{"clientCertFile", fmt.Errorf("%s: %w", certFile, err)}
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return tls.Certificate{}, &FieldError{"clientKeyFile", err}
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, &FieldError{"clientKeyFile", fmt.Errorf("%s: %w", keyFile, err)}
	}
	return pair, nil
}

// hasCertificate checks that data holds at least one PEM certificate and
// that every one parses.
func hasCertificate(data []byte) error {
	n := 0
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		if _, err := x509.ParseCertificate(b.Bytes); err != nil {
			return err
		}
		n++
	}
	if n == 0 {
		return errors.New("holds no PEM certificate")
	}
	return nil
}

// ErrPin is a remote none of whose certificates' public keys matches a
// spkiSHA256 pin.
var ErrPin = errors.New("no certificate's public key matches a spkiSHA256 pin")

// SPKIPin is cert's spkiSHA256 pin: the SHA-256 of its
// SubjectPublicKeyInfo.
func SPKIPin(cert *x509.Certificate) [sha256.Size]byte {
	return sha256.Sum256(cert.RawSubjectPublicKeyInfo)
}

// Pinned reports whether cert's public key matches one of pins.
func Pinned(pins [][sha256.Size]byte, cert *x509.Certificate) bool {
	sum := SPKIPin(cert)
	for _, p := range pins {
		if bytes.Equal(sum[:], p[:]) {
			return true
		}
	}
	return false
}

// IsVerifyError reports whether a handshake failed on the remote's
// identity (a pin, the chain, the name, the validity), as opposed to the
// network or the protocol.
func IsVerifyError(err error) bool {
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	return errors.Is(err, ErrPin) || errors.As(err, &cv) || errors.As(err, &ua) || errors.As(err, &hn) || errors.As(err, &ci)
}
