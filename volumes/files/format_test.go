package files

import (
	"bytes"
	"crypto/rand"
	"strings"
	"testing"
)

func testKeys(t testing.TB) (*keys, ID) {
	var vid ID
	rand.Read(vid[:])
	k, err := deriveKeys(bytes.Repeat([]byte{7}, 32), vid)
	if err != nil {
		t.Fatal(err)
	}
	return k, vid
}

func TestNames(t *testing.T) {
	k, root := testKeys(t)
	var other ID
	other[0] = 1
	for _, name := range []string{"a", "report.pdf", strings.Repeat("x", maxShortName), strings.Repeat("é", 127)} {
		enc := k.encryptName(root, name)
		if enc != k.encryptName(root, name) {
			t.Fatal("not deterministic")
		}
		if enc == k.encryptName(other, name) {
			t.Fatal("same ciphertext in another directory")
		}
		got, err := k.decryptName(root, enc)
		if err != nil || got != name {
			t.Fatalf("round trip %q: %q %v", name, got, err)
		}
		if _, err := k.decryptName(other, enc); !IsAuth(err) {
			t.Fatalf("decrypted in another directory: %v", err)
		}
		st, long := k.storeName(root, name)
		if len(st) > 255 || (len(name) > maxShortName) != (long != "") {
			t.Fatalf("store name of %d bytes for a %d-byte name (long %v)", len(st), len(name), long != "")
		}
	}
	if st, _ := k.storeName(root, strings.Repeat("x", maxShortName)); len(st) > 255 {
		t.Fatalf("longest short name stored in %d bytes", len(st))
	}
	// A flipped bit anywhere fails.
	enc := []byte(k.encryptName(root, "hello"))
	for i := range enc {
		c := append([]byte(nil), enc...)
		c[i] ^= 1
		if _, err := k.decryptName(root, string(c)); err == nil {
			t.Fatalf("flip at %d decrypted", i)
		}
	}
}

func TestHeaderBinding(t *testing.T) {
	k, root := testKeys(t)
	h := header{FileID: ID{1, 2, 3}, Size: 12345, KeyVersion: 3, KeyID: "dek"}
	b := appendHeader(nil, h, root, "f", k)
	if len(b) != headerLen(3) {
		t.Fatalf("header is %d bytes", len(b))
	}
	got, err := parseHeader(b, root, "f", k)
	if err != nil || got != h {
		t.Fatalf("%+v %v", got, err)
	}
	if _, err := parseHeader(b, root, "g", k); !IsAuth(err) {
		t.Fatal("header accepted under another name")
	}
	if _, err := parseHeader(b, ID{9}, "f", k); !IsAuth(err) {
		t.Fatal("header accepted in another directory")
	}
	k2, _ := testKeys(t)
	if _, err := parseHeader(b, root, "f", k2); !IsAuth(err) {
		t.Fatal("header accepted under another volume's keys")
	}
	d := encodeDirID(ID{5}, root, "d", k)
	if id, err := parseDirID(d, root, "d", k); err != nil || id != (ID{5}) {
		t.Fatal(id, err)
	}
	if _, err := parseDirID(d, root, "e", k); !IsAuth(err) {
		t.Fatal("dir id accepted under another name")
	}
}

func TestBlocks(t *testing.T) {
	k, _ := testKeys(t)
	a, _ := k.fileAEAD(ID{1})
	plain := bytes.Repeat([]byte("p"), BlockSize)
	sealed := make([]byte, storeBlockSize)
	sealBlock(a, sealed, plain, make([]byte, nonceSize), ID{1}, 7)
	out := make([]byte, BlockSize)
	if err := openBlock(a, out, sealed, ID{1}, 7); err != nil || !bytes.Equal(out, plain) {
		t.Fatal(err)
	}
	if err := openBlock(a, out, sealed, ID{1}, 8); !IsAuth(err) {
		t.Fatal("block opened at another number")
	}
	b, _ := k.fileAEAD(ID{2})
	if err := openBlock(b, out, sealed, ID{2}, 7); !IsAuth(err) {
		t.Fatal("block opened in another file")
	}
}

func FuzzParseHeader(f *testing.F) {
	k, root := testKeys(f)
	f.Add(appendHeader(nil, header{FileID: ID{1}, Size: 10, KeyVersion: 1, KeyID: "k"}, root, "n", k), "n")
	f.Add([]byte("CWVF\x01"), "")
	f.Fuzz(func(t *testing.T, b []byte, name string) {
		h, err := parseHeader(b, root, name, k)
		if err != nil {
			return
		}
		// Whatever parses re-encodes to the same bytes.
		if again := appendHeader(nil, h, root, name, k); !bytes.Equal(again, b[:len(again)]) {
			t.Fatalf("header %x re-encodes as %x", b, again)
		}
	})
}

func FuzzDecryptName(f *testing.F) {
	k, root := testKeys(f)
	f.Add(k.encryptName(root, "hello"))
	f.Add("AAAAAAAAAAAAAAAAAAAAAAAA")
	f.Add("cw.long.x")
	f.Fuzz(func(t *testing.T, enc string) {
		name, err := k.decryptName(root, enc)
		if err != nil {
			return
		}
		if checkName(name) != nil || k.encryptName(root, name) != enc {
			t.Fatalf("%q decrypted to %q", enc, name)
		}
	})
}

func FuzzParseConfig(f *testing.F) {
	k, root := testKeys(f)
	f.Add(encodeConfig(config{VolumeID: root, KeyID: "k", KeyVersion: 1}, k))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := parseConfig(b)
		if err != nil {
			return
		}
		if len(c.KeyID) > maxKeyID {
			t.Fatal("key id too long")
		}
		verifyConfig(b, k)
	})
}

func FuzzParseDirID(f *testing.F) {
	k, root := testKeys(f)
	f.Add(encodeDirID(ID{3}, root, "d", k), "d")
	f.Fuzz(func(t *testing.T, b []byte, name string) {
		id, err := parseDirID(b, root, name, k)
		if err == nil && !bytes.Equal(encodeDirID(id, root, name, k), b) {
			t.Fatal("dir id re-encodes differently")
		}
	})
}
