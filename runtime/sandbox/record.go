package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cleanwall/cleanwall/bpf"
	"github.com/cleanwall/cleanwall/runtime/api"
)

// Record is a sandbox's persisted state: everything a restarted daemon
// needs to re-adopt it.
type Record struct {
	ContainerID   string         `json:"containerID"`
	IfName        string         `json:"ifName"`
	Netns         string         `json:"netns"`
	HostInterface string         `json:"hostInterface"`
	HostIfindex   int            `json:"hostIfindex"`
	Bridge        string         `json:"bridge,omitempty"`
	BridgeIfindex int            `json:"bridgeIfindex,omitempty"`
	DatapathID    uint32         `json:"datapathID"`
	Entry         StoredEntry    `json:"entry"`
	Attachment    bpf.Attachment `json:"attachment"`
	IPs           []api.IPConfig `json:"ips"`
	MAC           string         `json:"mac"`
	Policy        []byte         `json:"policy"`
	PolicyName    string         `json:"policyName"`
	PolicySource  string         `json:"policySource"`
	Generation    uint64         `json:"generation"`
	Created       time.Time      `json:"created"`
}

// StoredEntry is the datapath sandbox entry in a JSON-friendly form.
type StoredEntry struct {
	MAC                  string `json:"mac"`
	GatewayMAC           string `json:"gatewayMAC"`
	IPv4                 string `json:"ipv4,omitempty"`
	GatewayIPv4          string `json:"gatewayIPv4,omitempty"`
	IPv6                 string `json:"ipv6,omitempty"`
	IPv6LinkLocal        string `json:"ipv6LinkLocal,omitempty"`
	GatewayIPv6          string `json:"gatewayIPv6,omitempty"`
	GatewayIPv6LinkLocal string `json:"gatewayIPv6LinkLocal,omitempty"`
}

// Key is the record's attachment key.
func (r *Record) Key() string { return AttachmentKey(r.ContainerID, r.IfName) }

// AttachmentKey is an attachment's registry key: container ID/interface.
func AttachmentKey(containerID, ifName string) string { return containerID + "/" + ifName }

// stateFileName maps an attachment to a file name that cannot escape the
// state directory.
func stateFileName(containerID, ifName string) string {
	clean := func(s string) string {
		return strings.Map(func(r rune) rune {
			if r == '/' || r == 0 || r == '\\' {
				return '_'
			}
			return r
		}, s)
	}
	return clean(containerID) + "@" + clean(ifName) + ".json"
}

// Store keeps records as files under Dir/sandboxes, one per attachment.
type Store struct{ Dir string }

func (s Store) sandboxDir() string { return filepath.Join(s.Dir, "sandboxes") }

// Save writes a record atomically (temp file, fsync, rename, fsync dir).
func (s Store) Save(r *Record) error {
	dir := s.sandboxDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating state dir: %w", err)
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	final := filepath.Join(dir, stateFileName(r.ContainerID, r.IfName))
	tmp, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return fmt.Errorf("writing sandbox state: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("writing sandbox state: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("syncing sandbox state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("committing sandbox state: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// Remove deletes a sandbox's record; missing is fine.
func (s Store) Remove(containerID, ifName string) error {
	err := os.Remove(filepath.Join(s.sandboxDir(), stateFileName(containerID, ifName)))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing sandbox state: %w", err)
	}
	return nil
}

// Load reads every record; unreadable files are reported, not fatal.
func (s Store) Load() ([]*Record, []error) {
	entries, err := os.ReadDir(s.sandboxDir())
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, []error{err}
	}
	var out []*Record
	var errs []error
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(s.sandboxDir(), e.Name()))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var r Record
		if err := json.Unmarshal(data, &r); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", e.Name(), err))
			continue
		}
		out = append(out, &r)
	}
	return out, errs
}
