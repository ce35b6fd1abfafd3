// Package volumes serves a policy's spec.volumes: encrypted data stores
// that the sandbox sees as a directory of files (kind files) or as a block
// device (kind block), while the store on the node only ever holds
// ciphertext. The formats are in docs/volumes.md.
//
// The kinds live in subpackages (volumes/files, volumes/block) that
// register an Opener here from their init functions; the runtime imports
// them for that effect and mounts a policy's volumes through Open after
// the volume's key is released and before the sandbox is admitted.
package volumes

import (
	"context"
	"fmt"
	"log/slog"
	"sort"
	"sync"

	"github.com/cleanwall/cleanwall/policy"
	"github.com/cleanwall/cleanwall/proxies"
)

// Request is one volume to serve.
type Request struct {
	// Volume is the policy's entry (kind, store, size, read-only, ...).
	Volume policy.Volume
	// Key is the data key the key broker released for Volume.KeyID.
	Key proxies.DataKey
	// Dir is an empty directory the kind may use, owned by this volume
	// until Close: the FUSE mountpoint of a files volume, or where a block
	// volume serves its decrypted image before attaching a loop device
	// to it. It is created by the caller; Close leaves it empty.
	Dir string
	// Logger may be nil.
	Logger *slog.Logger
}

// Mounted is a volume being served.
type Mounted interface {
	// HostPath is where the host sees the decrypted volume: the mounted
	// directory (files) or the loop device node, /dev/loopN (block).
	HostPath() string
	// Device is the block device's number (block only; ok false for
	// files), for making the device node inside a sandbox.
	Device() (major, minor uint32, ok bool)
	// Close unmounts and detaches; it is idempotent, and after it returns
	// nothing of the volume is served or attached.
	Close() error
}

// Opener serves one kind of volume. It returns only once the volume
// answers (the mount is ready, the loop device is attached); on error
// nothing of it remains.
type Opener func(ctx context.Context, r Request) (Mounted, error)

var (
	mu    sync.RWMutex
	kinds = map[string]Opener{}
)

// Register makes kind servable; it panics on a duplicate (a programming
// error, made at init).
func Register(kind string, o Opener) {
	mu.Lock()
	defer mu.Unlock()
	if _, dup := kinds[kind]; dup {
		panic("volumes: kind " + kind + " registered twice")
	}
	kinds[kind] = o
}

// Kinds lists the registered kinds, sorted.
func Kinds() []string {
	mu.RLock()
	defer mu.RUnlock()
	out := make([]string, 0, len(kinds))
	for k := range kinds {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Open serves r.Volume with the opener of its kind.
func Open(ctx context.Context, r Request) (Mounted, error) {
	mu.RLock()
	o := kinds[r.Volume.Kind]
	mu.RUnlock()
	if o == nil {
		return nil, fmt.Errorf("volume %s: kind %q is not served by this build (have %v)", r.Volume.Name, r.Volume.Kind, Kinds())
	}
	if len(r.Key.Key) != 32 {
		return nil, fmt.Errorf("volume %s: key %s is %d bytes, want 32", r.Volume.Name, r.Key.ID, len(r.Key.Key))
	}
	return o(ctx, r)
}
