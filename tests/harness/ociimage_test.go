package harness

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"strings"
	"testing"
)

// The archive is a valid OCI image layout: every blob is stored under its
// digest, the index names the image for containerd, and the layer holds
// the files with their parents.
func TestOCIArchive(t *testing.T) {
	img := OCIImage{Ref: "localhost/cleanwall-test/x:1", Entrypoint: []string{"/bin/x"}, Files: []ImageFile{
		{Path: "bin/x", Mode: 0o755, Data: []byte("program")},
		{Path: "bin/y", Mode: 0o777, Link: "x"},
		{Path: "tmp", Mode: 0o1777, Dir: true},
	}}
	var buf bytes.Buffer
	if err := img.WriteArchive(&buf); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	tr := tar.NewReader(&buf)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(tr)
		files[h.Name] = data
	}
	blob := func(digest string) []byte {
		t.Helper()
		data, ok := files["blobs/sha256/"+strings.TrimPrefix(digest, "sha256:")]
		if !ok {
			t.Fatalf("no blob %s", digest)
		}
		sum := sha256.Sum256(data)
		if "sha256:"+hex.EncodeToString(sum[:]) != digest {
			t.Fatalf("blob %s does not match its digest", digest)
		}
		return data
	}
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Fatalf("oci-layout: %q", files["oci-layout"])
	}
	var index struct {
		Manifests []ociDescriptor `json:"manifests"`
	}
	if err := json.Unmarshal(files["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("index.json: %v %s", err, files["index.json"])
	}
	m := index.Manifests[0]
	if m.Annotations[annotationContainerdName] != img.Ref || m.Annotations[annotationRefName] != "1" || m.MediaType != mediaTypeManifest {
		t.Fatalf("manifest descriptor: %+v", m)
	}
	var manifest struct {
		Config ociDescriptor   `json:"config"`
		Layers []ociDescriptor `json:"layers"`
	}
	if err := json.Unmarshal(blob(m.Digest), &manifest); err != nil || len(manifest.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	var config struct {
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
		Config struct {
			Entrypoint []string
		} `json:"config"`
	}
	if err := json.Unmarshal(blob(manifest.Config.Digest), &config); err != nil {
		t.Fatal(err)
	}
	if len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != manifest.Layers[0].Digest || config.Config.Entrypoint[0] != "/bin/x" {
		t.Fatalf("config: %+v", config)
	}
	layer := tar.NewReader(bytes.NewReader(blob(manifest.Layers[0].Digest)))
	var got []string
	for {
		h, err := layer.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, h.Name+"|"+string(h.Typeflag)+"|"+h.Linkname)
	}
	want := []string{"bin/|5|", "bin/x|0|", "bin/y|2|x", "tmp/|5|"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("layer entries %v, want %v", got, want)
	}
}

// A file without a path is refused, naming the image.
func TestOCIArchiveEmptyPath(t *testing.T) {
	err := OCIImage{Ref: "r", Files: []ImageFile{{Path: "/"}}}.WriteArchive(io.Discard)
	if err == nil || !strings.Contains(err.Error(), "image r: file with an empty path") {
		t.Fatalf("got %v", err)
	}
}
