package attest

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

// The vectors were computed outside Go (Python hashlib) from the byte layout
// in docs/keybroker.md §2, so they pin the wire format, not this implementation.
func TestReportDataKnownAnswer(t *testing.T) {
	nonce := make([]byte, 32)
	for i := range nonce {
		nonce[i] = byte(i)
	}
	pub := bytes.Repeat([]byte{0xab}, 32)
	policy := make([]byte, 32)
	for i := range policy {
		policy[i] = byte(0x40 + i)
	}
	node := make([]byte, 32)
	for i := range node {
		node[i] = byte(0x60 + i)
	}
	for _, tc := range []struct {
		name  string
		nonce []byte
		kem   uint16
		pub   []byte
		keyID string
		// policy, when set, is a §5 egress policy hash.
		policy []byte
		// node, when set, is a §7 node key.
		node []byte
		want string
	}{
		{"x25519", nonce, KEMX25519, pub, "egress-dek", nil, nil,
			"81c5df67df6eb5af882242007336ce80b6a92551c42e2a384584f2535568fcb55887b803f4923f996bef320d5b3157b726866290be8e69ef906a3ab7786e804c"},
		{"empty fields", nil, KEMMLKEM768X25519, nil, "", nil, nil,
			"5951561d2fbcd8831c51c155e85a569c9551a244bb046c099d607263e77b36632e4bb741679ed99e796835c0b331e2d65b8e832ce4dc8010af36df9a1249a6c3"},
		// §5: the same input followed by u32be(32) || bytes 0x40..0x5f.
		{"egress policy", nonce, KEMX25519, pub, "egress-dek", policy, nil,
			"b24204c40ac3d84ec8bab2acf313de0216e31bf2f959ec8eacfb5ba4d50b9c139ca055f1db8fad299947b541f1873d6a7e61c30c5d89a7e769d0bbf3f2963c47"},
		// §7: the §2 input followed by u32be(18) || "cleanwall-node-key" ||
		// u32be(32) || bytes 0x60..0x7f.
		{"node key", nonce, KEMX25519, pub, "egress-dek", nil, node,
			"b9f78f22611715747a1e1c375040a123a0ace8cfa2ae4adf680595480daf5787c9393b54ff702d0f60d10578fd6af422ca4e83e7828d10b0c3a1c2fd4147aa99"},
		// Both: the policy element, then the node key element.
		{"egress policy and node key", nonce, KEMX25519, pub, "egress-dek", policy, node,
			"5da802bde5ef3f773c213e479dd8a036a2d2bc5211162977eef2348f3898871d0d5baa77e99554da0831179088461afa03684ca3a7231a9050ec0bba85e5c742"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := ReportDataBound(tc.nonce, tc.kem, tc.pub, tc.keyID, tc.policy, tc.node)
			if hex.EncodeToString(got[:]) != tc.want {
				t.Fatalf("ReportDataBound = %x, want %s", got, tc.want)
			}
			if tc.node == nil && ReportDataWithPolicy(tc.nonce, tc.kem, tc.pub, tc.keyID, tc.policy) != got {
				t.Fatal("ReportDataWithPolicy differs from ReportDataBound without a node key")
			}
			if tc.policy == nil && tc.node == nil && ReportData(tc.nonce, tc.kem, tc.pub, tc.keyID) != got {
				t.Fatal("ReportData differs from ReportDataWithPolicy without a policy")
			}
		})
	}
}

func TestReportDataBindsEveryInput(t *testing.T) {
	nonce := bytes.Repeat([]byte{1}, 32)
	pub := bytes.Repeat([]byte{2}, 32)
	base := ReportData(nonce, KEMX25519, pub, "k")
	variants := map[string][64]byte{
		"nonce": ReportData(bytes.Repeat([]byte{3}, 32), KEMX25519, pub, "k"),
		"kem":   ReportData(nonce, KEMMLKEM768X25519, pub, "k"),
		"pub":   ReportData(nonce, KEMX25519, bytes.Repeat([]byte{4}, 32), "k"),
		"keyID": ReportData(nonce, KEMX25519, pub, "k2"),
		// Length prefixes keep a byte moving from one field to the next from colliding.
		"shift": ReportData(nonce[:31], KEMX25519, append([]byte{1}, pub...), "k"),
		// A request bound to an egress policy never shares REPORT_DATA with
		// one that is not, nor with one bound to another policy.
		"policy":       ReportDataWithPolicy(nonce, KEMX25519, pub, "k", bytes.Repeat([]byte{5}, 32)),
		"other policy": ReportDataWithPolicy(nonce, KEMX25519, pub, "k", bytes.Repeat([]byte{6}, 32)),
		// Nor does a node key, and a node key is never read as a policy
		// hash of the same bytes.
		"node key":         ReportDataBound(nonce, KEMX25519, pub, "k", nil, bytes.Repeat([]byte{7}, 32)),
		"other node key":   ReportDataBound(nonce, KEMX25519, pub, "k", nil, bytes.Repeat([]byte{8}, 32)),
		"node key, policy": ReportDataBound(nonce, KEMX25519, pub, "k", bytes.Repeat([]byte{5}, 32), bytes.Repeat([]byte{7}, 32)),
	}
	if ReportDataBound(nonce, KEMX25519, pub, "k", nil, bytes.Repeat([]byte{5}, 32)) == variants["policy"] {
		t.Error("a node key and a policy hash of the same bytes give the same REPORT_DATA")
	}
	for name, v := range variants {
		if v == base {
			t.Errorf("changing %s did not change REPORT_DATA", name)
		}
	}
}

func TestSealOpenRoundTrip(t *testing.T) {
	for _, id := range []uint16{KEMX25519, KEMMLKEM768X25519} {
		kem, err := KEM(id)
		if err != nil {
			t.Fatal(err)
		}
		priv, err := kem.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		pub := priv.PublicKey().Bytes()
		rd := ReportData(bytes.Repeat([]byte{9}, 32), id, pub, "egress-dek")
		key := bytes.Repeat([]byte{0x5a}, KeySize)
		sealed, err := SealKey(id, pub, rd, key)
		if err != nil {
			t.Fatalf("kem 0x%04x: %v", id, err)
		}
		got, err := OpenKey(priv, rd, sealed)
		if err != nil || !bytes.Equal(got, key) {
			t.Fatalf("kem 0x%04x: OpenKey = %x, %v", id, got, err)
		}
		// Other report data (another nonce, key or public key) means another info: no key.
		other := rd
		other[0] ^= 1
		if _, err := OpenKey(priv, other, sealed); err == nil {
			t.Fatalf("kem 0x%04x: opened with different report data", id)
		}
		// Another private key cannot open it.
		stranger, _ := kem.GenerateKey()
		if _, err := OpenKey(stranger, rd, sealed); err == nil {
			t.Fatalf("kem 0x%04x: opened with a different private key", id)
		}
	}
	if _, err := KEM(0x0010); !errors.Is(err, ErrUnsupportedKEM) {
		t.Fatalf("KEM(P-256) = %v, want ErrUnsupportedKEM", err)
	}
}

func TestRefusalIsCode(t *testing.T) {
	var err error = Refuse(CodeNonceExpired, "nonce expired %s ago", "3s")
	if !errors.Is(err, CodeNonceExpired) || errors.Is(err, CodeNonceReplayed) {
		t.Fatalf("errors.Is on %v does not match its code only", err)
	}
	var r *Refusal
	if !errors.As(err, &r) || r.Code != CodeNonceExpired || r.Detail != "nonce expired 3s ago" {
		t.Fatalf("errors.As = %+v", r)
	}
	seen := map[Code]bool{}
	for _, c := range Codes {
		if seen[c] {
			t.Fatalf("duplicate code %s", c)
		}
		seen[c] = true
		if s := c.HTTPStatus(); s < 400 || s > 499 {
			t.Errorf("refusal %s has status %d, want 4xx", c, s)
		}
	}
	if len(Codes) != 19 {
		t.Fatalf("%d codes, docs/keybroker.md lists 18 in §3 and 1 in §5", len(Codes))
	}
}

func TestParsePolicySHA256(t *testing.T) {
	h := "e5a75ce4acc5b9b2601b9b07f87de1b174c2442e6aea8b4865babe687cd1c2bf"
	b, err := ParsePolicySHA256(h)
	if err != nil || hex.EncodeToString(b) != h {
		t.Fatalf("ParsePolicySHA256 = %x, %v", b, err)
	}
	if u, err := ParsePolicySHA256(strings.ToUpper(h)); err != nil || !bytes.Equal(u, b) {
		t.Fatalf("upper case: %x, %v", u, err)
	}
	for _, bad := range []string{"", h[:62], h + "00", "z" + h[1:], " " + h[1:], h[:63] + "\n"} {
		if _, err := ParsePolicySHA256(bad); !errors.Is(err, ErrMalformedPolicyHash) {
			t.Errorf("%q: err = %v, want ErrMalformedPolicyHash", bad, err)
		}
	}
}
