// Package e2e holds cleanwall's end-to-end tests: real namespaces, the real
// CNI chain (Debian's ptp/bridge + host-local, then cleanwall-cni through
// libcni), a real cleanwalld process, real clients and servers.
package e2e

import (
	"testing"

	"github.com/cleanwall/cleanwall/tests/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

// policyOpen allows TCP 8080 to the remote server, over IPv4 only.
const policyOpen = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata:
  name: e2e
spec:
  egress:
    - name: results-api
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
`

// policyV6 allows the remote's IPv6 address on 8080, open mode.
const policyV6 = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: v6}
spec:
  egress:
    - name: v6-results
      to: [{cidr: "2001:db8:100::/64"}]
      ports: [{port: 8080}]
      mode: open
`
