package keys

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/cleanwall/cleanwall/proxies"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// volumePolicy has a secure rule naming secureKey and a files volume and a
// block volume naming volKeys in order (spec.volumes[0], [1]).
func volumePolicy(secureKey string, volKeys ...string) string {
	doc := securePolicy("vols", secureKey) + "  volumes:\n"
	for i, id := range volKeys {
		if i%2 == 0 {
			doc += fmt.Sprintf("    - {name: vol-%d, kind: files, store: /srv/vol-%d, keyID: %s, path: /data/%d}\n", i, i, id, i)
		} else {
			doc += fmt.Sprintf("    - {name: vol-%d, kind: block, store: /srv/vol-%d.img, sizeBytes: 4096, keyID: %s, path: /dev/vol-%d}\n", i, i, id, i)
		}
	}
	return doc
}

// A volume's key is released with the policy's secure keys (each id once)
// and handed out as the volume's own copy.
func TestEnsureReleasesVolumeKeys(t *testing.T) {
	v := newEnv(t)
	c := compile(t, volumePolicy("k1", "vk", "k1"))
	if err := v.ring.Ensure(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	want := []call{{"k1", c.Hash}, {"vk", c.Hash}}
	if got := v.broker.received(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("releases %v, want %v", got, want)
	}
	dk, err := v.ring.VolumeKey(c, "vk")
	if err != nil {
		t.Fatal(err)
	}
	if dk.ID != "vk" || dk.Version != 1 || !bytes.Equal(dk.Key, keyBytes("vk", c.Hash, 1)) {
		t.Fatalf("volume key %+v", dk)
	}
	// The copy is the volume's: wiping the ring leaves it whole.
	v.ring.wipe()
	if !bytes.Equal(dk.Key, keyBytes("vk", c.Hash, 1)) {
		t.Fatal("wiping the ring zeroed a mounted volume's key")
	}
	if _, err := v.ring.VolumeKey(c, "vk"); !errors.Is(err, proxies.ErrNoKey) {
		t.Fatalf("VolumeKey after the wipe: %v", err)
	}
	var none *Ring
	if _, err := none.VolumeKey(c, "vk"); !errors.Is(err, proxies.ErrNoKey) {
		t.Fatalf("VolumeKey on a nil ring: %v", err)
	}
}

// A refused volume key fails admission naming spec.volumes[i].keyID, the
// volume and the broker's reason; without a broker, the flag to set.
func TestRefusedVolumeKey(t *testing.T) {
	v := newEnv(t)
	c := compile(t, volumePolicy("k1", "a-ok", "vk"))
	v.broker.refuse = func(id, _ string) error {
		if id == "vk" {
			return errors.New("key-not-allowed")
		}
		return nil
	}
	err := v.ring.Ensure(context.Background(), c)
	var ae *api.Error
	if !errors.As(err, &ae) {
		t.Fatalf("Ensure: %v", err)
	}
	for _, want := range []string{"spec.volumes[1].keyID", "vol-1", `"vk"`, "key-not-allowed"} {
		if !strings.Contains(ae.Message, want) {
			t.Errorf("refusal %q does not name %s", ae.Message, want)
		}
	}
	var none *Ring
	err = none.Ensure(context.Background(), compile(t, openOnly+"  volumes:\n    - {name: scratch, kind: files, store: /srv/s, keyID: vk, path: /data}\n"))
	if !errors.As(err, &ae) || !strings.Contains(ae.Message, "spec.volumes[0].keyID (scratch): volume scratch needs key \"vk\"") || !strings.Contains(ae.Message, "--keybroker") {
		t.Fatalf("nil ring: %v", err)
	}
}
