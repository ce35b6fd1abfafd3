package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/volumes/block"
)

const volumeBlockUsage = `Block volumes (--kind block; format: docs/volumes-block.md): SRC and DST
are plain disk images, STORE is the store's image file. seal sizes STORE as
SRC rounded up to 4 KiB: give that as the volume's sizeBytes; all-zero 4 KiB
sectors of SRC stay unwritten. open names the damaged sectors (the first 20
and a count).
`

// volumeBlockIO is the unit of copying (a multiple of block.SectorSize).
const volumeBlockIO = 1 << 20

func init() {
	volumeKinds["block"] = volumeKind{usage: volumeBlockUsage, seal: volumeBlockSeal, open: volumeBlockOpen}
}

// volumeBlockSeal encrypts a plain image into a new block store.
func volumeBlockSeal(args []string, stdout, stderr io.Writer) (err error) {
	raw, keyID, keyVersion, files, err := volumeKeyFlags("seal", args, true)
	if err != nil {
		return err
	}
	key := proxies.DataKey{ID: keyID, Version: keyVersion, Key: raw}
	srcPath, storePath := files[0], files[1]
	src, err := os.Open(srcPath)
	if err != nil {
		return err
	}
	defer src.Close()
	st, err := src.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() && st.Mode()&os.ModeDevice == 0 {
		return fail("volume seal: %s is neither a file nor a block device", srcPath)
	}
	size, err := src.Seek(0, io.SeekEnd)
	if err != nil {
		return err
	}
	if size == 0 {
		return fail("volume seal: %s is empty", srcPath)
	}
	size = (size + block.SectorSize - 1) / block.SectorSize * block.SectorSize
	if storePath, err = filepath.Abs(storePath); err != nil {
		return err
	}
	im, err := block.Create(storePath, key, size)
	if err != nil {
		return fmt.Errorf("volume seal: %w", err)
	}
	defer func() {
		if cerr := im.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(storePath)
		}
	}()
	buf := make([]byte, volumeBlockIO)
	var written int64
	for off := int64(0); off < size; off += volumeBlockIO {
		n, rerr := src.ReadAt(buf, off)
		if rerr != nil && !errors.Is(rerr, io.EOF) {
			return rerr
		}
		if n < len(buf) {
			// The last chunk: zero up to the sector boundary.
			clear(buf[n:])
			n = int(min(int64(len(buf)), size-off))
		}
		// Skip all-zero sectors (unwritten sectors read as zeros); write
		// each run of the others at once.
		for s := 0; s < n; {
			if blockIsZero(buf[s : s+block.SectorSize]) {
				s += block.SectorSize
				continue
			}
			e := s + block.SectorSize
			for e < n && !blockIsZero(buf[e:e+block.SectorSize]) {
				e += block.SectorSize
			}
			if _, err := im.WriteAt(buf[s:e], off+int64(s)); err != nil {
				return err
			}
			written += int64(e - s)
			s = e
		}
	}
	if err := im.Sync(); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "sealed %s into %s: sizeBytes %d, %d sectors written, key %s version %d\n",
		srcPath, storePath, size, written/block.SectorSize, key.ID, key.Version)
	return nil
}

// volumeBlockOpen decrypts a block store into a plain image.
func volumeBlockOpen(args []string, stdout, stderr io.Writer) (err error) {
	raw, _, _, files, err := volumeKeyFlags("open", args, false)
	if err != nil {
		return err
	}
	storePath, dstPath := files[0], files[1]
	if _, err := os.Lstat(dstPath); err == nil {
		return fail("volume open: %s exists: give a new file", dstPath)
	}
	// The key id and version come from the image's header; its MAC is
	// checked by Open with the key.
	f, err := os.Open(storePath)
	if err != nil {
		return err
	}
	hb := make([]byte, block.HeaderSize)
	_, err = io.ReadFull(f, hb)
	f.Close()
	if err != nil {
		return fmt.Errorf("volume open: %s: reading header: %w", storePath, err)
	}
	h, err := block.ParseHeader(hb)
	if err != nil {
		return fmt.Errorf("volume open: %s: %w", storePath, err)
	}
	key := proxies.DataKey{ID: h.KeyID, Version: int(h.KeyVersion), Key: raw}
	im, err := block.Open(storePath, key, true)
	if err != nil {
		return fmt.Errorf("volume open: %w", err)
	}
	defer im.Close()
	var damaged []int64
	tmp, err := os.CreateTemp(filepath.Dir(dstPath), "."+filepath.Base(dstPath)+".partial-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	buf := make([]byte, volumeBlockIO)
	for off := int64(0); off < im.Size(); off += volumeBlockIO {
		chunk := buf[:min(int64(len(buf)), im.Size()-off)]
		if _, rerr := im.ReadAt(chunk, off); rerr != nil {
			if !errors.Is(rerr, block.ErrDamaged) {
				return rerr
			}
			// Sector by sector, to name every damaged one.
			for s := 0; s < len(chunk); s += block.SectorSize {
				if _, serr := im.ReadAt(chunk[s:s+block.SectorSize], off+int64(s)); serr != nil {
					if !errors.Is(serr, block.ErrDamaged) {
						return serr
					}
					damaged = append(damaged, (off+int64(s))/block.SectorSize)
				}
			}
		}
		if len(damaged) > 0 {
			continue // keep checking, write nothing more
		}
		if blockIsZero(chunk) {
			continue // sparse
		}
		if _, err := tmp.WriteAt(chunk, off); err != nil {
			return err
		}
	}
	if len(damaged) > 0 {
		names := make([]string, 0, min(len(damaged), 20))
		for _, s := range damaged[:min(len(damaged), 20)] {
			names = append(names, fmt.Sprintf("%d (bytes %d-%d)", s, s*block.SectorSize, (s+1)*block.SectorSize-1))
		}
		more := ""
		if len(damaged) > 20 {
			more = fmt.Sprintf(" and %d more", len(damaged)-20)
		}
		return fmt.Errorf("volume open: %s: %d damaged sector(s): %s%s; %s not written", storePath, len(damaged), strings.Join(names, ", "), more, dstPath)
	}
	if err := tmp.Truncate(im.Size()); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	// Link, not rename: an existing DST is never replaced.
	if err := os.Link(tmp.Name(), dstPath); err != nil {
		return fmt.Errorf("volume open: %w", err)
	}
	os.Remove(tmp.Name())
	fmt.Fprintf(stdout, "opened %s into %s: %d bytes, key %s version %d, every sector verified\n", storePath, dstPath, im.Size(), key.ID, key.Version)
	return nil
}

func blockIsZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
