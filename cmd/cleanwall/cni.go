package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/cleanwall/cleanwall/cni"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// The install step of a node (deploy/kubernetes: the DaemonSet's init
// container): copy cleanwall-cni into the runtime's CNI binary directory and
// write a conflist that chains it after the node's own network (ptp or
// bridge), named to sort before that network's file so that the runtime
// (containerd, CRI-O: the lexically first configuration) uses it. The
// node's own file is never modified; uninstall removes ours and the runtime
// falls back to it.

const (
	defaultConflistName = "00-cleanwall.conflist"
	cniPluginName       = "cleanwall-cni"
)

// cniConfExtensions are the files libcni (and so containerd and CRI-O)
// reads from a configuration directory.
var cniConfExtensions = []string{".conf", ".conflist", ".json"}

// chainTypes are the plugins cleanwall-cni chains after (it needs the
// host-side veth they create, and a bridge's ports).
var chainTypes = []string{"ptp", "bridge"}

func cmdCNI(args []string) error {
	const usage = "usage: cleanwall cni install|uninstall [flags] (-h for the flags)"
	if len(args) == 0 {
		return fail(usage)
	}
	switch args[0] {
	case "install":
		return cniInstallCmd(args[1:])
	case "uninstall":
		return cniUninstallCmd(args[1:])
	}
	return fail(usage)
}

type cniInstallOptions struct {
	plugin, binDir, confDir, name, socket, timeout string
}

// flagSet prints its defaults on -h (the manifests' test reads them).
func cniFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		fs.SetOutput(os.Stderr)
		fmt.Fprintf(os.Stderr, "usage: %s [flags]\n", name)
		fs.PrintDefaults()
	}
	return fs
}

func cniInstallCmd(args []string) error {
	var o cniInstallOptions
	fs := cniFlagSet("cleanwall cni install")
	fs.StringVar(&o.plugin, "plugin", "/usr/local/bin/cleanwall-cni", "the cleanwall-cni binary to install")
	fs.StringVar(&o.binDir, "bin-dir", "/opt/cni/bin", "the runtime's CNI binary directory (the host's, as mounted)")
	fs.StringVar(&o.confDir, "conf-dir", "/etc/cni/net.d", "the runtime's CNI configuration directory (the host's, as mounted)")
	fs.StringVar(&o.name, "name", defaultConflistName, "file name of the chained conflist; it must sort before the node's own network configuration")
	fs.StringVar(&o.socket, "socket", api.DefaultSocket, "cleanwalld's socket, as the host sees it (the plugin runs on the host)")
	fs.StringVar(&o.timeout, "timeout", "", "the plugin's daemon call timeout (e.g. 60s; empty: the plugin's default)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return fail("cleanwall cni install: %v", err)
	}
	if fs.NArg() > 0 {
		return fail("cleanwall cni install: unexpected argument %q", fs.Arg(0))
	}
	res, err := cniInstall(o)
	if err != nil {
		return fmt.Errorf("cni install: %w", err)
	}
	fmt.Printf("installed %s; %s chains cleanwall-cni after %s (network %q, from %s)\n",
		filepath.Join(o.binDir, cniPluginName), res.conflist, res.after, res.network, res.primary)
	return nil
}

func cniUninstallCmd(args []string) error {
	fs := cniFlagSet("cleanwall cni uninstall")
	confDir := fs.String("conf-dir", "/etc/cni/net.d", "the runtime's CNI configuration directory")
	name := fs.String("name", defaultConflistName, "file name of the chained conflist")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return fail("cleanwall cni uninstall: %v", err)
	}
	if err := validConflistName(*name); err != nil {
		return err
	}
	path := filepath.Join(*confDir, *name)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cni uninstall: %w", err)
	}
	fmt.Printf("removed %s: new pods get the node's own network, unenforced\n", path)
	return nil
}

type cniInstallResult struct {
	conflist, primary, network, after string
}

func validConflistName(name string) error {
	if name == "" || strings.ContainsRune(name, '/') || name != filepath.Base(name) || !strings.HasSuffix(name, ".conflist") {
		return fmt.Errorf("--name %q: want a file name ending in .conflist", name)
	}
	return nil
}

// cniInstall copies the plugin and writes the chained conflist, each
// atomically (a temporary file renamed into place): a runtime never runs a
// half-written plugin or reads a half-written configuration.
func cniInstall(o cniInstallOptions) (cniInstallResult, error) {
	var res cniInstallResult
	if err := validConflistName(o.name); err != nil {
		return res, err
	}
	if !filepath.IsAbs(o.socket) {
		return res, fmt.Errorf("--socket %q: not an absolute path", o.socket)
	}
	if o.timeout != "" {
		if d, err := time.ParseDuration(o.timeout); err != nil || d <= 0 {
			return res, fmt.Errorf("--timeout %q: not a positive duration", o.timeout)
		}
	}
	primary, err := primaryConf(o.confDir, o.name)
	if err != nil {
		return res, err
	}
	data, err := os.ReadFile(primary)
	if err != nil {
		return res, err
	}
	list, after, err := chainConflist(data, o)
	if err != nil {
		return res, fmt.Errorf("%s: %w", primary, err)
	}
	src, err := os.ReadFile(o.plugin)
	if err != nil {
		return res, fmt.Errorf("--plugin: %w", err)
	}
	if err := writeAtomic(filepath.Join(o.binDir, cniPluginName), src, 0o755); err != nil {
		return res, err
	}
	out := filepath.Join(o.confDir, o.name)
	if err := writeAtomic(out, list, 0o644); err != nil {
		return res, err
	}
	// What the runtime will read: ours, first.
	files, err := confFiles(o.confDir)
	if err != nil {
		return res, err
	}
	if len(files) == 0 || files[0] != o.name {
		_ = os.Remove(out)
		return res, fmt.Errorf("%s would not sort first in %s (%s does): the runtime would not use it; choose a --name that sorts before it", o.name, o.confDir, files[0])
	}
	var net struct {
		Name string `json:"name"`
	}
	_ = json.Unmarshal(list, &net)
	return cniInstallResult{conflist: out, primary: primary, network: net.Name, after: after}, nil
}

// confFiles lists the configuration files of dir as libcni orders them.
func confFiles(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("--conf-dir: %w", err)
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() || !slices.Contains(cniConfExtensions, filepath.Ext(e.Name())) {
			continue
		}
		out = append(out, e.Name())
	}
	sort.Strings(out)
	return out, nil
}

// primaryConf is the node's own network configuration: the first file the
// runtime would read, ours left aside.
func primaryConf(dir, ours string) (string, error) {
	files, err := confFiles(dir)
	if err != nil {
		return "", err
	}
	for _, f := range files {
		if f != ours {
			return filepath.Join(dir, f), nil
		}
	}
	return "", fmt.Errorf("no CNI network configuration in %s to chain after (want a conflist with %s): install the node's network first", dir, strings.Join(chainTypes, " or "))
}

// chainConflist returns the node's network (a conflist, or a single
// plugin's conf made into one) with cleanwall-cni appended, and the type of
// the plugin it is chained after.
func chainConflist(data []byte, o cniInstallOptions) ([]byte, string, error) {
	var top map[string]any
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, "", fmt.Errorf("not JSON: %w", err)
	}
	version, _ := top["cniVersion"].(string)
	if version == "" {
		return nil, "", errors.New("no cniVersion")
	}
	if !slices.Contains(cni.SupportedVersions.SupportedVersions(), version) {
		return nil, "", fmt.Errorf("cniVersion %q: cleanwall-cni speaks %s", version, strings.Join(cni.SupportedVersions.SupportedVersions(), ", "))
	}
	name, _ := top["name"].(string)
	if name == "" {
		return nil, "", errors.New("no network name")
	}
	var plugins []any
	if raw, ok := top["plugins"]; ok {
		if plugins, ok = raw.([]any); !ok || len(plugins) == 0 {
			return nil, "", errors.New("plugins: not a non-empty list")
		}
	} else {
		// A single plugin's conf: the same network as a one-plugin list.
		conf := map[string]any{}
		for k, v := range top {
			if k != "cniVersion" && k != "name" && k != "cniVersions" {
				conf[k] = v
			}
		}
		plugins = []any{conf}
		top = map[string]any{"cniVersion": version, "name": name}
	}
	var types []string
	for i, p := range plugins {
		m, ok := p.(map[string]any)
		if !ok {
			return nil, "", fmt.Errorf("plugins[%d]: not an object", i)
		}
		t, _ := m["type"].(string)
		if t == cniPluginName {
			return nil, "", fmt.Errorf("plugins[%d]: already chains %s: remove it from the node's network (this installer chains it)", i, cniPluginName)
		}
		types = append(types, t)
	}
	after := ""
	for _, t := range types {
		if slices.Contains(chainTypes, t) {
			after = t
		}
	}
	if after == "" {
		return nil, "", fmt.Errorf("plugins are %s: cleanwall-cni chains after %s (it needs the host-side veth)", strings.Join(types, ", "), strings.Join(chainTypes, " or "))
	}
	ours := map[string]any{
		"type":   cniPluginName,
		"socket": o.socket,
		// The pod's annotation cleanwall.dev/policy names its policy.
		"capabilities": map[string]any{cni.PodAnnotationsCapability: true},
	}
	if o.timeout != "" {
		ours["timeout"] = o.timeout
	}
	top["plugins"] = append(plugins, ours)
	out, err := json.MarshalIndent(top, "", "  ")
	if err != nil {
		return nil, "", err
	}
	return append(out, '\n'), after, nil
}

func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".cleanwall-*.tmp")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
