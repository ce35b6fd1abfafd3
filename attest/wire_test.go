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

const policyHash = "e5a75ce4acc5b9b2601b9b07f87de1b174c2442e6aea8b4865babe687cd1c2bf"

func TestDecodeReleaseRequestPolicy(t *testing.T) {
	withPolicy := strings.Replace(validRelease, `}`, `,"policySHA256":"`+policyHash+`"}`, 1)
	req, err := DecodeReleaseRequest([]byte(withPolicy))
	if err != nil || req.PolicySHA256 != policyHash {
		t.Fatalf("DecodeReleaseRequest = %+v, %v", req, err)
	}
	h, err := req.PolicyHash()
	if err != nil || len(h) != PolicySHA256Size {
		t.Fatalf("PolicyHash = %x, %v", h, err)
	}
	rd, err := req.ReportData([]byte("nonce"))
	if err != nil || rd != ReportDataWithPolicy([]byte("nonce"), req.KEMID, req.PublicKey, req.KeyID, h) {
		t.Fatalf("ReportData = %x, %v", rd, err)
	}
	// Absent: no binding, the §2 layout.
	plain, err := DecodeReleaseRequest([]byte(validRelease))
	if err != nil || plain.PolicySHA256 != "" {
		t.Fatalf("without policySHA256: %+v, %v", plain, err)
	}
	if h, _ := plain.PolicyHash(); h != nil {
		t.Fatalf("PolicyHash of a request without one = %x", h)
	}
	if rd, _ := plain.ReportData([]byte("nonce")); rd != ReportData([]byte("nonce"), plain.KEMID, plain.PublicKey, plain.KeyID) {
		t.Fatal("a request without policySHA256 does not use the §2 REPORT_DATA")
	}
	// Absent stays absent on the wire.
	if b, _ := json.Marshal(plain); strings.Contains(string(b), "policySHA256") {
		t.Fatalf("encoded without a policy: %s", b)
	}
}

func TestDecodeReleaseRequestNodeKey(t *testing.T) {
	node := bytes.Repeat([]byte{9}, NodeKeySize)
	b64 := "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk="
	withKey := strings.Replace(validRelease, `}`, `,"nodeKey":"`+b64+`","policySHA256":"`+policyHash+`"}`, 1)
	req, err := DecodeReleaseRequest([]byte(withKey))
	if err != nil || !bytes.Equal(req.NodeKey, node) {
		t.Fatalf("DecodeReleaseRequest = %+v, %v", req, err)
	}
	h, _ := req.PolicyHash()
	if rd, err := req.ReportData([]byte("nonce")); err != nil || rd != ReportDataBound([]byte("nonce"), req.KEMID, req.PublicKey, req.KeyID, h, node) {
		t.Fatalf("ReportData = %x, %v", rd, err)
	}
	// Absent stays absent on the wire, and out of REPORT_DATA.
	plain, _ := DecodeReleaseRequest([]byte(validRelease))
	if b, _ := json.Marshal(plain); plain.NodeKey != nil || strings.Contains(string(b), "nodeKey") {
		t.Fatalf("encoded without a node key: %s", b)
	}
	for _, bad := range []string{`""`, `"AAAA"`, `"` + b64[:40] + `"`, `null`, `5`} {
		_, err := DecodeReleaseRequest([]byte(strings.Replace(validRelease, `}`, `,"nodeKey":`+bad+`}`, 1)))
		if !errors.Is(err, CodeBadRequest) || !strings.Contains(err.Error(), "nodeKey") {
			t.Errorf("nodeKey %s: err = %v, want a bad-request naming nodeKey", bad, err)
		}
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
		{"empty policy", strings.Replace(validRelease, `}`, `,"policySHA256":""}`, 1), `policySHA256: malformed egress policy hash: 0 characters`},
		{"short policy", strings.Replace(validRelease, `}`, `,"policySHA256":"`+policyHash[:63]+`"}`, 1), `policySHA256: malformed`},
		{"non-hex policy", strings.Replace(validRelease, `}`, `,"policySHA256":"`+strings.Repeat("g", 64)+`"}`, 1), `policySHA256: malformed egress policy hash: not hex`},
		{"null policy", strings.Replace(validRelease, `}`, `,"policySHA256":null}`, 1), `policySHA256: null`},
		{"policy as bytes", strings.Replace(validRelease, `}`, `,"policySHA256":["e5"]}`, 1), `policySHA256`},
		{"duplicate policy", strings.Replace(validRelease, `}`, `,"policySHA256":"`+policyHash+`","policySHA256":"`+policyHash+`"}`, 1), `duplicate member "policySHA256"`},
		{"case-folded policy", strings.Replace(validRelease, `}`, `,"policysha256":"`+policyHash+`"}`, 1), `unknown member "policysha256"`},
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
	f.Add([]byte(strings.Replace(validRelease, `}`, `,"policySHA256":"`+policyHash+`"}`, 1)))
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
			!bytes.Equal(req.Evidence, req2.Evidence) || !bytes.Equal(req.PublicKey, req2.PublicKey) ||
			req.PolicySHA256 != req2.PolicySHA256 || !bytes.Equal(req.NodeKey, req2.NodeKey) {
			t.Fatalf("round trip changed the request: %+v != %+v", req, req2)
		}
		// What the decoder accepts binds into REPORT_DATA: the hash is
		// either absent (the §2 layout) or exactly 32 bytes.
		h, err := req.PolicyHash()
		if err != nil || (req.PolicySHA256 == "") != (h == nil) || (h != nil && len(h) != PolicySHA256Size) {
			t.Fatalf("accepted policySHA256 %q decodes to %x, %v", req.PolicySHA256, h, err)
		}
	})
}
