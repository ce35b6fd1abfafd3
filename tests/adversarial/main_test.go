// Package adversarial attacks a sandbox's enforcement the way a security
// reviewer does from inside sandboxes on a node running cleanwalld: one
// named test per attack, frames crafted with gopacket where the attack is
// at the packet level. Each asserts that nothing reached the remote side
// (or a node service, or another sandbox) and that the attempt was counted
// where cleanwall counts it. docs/security.md lists every case.
package adversarial

import (
	"testing"

	"github.com/cleanwall/cleanwall/tests/harness"
)

func TestMain(m *testing.M) { harness.Main(m) }

// policyOpen allows TCP 8080 to the remote server, open mode.
const policyOpen = `apiVersion: cleanwall.dev/v1
kind: EgressPolicy
metadata: {name: adversarial}
spec:
  egress:
    - name: results-api
      to: [{cidr: 198.51.100.10/32}]
      ports: [{port: 8080}]
      mode: open
`
