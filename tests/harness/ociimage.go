package harness

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"path"
	"runtime"
	"sort"
	"strings"
	"time"
)

// OCIImage is a one-layer container image, written as an OCI image layout
// tar that `ctr images import` reads: no registry is needed.
type OCIImage struct {
	// Ref is the image's full reference, e.g. localhost/cleanwall-test/pause:1.
	Ref        string
	Files      []ImageFile
	Entrypoint []string
	Cmd        []string
	Env        []string
}

// ImageFile is one entry of the image's layer: a regular file (Data), a
// symbolic link (Link) or a directory (Dir).
type ImageFile struct {
	Path string // relative to the root, e.g. bin/busybox
	Mode int64  // permission bits
	Data []byte
	Link string
	Dir  bool
}

// OCI media types and annotations the archive uses.
const (
	mediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar"
	// containerd names an imported image after this annotation of the
	// index's manifest descriptor; the OCI ref name is the tag alone.
	annotationContainerdName = "io.containerd.image.name"
	annotationRefName        = "org.opencontainers.image.ref.name"
)

type ociDescriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *ociPlatform      `json:"platform,omitempty"`
}

type ociPlatform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

// blob is content addressed by its sha256.
type blob struct {
	data   []byte
	digest string
}

func newBlob(data []byte) blob {
	sum := sha256.Sum256(data)
	return blob{data: data, digest: "sha256:" + hex.EncodeToString(sum[:])}
}

func (b blob) descriptor(mediaType string) ociDescriptor {
	return ociDescriptor{MediaType: mediaType, Digest: b.digest, Size: int64(len(b.data))}
}

// layerTar is the image's single layer: an uncompressed tar of its files,
// parents first, every entry owned by root with a fixed time.
func (img OCIImage) layerTar() ([]byte, error) {
	files := append([]ImageFile(nil), img.Files...)
	sort.SliceStable(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(0, 0)
	dirs := map[string]bool{}
	var mkdirs func(dir string) error
	mkdirs = func(dir string) error {
		if dir == "." || dir == "" || dirs[dir] {
			return nil
		}
		if err := mkdirs(path.Dir(dir)); err != nil {
			return err
		}
		dirs[dir] = true
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX})
	}
	for _, f := range files {
		name := strings.TrimPrefix(path.Clean("/"+f.Path), "/")
		if name == "" {
			return nil, fmt.Errorf("image %s: file with an empty path", img.Ref)
		}
		if err := mkdirs(path.Dir(name)); err != nil {
			return nil, err
		}
		h := &tar.Header{Name: name, Mode: f.Mode, ModTime: mtime, Format: tar.FormatPAX}
		switch {
		case f.Dir:
			if dirs[name] {
				continue
			}
			dirs[name] = true
			h.Typeflag, h.Name = tar.TypeDir, name+"/"
		case f.Link != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, f.Link
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(f.Data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// WriteArchive writes the image as an OCI image layout tar (oci-layout,
// index.json, blobs/sha256/...) for the machine's architecture.
func (img OCIImage) WriteArchive(w io.Writer) error {
	layerData, err := img.layerTar()
	if err != nil {
		return err
	}
	layer := newBlob(layerData)
	env := img.Env
	if env == nil {
		env = []string{"PATH=/bin"}
	}
	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH, "os": "linux",
		"config": map[string]any{"Entrypoint": img.Entrypoint, "Cmd": img.Cmd, "Env": env, "WorkingDir": "/"},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{layer.digest}},
	})
	if err != nil {
		return err
	}
	configBlob := newBlob(config)
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": mediaTypeManifest,
		"config": configBlob.descriptor(mediaTypeConfig),
		"layers": []ociDescriptor{layer.descriptor(mediaTypeLayer)},
	})
	if err != nil {
		return err
	}
	manifestBlob := newBlob(manifest)
	desc := manifestBlob.descriptor(mediaTypeManifest)
	desc.Platform = &ociPlatform{Architecture: runtime.GOARCH, OS: "linux"}
	desc.Annotations = map[string]string{annotationContainerdName: img.Ref}
	if i := strings.LastIndex(img.Ref, ":"); i > strings.LastIndex(img.Ref, "/") {
		desc.Annotations[annotationRefName] = img.Ref[i+1:]
	}
	index, err := json.Marshal(map[string]any{"schemaVersion": 2, "mediaType": mediaTypeIndex, "manifests": []ociDescriptor{desc}})
	if err != nil {
		return err
	}

	tw := tar.NewWriter(w)
	mtime := time.Unix(0, 0)
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: mtime}); err != nil {
			return err
		}
	}
	entries := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
	}
	for _, b := range []blob{layer, configBlob, manifestBlob} {
		entries = append(entries, struct {
			name string
			data []byte
		}{"blobs/sha256/" + strings.TrimPrefix(b.digest, "sha256:"), b.data})
	}
	for _, e := range entries {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: e.name, Mode: 0o644, Size: int64(len(e.data)), ModTime: mtime}); err != nil {
			return err
		}
		if _, err := tw.Write(e.data); err != nil {
			return err
		}
	}
	return tw.Close()
}
