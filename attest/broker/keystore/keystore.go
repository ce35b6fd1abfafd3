// Package keystore owns the key broker's keys at rest: every version of every
// key sealed under a master key with AES-256-GCM, the key id and version as
// associated data, one file per version, created atomically and never
// rewritten. It reads the master key file but never writes key bytes in the
// clear, and knows nothing of attestation or release policies.
//
// Layout: <dir>/<keyID>/v<version>.sealed, a JSON object
//
//	{"format":"cleanwall-keystore-v1","keyID":"egress-dek","version":3,
//	 "createdAt":"…","sealed":"<base64 nonce || ciphertext>"}
//
// The associated data is taken from the path, so a file copied or renamed
// to another key or version does not open.
package keystore

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Format names the on-disk format.
const Format = "cleanwall-keystore-v1"

// MasterKeySize and KeySize are in bytes.
const (
	MasterKeySize = 32
	KeySize       = 32
)

var (
	// ErrUnknownKey is returned for a key id with no version in the store.
	ErrUnknownKey = errors.New("unknown key")
	// ErrBadKeyID is returned for an id that cannot name a key.
	ErrBadKeyID = errors.New("invalid key id")
)

var keyIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidKeyID reports whether id can name a key: 1-128 of [A-Za-z0-9._-],
// starting with a letter or digit (it is a directory name).
func ValidKeyID(id string) bool { return keyIDPattern.MatchString(id) }

// Version is one version of a key.
type Version struct {
	KeyID     string
	Number    int
	Bytes     []byte
	CreatedAt time.Time
}

// Store is an open key store. It is safe for concurrent use.
type Store struct {
	dir  string
	aead cipher.AEAD
	now  func() time.Time

	mu   sync.RWMutex
	keys map[string][]Version // ascending version
}

// LoadMasterKey reads a 32-byte master key file that only its owner may read.
func LoadMasterKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening master key: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("opening master key: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("master key %s has mode %v: group and others must have no access (chmod 600)", path, st.Mode().Perm())
	}
	key, err := io.ReadAll(io.LimitReader(f, MasterKeySize+1))
	if err != nil {
		return nil, fmt.Errorf("reading master key: %w", err)
	}
	if len(key) != MasterKeySize {
		return nil, fmt.Errorf("master key %s: want exactly %d bytes", path, MasterKeySize)
	}
	return key, nil
}

// CreateMasterKey writes a new random master key (mode 0600) at path,
// refusing to replace an existing file.
func CreateMasterKey(path string) error {
	key := make([]byte, MasterKeySize)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("generating master key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("creating master key: %w", err)
	}
	return writeNew(path, key)
}

// Open loads every key version in dir (created 0700 if missing), sealed
// under masterKey. Any file that does not open is an error: a store that
// cannot be read whole is not served from.
func Open(dir string, masterKey []byte) (*Store, error) {
	if len(masterKey) != MasterKeySize {
		return nil, fmt.Errorf("master key: %d bytes, want %d", len(masterKey), MasterKeySize)
	}
	block, err := aes.NewCipher(masterKey)
	if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating key store: %w", err)
	}
	s := &Store{dir: dir, aead: aead, now: time.Now}
	if err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload reads the store again, e.g. after `key create` in another process.
func (s *Store) Reload() error {
	keys := map[string][]Version{}
	ids, err := os.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("reading key store: %w", err)
	}
	for _, d := range ids {
		if !d.IsDir() || !ValidKeyID(d.Name()) {
			continue
		}
		files, err := os.ReadDir(filepath.Join(s.dir, d.Name()))
		if err != nil {
			return fmt.Errorf("reading key store: %w", err)
		}
		for _, f := range files {
			n, ok := versionOf(f.Name())
			if !ok {
				continue
			}
			v, err := s.load(d.Name(), n)
			if err != nil {
				return err
			}
			keys[d.Name()] = append(keys[d.Name()], v)
		}
		sort.Slice(keys[d.Name()], func(i, j int) bool { return keys[d.Name()][i].Number < keys[d.Name()][j].Number })
	}
	s.mu.Lock()
	s.keys = keys
	s.mu.Unlock()
	return nil
}

func versionOf(name string) (int, bool) {
	num, ok := strings.CutPrefix(name, "v")
	if !ok {
		return 0, false
	}
	num, ok = strings.CutSuffix(num, ".sealed")
	if !ok || num == "" || num[0] == '0' {
		return 0, false
	}
	n, err := strconv.Atoi(num)
	return n, err == nil && n > 0
}

type sealedFile struct {
	Format    string    `json:"format"`
	KeyID     string    `json:"keyID"`
	Version   int       `json:"version"`
	CreatedAt time.Time `json:"createdAt"`
	Sealed    []byte    `json:"sealed"`
}

func (s *Store) path(id string, version int) string {
	return filepath.Join(s.dir, id, fmt.Sprintf("v%d.sealed", version))
}

// associatedData binds a sealed key to its id and version.
func associatedData(id string, version int) []byte {
	ad := make([]byte, 0, len(Format)+1+4+len(id)+8)
	ad = append(ad, Format...)
	ad = append(ad, 0)
	ad = binary.BigEndian.AppendUint32(ad, uint32(len(id)))
	ad = append(ad, id...)
	return binary.BigEndian.AppendUint64(ad, uint64(version))
}

func (s *Store) load(id string, version int) (Version, error) {
	p := s.path(id, version)
	data, err := os.ReadFile(p)
	if err != nil {
		return Version{}, fmt.Errorf("reading key %s v%d: %w", id, version, err)
	}
	var f sealedFile
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return Version{}, fmt.Errorf("key file %s: %w", p, err)
	}
	if f.Format != Format || f.KeyID != id || f.Version != version {
		return Version{}, fmt.Errorf("key file %s claims %s %q v%d", p, f.Format, f.KeyID, f.Version)
	}
	ns := s.aead.NonceSize()
	if len(f.Sealed) < ns {
		return Version{}, fmt.Errorf("key file %s: sealed key too short", p)
	}
	key, err := s.aead.Open(nil, f.Sealed[:ns], f.Sealed[ns:], associatedData(id, version))
	if err != nil {
		return Version{}, fmt.Errorf("key file %s does not open under the master key (wrong master key, or the file was altered or moved)", p)
	}
	if len(key) != KeySize {
		return Version{}, fmt.Errorf("key file %s: key of %d bytes", p, len(key))
	}
	return Version{KeyID: id, Number: version, Bytes: key, CreatedAt: f.CreatedAt}, nil
}

// Create makes a new random version of key id (version 1 for a new key) and
// returns its number.
func (s *Store) Create(id string) (int, error) {
	if !ValidKeyID(id) {
		return 0, fmt.Errorf("%w %q: 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit", ErrBadKeyID, id)
	}
	// Another process may have created versions since Open.
	if err := s.Reload(); err != nil {
		return 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	version := 1
	if vs := s.keys[id]; len(vs) > 0 {
		version = vs[len(vs)-1].Number + 1
	}
	key := make([]byte, KeySize)
	if _, err := rand.Read(key); err != nil {
		return 0, fmt.Errorf("generating key: %w", err)
	}
	nonce := make([]byte, s.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return 0, fmt.Errorf("generating key: %w", err)
	}
	created := s.now().UTC()
	data, err := json.Marshal(sealedFile{
		Format: Format, KeyID: id, Version: version, CreatedAt: created,
		Sealed: s.aead.Seal(nonce, nonce, key, associatedData(id, version)),
	})
	if err != nil {
		return 0, fmt.Errorf("encoding key: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(s.dir, id), 0o700); err != nil {
		return 0, fmt.Errorf("creating key directory: %w", err)
	}
	if err := writeNew(s.path(id, version), data); err != nil {
		return 0, err
	}
	s.keys[id] = append(s.keys[id], Version{KeyID: id, Number: version, Bytes: key, CreatedAt: created})
	return version, nil
}

// Latest returns the newest version of key id.
func (s *Store) Latest(id string) (Version, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	vs := s.keys[id]
	if len(vs) == 0 {
		return Version{}, fmt.Errorf("%w %q", ErrUnknownKey, id)
	}
	return vs[len(vs)-1], nil
}

// IDs lists the keys that have at least one version.
func (s *Store) IDs() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	ids := make([]string, 0, len(s.keys))
	for id := range s.keys {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// writeNew writes data to a new file (0600) at path: a temporary file, fsync,
// then a hard link to path, which fails if path exists, so two concurrent
// creators can never overwrite each other's version.
func writeNew(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("writing %s: already exists (another process created it)", path)
		}
		return fmt.Errorf("writing %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	return nil
}
