package files

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// SealTree encrypts the plain tree src (directories and regular files;
// anything else is refused) into a new volume at store, which must not
// exist or be empty, sealed under key. Modes and modification times are
// kept. On error the store is left partial: remove it.
func SealTree(src, store string, key Key) error {
	if st, err := os.Stat(src); err != nil {
		return err
	} else if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", src)
	}
	if _, err := os.Stat(filepath.Join(store, configName)); err == nil {
		return fmt.Errorf("store %s already holds a volume: seal into a new or empty directory", store)
	}
	s, err := OpenStore(store, key, true)
	if err != nil {
		return err
	}
	return s.sealDir(src, s.root, s.RootID())
}

func (s *Store) sealDir(src, dirPath string, dirID ID) error {
	des, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, de := range des {
		name := de.Name()
		p := filepath.Join(src, name)
		info, err := os.Lstat(p)
		if err != nil {
			return err
		}
		if err := checkName(name); err != nil {
			return fmt.Errorf("%s: %v", p, err)
		}
		switch {
		case info.IsDir():
			id, sp, err := s.Mkdir(dirPath, dirID, name, uint32(info.Mode().Perm()), -1, -1)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			if err := s.sealDir(p, sp, id); err != nil {
				return err
			}
			os.Chtimes(sp, time.Time{}, info.ModTime())
		case info.Mode().IsRegular():
			if err := s.sealFile(p, dirPath, dirID, name, info); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
		default:
			return fmt.Errorf("%s: a %s; a files volume holds directories and regular files only", p, info.Mode().Type())
		}
	}
	return nil
}

func (s *Store) sealFile(p, dirPath string, dirID ID, name string, info fs.FileInfo) error {
	in, err := os.Open(p)
	if err != nil {
		return err
	}
	defer in.Close()
	f, sp, err := s.Create(dirPath, dirID, name, uint32(info.Mode().Perm()), -1, -1)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, maxWrite)
	var off int64
	for {
		n, rerr := io.ReadFull(in, buf)
		if n > 0 {
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				return err
			}
			off += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return rerr
		}
	}
	if err := f.Sync(); err != nil {
		return err
	}
	return os.Chtimes(sp, time.Time{}, info.ModTime())
}

// DamageError is OpenTree's refusal: the volume path (or store path, for
// an entry whose name does not authenticate) that is damaged, misplaced,
// foreign or sealed under another key.
type DamageError struct {
	Path      string // in the volume, "" if unknown
	StorePath string
	Err       error
}

func (e *DamageError) Error() string {
	if e.Path == "" {
		return fmt.Sprintf("store entry %s: %v", e.StorePath, e.Err)
	}
	return fmt.Sprintf("%s (store %s): %v", e.Path, e.StorePath, e.Err)
}

func (e *DamageError) Unwrap() error { return e.Err }

// OpenTree decrypts the volume at store into dst, which must not exist or
// be an empty directory, after checking every name, directory id, header
// and block. It writes into a temporary directory next to dst and renames
// it to dst only when the whole volume verified: on any damage it returns
// a *DamageError naming the file and dst is left as it was.
func OpenTree(store, dst string, key []byte) error {
	s, err := OpenStore(store, Key{Key: key}, false)
	if err != nil {
		return err
	}
	if st, err := os.Stat(dst); err == nil {
		if !st.IsDir() {
			return fmt.Errorf("%s exists and is not a directory", dst)
		}
		if empty, err := isEmptyDir(dst); err != nil || !empty {
			return fmt.Errorf("%s exists and is not empty", dst)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(filepath.Clean(dst)), "."+filepath.Base(dst)+".partial-*")
	if err != nil {
		return err
	}
	if err := s.openDir(s.root, s.RootID(), tmp, ""); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	os.Chmod(tmp, 0o755)
	os.Remove(dst) // the empty directory, if any
	if err := os.Rename(tmp, dst); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	return nil
}

func (s *Store) openDir(dirPath string, dirID ID, out, rel string) error {
	entries, bad, err := s.List(dirPath, dirID)
	if err != nil {
		return err
	}
	if len(bad) > 0 {
		return &DamageError{StorePath: filepath.Join(dirPath, bad[0]), Err: fmt.Errorf("name does not authenticate in its directory: %w", errAuth)}
	}
	for _, e := range entries {
		sp := filepath.Join(dirPath, e.Stored)
		op := filepath.Join(out, e.Name)
		r := filepath.Join(rel, e.Name)
		info, err := os.Lstat(sp)
		if err != nil {
			return err
		}
		if e.Dir {
			id, err := s.ReadDirID(sp, dirID, e.Name)
			if err != nil {
				return &DamageError{Path: r, StorePath: sp, Err: err}
			}
			if err := os.Mkdir(op, 0o700); err != nil {
				return err
			}
			if err := s.openDir(sp, id, op, r); err != nil {
				return err
			}
			os.Chmod(op, info.Mode().Perm())
			os.Chtimes(op, time.Time{}, info.ModTime())
			continue
		}
		if !info.Mode().IsRegular() {
			return &DamageError{Path: r, StorePath: sp, Err: fmt.Errorf("a %s in the store: %w", info.Mode().Type(), errAuth)}
		}
		if err := s.openFile(sp, dirID, e.Name, op, info); err != nil {
			var de *DamageError
			if errors.As(err, &de) || !IsAuth(err) {
				return err
			}
			return &DamageError{Path: r, StorePath: sp, Err: err}
		}
	}
	return nil
}

func (s *Store) openFile(sp string, dirID ID, name, op string, info fs.FileInfo) error {
	f, err := s.OpenFile(sp, dirID, name, true)
	if err != nil {
		return err
	}
	defer f.Close()
	out, err := os.OpenFile(op, os.O_WRONLY|os.O_CREATE|os.O_EXCL, info.Mode().Perm())
	if err != nil {
		return err
	}
	buf := make([]byte, maxWrite)
	size := f.Size()
	for off := int64(0); off < size; {
		n, err := f.ReadAt(buf, off)
		if err != nil {
			out.Close()
			return err
		}
		if _, err := out.Write(buf[:n]); err != nil {
			out.Close()
			return err
		}
		off += int64(n)
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chtimes(op, time.Time{}, info.ModTime())
}
