package policy

import (
	"os"
	"strings"
	"testing"
)

const volumesBase = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: vols}
spec:
`

func TestVolumesAndGovernance(t *testing.T) {
	p, err := Parse([]byte(volumesBase + `  volumes:
    - name: patients
      kind: files
      store: /srv/cleanroom/patients
      keyID: volume-dek
      readOnly: true
      path: /data/patients
    - name: scratch
      kind: block
      store: /srv/cleanroom/scratch.img
      sizeBytes: 1073741824
      keyID: volume-dek
      path: /dev/cleanwall-scratch
  governance:
    consent: required
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Spec.Volumes) != 2 || !p.Spec.Volumes[0].ReadOnly || p.Spec.Volumes[1].SizeBytes != 1<<30 {
		t.Fatalf("volumes: %+v", p.Spec.Volumes)
	}
	if !p.ConsentRequired() {
		t.Fatal("consent: required not read")
	}
	// consent: none is the default and hashes like its absence.
	a, err := Parse([]byte(volumesBase + "  governance:\n    consent: none\n"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Parse([]byte(volumesBase + "  egress: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	if a.ConsentRequired() || a.Hash() != b.Hash() {
		t.Fatalf("consent none: required=%v, hash differs=%v", a.ConsentRequired(), a.Hash() != b.Hash())
	}
}

func TestVolumesRefused(t *testing.T) {
	for _, c := range []struct{ yaml, path, msg string }{
		{"  volumes:\n    - {kind: files, store: /s, keyID: k, path: /d}\n", "spec.volumes[0].name", "required"},
		{"  volumes:\n    - {name: a, kind: disk, store: /s, keyID: k, path: /d}\n", "spec.volumes[0].kind", "files or block"},
		{"  volumes:\n    - {name: a, kind: files, store: rel, keyID: k, path: /d}\n", "spec.volumes[0].store", "absolute"},
		{"  volumes:\n    - {name: a, kind: files, store: /s/../t, keyID: k, path: /d}\n", "spec.volumes[0].store", "clean"},
		{"  volumes:\n    - {name: a, kind: files, store: /s, path: /d}\n", "spec.volumes[0].keyID", "required"},
		{"  volumes:\n    - {name: a, kind: files, store: /s, keyID: 'k k', path: /d}\n", "spec.volumes[0].keyID", "not a key id"},
		{"  volumes:\n    - {name: a, kind: files, store: /s, keyID: k}\n", "spec.volumes[0].path", "required"},
		{"  volumes:\n    - {name: a, kind: files, store: /s, keyID: k, path: /d, sizeBytes: 4096}\n", "spec.volumes[0].sizeBytes", "only for kind block"},
		{"  volumes:\n    - {name: a, kind: block, store: /s, keyID: k, path: /d}\n", "spec.volumes[0].sizeBytes", "required"},
		{"  volumes:\n    - {name: a, kind: block, store: /s, keyID: k, path: /d, sizeBytes: 4097}\n", "spec.volumes[0].sizeBytes", "multiple of 4096"},
		{"  volumes:\n    - {name: a, kind: files, store: /s, keyID: k, path: /d, readOnly: yes please}\n", "spec.volumes[0].readOnly", "true or false"},
		{"  volumes:\n    - {name: a, kind: files, store: /s, keyID: k, path: /d}\n    - {name: a, kind: files, store: /t, keyID: k, path: /e}\n", "spec.volumes[1].name", "duplicate"},
		{"  volumes:\n    - {name: a, kind: files, store: /s, keyID: k, path: /d}\n    - {name: b, kind: files, store: /t, keyID: k, path: /d}\n", "spec.volumes[1].path", "also the path"},
		{"  governance:\n    consent: maybe\n", "spec.governance.consent", "required or none"},
		{"  governance:\n    consnet: required\n", "spec.governance.consnet", ""},
	} {
		_, err := Parse([]byte(volumesBase + c.yaml))
		if err == nil {
			t.Errorf("%s: accepted", c.path)
			continue
		}
		if !strings.Contains(err.Error(), c.path) || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: error %q does not name %q with %q", c.path, err, c.path, c.msg)
		}
	}
}

// docs/policy.md's volumes example works exactly as written.
func TestPolicyMDVolumesExample(t *testing.T) {
	doc, err := os.ReadFile("../docs/policy.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(doc)
	i := strings.Index(s, "### Volumes")
	if i < 0 {
		t.Fatal("docs/policy.md has no Volumes section")
	}
	s = s[i:]
	start := strings.Index(s, "```yaml\n")
	end := strings.Index(s[start+8:], "```")
	if start < 0 || end < 0 {
		t.Fatal("no yaml example in the Volumes section")
	}
	example := s[start+8 : start+8+end]
	p, err := Parse([]byte(strings.Replace(volumesBase, "spec:\n", "", 1) + example))
	if err != nil {
		t.Fatalf("docs/policy.md's volumes example: %v", err)
	}
	if len(p.Spec.Volumes) != 2 || p.Spec.Volumes[1].Kind != VolumeBlock {
		t.Fatalf("volumes example read as %+v", p.Spec.Volumes)
	}
}
