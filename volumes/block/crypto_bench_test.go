package block

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"path/filepath"
	"testing"

	"golang.org/x/crypto/xts"
)

// BenchmarkSector compares the two candidate sector ciphers on one 4 KiB
// sector (docs/volumes-block.md, "Why AES-GCM"): AES-256-GCM as this
// package uses it (a random nonce per write) and AES-256-XTS as LUKS
// uses it (golang.org/x/crypto/xts, a 512-bit key, the sector number as
// the tweak).
func BenchmarkSector(b *testing.B) {
	key := make([]byte, 64)
	_, _ = rand.Read(key)
	pt := make([]byte, SectorSize)
	_, _ = rand.Read(pt)
	blk, _ := aes.NewCipher(key[:32])
	gcm, _ := cipher.NewGCM(blk)
	xc, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		b.Fatal(err)
	}
	nonce := make([]byte, nonceSize)
	sealed := gcm.Seal(nil, nonce, pt, aad(1, 1))
	out := make([]byte, SectorSize+tagSize)
	b.Run("gcm-seal", func(b *testing.B) {
		b.SetBytes(SectorSize)
		for b.Loop() {
			_, _ = rand.Read(nonce)
			gcm.Seal(out[:0], nonce, pt, aad(1, 1))
		}
	})
	b.Run("gcm-open", func(b *testing.B) {
		b.SetBytes(SectorSize)
		nonce := make([]byte, nonceSize)
		for b.Loop() {
			if _, err := gcm.Open(out[:0], nonce, sealed, aad(1, 1)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("xts-encrypt", func(b *testing.B) {
		b.SetBytes(SectorSize)
		for b.Loop() {
			xc.Encrypt(out[:SectorSize], pt, 1)
		}
	})
	b.Run("xts-decrypt", func(b *testing.B) {
		b.SetBytes(SectorSize)
		for b.Loop() {
			xc.Decrypt(out[:SectorSize], pt, 1)
		}
	})
}

// BenchmarkImage is the Image's own cost (crypto, tag table, pread/pwrite
// on the test's temporary directory) without FUSE or the loop device.
func BenchmarkImage(b *testing.B) {
	im, err := Create(filepath.Join(b.TempDir(), "b.img"), testKey("k", 1), 64<<20)
	if err != nil {
		b.Fatal(err)
	}
	defer im.Close()
	for _, size := range []int{SectorSize, 1 << 20} {
		buf := make([]byte, size)
		_, _ = rand.Read(buf)
		name := map[int]string{SectorSize: "4KiB", 1 << 20: "1MiB"}[size]
		b.Run("write-"+name, func(b *testing.B) {
			b.SetBytes(int64(size))
			off := int64(0)
			for b.Loop() {
				if _, err := im.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
				off = (off + int64(size)) % (64 << 20)
			}
		})
		b.Run("read-"+name, func(b *testing.B) {
			b.SetBytes(int64(size))
			off := int64(0)
			for b.Loop() {
				if _, err := im.ReadAt(buf, off); err != nil {
					b.Fatal(err)
				}
				off = (off + int64(size)) % (64 << 20)
			}
		})
	}
}
