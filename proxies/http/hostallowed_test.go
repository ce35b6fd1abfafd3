package httpproxy

import (
	"net/netip"
	"testing"
)

func TestHostAllowed(t *testing.T) {
	names := Flow{Dst: netip.MustParseAddrPort("198.51.100.10:80"), Hosts: []string{"blob.store.example.test"}}
	ips := Flow{Dst: netip.MustParseAddrPort("198.51.100.10:8080"), Hosts: []string{"198.51.100.10"}}
	for _, tc := range []struct {
		flow Flow
		host string
		want bool
	}{
		{names, "blob.store.example.test", true},
		{names, "BLOB.store.example.test:80", true},
		{names, "blob.store.example.test:8080", false},
		{names, "other.example.test", false},
		{names, "blob.store.example.test.", false},
		{names, "198.51.100.10", false},
		{names, "", false},
		{names, "blob.store.example.test:", false},
		{ips, "198.51.100.10:8080", true},
		{ips, "198.51.100.10", false},
		{ips, "[::ffff:198.51.100.10]:8080", false},
	} {
		if got := HostAllowed(tc.flow, tc.host); got != tc.want {
			t.Errorf("HostAllowed(%v, %q) = %v, want %v", tc.flow.Hosts, tc.host, got, tc.want)
		}
	}
}
