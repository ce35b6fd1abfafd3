package client

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cleanwall/cleanwall/attest"
)

// fakeAttester returns the report data as "evidence", so the fake broker
// can seal to what the client bound.
type fakeAttester struct{}

func (fakeAttester) TEE() string     { return "snp" }
func (fakeAttester) Simulated() bool { return true }
func (fakeAttester) Evidence(_ context.Context, rd [64]byte) ([]byte, error) {
	return rd[:], nil
}

var key = bytes.Repeat([]byte{0x42}, attest.KeySize)

// fakeBroker speaks the protocol; release lets a test break the answer.
func fakeBroker(t *testing.T, release func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte)) (*httptest.Server, *x509.CertPool) {
	t.Helper()
	nonce := bytes.Repeat([]byte{7}, attest.NonceSize)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		switch r.URL.Path {
		case "/v1/challenge":
			req, err := attest.DecodeChallengeRequest(body)
			if err != nil {
				t.Errorf("client sent a bad challenge: %v", err)
			}
			if req.KeyID == "missing" {
				w.WriteHeader(http.StatusNotFound)
				w.Write([]byte(`{"error":"unknown-key","detail":"no key \"missing\""}`))
				return
			}
			json.NewEncoder(w).Encode(attest.ChallengeResponse{Session: "s1", Nonce: nonce, ExpiresAt: time.Now().Add(time.Minute)})
		case "/v1/release":
			req, err := attest.DecodeReleaseRequest(body)
			if err != nil {
				t.Errorf("client sent a bad release: %v", err)
			}
			release(w, req, nonce)
		}
	}))
	t.Cleanup(srv.Close)
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	return srv, pool
}

func sealFor(t *testing.T, req attest.ReleaseRequest, nonce []byte) []byte {
	t.Helper()
	rd, err := req.ReportData(nonce)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(req.Evidence, rd[:]) {
		t.Errorf("client's evidence does not bind its nonce, KEM, key, key id and policy hash")
	}
	sealed, err := attest.SealKey(req.KEMID, req.PublicKey, rd, key)
	if err != nil {
		t.Fatal(err)
	}
	return sealed
}

func TestRelease(t *testing.T) {
	srv, pool := fakeBroker(t, func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte) {
		json.NewEncoder(w).Encode(attest.ReleaseResponse{KeyID: req.KeyID, Version: 4, Sealed: sealFor(t, req, nonce), NotAfter: time.Unix(2e9, 0)})
	})
	for _, kem := range []uint16{attest.KEMX25519, attest.KEMMLKEM768X25519} {
		c := New(srv.URL, pool, fakeAttester{})
		c.KEMID = kem
		k, err := c.Release(context.Background(), "egress-dek")
		if err != nil {
			t.Fatal(err)
		}
		if k.ID != "egress-dek" || k.Version != 4 || !bytes.Equal(k.Bytes, key) || !k.NotAfter.Equal(time.Unix(2e9, 0)) ||
			!k.Evidence.Simulated || k.Evidence.Session != "s1" {
			t.Fatalf("key %+v", k)
		}
	}
	// A broker whose certificate is not in the pool is not talked to.
	if _, err := New(srv.URL, x509.NewCertPool(), fakeAttester{}).Release(context.Background(), "egress-dek"); err == nil {
		t.Fatal("released from an untrusted broker")
	}
}

func TestReleaseWithPolicy(t *testing.T) {
	const policy = "E5A75CE4ACC5B9B2601B9B07F87DE1B174C2442E6AEA8B4865BABE687CD1C2BF"
	var mu sync.Mutex
	var sent []attest.ReleaseRequest
	srv, pool := fakeBroker(t, func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte) {
		mu.Lock()
		sent = append(sent, req)
		mu.Unlock()
		json.NewEncoder(w).Encode(attest.ReleaseResponse{KeyID: req.KeyID, Version: 1, Sealed: sealFor(t, req, nonce)})
	})
	c := New(srv.URL, pool, fakeAttester{})
	k, err := c.ReleaseWith(context.Background(), "egress-dek", ReleaseOptions{PolicySHA256: policy})
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	lower := strings.ToLower(policy)
	if len(sent) != 1 || sent[0].PolicySHA256 != lower || k.Evidence.PolicySHA256 != lower || !bytes.Equal(k.Bytes, key) {
		t.Fatalf("sent %+v, key %+v", sent, k)
	}
	h, _ := hex.DecodeString(lower)
	nonce := bytes.Repeat([]byte{7}, attest.NonceSize)
	if k.Evidence.ReportData != attest.ReportDataWithPolicy(nonce, sent[0].KEMID, sent[0].PublicKey, "egress-dek", h) {
		t.Fatal("the evidence does not bind the policy hash")
	}
	mu.Unlock()
	// Without options: no member on the wire, the §2 REPORT_DATA.
	k, err = c.Release(context.Background(), "egress-dek")
	mu.Lock()
	if err != nil || len(sent) != 2 || sent[1].PolicySHA256 != "" || k.Evidence.PolicySHA256 != "" {
		t.Fatalf("Release without a policy: %v %+v", err, sent)
	}
	mu.Unlock()
	// A malformed hash never reaches the broker.
	for _, bad := range []string{"abc", strings.Repeat("x", 64), lower + "0"} {
		if _, err := c.ReleaseWith(context.Background(), "egress-dek", ReleaseOptions{PolicySHA256: bad}); !errors.Is(err, attest.ErrMalformedPolicyHash) {
			t.Errorf("%q: err = %v", bad, err)
		}
	}
	mu.Lock()
	if len(sent) != 2 {
		t.Fatalf("%d releases sent, want 2", len(sent))
	}
}

func TestRefusalIsTyped(t *testing.T) {
	srv, pool := fakeBroker(t, func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte) {
		w.WriteHeader(http.StatusForbidden)
		w.Write([]byte(`{"error":"measurement-not-allowed","detail":"anyOf[0]: measurement 00 is not one of the 1 allowed"}`))
	})
	c := New(srv.URL, pool, fakeAttester{})
	_, err := c.Release(context.Background(), "egress-dek")
	var r *attest.Refusal
	if !errors.Is(err, attest.CodeMeasurementNotAllowed) || !errors.As(err, &r) || r.Status != 403 || r.Detail == "" {
		t.Fatalf("err = %v", err)
	}
	_, err = c.Release(context.Background(), "missing")
	if !errors.Is(err, attest.CodeUnknownKey) {
		t.Fatalf("challenge refusal: %v", err)
	}
}

func TestBadResponses(t *testing.T) {
	for name, release := range map[string]func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte){
		"sealed to another info": func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte) {
			sealed, _ := attest.SealKey(req.KEMID, req.PublicKey, [64]byte{}, key)
			json.NewEncoder(w).Encode(attest.ReleaseResponse{KeyID: req.KeyID, Version: 1, Sealed: sealed})
		},
		"another key id": func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte) {
			json.NewEncoder(w).Encode(attest.ReleaseResponse{KeyID: "other", Version: 1, Sealed: sealFor(t, req, nonce)})
		},
		"short key": func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte) {
			rd := attest.ReportData(nonce, req.KEMID, req.PublicKey, req.KeyID)
			sealed, _ := attest.SealKey(req.KEMID, req.PublicKey, rd, key[:16])
			json.NewEncoder(w).Encode(attest.ReleaseResponse{KeyID: req.KeyID, Version: 1, Sealed: sealed})
		},
		"not json": func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte) {
			w.Write([]byte("<html>"))
		},
		"error without code": func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte) {
			w.WriteHeader(http.StatusBadGateway)
		},
		"redirect": func(w http.ResponseWriter, req attest.ReleaseRequest, nonce []byte) {
			w.Header().Set("Location", "https://127.0.0.1:1/elsewhere")
			w.WriteHeader(http.StatusTemporaryRedirect)
		},
	} {
		t.Run(name, func(t *testing.T) {
			srv, pool := fakeBroker(t, release)
			_, err := New(srv.URL, pool, fakeAttester{}).Release(context.Background(), "egress-dek")
			if !errors.Is(err, ErrBadResponse) {
				t.Fatalf("err = %v, want ErrBadResponse", err)
			}
		})
	}
}
