package broker_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"testing"

	"github.com/cleanwall/cleanwall/attest"
	"github.com/cleanwall/cleanwall/attest/broker"
	"github.com/cleanwall/cleanwall/attest/broker/client"
)

// TestNodeKeyBinding is docs/keybroker.md §7: a node key sent with a
// release is bound into the evidence, checked by the broker and named in
// the release record, so a verifier can tie the node's audit log to the
// attestation the key was released against.
func TestNodeKeyBinding(t *testing.T) {
	e := startBroker(t, envOptions{allowSimulated: true})
	a := newSim(t, nil)
	c := client.New(e.url, e.pool, a)
	nodeKey, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	policy := "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1"
	k, err := c.ReleaseWith(context.Background(), keyID, client.ReleaseOptions{NodeKey: nodeKey, PolicySHA256: policy})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k.Bytes, storedKey(t, e, keyID).Bytes) || !k.Evidence.NodeKey.Equal(nodeKey) {
		t.Fatalf("key %+v", k)
	}
	r := e.lastRecord(broker.KindRelease)
	if field(r, "decision") != "granted" || field(r, "nodeKey") != base64.StdEncoding.EncodeToString(nodeKey) || field(r, "policySHA256") != policy {
		t.Fatalf("release record %+v", r.Fields)
	}
	// The record's reportData is what the evidence bound: nonce, KEM,
	// public key, key id, policy and node key.
	if field(r, "reportData") != hex.EncodeToString(k.Evidence.ReportData[:]) {
		t.Fatalf("record reportData %s, evidence bound %x", field(r, "reportData"), k.Evidence.ReportData)
	}

	// Without a node key: the §2/§5 layout, and no nodeKey in the record.
	if _, err := c.Release(context.Background(), keyID); err != nil {
		t.Fatal(err)
	}
	if r := e.lastRecord(broker.KindRelease); field(r, "decision") != "granted" || r.Fields["nodeKey"] != nil {
		t.Fatalf("release without a node key: %+v", r.Fields)
	}

	// Evidence that bound another node key (or none) does not release to a
	// request naming this one.
	kem, _ := attest.KEM(attest.KEMX25519)
	priv, _ := kem.GenerateKey()
	pub := priv.PublicKey().Bytes()
	otherKey, _, _ := ed25519.GenerateKey(rand.Reader)
	for name, bound := range map[string][]byte{"another node key": otherKey, "no node key": nil} {
		ch := challenge(t, e, keyID)
		ev, err := a.Evidence(context.Background(), attest.ReportDataBound(ch.Nonce, attest.KEMX25519, pub, keyID, nil, bound))
		if err != nil {
			t.Fatal(err)
		}
		body := mustJSON(attest.ReleaseRequest{Session: ch.Session, KeyID: keyID, TEE: "snp", Evidence: ev, KEMID: attest.KEMX25519, PublicKey: pub, NodeKey: nodeKey})
		status, er := e.post("/v1/release", body, nil)
		t.Run(name, func(t *testing.T) {
			wantRefusal(t, e, status, er, attest.CodeReportDataMismatch, "does not bind")
			if r := e.lastRecord(broker.KindRelease); field(r, "nodeKey") != base64.StdEncoding.EncodeToString(nodeKey) {
				t.Fatalf("refusal record lacks the node key: %+v", r.Fields)
			}
		})
	}
	// Evidence bound to a node key, sent without it: refused too.
	ch := challenge(t, e, keyID)
	ev, _ := a.Evidence(context.Background(), attest.ReportDataBound(ch.Nonce, attest.KEMX25519, pub, keyID, nil, nodeKey))
	status, er := e.post("/v1/release", mustJSON(attest.ReleaseRequest{Session: ch.Session, KeyID: keyID, TEE: "snp", Evidence: ev, KEMID: attest.KEMX25519, PublicKey: pub}), nil)
	wantRefusal(t, e, status, er, attest.CodeReportDataMismatch, "does not bind")

	// A node key of the wrong size is a bad request, before anything is sent.
	if _, err := c.ReleaseWith(context.Background(), keyID, client.ReleaseOptions{NodeKey: nodeKey[:31]}); err == nil {
		t.Fatal("a 31-byte node key was sent")
	}
}
