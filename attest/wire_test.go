package attest

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

const validRelease = `{"session":"s1","keyID":"egress-dek","tee":"snp","evidence":"AAEC","kemID":32,"publicKey":"AwQF"}`

func TestDecodeReleaseRequest(t *testing.T) {
	req, err := DecodeReleaseRequest([]byte(validRelease))
	if err != nil {
		t.Fatal(err)
	}
	want := ReleaseRequest{Session: "s1", KeyID: "egress-dek", TEE: "snp", Evidence: []byte{0, 1, 2}, KEMID: 32, PublicKey: []byte{3, 4, 5}}
	if req.Session != want.Session || req.KeyID != want.KeyID || req.TEE != want.TEE || req.KEMID != want.KEMID ||
		!bytes.Equal(req.Evidence, want.Evidence) || !bytes.Equal(req.PublicKey, want.PublicKey) {
		t.Fatalf("decoded %+v, want %+v", req, want)
	}
	if _, err := DecodeReleaseRequest([]byte(strings.Replace(validRelease, `"kemID":32`, `"kemID":25722`, 1))); err != nil {
		t.Fatalf("kem 0x647a refused: %v", err)
	}
}

func TestDecodeReleaseRequestRefuses(t *testing.T) {
	for _, tc := range []struct {
		name, body, detail string
	}{
		{"unknown member", strings.Replace(validRelease, `}`, `,"extra":1}`, 1), `unknown member "extra"`},
		{"case-folded name", strings.Replace(validRelease, `"keyID"`, `"keyid"`, 1), `unknown member "keyid"`},
		{"duplicate", strings.Replace(validRelease, `}`, `,"tee":"snp"}`, 1), `duplicate member "tee"`},
		{"missing", strings.Replace(validRelease, `,"tee":"snp"`, ``, 1), `tee: required`},
		{"null", strings.Replace(validRelease, `"tee":"snp"`, `"tee":null`, 1), `tee: null`},
		{"empty", strings.Replace(validRelease, `"session":"s1"`, `"session":""`, 1), `session: empty`},
		{"trailing", validRelease + `{}`, `data after the JSON object`},
		{"array", `[]`, `not a JSON object`},
		{"not json", `hello`, `request body`},
		{"truncated", validRelease[:40], `request body`},
		{"bad base64", strings.Replace(validRelease, `"AAEC"`, `"A*EC"`, 1), `evidence`},
		{"unpadded base64", strings.Replace(validRelease, `"AwQF"`, `"AwQ"`, 1), `publicKey`},
		{"kem overflow", strings.Replace(validRelease, `"kemID":32`, `"kemID":65568`, 1), `kemID`},
		{"kem unsupported", strings.Replace(validRelease, `"kemID":32`, `"kemID":16`, 1), `kemID: 0x0010 not supported`},
		{"kem string", strings.Replace(validRelease, `"kemID":32`, `"kemID":"32"`, 1), `kemID`},
		{"long session", strings.Replace(validRelease, `"s1"`, `"`+strings.Repeat("s", MaxSessionBytes+1)+`"`, 1), `session: 129 bytes`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeReleaseRequest([]byte(tc.body))
			var r *Refusal
			if !errors.As(err, &r) || r.Code != CodeBadRequest {
				t.Fatalf("err = %v, want a bad-request refusal", err)
			}
			if !strings.Contains(r.Detail, tc.detail) {
				t.Fatalf("detail %q does not mention %q", r.Detail, tc.detail)
			}
		})
	}
}

func TestDecodeChallengeRequest(t *testing.T) {
	if req, err := DecodeChallengeRequest([]byte(` {"keyID": "egress-dek"} `)); err != nil || req.KeyID != "egress-dek" {
		t.Fatalf("DecodeChallengeRequest = %+v, %v", req, err)
	}
	for _, body := range []string{`{}`, `{"keyID":"a","x":1}`, `{"KeyID":"a"}`, `{"keyID":1}`} {
		if _, err := DecodeChallengeRequest([]byte(body)); !errors.Is(err, CodeBadRequest) {
			t.Errorf("%s: err = %v, want bad-request", body, err)
		}
	}
}

// FuzzReleaseRequest checks that the decoder never panics, refuses only with
// bad-request, and that what it accepts survives a round trip unchanged.
// Seeds are in testdata/fuzz/FuzzReleaseRequest.
func FuzzReleaseRequest(f *testing.F) {
	f.Add([]byte(validRelease))
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := DecodeReleaseRequest(data)
		if err != nil {
			if !errors.Is(err, CodeBadRequest) {
				t.Fatalf("refusal %v is not bad-request", err)
			}
			return
		}
		again, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		req2, err := DecodeReleaseRequest(again)
		if err != nil {
			t.Fatalf("re-encoded request refused: %v\n%s", err, again)
		}
		if req.Session != req2.Session || req.KeyID != req2.KeyID || req.TEE != req2.TEE || req.KEMID != req2.KEMID ||
			!bytes.Equal(req.Evidence, req2.Evidence) || !bytes.Equal(req.PublicKey, req2.PublicKey) {
			t.Fatalf("round trip changed the request: %+v != %+v", req, req2)
		}
	})
}
