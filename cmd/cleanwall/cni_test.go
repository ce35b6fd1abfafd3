package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/cleanwall/cleanwall/cni"
)

const ptpConflist = `{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "ptp", "ipMasq": true, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}`

const bridgeConf = `{"cniVersion": "0.4.0", "name": "containerd-net", "type": "bridge", "bridge": "cni0", "isGateway": true,
 "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}}`

type cniDirs struct{ bin, conf, plugin string }

func newCNIDirs(t *testing.T, files map[string]string) cniDirs {
	t.Helper()
	root := t.TempDir()
	d := cniDirs{bin: filepath.Join(root, "bin"), conf: filepath.Join(root, "net.d"), plugin: filepath.Join(root, "cleanwall-cni")}
	for _, dir := range []string{d.bin, d.conf} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(d.plugin, []byte("#!plugin binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(d.conf, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

func (d cniDirs) options() cniInstallOptions {
	return cniInstallOptions{plugin: d.plugin, binDir: d.bin, confDir: d.conf, name: defaultConflistName, socket: "/run/cleanwall/cleanwalld.sock"}
}

// ours loads the written conflist the way runtimes do (libcni) and returns
// its plugin types and cleanwall-cni's conf.
func (d cniDirs) ours(t *testing.T) (*libcni.NetworkConfigList, []string, map[string]any) {
	t.Helper()
	list, err := libcni.ConfListFromFile(filepath.Join(d.conf, defaultConflistName))
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	var last map[string]any
	for _, p := range list.Plugins {
		types = append(types, p.Network.Type)
		last = map[string]any{}
		if err := json.Unmarshal(p.Bytes, &last); err != nil {
			t.Fatal(err)
		}
	}
	return list, types, last
}

func TestCNIInstallChainsAfterPTP(t *testing.T) {
	d := newCNIDirs(t, map[string]string{"10-k8s.conflist": ptpConflist, "99-loopback.conf": `{"cniVersion":"1.0.0","name":"lo","type":"loopback"}`})
	res, err := cniInstall(d.options())
	if err != nil {
		t.Fatal(err)
	}
	if res.after != "ptp" || res.network != "k8s-pod-network" || res.primary != filepath.Join(d.conf, "10-k8s.conflist") {
		t.Fatalf("result %+v", res)
	}
	list, types, ours := d.ours(t)
	if list.Name != "k8s-pod-network" || list.CNIVersion != "1.0.0" || strings.Join(types, ",") != "ptp,portmap,cleanwall-cni" {
		t.Fatalf("conflist %s %s: %v", list.Name, list.CNIVersion, types)
	}
	if ours["socket"] != "/run/cleanwall/cleanwalld.sock" || ours["capabilities"].(map[string]any)[cni.PodAnnotationsCapability] != true {
		t.Fatalf("cleanwall-cni conf %v", ours)
	}
	// The plugin is installed executable; the node's file is untouched.
	st, err := os.Stat(filepath.Join(d.bin, "cleanwall-cni"))
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("plugin: %v %v", st, err)
	}
	if b, _ := os.ReadFile(filepath.Join(d.conf, "10-k8s.conflist")); string(b) != ptpConflist {
		t.Fatal("the node's conflist was modified")
	}
	// The runtime reads the first file: ours.
	files, _ := libcni.ConfFiles(d.conf, cniConfExtensions)
	if len(files) == 0 || filepath.Base(files[0]) != defaultConflistName {
		t.Fatalf("libcni's order: %v", files)
	}
	// Again (a restarted pod): the same result, no second cleanwall-cni.
	before, _ := os.ReadFile(filepath.Join(d.conf, defaultConflistName))
	if _, err := cniInstall(d.options()); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.ReadFile(filepath.Join(d.conf, defaultConflistName)); !bytes.Equal(before, after) {
		t.Fatalf("a second install changed the conflist:\n%s\n%s", before, after)
	}
	leftovers, _ := filepath.Glob(filepath.Join(d.conf, ".cleanwall-*"))
	if len(leftovers) != 0 {
		t.Fatalf("temporary files left: %v", leftovers)
	}
	if err := cniUninstallCmd([]string{"--conf-dir", d.conf}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(d.conf, defaultConflistName)); !os.IsNotExist(err) {
		t.Fatalf("uninstall left the conflist: %v", err)
	}
}

func TestCNIInstallMakesAListOfASingleConf(t *testing.T) {
	d := newCNIDirs(t, map[string]string{"10-containerd-net.conf": bridgeConf})
	res, err := cniInstall(d.options())
	if err != nil {
		t.Fatal(err)
	}
	list, types, _ := d.ours(t)
	if res.after != "bridge" || list.Name != "containerd-net" || list.CNIVersion != "0.4.0" || strings.Join(types, ",") != "bridge,cleanwall-cni" {
		t.Fatalf("%+v: %s %s %v", res, list.Name, list.CNIVersion, types)
	}
	var bridge map[string]any
	_ = json.Unmarshal(list.Plugins[0].Bytes, &bridge)
	if bridge["bridge"] != "cni0" || bridge["isGateway"] != true {
		t.Fatalf("bridge conf lost its fields: %v", bridge)
	}
}

func TestCNIInstallRefuses(t *testing.T) {
	for _, c := range []struct {
		name  string
		files map[string]string
		opt   func(*cniInstallOptions)
		want  string
	}{
		{"no network", nil, nil, "no CNI network configuration"},
		{"no ptp or bridge", map[string]string{"10-macvlan.conflist": `{"cniVersion":"1.0.0","name":"m","plugins":[{"type":"macvlan","master":"eth0"}]}`}, nil, "chains after ptp or bridge"},
		{"already chained", map[string]string{"10-x.conflist": `{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"ptp"},{"type":"cleanwall-cni"}]}`}, nil, "already chains cleanwall-cni"},
		{"old CNI version", map[string]string{"10-x.conf": `{"cniVersion":"0.2.0","name":"x","type":"bridge"}`}, nil, `cniVersion "0.2.0"`},
		{"not JSON", map[string]string{"10-x.conflist": `{`}, nil, "not JSON"},
		{"sorts after the node's", map[string]string{"00-aaa.conflist": ptpConflist}, func(o *cniInstallOptions) { o.name = "zz-cleanwall.conflist" }, "would not sort first"},
		{"bad name", map[string]string{"10-k8s.conflist": ptpConflist}, func(o *cniInstallOptions) { o.name = "../x.conflist" }, "--name"},
		{"relative socket", map[string]string{"10-k8s.conflist": ptpConflist}, func(o *cniInstallOptions) { o.socket = "cleanwalld.sock" }, "--socket"},
		{"bad timeout", map[string]string{"10-k8s.conflist": ptpConflist}, func(o *cniInstallOptions) { o.timeout = "soon" }, "--timeout"},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := newCNIDirs(t, c.files)
			o := d.options()
			if c.opt != nil {
				c.opt(&o)
			}
			_, err := cniInstall(o)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want %q", err, c.want)
			}
			// Nothing of ours is left for the runtime to read.
			files, _ := libcni.ConfFiles(d.conf, cniConfExtensions)
			for _, f := range files {
				if strings.Contains(f, "cleanwall") {
					t.Fatalf("%s written although the install failed", f)
				}
			}
		})
	}
}
