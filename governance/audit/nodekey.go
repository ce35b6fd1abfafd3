package audit

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// CheckpointLabel is the domain separation label of checkpoint signatures.
const CheckpointLabel = "cleanwall-audit-checkpoint-v1"

// CheckpointMessage is what a checkpoint signs:
//
//	"cleanwall-audit-checkpoint-v1" || 0x00
//	|| u64be(seq) || hash (32 bytes)
//	|| u32be(len(time)) || time
//	|| nodeKey (32 bytes)
//
// where seq and hash are those of the record before the checkpoint (the last
// record it covers), time is the checkpoint record's own time (RFC 3339 text,
// as in the record) and nodeKey the Ed25519 public key that signs.
func CheckpointMessage(seq uint64, hash, t string, nodeKey ed25519.PublicKey) ([]byte, error) {
	h, err := hex.DecodeString(hash)
	if err != nil || len(h) != 32 {
		return nil, fmt.Errorf("hash %q is not 64 hex characters", hash)
	}
	if len(nodeKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("node key of %d bytes, want %d", len(nodeKey), ed25519.PublicKeySize)
	}
	msg := make([]byte, 0, len(CheckpointLabel)+1+8+32+4+len(t)+32)
	msg = append(msg, CheckpointLabel...)
	msg = append(msg, 0)
	msg = binary.BigEndian.AppendUint64(msg, seq)
	msg = append(msg, h...)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(t)))
	msg = append(msg, t...)
	return append(msg, nodeKey...), nil
}

// checkCheckpoint checks a checkpoint record's fields and signature and
// returns the key that signed it.
func checkCheckpoint(rec *Record) (ed25519.PublicKey, error) {
	if len(rec.Fields) != 2 {
		return nil, fmt.Errorf("fields must be exactly nodeKey and signature, has %d", len(rec.Fields))
	}
	ks, _ := rec.Fields["nodeKey"].(string)
	ss, _ := rec.Fields["signature"].(string)
	key, err := ParseNodeKey(ks)
	if err != nil {
		return nil, fmt.Errorf("nodeKey: %v", err)
	}
	sig, err := base64.StdEncoding.Strict().DecodeString(ss)
	if err != nil || len(sig) != ed25519.SignatureSize {
		return nil, errors.New("signature: not a base64 Ed25519 signature")
	}
	if rec.Seq < 2 {
		return nil, errors.New("a checkpoint covers no record")
	}
	msg, err := CheckpointMessage(rec.Seq-1, rec.PrevHash, rec.Time, key)
	if err != nil {
		return nil, err
	}
	if !ed25519.Verify(key, msg, sig) {
		return nil, fmt.Errorf("signature invalid (node key %s): the records up to %d or the checkpoint were altered", ks, rec.Seq-1)
	}
	return key, nil
}

func encodeB64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// EncodeNodeKey is a node public key as records, the key broker and
// `cleanwall audit verify --node-key` write it: standard base64 of its 32
// bytes.
func EncodeNodeKey(k ed25519.PublicKey) string { return encodeB64(k) }

// ParseNodeKey decodes EncodeNodeKey's text (base64 of 32 bytes, or 64 hex
// characters).
func ParseNodeKey(s string) (ed25519.PublicKey, error) {
	s = strings.TrimSpace(s)
	if len(s) == 2*ed25519.PublicKeySize {
		if b, err := hex.DecodeString(s); err == nil {
			return ed25519.PublicKey(b), nil
		}
	}
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%q is not base64", s)
	}
	if len(b) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("%d bytes, an Ed25519 public key has %d", len(b), ed25519.PublicKeySize)
	}
	return ed25519.PublicKey(b), nil
}

const nodeKeyPEMType = "PRIVATE KEY"

// LoadOrCreateNodeKey reads the node's Ed25519 key from path (PKCS #8, PEM),
// or creates it there (0600, written to a temporary file, synced, renamed,
// the directory synced) when the file does not exist. created says which. A
// key file that group or others can read or write is refused: whoever reads
// it can sign checkpoints.
func LoadOrCreateNodeKey(path string) (key ed25519.PrivateKey, created bool, err error) {
	key, err = ReadNodeKey(path)
	if err == nil {
		return key, false, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, false, err
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, false, fmt.Errorf("generating node key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, false, fmt.Errorf("encoding node key: %w", err)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, false, fmt.Errorf("node key: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".node-key-*")
	if err != nil {
		return nil, false, fmt.Errorf("node key: %w", err)
	}
	defer os.Remove(tmp.Name())
	werr := pem.Encode(tmp, &pem.Block{Type: nodeKeyPEMType, Bytes: der})
	if werr == nil {
		werr = tmp.Chmod(0o600)
	}
	if werr == nil {
		werr = tmp.Sync()
	}
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return nil, false, fmt.Errorf("writing node key: %w", werr)
	}
	// Link, not rename: two daemons starting at once must not each keep a
	// key of their own.
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, os.ErrExist) {
			key, err = ReadNodeKey(path)
			return key, false, err
		}
		return nil, false, fmt.Errorf("writing node key: %w", err)
	}
	if err := syncDir(dir); err != nil {
		return nil, false, err
	}
	return priv, true, nil
}

// ReadNodeKey reads an existing node key file (see LoadOrCreateNodeKey).
func ReadNodeKey(path string) (ed25519.PrivateKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("node key: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("node key: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("node key %s: not a regular file", path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("node key %s: mode %04o lets group or others read it; chmod 600 it (or remove it to make a new key)", path, perm)
	}
	data, err := io.ReadAll(io.LimitReader(f, 16<<10))
	if err != nil {
		return nil, fmt.Errorf("node key %s: %w", path, err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != nodeKeyPEMType {
		return nil, fmt.Errorf("node key %s: not a PEM %q block", path, nodeKeyPEMType)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("node key %s: %w", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("node key %s: a %T, want an Ed25519 key", path, k)
	}
	return priv, nil
}
